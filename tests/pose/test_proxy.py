"""The accuracy proxy on tiny sizes, and the synthetic generator's difficulty levels."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from pose.data import build_datasets, parse_spec
from pose.data.synthetic import GENERATOR_VERSION, LEVELS, draw_image, generate_mpii, get_level, synthetic_root
from pose.evaluate import MPII_KEYS
from pose.models import build_model, zero_init_residuals
from pose.ops import MBConv
from pose.proxy import PROXY, QUICK_PROXY, Proxy, minimal_arch, train_and_score
from pose.space import SKIP, SMALL

# sha256 of three 96x96 standard-level images and their people (seed 0), taken before levels existed:
# the standard level must keep drawing exactly what it drew.
STANDARD_DIGEST = "0bd0a364d35188d0312bdb3bfc2a9b14bde33c4aa190a0400d4b96a501ef9d5d"


def _draw_digest(level: str) -> str:
    digest = hashlib.sha256()
    rng = np.random.default_rng(0)
    for _ in range(3):
        image, people = draw_image(rng, 96, level)
        digest.update(image.tobytes())
        for pts, labels, mask, _visible, _facing, head in people:
            digest.update(np.round(pts, 3).tobytes())
            digest.update(labels.tobytes())
            digest.update(mask.tobytes())
            digest.update(head.round(3).tobytes())
    return digest.hexdigest()


def test_standard_level_is_unchanged(tmp_path, monkeypatch):
    assert _draw_digest("standard") == STANDARD_DIGEST
    monkeypatch.setenv("EFFPOSE_CACHE_DIR", str(tmp_path))
    key = json.dumps({"v": GENERATOR_VERSION, "n": 2, "k": "mpii", "seed": 0, "size": 96})
    old_name = f"mpii-2-{hashlib.sha256(key.encode()).hexdigest()[:16]}"  # the cache folder of an existing spec
    assert synthetic_root(2, "mpii", size=96).name == old_name
    assert synthetic_root(2, "mpii", size=96, level="easy").name.startswith("mpii-easy-2-")


def test_easy_specs_parse():
    easy = parse_spec("synthetic-mpii-easy:8")
    assert (easy.kind, easy.images, easy.level, easy.synthetic) == ("mpii", 8, "easy", True)
    assert parse_spec("synthetic-easy").kind == "coco" and parse_spec("synthetic-easy").level == "easy"
    assert parse_spec("synthetic-coco-easy:3").images == 3
    assert parse_spec("synthetic-mpii:8").level == "standard"
    with pytest.raises(ValueError, match="synthetic-mpii-easy:"):
        parse_spec("synthetic-mpii-easy:x")
    with pytest.raises(ValueError, match="unknown synthetic difficulty level 'hard'"):
        get_level("hard")


def test_easy_level_draws_one_person_without_occluders(tmp_path):
    assert _draw_digest("easy") != STANDARD_DIGEST
    rng = np.random.default_rng(1)
    counts = [len(draw_image(rng, 96, "easy")[1]) for _ in range(6)]
    assert counts == [1] * 6
    assert not LEVELS["easy"].occluders and LEVELS["standard"].occluders
    root = generate_mpii(tmp_path / "m", 8, seed=2, size=96, level="easy")
    entries = json.loads((root / "annot" / "train.json").read_text())
    assert 0 < len(entries) <= 8 and len({e["image"] for e in entries}) == len(entries)


def test_easy_spec_builds_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFPOSE_CACHE_DIR", str(tmp_path))
    train, val = build_datasets("synthetic-mpii-easy:8", (64, 64))
    assert train.kind == "mpii" and len(train) > 0 and len(val) > 0
    image, target, _weight, _meta = train[0]
    assert image.shape == (3, 64, 64) and target.shape == (16, 16, 16)


def test_minimal_arch():
    arch = minimal_arch()
    assert arch.space == "small" and len(arch.ops) == SMALL.num_layers
    for op, layer in zip(arch.ops, SMALL.layers(), strict=True):
        assert op == ("k3e3" if layer.skip_reason() else SKIP)
    assert arch.ops.count("k3e3") == len(SMALL.stages)


def test_train_and_score_on_tiny_data(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFPOSE_CACHE_DIR", str(tmp_path / "cache"))
    proxy = Proxy(name="tiny", data="synthetic-mpii-easy:16", input_hw=(64, 64), epochs=2, batch_size=8, lr=1e-3)
    result = train_and_score(minimal_arch(), proxy, seed=0, out=tmp_path / "run")
    assert result["proxy"] == "tiny" and result["arch"] == "minimal-small" and result["seed"] == 0
    assert result["epochs"] == 2 and 0.0 <= result["Mean"] <= 100.0
    assert set(result["pckh"]) == set(MPII_KEYS) and result["pckh"]["Mean"] == result["Mean"]
    assert result["train_loss"] > 0 and result["cpu_seconds"] > 0
    for name in ("arch.json", "last.pt", "best.pt", "metrics.jsonl", "training.png"):
        assert (tmp_path / "run" / name).is_file(), name
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [1, 2] and "Mean" not in history[0]  # scored once, at the end
    again = train_and_score(minimal_arch(), proxy, seed=0, out=tmp_path / "again")
    assert again["Mean"] == result["Mean"]  # same proxy and seed: same score


def test_zero_init_residuals_starts_residual_blocks_as_identity():
    model = build_model("efficientpose-a")
    residual = [m for m in model.modules() if isinstance(m, MBConv) and m.use_residual]
    assert zero_init_residuals(model) == len(residual) > 0
    x = torch.randn(2, residual[0].block[0][0].in_channels, 8, 8)
    residual[0].eval()
    assert torch.equal(residual[0](x), x)
    assert zero_init_residuals(build_model(minimal_arch())) == 0  # no residual block: nothing changes


def test_presets_and_config():
    assert PROXY.data.startswith("synthetic-mpii") and QUICK_PROXY.epochs < PROXY.epochs
    cfg = PROXY.config("efficientpose-a", seed=3)
    assert (cfg.seed, cfg.epochs, cfg.eval_every, cfg.threads) == (3, PROXY.epochs, PROXY.epochs, 1)
    assert tuple(cfg.input_hw) == PROXY.input_hw and cfg.batch_size == PROXY.batch_size and cfg.lr == PROXY.lr
    assert cfg.zero_init_residual is PROXY.zero_init_residual is True
