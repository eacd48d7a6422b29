"""LUT fidelity (issue 6 item 1): LUT-predicted against measured end-to-end latency of random networks.

For every cell (backend x threads x batch) a local profiler agent (``lut_service.local.LocalAgent``,
its own process, real HTTP API through ``AgentClient``) builds the LUT of the small space, then times
N random legal architectures of that space end to end (``POST /v1/networks``: whole networks on the
same backend, interleaved round-robin in one job). The prediction is ``LutTable.predict`` (stem +
head + per-call overhead + the chosen ops); ``lut_service.lut.fidelity`` scores it. The architectures
come from a different seed than anything the LUT build uses, so every scored network is held out.

    python benchmarks/lut_fidelity.py            # full: 8 cells, N=50 each (about 10 min on 2 cores)
    python benchmarks/lut_fidelity.py --quick    # smoke check: onnxruntime-cpu, 1 thread, batch 1, N=8

The same job times one uniform network per op (the LUT build's own networks): their measured/predicted
ratio is the machine's drift since the build, shown as ``drift`` and as drift-corrected shares
(``±5% dc``); targets are judged on the uncorrected scores only.

Writes ``benchmarks/results/lut_fidelity.json`` (``quick/`` for --quick) and a scatter plot per cell.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, format_table, machine_summary, write_results

from lut_service.client import AgentClient
from lut_service.local import LocalAgent
from lut_service.lut import validate_on_agent
from pose.space import TableSpec

TARGETS = {  # (backend, threads, batch) -> {metric: minimum}, issue 6
    ("onnxruntime-cpu", 1, 1): {"within_5pct": 0.99, "kendall_tau": 0.95},
    ("onnxruntime-cpu", 1, 8): {"within_5pct": 0.95},
    ("torch-cpu", 1, 1): {"within_5pct": 0.95},
    ("onnxruntime-cpu", 2, 1): {"within_10pct": 0.90, "kendall_tau": 0.8},
    ("onnxruntime-cpu", 2, 8): {"within_10pct": 0.90, "kendall_tau": 0.8},
}
FULL_CELLS = [(b, t, n) for b in ("onnxruntime-cpu", "torch-cpu") for t in (1, 2) for n in (1, 8)]
QUICK_CELLS = [("onnxruntime-cpu", 1, 1)]


def target_status(cell: tuple[str, int, int], stats: dict) -> str:
    target = TARGETS.get(cell)
    if target is None:
        return "-"
    return "met" if all(stats[k] >= v for k, v in target.items()) else "MISSED"


def run_cell(client: AgentClient, space: str, backend: str, threads: int, batch: int, samples: int, seed: int) -> dict:
    """One cell through ``lut_service.lut.validate_on_agent``, the code behind ``effpose lut validate``."""
    t0 = time.perf_counter()
    spec = TableSpec(space, (256, 256), batch, threads=threads)
    report = validate_on_agent(client, spec, backend, samples, seed, progress=True)
    cell = (backend, threads, batch)
    archs = report.pop("archs")
    return {
        **report,
        "target": TARGETS.get(cell, {}),
        "target_status": target_status(cell, report),
        "cell_seconds": round(time.perf_counter() - t0, 1),
        "predicted_ms": [a["predicted_ms"] for a in archs],
        "measured_ms": [a["measured_ms"] for a in archs],
        "measured_rel_iqr": [round(a["iqr_ms"] / a["measured_ms"], 4) for a in archs],
    }


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.8 * rows), squeeze=False)
    for ax, run in zip(axes.flat, runs, strict=False):
        pred, meas = run["predicted_ms"], run["measured_ms"]
        lo, hi = min(pred + meas) * 0.95, max(pred + meas) * 1.05
        ax.fill_between([lo, hi], [lo * 0.95, hi * 0.95], [lo * 1.05, hi * 1.05], color="0.9", label="±5 %")
        ax.plot([lo, hi], [lo, hi], color="0.5", lw=0.8)
        ax.scatter(meas, pred, s=10)
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_title(
            f"{run['backend']} {run['threads']}T b{run['batch']}\n"
            f"±5%: {run['within_5pct']:.0%}  ±10%: {run['within_10pct']:.0%}  tau {run['kendall_tau']:.2f}",
            fontsize=9,
        )
        ax.set_xlabel("measured ms")
        ax.set_ylabel("LUT predicted ms")
    for ax in list(axes.flat)[len(runs) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown(path: Path) -> str:
    """The README table of a results file (``--markdown``)."""
    import json

    doc = json.loads(path.read_text())
    meta = doc["meta"]
    load = ", ".join(f"{x:.1f}" for x in meta["machine"].get("load_average_1_5_15") or [])
    lines = [
        f"`{meta['command']}` at {meta['timestamp_utc']} ({meta.get('seconds', '?')} s, load average {load}):",
        "",
        "| backend | threads | batch | N | ±5 % | ±10 % | MAPE | bias | Kendall tau | Spearman | target | drift |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        target = ", ".join(f"{k} >= {v:g}" for k, v in r["target"].items())
        verdict = f"{target}: **{r['target_status']}**" if target else "-"
        lines.append(
            f"| {r['backend']} | {r['threads']} | {r['batch']} | {r['samples']} | {r['within_5pct']:.0%} | "
            f"{r['within_10pct']:.0%} | {r['mape']:.1%} | {r['bias']:+.1%} | {r['kendall_tau']:.3f} | "
            f"{r['spearman']:.3f} | {verdict} | {r['drift']:+.1%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one cell, 8 networks (< 1 min)")
    parser.add_argument("--samples", type=int, default=None, help="networks per cell (default 50; quick 8)")
    parser.add_argument("--space", default="small")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--cells", default=None, help="comma-separated BACKEND:THREADS:BATCH (default: all 8; quick: ORT 1T b1)"
    )
    parser.add_argument("--results-dir", default=None, help=f"default {RESULTS_DIR}")
    parser.add_argument("--markdown", action="store_true", help="print the README table of the latest results only")
    args = parser.parse_args(argv)
    if args.markdown:
        directory = Path(args.results_dir) if args.results_dir else RESULTS_DIR
        print(markdown((directory / "quick" if args.quick else directory) / "lut_fidelity.json"))
        return 0
    samples = args.samples or (8 if args.quick else 50)
    cells = QUICK_CELLS if args.quick else FULL_CELLS
    if args.cells:
        try:
            cells = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in args.cells.split(",")]
        except (IndexError, ValueError):
            parser.error(f"--cells {args.cells!r}: expected e.g. onnxruntime-cpu:1:1,torch-cpu:1:8")
    print(machine_summary(), file=sys.stderr)
    runs = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="effpose-fidelity-") as tmp, LocalAgent(Path(tmp) / "agent.db") as agent:
        with AgentClient(agent.url) as client:
            for backend, threads, batch in cells:
                print(f"{backend}, {threads} thread(s), batch {batch}: {samples} networks", file=sys.stderr)
                run = run_cell(client, args.space, backend, threads, batch, samples, args.seed)
                print(
                    f"  within 5%: {run['within_5pct']:.0%}  10%: {run['within_10pct']:.0%}  "
                    f"tau {run['kendall_tau']:.3f}  bias {run['bias']:+.2%}  drift {run['drift']:+.2%}  "
                    f"({run['cell_seconds']:.0f} s)",
                    file=sys.stderr,
                )
                runs.append(run)
    headers = ["backend", "threads", "batch", "N", "±5%", "±10%", "MAPE", "bias", "tau", "rho", "target"]
    headers += ["drift", "±5% dc"]
    rows = [
        [
            r["backend"],
            r["threads"],
            r["batch"],
            r["samples"],
            f"{r['within_5pct']:.0%}",
            f"{r['within_10pct']:.0%}",
            f"{r['mape']:.1%}",
            f"{r['bias']:+.1%}",
            round(r["kendall_tau"], 3),
            round(r["spearman"], 3),
            r["target_status"],
            f"{r['drift']:+.1%}",
            f"{r['drift_corrected']['within_5pct']:.0%}",
        ]
        for r in runs
    ]
    print(format_table(headers, rows))
    data = {
        "runs": runs,
        "meta": {
            "method": "in-context LUT (lut_service.context) + separately profiled per-call overhead",
            "seconds": round(time.perf_counter() - start, 1),
        },
    }
    path = write_results("lut_fidelity", data, args.results_dir, quick=args.quick)
    png = path.with_suffix(".png")
    plot(runs, png)
    print(f"wrote {path} and {png}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
