"""The search under torchrun (gloo, 2 processes on CPU) against the same search in one process.

Both see the same global batches: under torchrun each batch is cut into one slice per process, batch norm
statistics span the processes and the gradients are summed, so the two runs compute the same steps up to
float32 rounding. Rounding is then amplified by Adam, which moves alpha by about ``arch_lr`` per step
whatever the size of its gradient: alpha and the weights agree to the tolerances below, not bit for bit
(a run whose gradients or batch norm were not synchronised is off by far more).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import torch

from search.distributed import RankSlices
from search.loop import CHECKPOINT, LOG


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # never leave worker processes behind
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _relative(a: dict, b: dict, keys: list[str]) -> float:
    num = math.sqrt(sum(float((a[k] - b[k]).norm()) ** 2 for k in keys))
    return num / math.sqrt(sum(float(a[k].norm()) ** 2 for k in keys))


def test_rank_slices_cut_each_global_batch():
    batches = [[5, 1, 7, 3], [0, 2, 6, 4], [9, 8]]
    parts = [list(RankSlices(batches, rank, 2)) for rank in (0, 1)]
    assert parts == [[[5, 7], [0, 6], [9]], [[1, 3], [2, 4], [8]]]
    for k, batch in enumerate(batches):  # together the processes see exactly the 1-process batch
        assert sorted(parts[0][k] + parts[1][k]) == sorted(batch)


def test_two_processes_search_what_one_process_searches(tmp_path, tiny_space):
    space_file = tmp_path / "tiny.json"
    space_file.write_text(json.dumps(tiny_space))
    common = [
        "--space", str(space_file), "--data", "synthetic:10", "--cost", "flops", "--lambda", "0.5",
        "--mode", "sampled", "--warmup-epochs", "1", "--epochs", "2", "--batch-size", "4", "--input", "64x64",
        "--cost-input", "64x64", "--seed", "3", "--no-progress", "--threads", "1", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = _run([sys.executable, "-m", "search", *common, "--out", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    two = _run(
        [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "search", *common, "--out", str(tmp_path / "two")],
        env,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # only rank 0 printed and wrote: one summary, one log line per epoch
    assert len([line for line in two.stdout.splitlines() if line.startswith("{")]) == 1
    assert json.loads(two.stdout)["ops"] == json.loads(one.stdout)["ops"]
    logs = [[json.loads(x) for x in (tmp_path / d / LOG).read_text().splitlines()] for d in ("one", "two")]
    assert [r["epoch"] for r in logs[1]] == [1, 2, 3]
    for a, b in zip(*logs, strict=True):
        assert math.isclose(a["train_loss"], b["train_loss"], rel_tol=2e-3)
        assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=2e-3)

    a = torch.load(tmp_path / "one" / CHECKPOINT, weights_only=False)["supernet"]
    b = torch.load(tmp_path / "two" / CHECKPOINT, weights_only=False)["supernet"]
    assert a.keys() == b.keys()
    torch.testing.assert_close(b["alpha"], a["alpha"], rtol=0, atol=1e-2)  # alpha moves ~0.2 in these steps
    weights = [k for k in a if a[k].is_floating_point() and k != "alpha" and "running" not in k]
    stats = [k for k in a if "running" in k]
    assert _relative(a, b, weights) < 2e-3
    assert _relative(a, b, stats) < 1e-2
