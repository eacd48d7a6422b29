"""Checkpoints survive a kill -9 in the middle of a write: the file is the old one or the new one."""

import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from pose.checkpoint import load_checkpoint, load_model, save_atomic
from pose.models import arch_description, build_model

WRITER = textwrap.dedent(
    """
    import sys, torch
    from pose.checkpoint import save_atomic
    path = sys.argv[1]
    step = 0
    while True:  # ~16 MB per write so a kill often lands inside one
        step += 1
        save_atomic({"model": {"w": torch.full((4_000_000,), float(step))}, "arch": {}, "step": step}, path)
        print(step, flush=True)
    """
)


def test_kill_during_checkpoint_write_never_leaves_a_torn_file(tmp_path):
    path = tmp_path / "last.pt"
    for attempt in range(4):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one complete write
        time.sleep(0.05 + 0.07 * attempt)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        data = load_checkpoint(path)
        step = data["step"]
        assert torch.equal(data["model"]["w"], torch.full((4_000_000,), float(step))), attempt
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.pt"]
    # a kill can leave the temp file of the interrupted write; it is never the checkpoint itself
    assert all(name.startswith(".last.pt.") and name.endswith(".tmp") for name in leftovers)


def test_checkpoint_round_trip_and_bad_files(tmp_path):
    model = build_model("efficientpose-a", joints=17)
    save_atomic(
        {"model": model.state_dict(), "arch": arch_description("efficientpose-a"), "joints": 17}, tmp_path / "a.pt"
    )
    loaded, data = load_model(tmp_path / "a.pt")
    assert data["joints"] == 17
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key])
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pt"):
        load_checkpoint(tmp_path / "bad.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
