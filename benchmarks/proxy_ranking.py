"""Can the accuracy proxy judge architectures? It must rank networks of known capacity in the known order.

Trains efficientpose-c (large space), efficientpose-a (small space) and the minimal small-space network
(``k3e3`` where ``skip`` is illegal, ``skip`` elsewhere: ``pose.proxy.minimal_arch``) with
``pose.proxy.train_and_score`` under ``pose.proxy.PROXY``, each with seeds 0, 1, 2 (the seed sets model
init, sample order and augmentation; the data and its validation split are the same for every run), and
reports PCKh@0.5 Mean as mean ± std over seeds, the per-seed values and the time per training. The
proxy passes when the means are ordered c > a > minimal; the JSON also says, per pair, on how many seeds
the order held and whether the gap exceeds both networks' spread.

    python benchmarks/proxy_ranking.py --quick   # smoke check, QUICK_PROXY, < 1 min -> results/quick/
    python benchmarks/proxy_ranking.py           # full run (~30-40 CPU minutes) -> results/proxy_ranking.json + .png

Trainings run one after another in this process with one torch thread (the proxy's setting); the JSON
is rewritten after every training, so an interrupted run keeps what it finished ("complete": false).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS_DIR, format_table, machine_info, machine_summary, write_results

from pose.proxy import PROXY, QUICK_PROXY, Proxy, minimal_arch, train_and_score

NAME = "proxy_ranking"
NETWORKS = ("efficientpose-c", "efficientpose-a", "minimal")  # expected order, best first


def _arch(name: str):
    return minimal_arch() if name == "minimal" else name


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per network: per-seed Mean, mean, sample std (n-1), time per training."""
    out: dict[str, dict] = {}
    for name in NETWORKS:
        mine = [r for r in runs if r["network"] == name]
        if not mine:
            continue
        values = [r["Mean"] for r in mine]
        out[name] = {
            "seeds": [r["seed"] for r in mine],
            "Mean_per_seed": values,
            "mean": statistics.fmean(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "cpu_seconds_mean": statistics.fmean(r["cpu_seconds"] for r in mine),
            "wall_seconds_mean": statistics.fmean(r["seconds"] for r in mine),
            "train_loss_mean": statistics.fmean(r["train_loss"] for r in mine),
        }
    return out


def verdict(summary: dict[str, dict]) -> dict:
    """Ordered means, and per adjacent pair: seeds on which the order held and whether the gap beats the spread."""
    pairs = []
    for better, worse in zip(NETWORKS, NETWORKS[1:], strict=False):
        if better not in summary or worse not in summary:
            continue
        b, w = summary[better], summary[worse]
        by_seed = dict(zip(w["seeds"], w["Mean_per_seed"], strict=True))
        held = [seed for seed, v in zip(b["seeds"], b["Mean_per_seed"], strict=True) if v > by_seed.get(seed, v)]
        gap = b["mean"] - w["mean"]
        pairs.append(
            {
                "better": better,
                "worse": worse,
                "gap": gap,
                "ordered": gap > 0,
                "seeds_ordered": f"{len(held)}/{len(b['seeds'])}",
                "gap_exceeds_both_std": gap > max(b["std"], w["std"]),
            }
        )
    complete = all(name in summary for name in NETWORKS)
    return {"ranking_holds": complete and all(p["ordered"] for p in pairs), "complete": complete, "pairs": pairs}


def plot(summary: dict[str, dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for i, s in enumerate(summary.values()):
        ax.scatter([i] * len(s["Mean_per_seed"]), s["Mean_per_seed"], color="C0", alpha=0.6, zorder=3)
        ax.errorbar(i + 0.12, s["mean"], yerr=s["std"], fmt="s", color="C3", capsize=5, zorder=4)
    ax.set_xticks(range(len(summary)), list(summary))
    ax.set_xlim(-0.5, len(summary) - 0.5)
    ax.set_ylabel("PCKh@0.5 Mean (%)")
    ax.set_title(title, fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def document(proxy: Proxy, runs: list[dict], started: float, load_start: list[float] | None) -> dict:
    summary = summarize(runs)
    return {
        "proxy": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(proxy).items()},
        "networks": list(NETWORKS),
        "runs": runs,
        "summary": summary,
        "verdict": verdict(summary),
        "total_seconds": round(time.perf_counter() - started, 1),
        "total_cpu_seconds": round(sum(r["cpu_seconds"] for r in runs), 1),
        "load_average_at_start": load_start,
    }


def report(doc: dict) -> str:
    rows = [
        [
            name,
            f"{s['mean']:.1f} ± {s['std']:.1f}",
            " / ".join(f"{v:.1f}" for v in s["Mean_per_seed"]),
            f"{s['cpu_seconds_mean']:.0f}",
            f"{s['wall_seconds_mean']:.0f}",
        ]
        for name, s in doc["summary"].items()
    ]
    table = format_table(["network", "PCKh@0.5 Mean", "per seed", "CPU s / training", "wall s / training"], rows)
    lines = [table, ""]
    for p in doc["verdict"]["pairs"]:
        lines.append(
            f"{p['better']} > {p['worse']}: gap {p['gap']:+.1f}, ordered on {p['seeds_ordered']} seeds, "
            f"gap {'exceeds' if p['gap_exceeds_both_std'] else 'within'} the spread"
        )
    lines.append(f"ranking c > a > minimal holds: {doc['verdict']['ranking_holds']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="QUICK_PROXY (tiny data, 2 epochs), seeds 0 1")
    parser.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (quick: 0 1)")
    parser.add_argument("--work", type=Path, help="folder for the training runs (default: a temporary folder)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    proxy = QUICK_PROXY if args.quick else PROXY
    seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    info = machine_info()
    print(machine_summary(info), flush=True)
    print(f"proxy {proxy}", flush=True)
    started, runs = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="proxy-ranking-") as tmp:
        work = args.work or Path(tmp)
        for seed in seeds:  # seed-major: an interrupted run still has every network at the first seeds
            for name in NETWORKS:
                result = train_and_score(_arch(name), proxy, seed, work / f"{name}-seed{seed}")
                runs.append({"network": name, **result})
                print(
                    f"[{name} seed {seed}] PCKh@0.5 Mean {result['Mean']:.2f}  loss {result['train_loss']:.5f}  "
                    f"{result['cpu_seconds']:.0f} CPU s, {result['seconds']:.0f} s",
                    flush=True,
                )
                doc = document(proxy, runs, started, info["load_average_1_5_15"])
                path = write_results(NAME, doc, args.results_dir, quick=args.quick)
    print(report(doc))
    title = f"{proxy.name}: {proxy.data}, {proxy.input_hw[0]}x{proxy.input_hw[1]}, {proxy.epochs} ep, seeds {seeds}"
    plot(doc["summary"], path.with_suffix(".png"), title)
    print(f"wrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
