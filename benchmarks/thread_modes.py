"""Does this machine hold one speed? One network timed at 1 and at N threads, block after block, for minutes.

The 2-thread cells of ``lut_fidelity.py`` missed by a steady 20-30 % while their rankings were right,
and the build's own guard said the machine was stable. This benchmark shows why, with nothing but one
ONNX Runtime session per thread count: blocks of back-to-back calls alternate between the thread
counts for ``--seconds``, and each block's median is kept with its time. On a machine with one speed
per thread count the block medians sit in one narrow band; on this virtual machine the 2-thread ones
jump between two bands (the two vCPUs on separate physical cores, or sharing one) while the 1-thread
ones do not move. A table timed in one band and used in the other is off by the ratio of the bands,
however carefully it was measured.

    python benchmarks/thread_modes.py               # efficientpose-a, 1 and 2 threads, 120 s
    python benchmarks/thread_modes.py --quick       # 15 s

Writes ``results/thread_modes.json`` and ``.png`` (``quick/`` for --quick).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import RESULTS_DIR, format_table, machine_summary, write_results

from lut_service.timing import ort_session, random_input
from pose.export import export_onnx
from pose.models import build_model


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="15 s instead of 120 s")
    parser.add_argument("--model", default="efficientpose-a")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts (default 1 2)")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--block-ms", type=float, default=400.0, help="length of one block of calls (default 400)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds = 15.0
    return args


def two_bands(values: list[float]) -> dict[str, float]:
    """Split block medians into a fast and a slow band (1-D two-means); how far apart and how often slow."""
    x = np.sort(np.asarray(values))
    best, cut = np.inf, 1
    for i in range(1, len(x)):
        cost = x[:i].var() * i + x[i:].var() * (len(x) - i)
        if cost < best:
            best, cut = cost, i
    fast, slow = x[:cut], x[cut:]
    return {"fast_ms": float(np.median(fast)), "slow_ms": float(np.median(slow)),
            "slow_over_fast": float(np.median(slow) / np.median(fast)), "slow_share": len(slow) / len(x)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"machine: {machine_summary()}", file=sys.stderr)
    x = random_input((1, 3, 256, 256)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(build_model(args.model, 16).eval(), Path(tmp) / "m.onnx", (256, 256), 1)
        sessions = {t: ort_session(path, t) for t in args.threads}
        name = sessions[args.threads[0]].get_inputs()[0].name
        blocks: dict[int, list[tuple[float, float]]] = {t: [] for t in args.threads}
        start = time.perf_counter()
        while time.perf_counter() - start < args.seconds:
            for threads, session in sessions.items():
                calls, t_block = [], time.perf_counter()
                while (time.perf_counter() - t_block) * 1000 < args.block_ms:
                    t0 = time.perf_counter()
                    session.run(None, {name: x})
                    calls.append((time.perf_counter() - t0) * 1000)
                blocks[threads].append((round(t_block - start, 2), float(np.median(calls[1:] or calls))))
    result = {"model": args.model, "seconds": args.seconds, "block_ms": args.block_ms, "threads": {}}
    rows = []
    for threads, series in blocks.items():
        medians = [ms for _, ms in series]
        bands = two_bands(medians)
        p10, p50, p90 = np.percentile(medians, [10, 50, 90])
        result["threads"][str(threads)] = {"blocks": series, "p10_ms": p10, "median_ms": p50, "p90_ms": p90, **bands}
        rows.append([threads, len(series), p50, p10, p90, bands["fast_ms"], bands["slow_ms"],
                     f"{bands['slow_over_fast']:.2f}x", f"{bands['slow_share']:.0%}"])  # fmt: skip
    headers = ["threads", "blocks", "median ms", "p10", "p90", "fast band", "slow band", "ratio", "slow share"]
    print(format_table(headers, rows))
    out = write_results("thread_modes", result, args.results_dir, quick=args.quick)
    plot(blocks, out.with_suffix(".png"), args.model)
    print(f"results: {out} (+ .png)")
    return 0


def plot(blocks: dict[int, list[tuple[float, float]]], path: Path, model: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3.6))
    for threads, series in blocks.items():
        ax.plot([t for t, _ in series], [ms for _, ms in series], ".-", ms=3, lw=0.6, label=f"{threads} thread(s)")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel(f"{model}, ORT CPU, median ms per block")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
