"""LUT build time (issue 6 item 2): wall time to build the complete LUT of both spaces per CPU backend.

For each backend a fresh agent (``effpose lut serve`` subprocess on 127.0.0.1) with a fresh SQLite file
is started, then the LUTs of the small and the large space are requested through the real client at
batch 1, 1 thread, with the agent's default timing budget. The clock runs from the first request to
the last complete document: every unique key, the stem, the head and the per-call overhead entry,
with ONNX export included for onnxruntime. Agent start-up is not counted.

    python benchmarks/lut_build.py --quick     # small space only
    python benchmarks/lut_build.py             # both spaces -> results/lut_build.json

Target: <= 30 s per backend, with every entry's IQR/median <= 5%.
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
from pose.space import TableSpec

TARGET_SECONDS = 30.0
TARGET_IQR_OVER_MEDIAN = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small space only (smoke check)")
    parser.add_argument(
        "--backends", default="onnxruntime-cpu,torch-cpu", help="comma separated (default onnxruntime-cpu,torch-cpu)"
    )
    parser.add_argument("--spaces", help="comma separated (default small,large; quick: small)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="lut_build", help="results file stem")
    args = parser.parse_args(argv)
    args.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    args.spaces = [s.strip() for s in (args.spaces or ("small" if args.quick else "small,large")).split(",")]
    return args


def build_one(backend: str, spaces: list[str], batch: int, threads: int, workdir: Path) -> dict:
    """Fresh agent + fresh DB; request every space's LUT; time from first request to last document."""
    workdir.mkdir(parents=True, exist_ok=True)
    per_space = {}
    entries: list[dict] = []
    with LocalAgent(workdir / "agent.db") as agent:
        with AgentClient(agent.url, cache_dir=workdir / "cache") as client:
            start = time.perf_counter()
            for space in spaces:
                t0 = time.perf_counter()
                spec = TableSpec(space, batch=batch, threads=threads)
                doc = client.request_lut(spec, backend, poll_s=0.1)
                per_space[space] = {"seconds": round(time.perf_counter() - t0, 2), "entries": len(doc["entries"])}
                entries += doc["entries"]
            seconds = time.perf_counter() - start
    entries = list({e["key"]: e for e in entries}.values())  # a key shared by both spaces counts once
    rel = [e["iqr_ms"] / e["median_ms"] if e["median_ms"] > 0 else float("inf") for e in entries]
    worst = max(range(len(entries)), key=lambda i: rel[i])
    return {
        "backend": backend,
        "seconds": round(seconds, 2),
        "entries": len(entries),
        "max_iqr_over_median": round(rel[worst], 4),
        "worst_entry": entries[worst]["key"],
        "entries_over_5pct": sum(r > TARGET_IQR_OVER_MEDIAN for r in rel),
        "median_iqr_over_median": round(sorted(rel)[len(rel) // 2], 4),
        "spaces": per_space,
        "batch": batch,
        "threads": threads,
        "met": seconds <= TARGET_SECONDS and rel[worst] <= TARGET_IQR_OVER_MEDIAN,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(f"machine: {machine_summary()}", file=sys.stderr)
    runs = []
    with tempfile.TemporaryDirectory(prefix="lut_build_") as tmp:
        for backend in args.backends:
            print(f"building {'+'.join(args.spaces)} on {backend} ...", file=sys.stderr)
            runs.append(build_one(backend, args.spaces, args.batch, args.threads, Path(tmp) / backend))
    data = {
        "runs": runs,
        "target": {"seconds": TARGET_SECONDS, "max_iqr_over_median": TARGET_IQR_OVER_MEDIAN},
        "settings": {"spaces": args.spaces, "batch": args.batch, "threads": args.threads, "quick": args.quick},
    }
    path = write_results(args.name, data, args.results_dir, quick=args.quick)
    rows = [
        [
            r["backend"],
            r["seconds"],
            r["entries"],
            r["max_iqr_over_median"],
            r["entries_over_5pct"],
            "MET" if r["met"] else "NOT MET",
        ]
        for r in runs
    ]
    print(f"spaces {'+'.join(args.spaces)}, batch {args.batch}, {args.threads} thread(s), fresh DB per backend")
    print(format_table(["backend", "seconds", "entries", "max IQR/median", "entries > 5%", "target"], rows))
    print(f"target: <= {TARGET_SECONDS:g} s per backend and every IQR/median <= {TARGET_IQR_OVER_MEDIAN:.0%}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
