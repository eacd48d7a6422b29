"""``effpose demo``: the whole product on embedded defaults, in minutes on a laptop CPU.

local agent -> onnxruntime-cpu LUT of the small space -> synthetic MPII-format data -> search with
the LUT cost -> train the derived network -> evaluate -> export ONNX -> real latency of the exported
network next to the LUT's prediction and next to EfficientPose-A -> summary table and plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

BACKEND = "onnxruntime-cpu"
LUT_INPUT = (256, 256)  # the input the LUT, the export and the latency comparison use
TRAIN_INPUT = (128, 128)  # search and training run at a smaller input to fit minutes on a CPU
JOINTS = 16  # synthetic MPII-format data: the paper searches on MPII and PCKh moves within minutes


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _time_onnx(paths: dict[str, Path], input_hw: tuple[int, int], rounds: int) -> dict[str, dict[str, float]]:
    """Median/p10/p90 wall ms of each ONNX file on 1 ORT thread, calls interleaved so drift hits all alike."""
    from tqdm import tqdm

    from pose.export import OnnxPoseModel

    runners = {name: OnnxPoseModel(path, device="cpu", threads=1) for name, path in paths.items()}
    image = np.random.default_rng(0).standard_normal((1, 3, *input_hw), dtype=np.float32)
    samples: dict[str, list[float]] = {name: [] for name in runners}
    for runner in runners.values():  # warm-up
        for _ in range(3):
            runner(image)
    for _ in tqdm(range(rounds), desc="latency", unit="round", file=sys.stderr):
        for name, runner in runners.items():
            start = time.perf_counter()
            runner(image)
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {
        name: {
            "median_ms": float(np.median(v)),
            "p10_ms": float(np.percentile(v, 10)),
            "p90_ms": float(np.percentile(v, 90)),
        }
        for name, v in samples.items()
    }


def run_demo(
    out: str | Path,
    images: int = 96,
    search_epochs: int = 4,
    warmup_epochs: int = 1,
    max_batches: int = 16,
    train_minutes: float = 2.5,
    lambda_: float = 0.003,
    arch_lr: float = 0.03,
    seed: int = 0,
    latency_rounds: int = 40,
) -> dict[str, Any]:
    """Run every stage and return the summary (also written to OUT/summary.json)."""
    import torch

    from lut_service.client import AgentClient
    from lut_service.local import LocalAgent
    from lut_service.lut import LutTable, save_document
    from pose.checkpoint import load_model
    from pose.data import build_dataset
    from pose.evaluate import evaluate_model, primary_metric
    from pose.export import export_onnx, parity
    from pose.models import PRESETS, build_model
    from pose.space import ArchSpec, TableSpec
    from pose.train import train
    from search.loop import SearchConfig, run_search

    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = f"synthetic-mpii:{images}"
    started = time.time()
    stage_seconds: dict[str, float] = {}

    def stage(name: str, clock: float) -> float:
        now = time.time()
        stage_seconds[name] = round(now - clock, 1)
        _say(f"   ... {name} took {stage_seconds[name]:.1f} s")
        return now

    clock = time.time()
    _say(f"[1/7] starting a local profiler agent (database {out / 'agent.db'})")
    with LocalAgent(out / "agent.db") as agent, AgentClient(agent.url, cache_dir=out / "lut-cache") as client:
        device = client.device()
        _say(f"      agent {agent.url} on {device.get('fingerprint', device).get('cpu', 'this machine')}")
        _say(f"[2/7] building the {BACKEND} LUT of the small space at {LUT_INPUT[0]}x{LUT_INPUT[1]}, batch 1, 1 thread")
        spec = TableSpec("small", LUT_INPUT, joints=JOINTS)
        doc = client.request_lut(spec, BACKEND)
        lut_path = save_document(doc, out / f"lut-{BACKEND}.json")
        table = LutTable.from_document(doc)
        clock = stage("lut", clock)

        _say(f"[3/7] synthetic MPII-format dataset ({images} training images) and differentiable search")
        cfg = SearchConfig(
            space="small",
            data=data,
            costs=[str(lut_path)],
            lambdas=[lambda_],
            taus=[10.0],
            mode="sampled",  # one Gumbel-sampled path per step: ~1x a training step, mixed is ~4x
            max_batches=max_batches,
            warmup_epochs=warmup_epochs,
            epochs=search_epochs,
            batch_size=8,
            input_hw=TRAIN_INPUT,
            cost_input_hw=LUT_INPUT,
            seed=seed,
            # A demo search takes a few dozen alpha steps, not the paper's 150 epochs: with Adam at the
            # paper's 3e-4, alpha would move < 0.01 and argmax would be decided by noise.
            arch_lr=arch_lr,
        )
        search = run_search(cfg, out / "search", resume=False, progress=True)
        arch = ArchSpec.load(search["arch"])
        clock = stage("search", clock)

        _say(f"[4/7] training the derived network for {train_minutes:g} min")
        trained = train(
            search["arch"],
            data,
            out / "train",
            epochs=100,
            batch_size=16,
            input_hw=TRAIN_INPUT,
            max_minutes=train_minutes,
            seed=seed,
        )
        clock = stage("train", clock)

        _say("[5/7] evaluating the best checkpoint on the validation split (flip test)")
        model, _ = load_model(out / "train" / "best.pt")
        val_set = build_dataset(data, "val", TRAIN_INPUT, seed=seed)
        metrics = evaluate_model(model, val_set, flip_test=True)
        metric = primary_metric(metrics)
        clock = stage("eval", clock)

        _say("[6/7] exporting to ONNX (with an ONNX Runtime parity check)")
        derived_onnx = export_onnx(model, out / "derived.onnx", LUT_INPUT)
        max_diff = parity(model, derived_onnx, LUT_INPUT)
        reference = build_model("efficientpose-a", JOINTS)
        reference_onnx = export_onnx(reference, out / "efficientpose-a.onnx", LUT_INPUT)
        clock = stage("export", clock)

        _say("[7/7] measuring real latency: exported files in ONNX Runtime, and both networks on the agent")
        local = _time_onnx({"derived": derived_onnx, "efficientpose-a": reference_onnx}, LUT_INPUT, latency_rounds)
        on_agent = client.measure_networks(spec, [arch.ops, PRESETS["efficientpose-a"].ops], BACKEND)
        clock = stage("latency", clock)

    with torch.no_grad():
        from pose.counting import count

        counts = {"derived": count(model, LUT_INPUT), "efficientpose-a": count(reference, LUT_INPUT)}
    predicted = {"derived": table.predict(arch), "efficientpose-a": table.predict(PRESETS["efficientpose-a"])}
    names = ("derived", "efficientpose-a")
    agent_ms = {name: lat["median_ms"] for name, lat in zip(names, on_agent["latencies"], strict=True)}
    rows = {
        name: {
            "params": counts[name].params,
            "gflops_paper": round(counts[name].gflops_paper, 3),
            "lut_predicted_ms": round(predicted[name], 3),
            "agent_measured_ms": round(agent_ms[name], 3),
            "agent_clock": on_agent.get("clock"),
            "onnx_wall_ms": round(local[name]["median_ms"], 3),
            "prediction_error": round(predicted[name] / agent_ms[name] - 1.0, 4),
        }
        for name in ("derived", "efficientpose-a")
    }
    summary = {
        "out": str(out),
        "agent_device": device,
        "lut": {"file": str(lut_path), "entries": len(doc["entries"]), "id": doc["id"]},
        "arch": {"file": search["arch"], "ops": arch.ops},
        "accuracy": {
            "metric": metric,
            "value": metrics[metric],
            "metrics": metrics,
            "flip_test": True,
            "epochs": trained.get("epochs_run"),
        },
        "onnx": {"file": str(derived_onnx), "parity_max_abs_diff": max_diff},
        "models": rows,
        "stage_seconds": stage_seconds,
        "total_seconds": round(time.time() - started, 1),
        "plots": [
            str(out / "search" / "arch.png"),
            str(out / "search" / "search.png"),
            str(out / "train" / "training.png"),
            str(out / "latency.png"),
        ],
    }
    _plot(rows, out / "latency.png")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _plot(rows: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(rows)
    kinds = [
        ("lut_predicted_ms", "LUT prediction"),
        ("agent_measured_ms", "measured (agent)"),
        ("onnx_wall_ms", "ONNX file"),
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(kinds)
    for i, (key, label) in enumerate(kinds):
        ax.bar([j + i * width for j in range(len(names))], [rows[n][key] for n in names], width, label=label)
    ax.set_xticks([j + width for j in range(len(names))], names)
    ax.set_ylabel(f"{BACKEND} latency, batch 1, 1 thread (ms)")
    ax.legend(fontsize=8)
    ax.set_title("Derived network vs EfficientPose-A on this machine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(summary: dict[str, Any]) -> None:
    acc = summary["accuracy"]
    print(f"\neffpose demo finished in {summary['total_seconds']:.0f} s -> {summary['out']}")
    print(f"LUT: {summary['lut']['entries']} entries ({BACKEND}) in {summary['lut']['file']}")
    print(f"derived architecture: {' '.join(summary['arch']['ops'])}")
    name = "PCKh@0.5 Mean" if acc["metric"] == "Mean" else acc["metric"]
    print(f"accuracy on synthetic val: {name} {acc['value']:.1f} (flip test) after {acc['epochs']} epochs")
    print(f"ONNX: {summary['onnx']['file']} (parity max |diff| {summary['onnx']['parity_max_abs_diff']:.1e})")
    print()
    header = f"{'model':<18}{'params':>10}{'GFLOPs':>8}{'LUT ms':>9}{'agent ms':>10}{'err':>8}{'ONNX ms':>9}"
    print(header)
    print("-" * len(header))
    for name, row in summary["models"].items():
        print(
            f"{name:<18}{row['params'] / 1e6:>9.2f}M{row['gflops_paper']:>8.2f}{row['lut_predicted_ms']:>9.2f}"
            f"{row['agent_measured_ms']:>10.2f}{row['prediction_error']:>+8.1%}{row['onnx_wall_ms']:>9.2f}"
        )
    print(
        f"\n(agent ms: whole network timed on the agent with the LUT's method, clock "
        f"{summary['models']['derived']['agent_clock']}; ONNX ms: wall time of the exported file here)"
    )
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()))
    print("plots: " + ", ".join(summary["plots"]))


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="the main job end to end on embedded defaults (agent, LUT, search, train, eval, export, latency)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", default="effpose-demo", help="output folder (default ./effpose-demo)")
    demo.add_argument("--images", type=int, default=96, help="synthetic training images (default 96)")
    demo.add_argument("--search-epochs", type=int, default=4, help="alternating search epochs (default 4)")
    demo.add_argument("--train-minutes", type=float, default=2.5, help="training budget in minutes (default 2.5)")
    demo.add_argument(
        "--lambda",
        dest="lambda_",
        type=float,
        default=0.003,
        help="cost weight (default 0.003: in a short sampled search, larger values let the cost decide every layer)",
    )
    demo.add_argument("--arch-lr", type=float, default=0.03, help="Adam learning rate of alpha (default 0.03)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    summary = run_demo(
        args.out,
        images=args.images,
        search_epochs=args.search_epochs,
        train_minutes=args.train_minutes,
        lambda_=args.lambda_,
        arch_lr=args.arch_lr,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0
