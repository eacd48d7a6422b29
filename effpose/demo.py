"""``effpose demo``: the whole product on embedded defaults, in minutes on a laptop CPU.

local agent -> onnxruntime-cpu LUT of the small space -> a latency budget (a share of EfficientPose-A's
predicted latency on this machine) -> synthetic MPII-format data -> budgeted search with the LUT cost ->
train the derived network -> evaluate -> export ONNX -> the derived network's latency measured on the
agent next to the LUT's prediction and the budget, beside EfficientPose-A -> summary table and plots.

This is the one module that joins all three packages (pose, lut_service, search) in one flow.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

BACKEND = "onnxruntime-cpu"
LUT_INPUT = (256, 256)  # the input the LUT, the export and the latency comparison use
TRAIN_INPUT = (64, 64)  # search and training at the accuracy proxy's input (pose.proxy) to fit minutes on a CPU
JOINTS = 16  # synthetic MPII-format data: the paper searches on MPII and PCKh moves within minutes
REFERENCE = "efficientpose-a"
PLOTS = ("search/arch.png", "search/search.png", "train/training.png", "latency.png")


@dataclass
class DemoConfig:
    """The demo's knobs; the defaults fit about 10 minutes on a 2-core laptop, set-up included. The search
    runs with ``search.loop.SearchConfig``'s defaults (the recipe measured to converge), on fewer images."""

    out: Path = Path("effpose-demo")
    images: int = 512
    budget_share: float = 0.6  # latency budget = this share of EfficientPose-A's predicted latency
    warmup_epochs: int | None = None  # None: SearchConfig's
    search_epochs: int | None = None
    max_batches: int | None = None
    train_minutes: float = 2.5
    seed: int = 0
    latency_rounds: int = 40


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _Stages:
    """Numbered progress lines and the seconds each stage took."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.seconds = total, 0, {}
        self.clock = time.time()

    def start(self, message: str) -> None:
        self.index += 1
        _say(f"[{self.index}/{self.total}] {message}")

    def done(self, name: str) -> None:
        now = time.time()
        self.seconds[name] = round(now - self.clock, 1)
        self.clock = now
        _say(f"   ... {name} took {self.seconds[name]:.1f} s")


def _search(cfg: DemoConfig, data: str, lut_path: Path, budget_ms: float) -> dict[str, Any]:
    from search.loop import SearchConfig, run_search

    search_cfg = SearchConfig(
        space="small", data=data, costs=[str(lut_path)], targets=[budget_ms], input_hw=TRAIN_INPUT,
        cost_input_hw=LUT_INPUT, seed=cfg.seed, max_batches=cfg.max_batches,
    )  # fmt: skip
    if cfg.warmup_epochs is not None:
        search_cfg.warmup_epochs = cfg.warmup_epochs
    if cfg.search_epochs is not None:
        search_cfg.epochs = cfg.search_epochs
    return run_search(search_cfg, cfg.out / "search", resume=False, progress=True)


def _train_and_evaluate(cfg: DemoConfig, data: str, arch_path: str) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    from pose.checkpoint import load_model
    from pose.data import build_dataset
    from pose.evaluate import evaluate_model, primary_metric
    from pose.train import TrainConfig, train

    train_cfg = TrainConfig(
        arch=arch_path,
        data=data,
        epochs=100,
        batch_size=16,
        input_hw=TRAIN_INPUT,
        max_minutes=cfg.train_minutes,
        seed=cfg.seed,
    )
    trained = train(train_cfg, cfg.out / "train")
    model, _ = load_model(cfg.out / "train" / "best.pt")
    metrics = evaluate_model(model, build_dataset(data, "val", TRAIN_INPUT, seed=cfg.seed), flip_test=True)
    metric = primary_metric(metrics)
    accuracy = {
        "metric": metric,
        "value": metrics[metric],
        "metrics": metrics,
        "flip_test": True,
        "epochs": trained.get("epochs_run"),
    }
    return model, accuracy, trained


def time_onnx_files(paths: dict[str, Path], rounds: int) -> dict[str, dict[str, float]]:
    """Median/p10/p90 wall ms of each exported file on 1 ORT thread here, in shuffled interleaved rounds."""
    import functools

    import numpy as np
    from tqdm import tqdm

    from lut_service.timing import shuffled_rounds, timing_stats, wall_clock
    from pose.export import OnnxPoseModel

    image = np.random.default_rng(0).standard_normal((1, 3, *LUT_INPUT), dtype=np.float32)
    runners = {name: OnnxPoseModel(path, device="cpu", threads=1) for name, path in paths.items()}
    with tqdm(total=rounds, desc="latency", unit="round", file=sys.stderr) as bar:
        samples = shuffled_rounds(
            {name: wall_clock(functools.partial(model, image)) for name, model in runners.items()},
            rounds,
            warmup=3,
            progress=lambda: bar.update(1),
        )
    stats = {name: timing_stats(values) for name, values in samples.items()}
    return {name: {"median_ms": t.median_ms, "p10_ms": t.p10_ms, "p90_ms": t.p90_ms} for name, t in stats.items()}


def _latency_rows(
    models: dict[str, Any], predicted: dict[str, float], on_agent: dict[str, Any], local: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    import torch

    from pose.counting import count

    rows = {}
    for (name, model), measured in zip(models.items(), on_agent["latencies"], strict=True):
        with torch.no_grad():
            counts = count(model, LUT_INPUT)
        rows[name] = {
            "params": counts.params,
            "gflops_paper": round(counts.gflops_paper, 3),
            "lut_predicted_ms": round(predicted[name], 3),
            "agent_measured_ms": round(measured["median_ms"], 3),
            "agent_clock": on_agent.get("clock"),
            "onnx_wall_ms": round(local[name]["median_ms"], 3),
            "prediction_error": round(predicted[name] / measured["median_ms"] - 1.0, 4),
        }
    return rows


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run every stage and return the summary (also written to OUT/summary.json)."""
    from lut_service.client import AgentClient
    from lut_service.local import LocalAgent
    from lut_service.lut import LutTable, drift_now, save_document
    from lut_service.stability import describe, unstable_warning
    from pose.export import export_onnx, parity
    from pose.models import PRESETS, build_model
    from pose.space import ArchSpec, TableSpec

    cfg.out = Path(cfg.out).resolve()
    cfg.out.mkdir(parents=True, exist_ok=True)
    data = f"synthetic-mpii-easy:{cfg.images}"
    started = time.time()
    stages = _Stages(7)
    spec = TableSpec("small", LUT_INPUT, joints=JOINTS)
    stages.start(f"starting a local profiler agent (database {cfg.out / 'agent.db'})")
    with LocalAgent(cfg.out / "agent.db") as agent, AgentClient(agent.url, cache_dir=cfg.out / "lut-cache") as client:
        device = client.device()
        _say(f"      agent {agent.url} on {device.get('fingerprint', device).get('cpu', 'this machine')}")
        _say(f"      building the {BACKEND} LUT of the small space at {LUT_INPUT[0]}x{LUT_INPUT[1]}, batch 1, 1 thread")
        doc = client.request_lut(spec, BACKEND)
        lut_path = save_document(doc, cfg.out / f"lut-{BACKEND}.json")
        table = LutTable.from_document(doc)
        reference_ms = table.predict(PRESETS[REFERENCE])
        budget_ms = cfg.budget_share * reference_ms
        stages.done("lut")

        stages.start(
            f"budgeted search: {budget_ms:.2f} ms = {cfg.budget_share:.0%} of {REFERENCE}'s {reference_ms:.2f} ms "
            f"(synthetic MPII-format data, {cfg.images} training images)"
        )
        search = _search(cfg, data, lut_path, budget_ms)
        arch = ArchSpec.load(search["arch"])
        stages.done("search")

        stages.start(f"training the derived network for {cfg.train_minutes:g} min, then evaluating it (flip test)")
        model, accuracy, _ = _train_and_evaluate(cfg, data, search["arch"])
        stages.done("train+eval")

        stages.start("exporting to ONNX (with an ONNX Runtime parity check)")
        derived_onnx = export_onnx(model, cfg.out / "derived.onnx", LUT_INPUT)
        max_diff = parity(model, derived_onnx, LUT_INPUT)
        reference = build_model(REFERENCE, JOINTS)
        reference_onnx = export_onnx(reference, cfg.out / f"{REFERENCE}.onnx", LUT_INPUT)
        stages.done("export")

        stages.start("measuring real latency: both networks on the agent, and the exported files here")
        # with the table's reference network in the same job: how far the machine moved since the build
        drift = drift_now(client, doc, [arch.ops, PRESETS[REFERENCE].ops])
        on_agent = {"clock": drift["clock"], "latencies": drift.pop("latencies")}
        local = time_onnx_files({"derived": derived_onnx, REFERENCE: reference_onnx}, cfg.latency_rounds)
        stages.done("latency")

    predicted = {"derived": table.predict(arch), REFERENCE: reference_ms}
    rows = _latency_rows({"derived": model, REFERENCE: reference}, predicted, on_agent, local)
    for name, row in rows.items():  # the same prediction, corrected by the reference's drift since the build
        row["lut_corrected_ms"] = round(predicted[name] * drift["factor"], 3)
        row["corrected_error"] = round(row["lut_corrected_ms"] / row["agent_measured_ms"] - 1.0, 4)
    summary = {
        "out": str(cfg.out),
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "agent_device": device,
        "lut": {
            "file": str(lut_path),
            "entries": len(doc["entries"]),
            "id": doc["id"],
            "trust": describe(doc),
            "unstable": unstable_warning(doc.get("stability")),
        },
        "drift": drift,
        "budget": {
            "target_ms": round(budget_ms, 3),
            "share_of_reference": cfg.budget_share,
            "reference": REFERENCE,
            "predicted_ms": round(predicted["derived"], 3),
            "measured_ms": rows["derived"]["agent_measured_ms"],
            "repair": search.get("repair", {}).get("changes", []),
        },
        "convergence": search.get("convergence"),
        "arch": {"file": search["arch"], "ops": arch.ops},
        "accuracy": accuracy,
        "onnx": {"file": str(derived_onnx), "parity_max_abs_diff": max_diff},
        "models": rows,
        "stage_seconds": stages.seconds,
        "total_seconds": round(time.time() - started, 1),
        "plots": [str(cfg.out / p) for p in PLOTS],
    }
    _plot(rows, budget_ms, cfg.out / "latency.png")
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _plot(rows: dict[str, dict[str, Any]], budget_ms: float, path: Path) -> None:
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
    ax.axhline(budget_ms, color="#cb181d", linestyle="--", linewidth=1, label=f"budget {budget_ms:.2f} ms")
    ax.set_xticks([j + width for j in range(len(names))], names)
    ax.set_ylabel(f"{BACKEND} latency, batch 1, 1 thread (ms)")
    ax.legend(fontsize=8)
    ax.set_title(f"Derived network vs {REFERENCE} on this machine")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_summary(summary: dict[str, Any]) -> None:
    from lut_service.lut import drift_words

    acc, budget = summary["accuracy"], summary["budget"]
    print(f"\neffpose demo finished in {summary['total_seconds']:.0f} s -> {summary['out']}")
    print(f"LUT: {summary['lut']['entries']} entries ({BACKEND}) in {summary['lut']['file']}")
    for line in summary["lut"].get("trust", []):
        print(f"  {line}")
    print(f"derived architecture: {' '.join(summary['arch']['ops'])}")
    print(
        f"budget {budget['target_ms']:.2f} ms ({budget['share_of_reference']:.0%} of {budget['reference']}): "
        f"predicted {budget['predicted_ms']:.2f} ms ({budget['predicted_ms'] / budget['target_ms']:.0%} of it), "
        f"measured on the agent {budget['measured_ms']:.2f} ms ({budget['measured_ms'] / budget['target_ms']:.0%})"
    )
    for change in budget["repair"]:
        print(f"  repair: layer {change['layer']} {change['old']} -> {change['new']} ({change['reason']})")
    conv = summary.get("convergence") or {}
    if "final_entropy" in conv:
        print(
            f"search: entropy {conv['final_entropy']:.3f} nats ({conv['entropy_vs_uniform']:.0%} of uniform), "
            f"layers changed in the last two epochs {conv['changed_layers_last_two']}"
        )
    name = "PCKh@0.5 Mean" if acc["metric"] == "Mean" else acc["metric"]
    print(f"accuracy on synthetic val: {name} {acc['value']:.1f} (flip test) after {acc['epochs']} epochs")
    print(f"ONNX: {summary['onnx']['file']} (parity max |diff| {summary['onnx']['parity_max_abs_diff']:.1e})")
    print()
    header = f"{'model':<18}{'params':>10}{'GFLOPs':>8}{'LUT ms':>9}{'agent ms':>10}{'err':>8}"
    header += f"{'LUT x d':>9}{'err d':>8}{'ONNX ms':>9}"
    print(header)
    print("-" * len(header))
    for model, row in summary["models"].items():
        print(
            f"{model:<18}{row['params'] / 1e6:>9.2f}M{row['gflops_paper']:>8.2f}{row['lut_predicted_ms']:>9.2f}"
            f"{row['agent_measured_ms']:>10.2f}{row['prediction_error']:>+8.1%}"
            f"{row.get('lut_corrected_ms', float('nan')):>9.2f}{row.get('corrected_error', float('nan')):>+8.1%}"
            f"{row['onnx_wall_ms']:>9.2f}"
        )
    print(
        f"\n(LUT ms: the table's raw sum; agent ms: whole network timed on the agent now with the LUT's method, "
        f"clock {summary['models']['derived']['agent_clock']}; err: raw sum vs agent; ONNX ms: wall time of the "
        "exported file here)"
    )
    if summary.get("drift"):
        print(f"(LUT x d, err d: the raw sum corrected for drift since the build, {drift_words(summary['drift'])})")
    if summary["lut"].get("unstable"):
        print(f"WARNING: {summary['lut']['unstable']}")
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in summary["stage_seconds"].items()))
    print("plots: " + ", ".join(summary["plots"]))


def register(commands: argparse._SubParsersAction) -> None:
    defaults = DemoConfig()
    demo = commands.add_parser(
        "demo",
        help="the main job end to end on embedded defaults (agent, LUT, budgeted search, train, eval, export, latency)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", default=str(defaults.out), help="output folder (default ./effpose-demo)")
    demo.add_argument("--images", type=int, default=defaults.images, help="synthetic training images (default 512)")
    demo.add_argument(
        "--budget-share",
        type=float,
        default=defaults.budget_share,
        help="latency budget as a share of EfficientPose-A's predicted latency on this machine (default 0.6)",
    )
    demo.add_argument("--search-epochs", type=int, default=None, help="search epochs after warm-up (default 8)")
    demo.add_argument("--train-minutes", type=float, default=defaults.train_minutes, help="training budget, minutes")
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    if not 0.0 < args.budget_share <= 2.0:
        raise ValueError(f"--budget-share must be in (0, 2], got {args.budget_share}")
    cfg = DemoConfig(
        out=Path(args.out),
        images=args.images,
        budget_share=args.budget_share,
        search_epochs=args.search_epochs,
        train_minutes=args.train_minutes,
        seed=args.seed,
    )
    summary = run_demo(cfg)
    if args.json:
        print(json.dumps(summary))
    else:
        print_summary(summary)
    return 0
