"""In-context LUT measurement (lut_service.context): key coverage and per-part timing on real backends."""

from __future__ import annotations

import pytest

from lut_service.context import context_lut, context_nets, make_part_runner, part_times
from lut_service.plan import plan_entries
from lut_service.settings import Budget
from lut_service.timing import tune_allocator
from pose.models import PoseNet
from pose.space import SMALL, TableSpec, get_space

FAST = Budget(warmup_runs=1, warmup_s=0, min_samples=3, max_samples=6, max_seconds=0.01, min_sample_ms=0)
TINY = get_space({"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 2], [24, 1, 2]]})


def test_uniform_networks_cover_every_layer_key():
    spec = TableSpec(SMALL, (256, 256), batch=8)
    nets = context_nets(spec)
    planned = {e.key for e in plan_entries(spec) if e.kind == "mbconv"}
    covered = {key for net in nets for part, key in net.parts.items() if part.startswith("layers.")}
    assert covered == planned
    assert all(set(net.arch.ops) == {net.op} for net in nets)


@pytest.mark.parametrize("backend", ["torch-cpu", "onnxruntime-cpu"])
def test_parts_are_attributed_to_stem_layers_and_head(backend, tmp_path):
    net = context_nets(TableSpec(TINY, (64, 64), head_widths=(16,)))[0]
    runner = make_part_runner(backend, PoseNet(net.arch, 16), (1, 3, 64, 64), 1, tmp_path, "auto")
    try:
        assert runner.run(2) > 0
        rounds = part_times(runner, 3)
    finally:
        runner.close()
    assert len(rounds) == 3
    expected = {"stem", "head"} | {f"layers.{layer.index}" for layer in TINY.layers((64, 64))}
    assert set(rounds[-1]) == expected and all(v > 0 for v in rounds[-1].values())


@pytest.mark.parametrize("backend", ["torch-cpu", "onnxruntime-cpu"])
def test_context_lut_times_every_non_overhead_key(backend, tmp_path):
    spec = TableSpec(TINY, (64, 64), head_widths=(16,))
    timings = context_lut(backend, spec, 0.0, FAST, tmp_path)
    planned = {e.key for e in plan_entries(spec) if e.kind != "overhead"}
    assert set(timings) == planned
    assert all(t.median_ms > 0 and t.samples >= 3 for t in timings.values())
    assert not list(tmp_path.iterdir())  # exported models and profiler files are removed


def test_tune_allocator_applies_on_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert tune_allocator() is True
