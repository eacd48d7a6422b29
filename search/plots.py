"""Pictures of a search: the derived architecture in the manner of the paper's Fig. 4, and the search curves."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from pose.space import CANDIDATE_OPS, SKIP, ArchSpec  # noqa: E402

OP_COLOURS = {
    "k3e3": "#c6dbef",
    "k3e6": "#6baed6",
    "k5e3": "#c7e9c0",
    "k5e6": "#41ab5d",
    "k7e3": "#fdd0a2",
    "k7e6": "#f16913",
    SKIP: "#f0f0f0",
}


def plot_arch(arch: ArchSpec, path: str | Path, title: str = "") -> None:
    """One box per searchable layer labelled kKeE (height grows with the kernel, width with the expansion),
    coloured by op, stages separated and labelled with their channels and stride, like Fig. 4."""
    space = arch.search_space
    layers = space.layers()
    n = len(layers)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.42 * n + 2), 3.2))
    x = 0.0
    gap = 0.6
    stage_start = 0.0
    for layer, op in zip(layers, arch.ops, strict=True):
        if layer.position == 0 and layer.index > 0:
            x += gap
            stage_start = x
        if op == SKIP:
            h, w = 0.5, 0.8
        else:
            k, e = int(op[1]), int(op[3:])
            h, w = 0.6 + 0.2 * k, 0.6 + 0.05 * e
        ax.add_patch(Rectangle((x + (1 - w) / 2, -h / 2), w * 0.9, h, facecolor=OP_COLOURS[op], edgecolor="#333333"))
        ax.text(x + 0.5, 0, op if op != SKIP else "skip", rotation=90, ha="center", va="center", fontsize=7)
        x += 1.0
        if layer.position == space.stages[layer.stage].layers - 1:
            stage = space.stages[layer.stage]
            mid = (stage_start + x) / 2
            ax.annotate("", xy=(stage_start, -1.35), xytext=(x, -1.35), arrowprops={"arrowstyle": "-", "color": "#555"})
            ax.text(
                mid,
                -1.6,
                f"stage {layer.stage + 1}: {stage.channels}ch s{stage.stride}",
                ha="center",
                va="top",
                fontsize=8,
            )
    handles = [Rectangle((0, 0), 1, 1, facecolor=OP_COLOURS[o], edgecolor="#333") for o in CANDIDATE_OPS]
    ax.legend(
        handles,
        CANDIDATE_OPS,
        ncol=len(CANDIDATE_OPS),
        loc="upper center",
        bbox_to_anchor=(0.5, 1.02),
        fontsize=7,
        frameon=False,
    )
    ax.set_xlim(-0.5, x + 0.5)
    ax.set_ylim(-2.2, 2.4)
    ax.axis("off")
    name = arch.name or "derived architecture"
    ax.set_title(f"{name} ({space.name} space){' - ' + title if title else ''}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(history: list[dict[str, Any]], path: str | Path) -> None:
    """Expected cost per term (over its target, else over epoch 1), mean alpha entropy with the number of
    layers whose argmax changed, and the heatmap MSE, per epoch: is the search converging?"""
    epochs = [r["epoch"] for r in history]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.4))
    budgets = history[-1].get("utilisation", {})
    for name in history[0].get("expected_cost", {}):
        values = [r["expected_cost"][name] for r in history]
        if name in budgets:  # expected cost / target: 1 is on budget
            target = values[-1] / budgets[name]
            ax1.plot(epochs, [v / target for v in values], marker="o", label=f"{name} / target {target:.4g}")
        else:
            ax1.plot(epochs, [v / values[0] for v in values], marker="o", label=f"{name} / epoch 1 ({values[0]:.4g})")
    ax1.set_title("expected cost (relative)")
    ax1.set_xlabel("epoch")
    ax1.legend(fontsize=7)
    ax2.plot(epochs, [r["entropy"] for r in history], marker="o", color="#6a51a3", label="entropy (nats)")
    ax2.set_title("mean alpha entropy and changed argmax layers")
    ax2.set_xlabel("epoch")
    changed = [(r["epoch"], r["changed_layers"]) for r in history if r.get("changed_layers") is not None]
    if changed:
        twin = ax2.twinx()
        twin.bar([e for e, _ in changed], [c for _, c in changed], color="#fd8d3c", alpha=0.4, width=0.6)
        twin.set_ylabel("layers whose argmax changed", fontsize=8)
        twin.set_zorder(ax2.get_zorder() - 1)
        ax2.patch.set_visible(False)
    if budgets:
        ax1.axhline(1.0, color="#cb181d", linestyle=":", linewidth=1)
    ax3.plot(epochs, [r["val_loss"] for r in history], marker="o", color="#cb181d", label="validation")
    ax3.plot(epochs, [r["train_loss"] for r in history], marker=".", color="#999", label="train")
    ax3.set_title("heatmap MSE")
    ax3.set_xlabel("epoch")
    ax3.legend(fontsize=7)
    warm = [r["epoch"] for r in history if r["phase"] == "warmup"]
    for ax in (ax1, ax2, ax3):
        if warm:
            ax.axvspan(min(warm) - 0.5, max(warm) + 0.5, color="#eeeeee", zorder=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
