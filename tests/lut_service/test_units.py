"""The agent's parts without HTTP: storage, fingerprint, timing, LUT tables, client errors."""

from __future__ import annotations

import json

import pytest
import torch
from sqlalchemy import func, select

from lut_service import crud
from lut_service.client import AgentClient, AgentError, fetch_lut
from lut_service.db import init_db, make_engine, session_scope
from lut_service.fingerprint import device_id, fingerprint
from lut_service.lut import LutTable, document_summary, load_document, save_document
from lut_service.models import Measurement
from lut_service.plan import largest_activation, plan_entries
from lut_service.settings import Budget, Settings
from lut_service.timing import Timing, available_backends, measure, measure_module, timing_stats
from pose.ops import make_op
from pose.space import SMALL, TableSpec, arch_keys, overhead_key, table_keys

FAST = Budget(warmup_runs=1, warmup_s=0, min_samples=3, max_samples=10, max_seconds=0.01, min_sample_ms=0)
TINY = {"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 2]]}


def test_upsert_never_duplicates(tmp_path):
    sessions = init_db(make_engine(f"sqlite:///{tmp_path / 'db' / 'a.db'}"))
    info = {"cpu": "test"}
    for median in (1.0, 2.0, 3.0):
        with session_scope(sessions) as session:
            crud.ensure_device(session, device_id(info), info)
            crud.upsert_measurement(
                session,
                device_id=device_id(info),
                backend="torch-cpu",
                key="k",
                batch=1,
                dtype="float32",
                threads=1,
                timing=Timing(median, median * 0.9, median * 1.1, 0.1, 9),
                overhead_ms=0.5,
            )
    with session_scope(sessions) as session:
        assert session.scalar(select(func.count()).select_from(Measurement)) == 1
        row = session.scalar(select(Measurement))
        assert row.raw_median_ms == 3.0 and row.median_ms == 2.5 and row.overhead_ms == 0.5
    with session_scope(sessions) as session:  # another thread count is another row
        crud.upsert_measurement(
            session,
            device_id=device_id(info),
            backend="torch-cpu",
            key="k",
            batch=1,
            dtype="float32",
            threads=2,
            timing=Timing(1, 1, 1, 0, 3),
        )
        assert session.scalar(select(func.count()).select_from(Measurement)) == 2


def test_sqlite_uses_wal(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'w.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() > 0


def test_fingerprint_is_stable_and_sensitive():
    info = fingerprint()
    assert info["torch"] == torch.__version__ and info["logical_cpus"] >= 1 and info["onnxruntime"]
    assert device_id(dict(info)) == device_id(dict(info))
    assert device_id({**info, "torch": "0.0"}) != device_id(info)
    assert device_id({**info, "cpu": "other"}) != device_id(info)


def test_settings_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    monkeypatch.delenv("EFFPOSE_DB_URL", raising=False)
    monkeypatch.setenv("EFFPOSE_PROFILE_MAX_SECONDS", "0.5")
    settings = Settings.from_env()
    assert settings.db_url == f"sqlite:///{tmp_path / 'effpose' / 'agent.db'}"
    assert settings.budget.max_seconds == 0.5 and settings.host == "127.0.0.1"
    assert Settings.from_env(db_url="sqlite:///x.db", port=9).port == 9
    assert settings.budget.merged({"min_samples": 4, "junk": 1}).min_samples == 4
    monkeypatch.setenv("EFFPOSE_PROFILE_MIN_SAMPLES", "many")
    with pytest.raises(ValueError, match="EFFPOSE_PROFILE_MIN_SAMPLES"):
        Settings.from_env()


def test_plan_shares_identical_layers_and_builds_pose_ops():
    entries = plan_entries(TableSpec(SMALL))
    assert len(entries) == 51 and [e.key for e in entries] == table_keys(TableSpec(SMALL))
    assert [e.kind for e in entries[:3]] == ["stem", "head", "overhead"]
    layer = SMALL.layers()[0]
    first = next(e for e in entries if e.kind == "mbconv")
    assert first.input_shape == (1, layer.c_in, layer.in_h, layer.in_w) and first.stage == 0
    module = first.build()
    reference = make_op("k3e3", layer.c_in, layer.c_out, layer.stride)
    assert type(module) is type(reference)
    assert [p.shape for p in module.parameters()] == [p.shape for p in reference.parameters()]
    assert largest_activation(TableSpec(SMALL, batch=2)) == 2 * largest_activation(TableSpec(SMALL))


def test_measure_stops_at_target_or_cap():
    calls = []

    def steady(n: int) -> float:
        calls.append(n)
        return 1.0

    timing = measure(steady, Budget(warmup_runs=2, warmup_s=0, min_samples=5, max_samples=100, min_sample_ms=0))
    assert timing.samples == 5 and timing.median_ms == 1.0 and timing.iqr_ms == 0.0
    values = iter([1.0, 3.0] * 1000)
    noisy = measure(lambda n: next(values), Budget(warmup_runs=0, warmup_s=0, min_samples=3, max_samples=40))
    assert noisy.samples == 40 and noisy.rel_iqr > 0.5
    stats = timing_stats([1, 2, 3, 4, 5])
    assert stats.median_ms == 3 and stats.iqr_ms == 2 and stats.samples == 5


@pytest.mark.parametrize("backend", ["torch-cpu", "onnxruntime-cpu"])
def test_measure_module_cpu(backend, tmp_path):
    assert backend in available_backends()
    timing = measure_module(backend, make_op("k3e3", 8, 8, 1), (1, 8, 16, 16), 1, FAST, tmp_path)
    assert timing.samples >= 3 and timing.median_ms > 0 and timing.p10_ms <= timing.median_ms <= timing.p90_ms
    assert not list(tmp_path.iterdir())  # exported ONNX files are removed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["torch-cuda", "onnxruntime-cuda"])
def test_measure_module_cuda(backend, tmp_path):
    if backend not in available_backends():
        pytest.skip(f"{backend} unavailable here")
    timing = measure_module(backend, make_op("k5e6", 16, 24, 2), (4, 16, 32, 32), 1, FAST, tmp_path)
    assert timing.samples >= 3 and timing.median_ms > 0


def _fake_document() -> dict:
    spec = TableSpec(TINY, (64, 64))
    entries = plan_entries(spec)
    return {
        "id": "x" * 24,
        "device": {"id": "d", "cpu": "test cpu", "gpus": []},
        "backend": "torch-cpu",
        **spec.as_fields(),
        "overhead_key": overhead_key((64, 64)),
        "entries": [
            {"key": e.key, "median_ms": float(i + 1), "p10_ms": i + 0.9, "p90_ms": i + 1.1, "iqr_ms": 0.1, "samples": 9}
            for i, e in enumerate(entries)
        ],
    }


def test_lut_table_predicts_by_summing_arch_keys(tmp_path):
    from pose.space import ArchSpec

    doc = _fake_document()
    table = LutTable.from_document(doc)
    arch = ArchSpec(space=TINY, ops=["k5e6", "skip"])
    assert table.spec == TableSpec(TINY, (64, 64))
    keys = arch_keys(arch, TableSpec.for_arch(arch, input_hw=(64, 64)))
    assert len(keys) == 4  # stem, head, overhead, one op (skip is free)
    with pytest.raises(ValueError, match="does not match the table spec"):
        arch_keys(arch, TableSpec(TINY, (64, 64), head_widths=(32,)))
    assert table.predict(arch) == pytest.approx(sum(table.cost(k) for k in keys))
    assert table.cost(None) == 0.0 and table.missing(keys + [None]) == []
    assert table.missing(["nope"]) == ["nope"]
    with pytest.raises(KeyError, match="nope"):
        table.cost("nope")
    with pytest.raises(KeyError, match="lacks 1 keys"):  # another head: its key is not in this table
        table.predict(ArchSpec(space=TINY, ops=["k5e6", "skip"], head_widths=(32,)))
    path = save_document(doc, tmp_path / "lut.json")
    assert LutTable.load(path).costs == table.costs
    assert fetch_lut(path) == doc
    summary = document_summary(doc)
    assert summary["entries"] == 15 and summary["per_stage"]["stage 1"]["entries"] == 12


def test_load_document_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_document(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(ValueError, match="bad.json"):
        load_document(tmp_path / "bad.json")
    (tmp_path / "partial.json").write_text(json.dumps({"id": "x"}))
    with pytest.raises(ValueError, match="partial.json is not a valid LUT document"):
        load_document(tmp_path / "partial.json")


def test_client_unreachable_agent_names_the_url(tmp_path):
    from lut_service.local import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with AgentClient(url, retries=2, backoff_s=0.01, cache_dir=tmp_path) as client:
        with pytest.raises(AgentError, match=f"{url}/v1/health is unreachable after 3 attempts"):
            client.health()
        # With a cached table, an unreachable agent falls back to it with a warning.
        doc = _fake_document()
        client._store(doc, '"etag"')
        with pytest.warns(UserWarning, match="using the cached LUT"):
            assert client.get_lut(doc["id"]) == doc
        with pytest.raises(AgentError):
            client.get_lut(doc["id"], use_stale=False)
    with pytest.raises(ValueError, match="http"):
        AgentClient("localhost:8000")
    with pytest.raises(ValueError, match="/v1/luts/ID"):
        fetch_lut(f"{url}/v1/other")
