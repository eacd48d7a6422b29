"""Does the search decide? Entropy, changed argmax layers and budget use per epoch, for the default recipe
(three seeds) and for the settings it was chosen against, all with one FLOPs budget on the small space.

Each run is ``effpose search --cost flops --target T`` with T = 60 % of EfficientPose-A's GFLOPs at 256x256,
everything else at ``SearchConfig``'s defaults unless the variant says otherwise. "Decided" is the issue's
test: final mean entropy <= 50 % of uniform and no argmax change over the last two epochs.

    python benchmarks/search_convergence.py --quick   # smoke check -> results/quick/search_convergence.json
    python benchmarks/search_convergence.py           # full run (~10 min on 2 cores) -> results/search_convergence.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, format_table, machine_info, machine_summary, write_results

from pose.counting import count
from pose.models import build_model

VARIANTS = {  # name -> extra flags; the default recipe is run with three seeds for the spread
    "default seed 0": ["--seed", "0"],
    "default seed 1": ["--seed", "1"],
    "default seed 2": ["--seed", "2"],
    "no commitment term": ["--entropy-weight", "0"],
    "beta 0.02, commitment 0.02": ["--beta", "0.02", "--entropy-weight", "0.02"],
}
SHARE = 0.6


def run_all(args: argparse.Namespace, target: float, work: Path) -> dict[str, dict]:
    """Every variant as its own ``effpose search`` process, ``--jobs`` at a time."""
    pending, running, results = list(VARIANTS.items()), {}, {}
    while pending or running:
        while pending and len(running) < args.jobs:
            name, flags = pending.pop(0)
            out = work / name.replace(" ", "_").replace(",", "")
            cmd = [sys.executable, "-m", "effpose.cli", "search", "--cost", "flops", "--target", f"{target:.6f}",
                   "--threads", "1", "--no-progress", "--json", "--out", str(out), *flags]  # fmt: skip
            if args.quick:
                cmd += ["--data", "synthetic-mpii-easy:32", "--warmup-epochs", "1", "--epochs", "3"]
            with (work / f"{out.name}.json").open("w") as res, (work / f"{out.name}.err").open("w") as err:
                running[name] = (subprocess.Popen(cmd, stdout=res, stderr=err), time.perf_counter(), out)
        time.sleep(0.5)
        for name, (proc, t0, out) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            if proc.returncode != 0:
                raise RuntimeError(f"{name} failed; see {out}.err")
            summary = json.loads((work / f"{out.name}.json").read_text())
            history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
            results[name] = describe(summary, history, target, time.perf_counter() - t0)
            print(f"[run] {name}: {results[name]['convergence']}", file=sys.stderr, flush=True)
    return {name: results[name] for name in VARIANTS}


def describe(summary: dict, history: list[dict], target: float, seconds: float) -> dict:
    search = [r for r in history if r["phase"] == "search"]
    return {
        "seconds": round(seconds, 1),
        "entropy": [r["entropy"] for r in history],
        "changed_layers": [r.get("changed_layers") for r in history],
        "expected_over_target": [r["expected_cost"]["flops"] / target for r in history],
        "argmax_over_target": search[-1]["derived_cost"]["flops"] / target if search else None,
        "derived_over_target": summary["predicted_cost"]["flops"]["value"] / target,
        "repair_changes": len(summary.get("repair", {}).get("changes", [])),
        "ops": summary["ops"],
        "convergence": summary["convergence"],
    }


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    for name, r in results.items():
        epochs = range(1, len(r["entropy"]) + 1)
        style = "-" if name.startswith("default") else "--"
        ax1.plot(epochs, r["entropy"], style, marker=".", label=name)
        ax2.plot(epochs, r["expected_over_target"], style, marker=".", label=name)
    uniform = next(iter(results.values()))["convergence"].get("uniform_entropy")
    if uniform:
        ax1.axhline(0.5 * uniform, color="k", linestyle=":", linewidth=1, label="50 % of uniform")
    ax1.set_title("mean alpha entropy (nats)")
    ax2.axhline(1.0, color="k", linestyle=":", linewidth=1)
    ax2.set_title("expected GFLOPs / target")
    for ax in (ax1, ax2):
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny data, few epochs (smoke check)")
    parser.add_argument("--jobs", type=int, default=2, help="searches at once (default 2, one thread each)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    info = machine_info()
    print(f"machine: {machine_summary(info)}", file=sys.stderr)
    target = SHARE * count(build_model("efficientpose-a", 16), (256, 256)).gflops_paper
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="search_convergence_") as tmp:
        results = run_all(args, target, Path(tmp))
    data = {"target_gflops": target, "share_of_efficientpose_a": SHARE, "variants": VARIANTS, "runs": results,
            "total_seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
    path = write_results("search_convergence", data, args.results_dir, quick=args.quick)
    rows = []
    for name, r in results.items():
        c = r["convergence"]
        rows.append([name, f"{100 * c['entropy_vs_uniform']:.0f}%", str(c["changed_layers_last_two"]),
                     "yes" if c["decided"] else "no", f"{r['expected_over_target'][-1]:.2f}",
                     f"{r['argmax_over_target']:.2f}", r["repair_changes"], f"{r['derived_over_target']:.3f}",
                     r["seconds"]])  # fmt: skip
    headers = ["run", "entropy/uniform", "changed last 2", "decided", "E[cost]/T", "argmax/T", "repaired",
               "derived/T", "seconds"]  # fmt: skip
    print(format_table(headers, rows))
    plot(results, path.with_suffix(".png"), f"small space, flops target {target:.3f} GFLOPs; {info['cpu_model']}")
    print(f"results: {path} (+ .png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
