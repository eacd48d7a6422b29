"""Search cost (issue 6 item 3): time and peak memory of one search step, mixed vs sampled, against one
training step of a derived network at the same batch and input.

Every measurement runs in a fresh Python process (peak RSS is a per-process high-water mark, and torch's
allocator keeps freed memory, so two measurements in one process would contaminate each other). The
workers run round-robin in a shuffled order per round so machine drift hits every kind alike.

Kinds (``--worker KIND``):
    derived-train      one training step (SGD) of the derived network: efficientpose-a for the small space,
                       efficientpose-b for the large one (the published networks of those spaces)
    mixed-weights      one weight step of the supernet in mixed mode (Eq. 3 with drop-path)
    mixed-arch         one architecture step in mixed mode (all candidates, exact gradient to alpha)
    sampled-weights    one weight step in sampled mode (one path sampled from p)
    sampled-arch       one architecture step in sampled mode (one hard Gumbel path, straight-through)

A search batch is a weight step 80% of the time and an architecture step 20% of the time (the 80/20 split),
so ``step_ratio`` = (0.8 x weights + 0.2 x arch) / derived; ``mem_ratio`` = max(weights, arch) / derived,
with memory measured as the peak RSS increase over the process's RSS right before the first step (model,
optimizer state, gradients and activations, not the Python/torch runtime).

    python benchmarks/search_cost.py --quick     # smoke check, < 1 min -> results/quick/search_cost.json
    python benchmarks/search_cost.py             # full run -> results/search_cost.json

Target: sampled <= 1.5x time and <= 1.5x memory of the derived network's training step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

KINDS = ("derived-train", "mixed-weights", "mixed-arch", "sampled-weights", "sampled-arch")
TARGET = 1.5
SPLIT = (0.8, 0.2)  # share of weight / architecture batches in a search epoch


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(
    kind: str, space: str, batch: int, input_hw: tuple[int, int], steps: int, warmup: int, threads: int, seed: int
) -> dict:
    """Run ``warmup`` + ``steps`` steps of ``kind``; return the median step ms and the peak RSS increase.

    Warm-up steps are untimed (first calls create oneDNN primitives per conv shape; in sampled mode every
    candidate pays that once, which a real search amortises over thousands of steps) but count for memory.
    """
    import torch

    from pose.loss import heatmap_loss
    from pose.models import PRESETS, PoseNet
    from pose.space import TableSpec
    from search.cost import count_table
    from search.supernet import Supernet

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    joints = 16
    images = torch.randn(batch, 3, *input_hw)
    target = torch.rand(batch, joints, input_hw[0] // 4, input_hw[1] // 4)
    weight = torch.ones(batch, joints, 1)
    if kind == "derived-train":
        model = PoseNet(PRESETS["efficientpose-a" if space == "small" else "efficientpose-b"], joints)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            heatmap_loss(model(images), target, weight).backward()
            opt.step()

    else:
        mode, phase = kind.split("-")
        net = Supernet(space, joints, mode=mode)
        term_table = count_table("flops", TableSpec(net.space, input_hw, joints=joints))
        opt_w = torch.optim.SGD(net.weight_parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        opt_a = torch.optim.Adam(net.arch_parameters(), lr=3e-4)
        if phase == "arch":
            for p in net.weight_parameters():
                p.requires_grad_(False)

        def step() -> None:
            if phase == "weights":
                opt_w.zero_grad(set_to_none=True)
                heatmap_loss(net(images, "weights"), target, weight).backward()
                opt_w.step()
            else:
                opt_a.zero_grad(set_to_none=True)
                loss = heatmap_loss(net(images, "arch"), target, weight)
                loss = loss + 0.1 * torch.log(term_table.expected(net.probs())) / 2.302585
                loss.backward()
                opt_a.step()

    base = _rss_mib()
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    times.sort()
    return {"kind": kind, "step_ms": times[len(times) // 2], "steps_ms": times, "peak_mib": peak - base,
            "base_mib": base, "peak_total_mib": peak}  # fmt: skip


def run_worker(args: argparse.Namespace, kind: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--space", args.space, "--batch", str(args.batch),
           "--input", f"{args.input[0]}x{args.input[1]}", "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]  # fmt: skip
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"worker {kind} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small input and batch, one round (< 1 min)")
    parser.add_argument("--space", default="small", choices=("small", "large"))
    parser.add_argument("--batch", type=int, default=None, help="batch (default 8; quick 2)")
    parser.add_argument("--input", default=None, help="HxW (default 256x256; quick 128x128)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per process (default 4; quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="processes per kind, round-robin (default 2)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--worker", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.batch = args.batch or (2 if args.quick else 8)
    text = args.input or ("128x128" if args.quick else "256x256")
    args.input = tuple(int(v) for v in text.lower().split("x"))
    args.steps = args.steps or (3 if args.quick else 4)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.quick else 3)
    args.rounds = args.rounds or (1 if args.quick else 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(
            json.dumps(
                worker(args.worker, args.space, args.batch, args.input, args.steps, args.warmup, args.threads, 0)
            )
        )
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import format_table, machine_summary, write_results
    from tqdm import tqdm

    order = [kind for _ in range(args.rounds) for kind in KINDS]
    random.Random(0).shuffle(order)
    runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    for kind in tqdm(order, desc="search-cost workers", file=sys.stderr):
        runs[kind].append(run_worker(args, kind))

    def median(values: list[float]) -> float:
        values = sorted(values)
        n = len(values)
        return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2

    kinds = {
        k: {
            "step_ms": median([r["step_ms"] for r in v]),
            "peak_mib": median([r["peak_mib"] for r in v]),
            "peak_total_mib": median([r["peak_total_mib"] for r in v]),
            "runs": v,
        }
        for k, v in runs.items()
    }
    base = kinds["derived-train"]
    results: dict = {}
    for mode in ("mixed", "sampled"):
        w, a = kinds[f"{mode}-weights"], kinds[f"{mode}-arch"]
        step_ms = SPLIT[0] * w["step_ms"] + SPLIT[1] * a["step_ms"]
        peak = max(w["peak_mib"], a["peak_mib"])
        results[mode] = {
            "step_ratio": round(step_ms / base["step_ms"], 3),
            "mem_ratio": round(peak / base["peak_mib"], 3),
            "step_ms": round(step_ms, 2),
            "peak_mib": round(peak, 1),
            "weights_step_ms": round(w["step_ms"], 2),
            "arch_step_ms": round(a["step_ms"], 2),
            "weights_peak_mib": round(w["peak_mib"], 1),
            "arch_peak_mib": round(a["peak_mib"], 1),
            "meets_target": step_ms / base["step_ms"] <= TARGET and peak / base["peak_mib"] <= TARGET,
        }
    results["derived"] = {
        "arch": "efficientpose-a" if args.space == "small" else "efficientpose-b",
        "step_ms": round(base["step_ms"], 2),
        "peak_mib": round(base["peak_mib"], 1),
    }
    results["settings"] = {
        "space": args.space,
        "batch": args.batch,
        "input": list(args.input),
        "steps": args.steps,
        "warmup": args.warmup,
        "rounds": args.rounds,
        "threads": args.threads,
        "target": TARGET,
        "split": list(SPLIT),
    }
    results["kinds"] = kinds
    rows = [["derived-train (" + results["derived"]["arch"] + ")", base["step_ms"], base["peak_mib"], 1.0, 1.0]]
    for kind in KINDS[1:]:
        rows.append([kind, kinds[kind]["step_ms"], kinds[kind]["peak_mib"], kinds[kind]["step_ms"] / base["step_ms"],
                     kinds[kind]["peak_mib"] / base["peak_mib"]])  # fmt: skip
    for mode in ("mixed", "sampled"):
        r = results[mode]
        rows.append([f"{mode} search step (0.8w+0.2a)", r["step_ms"], r["peak_mib"], r["step_ratio"], r["mem_ratio"]])
    print(machine_summary())
    print(f"space {args.space}, batch {args.batch}, input {args.input[0]}x{args.input[1]}, {args.threads} thread(s), "
          f"{args.steps} steps x {args.rounds} process(es) per kind")  # fmt: skip
    print(format_table(["kind", "step ms", "peak MiB", "time x", "memory x"], rows))
    for mode in ("mixed", "sampled"):
        r = results[mode]
        verdict = "meets" if r["meets_target"] else "MISSES"
        print(f"{mode}: {r['step_ratio']:.2f}x time, {r['mem_ratio']:.2f}x memory ({verdict} the <= {TARGET}x target)")
    path = write_results("search_cost", results, quick=args.quick)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
