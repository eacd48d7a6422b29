"""Model latency (issue 6 item 4): params, paper GFLOPs and latency of the presets and baselines.

All models are timed side by side in one interleaved run (every round calls every model on every
backend/thread cell once, in a shuffled order), so machine drift cannot favour one model.

    python benchmarks/model_latency.py --quick          # smoke check, < 1 min
    python benchmarks/model_latency.py                  # full run -> results/model_latency.json + .png
    python benchmarks/model_latency.py --backend torch-cuda --backend onnxruntime-cuda --batch 32   # GPU

Target: efficientpose-a >= 10x faster than simplebaseline-r50 on onnxruntime-cpu (1 thread, batch 1).
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from common import (
    RESULTS_DIR,
    format_table,
    interleaved_timing,
    machine_info,
    machine_summary,
    ort_cpu_runner,
    ort_cuda_runner,
    require_cuda,
    stats_dict,
    torch_cpu_runner,
    torch_cuda_runner,
    write_results,
)
from tqdm import tqdm

from lut_service.timing import ort_session
from pose.counting import count
from pose.export import export_onnx
from pose.models import MODEL_NAMES, build_model
from pose.space import parse_hw

BACKENDS = ("onnxruntime-cpu", "torch-cpu", "onnxruntime-cuda", "torch-cuda")
KEY_PREFIX = {
    "onnxruntime-cpu": "ort_cpu",
    "torch-cpu": "torch_cpu",
    "onnxruntime-cuda": "ort_cuda",
    "torch-cuda": "torch_cuda",
}
TARGET_SPEEDUP = 10.0
FAST, SLOW = "efficientpose-a", "simplebaseline-r50"


@dataclass(frozen=True)
class Cell:
    """One way of running a model: backend and thread count (threads only matter on CPU)."""

    backend: str
    threads: int

    @property
    def key(self) -> str:
        """JSON key: ``ort_cpu_ms`` is 1 thread, ``ort_cpu_2t_ms`` 2 threads, GPU keys carry no thread count."""
        suffix = "" if self.threads == 1 or self.backend.endswith("cuda") else f"_{self.threads}t"
        return f"{KEY_PREFIX[self.backend]}{suffix}_ms"

    @property
    def label(self) -> str:
        return self.backend if self.backend.endswith("cuda") else f"{self.backend} {self.threads}t"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few repeats, under a minute (smoke check)")
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES), help="model names (default: all)")
    parser.add_argument(
        "--backend",
        action="append",
        choices=BACKENDS,
        help="repeatable; default onnxruntime-cpu and torch-cpu",
    )
    parser.add_argument("--threads", default="1,2", help="CPU thread counts, comma separated (default 1,2)")
    parser.add_argument("--batch", type=int, default=1, help="batch size (the paper's GPU numbers use 32)")
    parser.add_argument("--input", default="256x256", help="input HxW (default 256x256)")
    parser.add_argument("--joints", type=int, default=16, help="heatmap channels (16 = MPII)")
    parser.add_argument("--repeats", type=int, help="timing rounds (default 60 full, 5 quick)")
    parser.add_argument("--warmup", type=int, help="untimed rounds first (default 5 full, 1 quick)")
    parser.add_argument("--max-seconds", type=float, help="bound on the timed phase (default 600 full, 25 quick)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", help="results file stem (default model_latency, plus backends/batch for GPU runs)")
    parser.add_argument("--no-plot", action="store_true")
    args = parser.parse_args(argv)
    args.backend = args.backend or ["onnxruntime-cpu", "torch-cpu"]
    try:
        args.threads = sorted({int(t) for t in args.threads.split(",")})
        args.input_hw = parse_hw(args.input)
    except ValueError as exc:
        parser.error(f"bad --threads or --input: {exc}")
    if any(t < 1 for t in args.threads) or args.batch < 1:
        parser.error("--threads and --batch must be positive")
    unknown = [m for m in args.models if m not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {list(MODEL_NAMES)}")
    args.repeats = args.repeats or (5 if args.quick else 60)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 5)
    args.max_seconds = args.max_seconds or (25.0 if args.quick else 600.0)
    if args.name is None:
        default_run = set(args.backend) <= {"onnxruntime-cpu", "torch-cpu"} and args.batch == 1
        args.name = "model_latency" if default_run else f"model_latency_{'_'.join(sorted(args.backend))}_b{args.batch}"
    return args


def cells_for(backends: list[str], threads: list[int]) -> list[Cell]:
    cells = []
    for backend in backends:
        for t in [1] if backend.endswith("cuda") else threads:
            cells.append(Cell(backend, t))
    return cells


def build_runners(args: argparse.Namespace, workdir: Path) -> tuple[dict, dict]:
    """Build every model, count it, export it once, and make one runner per (model, cell)."""
    cells = cells_for(args.backend, args.threads)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch, 3, *args.input_hw), dtype=np.float32)
    counts: dict[str, dict] = {}
    runners: dict = {}
    for name in tqdm(args.models, desc="build/export", file=sys.stderr, leave=False):
        model = build_model(name, args.joints).eval()
        c = count(model, args.input_hw)
        counts[name] = {"params": c.params, "gflops_paper": round(c.gflops_paper, 4), "gmacs": round(c.gmacs, 4)}
        onnx_path = None
        if any(cell.backend.startswith("onnxruntime") for cell in cells):
            onnx_path = export_onnx(model, workdir / f"{name}.onnx", args.input_hw, args.batch)
        for cell in cells:
            if cell.backend == "onnxruntime-cpu":
                runner = ort_cpu_runner(ort_session(onnx_path, cell.threads), images)
            elif cell.backend == "onnxruntime-cuda":
                runner = ort_cuda_runner(ort_session(onnx_path, 1, device="cuda"), images)
            elif cell.backend == "torch-cpu":
                runner = torch_cpu_runner(model, torch.from_numpy(images), cell.threads)
            else:
                # a copy: the CPU cells of the same model keep using the original
                runner = torch_cuda_runner(copy.deepcopy(model).to("cuda"), torch.from_numpy(images).to("cuda"))
            runners[(name, cell)] = runner
    return counts, runners


def speedups(models: dict, cells: list[Cell]) -> dict | None:
    if FAST not in models or SLOW not in models:
        return None
    out: dict = {}
    for cell in cells:
        key = cell.key.removesuffix("_ms")
        out[key] = round(models[SLOW][cell.key] / models[FAST][cell.key], 2)
    target_key = "ort_cpu" if "ort_cpu" in out else next(iter(out))
    return {
        "pair": f"{SLOW} / {FAST}",
        **out,
        "target": TARGET_SPEEDUP,
        "target_on": target_key,
        "met": out[target_key] >= TARGET_SPEEDUP,
    }


def plot(models: dict, cells: list[Cell], path: Path, title: str) -> None:
    """Latency against paper GFLOPs, one series per backend/thread cell (cf. the paper's Fig. 1/3)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(7.5, 5))
    markers = "osD^v<>"
    names = list(models)
    for i, cell in enumerate(cells):
        xs = [models[n]["gflops_paper"] for n in names]
        ys = [models[n][cell.key] for n in names]
        ax.scatter(xs, ys, marker=markers[i % len(markers)], s=50, label=cell.label, zorder=3)
    first = cells[0]
    # Alternate label offsets along the GFLOPs axis: neighbours (e.g. efficientpose-a, mobilenetv2) sit close.
    for i, n in enumerate(sorted(names, key=lambda m: models[m]["gflops_paper"])):
        ax.annotate(
            n,
            (models[n]["gflops_paper"], models[n][first.key]),
            textcoords="offset points",
            xytext=(6, -12 if i % 2 == 0 else 8),
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        axis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("GFLOPs (paper convention: multiply-adds / 2^30)")
    ax.set_ylabel("median latency (ms, log)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for backend in args.backend:
        require_cuda(backend)
    cells = cells_for(args.backend, args.threads)
    info = machine_info()
    print(f"machine: {machine_summary(info)}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="model_latency_") as tmp:
        counts, runners = build_runners(args, Path(tmp))
        labels = {key: f"{key[0]} @ {key[1].label}" for key in runners}
        stats = interleaved_timing(
            {labels[k]: r for k, r in runners.items()},
            repeats=args.repeats,
            warmup=args.warmup,
            max_seconds=args.max_seconds,
        )
    models: dict = {}
    for name in args.models:
        entry = dict(counts[name])
        entry["stats"] = {}
        for cell in cells:
            s = stats[labels[(name, cell)]]
            entry[cell.key] = round(s.median_ms, 3)
            entry["stats"][cell.key] = stats_dict(s)
        models[name] = entry
    speed = speedups(models, cells)
    data = {
        "models": models,
        "speedup": speed,
        "settings": {
            "input_hw": list(args.input_hw),
            "batch": args.batch,
            "joints": args.joints,
            "cells": [{"key": c.key, "backend": c.backend, "threads": c.threads} for c in cells],
            "repeats_requested": args.repeats,
            "warmup_rounds": args.warmup,
            "quick": args.quick,
            "weights": "random init (latency does not depend on weight values)",
        },
    }
    path = write_results(args.name, data, args.results_dir, quick=args.quick)

    headers = ["model", "params (M)", "GFLOPs"] + [c.label + " ms" for c in cells]
    rows = []
    for name, entry in models.items():
        row: list = [name, entry["params"] / 1e6, entry["gflops_paper"]]
        for cell in cells:
            s = entry["stats"][cell.key]
            flag = "*" if s["iqr_over_median"] >= 0.1 else ""
            row.append(f"{s['median_ms']:.2f} ±{100 * s['iqr_over_median']:.0f}%{flag}")
        rows.append(row)
    print(f"batch {args.batch}, input {args.input}, {stats[next(iter(stats))].samples} timed rounds")
    print(format_table(headers, rows))
    print("(± is IQR/median; * marks IQR/median >= 10%)")
    if speed:
        verdict = "MET" if speed["met"] else "NOT MET"
        parts = ", ".join(f"{c.key.removesuffix('_ms')} {speed[c.key.removesuffix('_ms')]:.1f}x" for c in cells)
        print(f"speedup {speed['pair']}: {parts}; target >= {TARGET_SPEEDUP:.0f}x on {speed['target_on']}: {verdict}")
    if not args.no_plot:
        png = path.with_suffix(".png")
        plot(models, cells, png, f"batch {args.batch}, {args.input}; {info['cpu_model']}")
        print(f"plot: {png}")
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
