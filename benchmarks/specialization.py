"""Specialisation (issue 6 item 5): the paper's Fig. 5 on this machine.

One search per cost benchmark, on the same synthetic data with the same seed, lambda and tau:

    flops                  paper GFLOPs counted locally (no agent)
    lut:onnxruntime-cpu    LUT built by a local agent (1 thread, batch 1)
    lut:torch-cpu          LUT built by the same agent (1 thread, batch 1)

Steps: start one agent (``effpose lut serve`` subprocess, fresh SQLite file in a temp folder), request
both LUTs of the small space through ``lut_service.client.AgentClient`` and save them; close the agent;
run ``search.loop.run_search`` three times (cost = flops / ORT LUT file / torch LUT file); train each
derived network with ``pose.train.train`` for the same time budget; then, for the three derived
networks and efficientpose-a, report paper GFLOPs, params, the LUT-predicted latency on both backends
and the measured latency (onnxruntime-cpu and torch-cpu, 1 thread, batch 1, all eight candidates timed
interleaved in one run with ``common.interleaved_timing``), plus the accuracy ``pose.evaluate`` gives
on the synthetic validation split (PCKh@0.5 Mean for ``synthetic-mpii``, OKS AP for ``synthetic``).

A search only specialises if its cost term moves the architecture. The JSON therefore also holds the
predicted-cost matrix (each derived network priced by all three cost models) and, per cost model,
whether the network searched with it is the cheapest of the three under it ("diagonal").

    python benchmarks/specialization.py --quick     # smoke check, ~1 min -> results/quick/specialization.json
    python benchmarks/specialization.py             # full run (~10-15 min) -> results/specialization.json + .png

Full mode builds the LUTs and measures latency at 256x256 (the paper's MPII input); the search and the
training run at 128x128 on synthetic-mpii to fit the time budget (stated in the JSON and the output).
Search and training use 1 torch thread by default: on a shared 2-core machine a 2-thread OpenMP team
waits at every barrier for a descheduled partner (10x slower steps were seen here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
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
    stats_dict,
    torch_cpu_runner,
    write_results,
)

from lut_service.client import AgentClient
from lut_service.local import LocalAgent
from lut_service.lut import LutTable, save_document
from lut_service.timing import ort_session
from pose.counting import count
from pose.data import parse_spec
from pose.export import export_onnx
from pose.models import PRESETS, build_model
from pose.space import ArchSpec, TableSpec, parse_hw

BACKENDS = ("onnxruntime-cpu", "torch-cpu")
COSTS = ("flops", "lut:onnxruntime-cpu", "lut:torch-cpu")  # cost-table names the search gives them
REFERENCE = "efficientpose-a"
LABEL = {"flops": "FLOPs", "lut:onnxruntime-cpu": "ORT-CPU LUT", "lut:torch-cpu": "torch-CPU LUT"}
COLOR = {"flops": "tab:blue", "lut:onnxruntime-cpu": "tab:orange", "lut:torch-cpu": "tab:green", REFERENCE: "0.4"}
KEY = {"onnxruntime-cpu": "ort_cpu_ms", "torch-cpu": "torch_cpu_ms"}
# A LUT entry timed this briefly is noisy, but the quick mode only checks that every step runs.
QUICK_BUDGET = {
    "warmup_runs": 1,
    "warmup_s": 0.0,
    "min_samples": 3,
    "max_samples": 5,
    "max_seconds": 0.02,
    "min_sample_ms": 0.1,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes and budgets, ~1 min (smoke check)")
    parser.add_argument("--space", default="small", help="search space (default small)")
    parser.add_argument("--data", help="data SPEC (default synthetic-mpii:256; quick synthetic-mpii:32)")
    parser.add_argument("--input", help="LUT and latency input HxW (default 256x256; quick 128x128)")
    parser.add_argument("--search-input", help="search and training input HxW (default 128x128; quick 64x64)")
    parser.add_argument(
        "--lambda",
        dest="lam",
        type=float,
        default=0.1,
        help="weight of the cost term, the same for all three searches (default 0.1: with 0.02-0.05 the derived "
        "ops of a search this short are set by MSE noise and no search is cheapest under its own cost; at 0.1 the "
        "cost term cuts the derived cost by ~25%% without collapsing every layer to the cheapest op)",
    )
    parser.add_argument("--tau", type=float, default=10.0, help="log base of the cost term (default 10)")
    parser.add_argument("--mode", choices=("mixed", "sampled"), default="mixed", help="supernet mode (default mixed)")
    parser.add_argument("--warmup-epochs", type=int, help="weight-only search epochs (default 1)")
    parser.add_argument("--epochs", type=int, help="alternating search epochs (default 2; quick 1)")
    parser.add_argument("--batch-size", type=int, default=8, help="search batch (default 8)")
    parser.add_argument("--max-batches", type=int, help="batches per search phase and epoch (default 12; quick 2)")
    parser.add_argument(
        "--arch-lr",
        type=float,
        default=0.03,
        help="Adam lr of alpha (default 0.03; the paper's 3e-4 over ~20k architecture steps, scaled up because this "
        "search takes a few dozen: at 3e-4 alpha moves < 0.01 and the argmax is a sign pattern of the first steps)",
    )
    parser.add_argument("--train-minutes", type=float, help="training budget per network (default 2; quick 0.1)")
    parser.add_argument(
        "--budget-clock",
        choices=("wall", "cpu"),
        default="wall",
        help="what the training budget counts: wall-clock minutes (default) or this process's CPU minutes "
        "(fairer on a shared machine)",
    )
    parser.add_argument("--train-reference", action="store_true", help=f"also train {REFERENCE} for the same budget")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for search and training (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, help="latency timing rounds (default 40; quick 5)")
    parser.add_argument("--max-seconds", type=float, help="bound on the timed phase (default 180; quick 8)")
    parser.add_argument("--workdir", type=Path, help="keep LUTs, searches and checkpoints here (default: temp dir)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="specialization", help="results file stem")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    q = args.quick
    args.data = args.data or ("synthetic-mpii:32" if q else "synthetic-mpii:256")
    try:
        args.input_hw = parse_hw(args.input or ("128x128" if q else "256x256"))
        args.search_hw = parse_hw(args.search_input or ("64x64" if q else "128x128"))
        spec = parse_spec(args.data)
    except (ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))
    if any(v % 16 for v in (*args.input_hw, *args.search_hw)):
        parser.error("--input and --search-input must be multiples of 16 in both sides")
    args.joints = 16 if spec.kind == "mpii" else 17
    args.warmup_epochs = 1 if args.warmup_epochs is None else args.warmup_epochs
    args.epochs = (1 if q else 2) if args.epochs is None else args.epochs
    args.max_batches = args.max_batches or (2 if q else 12)
    args.train_minutes = args.train_minutes or (0.1 if q else 2.0)
    args.repeats = args.repeats or (5 if q else 40)
    args.max_seconds = args.max_seconds or (8.0 if q else 180.0)
    if args.workdir is not None and args.workdir.exists() and any(args.workdir.iterdir()):
        parser.error(f"--workdir {args.workdir} is not empty: give a new or empty folder (runs are not resumed)")
    if args.epochs < 1:
        parser.error("--epochs must be >= 1: without architecture epochs the cost term never acts")
    if args.threads < 1 or args.train_minutes <= 0 or args.lam < 0 or args.tau <= 1:
        parser.error("--threads >= 1, --train-minutes > 0, --lambda >= 0 and --tau > 1 are required")
    return args


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- steps


def build_luts(args: argparse.Namespace, work: Path) -> dict[str, dict]:
    """One agent, fresh DB; both LUTs through the real client; saved as files the search reads."""
    luts: dict[str, dict] = {}
    budget = QUICK_BUDGET if args.quick else None
    with LocalAgent(work / "agent.db") as agent:
        with AgentClient(agent.url, cache_dir=work / "client-cache") as client:
            for backend in BACKENDS:
                say(f"[lut] {backend}: requesting the {args.space} space at {args.input_hw[0]}x{args.input_hw[1]} ...")
                t0 = time.perf_counter()
                doc = client.request_lut(
                    TableSpec(args.space, args.input_hw, joints=args.joints),
                    backend,
                    budget=budget,
                    progress=not args.no_progress,
                    poll_s=0.2,
                )
                seconds = time.perf_counter() - t0
                path = save_document(doc, work / f"lut-{backend}.json")
                rel = [e["iqr_ms"] / e["median_ms"] for e in doc["entries"] if e["median_ms"] > 0]
                luts[backend] = {
                    "path": path,
                    "doc": doc,
                    "summary": {
                        "id": doc["id"],
                        "entries": len(doc["entries"]),
                        "seconds": round(seconds, 2),
                        "max_iqr_over_median": round(max(rel), 4) if rel else None,
                        "median_iqr_over_median": round(float(np.median(rel)), 4) if rel else None,
                        "budget": budget or "agent default",
                    },
                }
                say(f"[lut] {backend}: {len(doc['entries'])} entries in {seconds:.1f} s")
    return luts


def run_searches(args: argparse.Namespace, luts: dict[str, dict], work: Path) -> dict[str, dict]:
    """Three searches that differ only in the cost source."""
    from search.loop import SearchConfig, run_search

    sources = {"flops": "flops", **{f"lut:{b}": str(luts[b]["path"]) for b in BACKENDS}}
    results: dict[str, dict] = {}
    for name, source in sources.items():
        torch.set_num_threads(args.threads)
        cfg = SearchConfig(
            space=args.space,
            data=args.data,
            costs=[source],
            lambdas=[args.lam],
            taus=[args.tau],
            mode=args.mode,
            warmup_epochs=args.warmup_epochs,
            epochs=args.epochs,
            batch_size=args.batch_size,
            input_hw=args.search_hw,
            cost_input_hw=args.input_hw,
            seed=args.seed,
            arch_lr=args.arch_lr,
            max_batches=args.max_batches,
        )
        out = work / f"search-{name.replace(':', '-')}"
        say(f"[search] cost {name} ({source}), lambda {args.lam:g}, tau {args.tau:g} ...")
        t0 = time.perf_counter()
        summary = run_search(cfg, out, progress=not args.no_progress)
        seconds = time.perf_counter() - t0
        assert summary is not None  # no stop_after_epoch: the search always finishes
        cost_name = next(iter(summary["predicted_cost"]))
        if cost_name != name:
            raise RuntimeError(f"search with cost {source} reported a {cost_name!r} cost, expected {name!r}")
        final = summary.get("final", {})
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if line.strip()]
        results[name] = {
            "arch_path": Path(summary["arch"]),
            "ops": summary["ops"],
            "predicted_own_cost": summary["predicted_cost"][name]["value"],
            "unit": summary["predicted_cost"][name]["unit"],
            # after the weight-only warm-up alpha is still uniform: the cost every op choice starts from
            "expected_cost_uniform": log[0]["expected_cost"][name] if log and args.warmup_epochs > 0 else None,
            "expected_cost_final": summary.get("expected_cost", {}).get(name),
            "entropy_final": summary.get("entropy"),
            "val_loss_final": final.get("val_loss"),
            "seconds": round(seconds, 1),
        }
        say(f"[search] cost {name}: {' '.join(summary['ops'])} ({seconds:.0f} s)")
    return results


def train_all(args: argparse.Namespace, archs: dict[str, Path | str], work: Path) -> dict[str, dict]:
    """The same time budget for every network; evaluation only once, at the end (not billed to the budget)."""
    from pose.train import TrainConfig, train

    budget = {"max_minutes" if args.budget_clock == "wall" else "max_cpu_minutes": args.train_minutes}
    results: dict[str, dict] = {}
    for name, arch in archs.items():
        say(f"[train] {name}: {args.train_minutes:g} {args.budget_clock} minute(s) on {args.data} ...")
        cfg = TrainConfig(
            str(arch),
            args.data,
            epochs=100_000,  # the time budget ends the run; the lr schedule's milestones are never reached
            input_hw=args.search_hw,
            seed=args.seed,
            threads=args.threads,
            eval_every=10**9,  # evaluate once, after the budget is spent
            **budget,
        )
        summary = train(cfg, work / f"train-{name.replace(':', '-')}", progress=not args.no_progress)
        last = summary["last"] or {}
        results[name] = {
            "metric": summary["metric"],
            "accuracy": summary["best"],
            "metrics": {k: v for k, v in last.items() if k not in ("epoch", "lr", "skipped", "partial", "time_s")},
            "epochs_run": summary["epochs_run"],
            "images_seen_last_epoch_partial": last.get("partial"),
            "seconds": summary["seconds"],
            "cpu_seconds": summary["cpu_seconds"],
        }
        say(f"[train] {name}: {summary['metric']} {summary['best']} after {summary['epochs_run']} epoch(s)")
    return results


def measure_latency(args: argparse.Namespace, archs: dict[str, ArchSpec], work: Path) -> dict[str, dict]:
    """Every network on both backends, 1 thread, batch 1, interleaved in one run (random weights)."""
    rng = np.random.default_rng(args.seed)
    images = rng.standard_normal((1, 3, *args.input_hw), dtype=np.float32)
    runners = {}
    for name, arch in archs.items():
        model = build_model(arch, args.joints).eval()
        onnx_path = export_onnx(model, work / f"{name.replace(':', '-')}.onnx", args.input_hw, 1)
        runners[(name, "onnxruntime-cpu")] = ort_cpu_runner(ort_session(onnx_path, 1), images)
        runners[(name, "torch-cpu")] = torch_cpu_runner(model, torch.from_numpy(images), 1)
    labels = {key: f"{key[0]} @ {key[1]}" for key in runners}
    say(f"[latency] {len(runners)} candidates interleaved, up to {args.repeats} rounds / {args.max_seconds:g} s ...")
    stats = interleaved_timing(
        {labels[k]: r for k, r in runners.items()},
        repeats=args.repeats,
        warmup=1 if args.quick else 5,
        max_seconds=args.max_seconds,
        seed=args.seed,
        progress=not args.no_progress,
    )
    out: dict[str, dict] = {}
    for (name, backend), label in labels.items():
        out.setdefault(name, {})[backend] = stats_dict(stats[label])
    return out


# --------------------------------------------------------------------------- report


def cost_matrix(networks: dict[str, dict]) -> dict:
    """Each derived network priced by every cost model; the diagonal should be each column's minimum."""
    columns = {"flops": "gflops_paper", "lut:onnxruntime-cpu": "lut_ort_cpu_ms", "lut:torch-cpu": "lut_torch_cpu_ms"}
    matrix = {row: {col: networks[row][field] for col, field in columns.items()} for row in COSTS}
    diagonal = {}
    for col in COSTS:
        cheapest = min(COSTS, key=lambda row: matrix[row][col])
        diagonal[col] = {
            "cheapest": cheapest,
            "own_is_cheapest": matrix[col][col] <= min(matrix[row][col] for row in COSTS) + 1e-12,
        }
    distinct = len({tuple(networks[row]["ops"]) for row in COSTS})
    return {"rows_are_searches": list(COSTS), "matrix": matrix, "diagonal": diagonal, "distinct_archs": distinct}


def plot(networks: dict[str, dict], metric: str, path: Path, title: str) -> None:
    """Measured latency against paper GFLOPs on each backend, coloured by cost benchmark, accuracy labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    for ax, backend in zip(axes, BACKENDS, strict=True):
        for name, net in networks.items():
            s = net["latency"][backend]
            x, y = net["gflops_paper"], s["median_ms"]
            label = LABEL.get(name, name)
            ax.errorbar(
                x,
                y,
                yerr=[[y - s["p10_ms"]], [s["p90_ms"] - y]],
                fmt="o" if name in COSTS else "s",
                color=COLOR[name],
                markersize=8,
                capsize=3,
                label=f"searched with {label}" if name in COSTS else f"{name} (published)",
                zorder=3,
            )
            lut = net["lut_ort_cpu_ms" if backend == "onnxruntime-cpu" else "lut_torch_cpu_ms"]
            ax.scatter([x], [lut], marker="x", color=COLOR[name], s=40, zorder=4)
            acc = net.get("accuracy")
            text = f"{metric} {acc:.1f}" if acc is not None else "not trained"
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(7, 4), fontsize=8, color=COLOR[name])
        ax.set_xlabel("GFLOPs (paper convention)")
        ax.set_ylabel(f"{backend} latency, 1 thread, batch 1 (ms)")
        ax.set_title(f"{backend}: measured median (bars p10-p90), x = LUT-predicted", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.25, y=0.2)
    axes[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = machine_info()
    say(f"machine: {machine_summary(info)}")
    started = time.perf_counter()
    stage_seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="specialization_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        luts = build_luts(args, work)
        stage_seconds["luts"] = round(time.perf_counter() - t0, 1)

        t0 = time.perf_counter()
        searches = run_searches(args, luts, work)
        stage_seconds["searches"] = round(time.perf_counter() - t0, 1)

        arch_files: dict[str, Path | str] = {name: s["arch_path"] for name, s in searches.items()}
        if args.train_reference:
            arch_files[REFERENCE] = REFERENCE
        t0 = time.perf_counter()
        trained = train_all(args, arch_files, work)
        stage_seconds["training"] = round(time.perf_counter() - t0, 1)

        specs: dict[str, ArchSpec] = {name: ArchSpec.load(s["arch_path"]) for name, s in searches.items()}
        specs[REFERENCE] = PRESETS[REFERENCE]
        t0 = time.perf_counter()
        latency = measure_latency(args, specs, work)
        stage_seconds["latency"] = round(time.perf_counter() - t0, 1)

    tables = {b: LutTable.from_document(luts[b]["doc"]) for b in BACKENDS}
    networks: dict[str, dict] = {}
    metric = next(iter(trained.values()))["metric"]
    for name, arch in specs.items():
        counts = count(build_model(arch, args.joints), args.input_hw)
        entry: dict = {
            "searched_with": name if name in COSTS else None,
            "ops": list(arch.ops),
            "params": counts.params,
            "gflops_paper": round(counts.gflops_paper, 4),
            "lut_ort_cpu_ms": round(tables["onnxruntime-cpu"].predict(arch), 3),
            "lut_torch_cpu_ms": round(tables["torch-cpu"].predict(arch), 3),
            "ort_cpu_ms": round(latency[name]["onnxruntime-cpu"]["median_ms"], 3),
            "torch_cpu_ms": round(latency[name]["torch-cpu"]["median_ms"], 3),
            "latency": latency[name],
            "accuracy": trained[name]["accuracy"] if name in trained else None,
            "metric": metric if name in trained else None,
            "training": trained.get(name),
            "search": {k: v for k, v in searches[name].items() if k != "arch_path"} if name in searches else None,
        }
        for backend, lut_key in (("onnxruntime-cpu", "lut_ort_cpu_ms"), ("torch-cpu", "lut_torch_cpu_ms")):
            measured = entry[KEY[backend]]
            error = round(entry[lut_key] / measured - 1, 4) if measured else None
            entry[f"{lut_key.removesuffix('_ms')}_error"] = error  # LUT prediction / measured - 1
        networks[name] = entry
    matrix = cost_matrix(networks)
    total = round(time.perf_counter() - started, 1)
    data = {
        "networks": networks,
        "cost_matrix": matrix,
        "luts": {b: luts[b]["summary"] for b in BACKENDS},
        "settings": {
            "space": args.space,
            "data": args.data,
            "metric": metric,
            "joints": args.joints,
            "lut_and_latency_input_hw": list(args.input_hw),
            "search_and_training_input_hw": list(args.search_hw),
            "reduced_size_note": (
                f"search and training at {args.search_hw[0]}x{args.search_hw[1]} (LUTs, GFLOPs and latency at "
                f"{args.input_hw[0]}x{args.input_hw[1]}) to fit the time budget"
                if args.search_hw != args.input_hw
                else None
            ),
            "search": {
                "lambda": args.lam,
                "tau": args.tau,
                "mode": args.mode,
                "warmup_epochs": args.warmup_epochs,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "max_batches_per_phase": args.max_batches,
                "arch_lr": args.arch_lr,
                "seed": args.seed,
            },
            "training": {
                "budget_minutes": args.train_minutes,
                "budget_clock": args.budget_clock,
                "recipe": "pose.train synthetic recipe (Adam lr 1e-3, batch 32), constant lr: the budget ends the "
                "run before any milestone; evaluated once at the end",
                "reference_trained": args.train_reference,
            },
            "threads": args.threads,
            "latency": {
                "backends": list(BACKENDS),
                "threads": 1,
                "batch": 1,
                "repeats_requested": args.repeats,
                "max_seconds": args.max_seconds,
                "weights": "random init (latency does not depend on weight values)",
            },
            "quick": args.quick,
        },
        "stage_seconds": stage_seconds,
        "total_seconds": total,
    }
    path = write_results(args.name, data, args.results_dir, quick=args.quick)

    print(
        f"specialisation, space {args.space}, data {args.data}; search/training at {args.search_hw[0]}x"
        f"{args.search_hw[1]}, LUTs/GFLOPs/latency at {args.input_hw[0]}x{args.input_hw[1]}; lambda {args.lam:g}, "
        f"tau {args.tau:g}, {args.mode}; training {args.train_minutes:g} {args.budget_clock} min each"
    )
    headers = ["network", "params (M)", "GFLOPs", "ORT ms", "ORT LUT ms", "torch ms", "torch LUT ms", metric]
    rows = []
    for name, n in networks.items():
        rows.append(
            [
                f"searched: {LABEL[name]}" if name in COSTS else name,
                n["params"] / 1e6,
                n["gflops_paper"],
                f"{n['ort_cpu_ms']:.2f} ±{100 * n['latency']['onnxruntime-cpu']['iqr_over_median']:.0f}%",
                n["lut_ort_cpu_ms"],
                f"{n['torch_cpu_ms']:.2f} ±{100 * n['latency']['torch-cpu']['iqr_over_median']:.0f}%",
                n["lut_torch_cpu_ms"],
                n["accuracy"],
            ]
        )
    print(format_table(headers, rows))
    print("(measured: median, ± IQR/median, 1 thread, batch 1; LUT: stem + head + overhead + chosen ops)")
    print("predicted cost of each searched network under each cost model (rows: searched with; * = column min):")
    mrows = []
    for row in COSTS:
        cells = []
        for col in COSTS:
            value = matrix["matrix"][row][col]
            cells.append(f"{value:.4g}" + ("*" if matrix["diagonal"][col]["cheapest"] == row else ""))
        mrows.append([LABEL[row], *cells])
    print(format_table(["searched with", "GFLOPs", "ORT LUT ms", "torch LUT ms"], mrows))
    own = sum(d["own_is_cheapest"] for d in matrix["diagonal"].values())
    print(f"{matrix['distinct_archs']} distinct architecture(s); own cost model cheapest in {own}/3 columns")
    for name in COSTS:
        search = networks[name]["search"]
        start, own = search["expected_cost_uniform"], search["predicted_own_cost"]
        change = f" ({own:.4g} {search['unit']}, {100 * (own / start - 1):+.0f}% vs uniform alpha)" if start else ""
        print(f"  {LABEL[name]:>14}{change}: {' '.join(networks[name]['ops'])}")
    print(f"stages (s): {json.dumps(stage_seconds)}; total {total:.0f} s")
    if not args.no_plot:
        png = path.with_suffix(".png")
        plot(
            networks,
            metric,
            png,
            f"{args.space} space, {args.data}, search/train {args.search_hw[0]}x{args.search_hw[1]}, latency "
            f"{args.input_hw[0]}x{args.input_hw[1]}; {info['cpu_model']}",
        )
        print(f"plot: {png}")
    print(f"results: {path}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``main`` with user-facing errors (a reused --workdir, an agent that fails...) as one line, exit 2."""
    try:
        return main(argv)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
