"""``effpose search``: differentiable architecture search (or the random-search baseline) -> OUT/arch.json."""

from __future__ import annotations

import argparse
import json
import sys

from pose.space import parse_hw


def register(commands: argparse._SubParsersAction) -> None:
    """Add this package's subcommands to the ``effpose`` parser (defaults from ``SearchConfig``)."""
    from search.loop import SearchConfig

    p = commands.add_parser(
        "search",
        help="search a backbone with a FLOPs/params/latency cost (differentiable NAS or random baseline)",
        description=(
            "Differentiable architecture search (paper Sec. 3.1-3.2): supernet of mixed ops, loss = MSE + "
            "lambda * log_tau(expected cost). Writes OUT/arch.json, OUT/arch.png, OUT/search.png, "
            "OUT/log.jsonl and OUT/search.json."
        ),
    )
    d = SearchConfig()
    p.add_argument("--space", default="small", help="small, large or a search-space JSON file (default small)")
    p.add_argument(
        "--data",
        default=d.data,
        metavar="SPEC",
        help=f"coco:ROOT, mpii:ROOT, synthetic[-mpii[-easy]][:N] (default {d.data}, the accuracy proxy's data)",
    )
    p.add_argument(
        "--cost",
        action="append",
        metavar="COST",
        help="flops, params, a LUT file, a LUT URL (.../v1/luts/ID, of any device in the agent's store), an agent "
        "URL (http://HOST:PORT?backend=onnxruntime-cpu&threads=1&batch=1; add &device=ID for another device's "
        "stored table) or a table-list filter (http://HOST:PORT/v1/luts?device=ID&backend=NAME[&space=&batch="
        "&threads=], which must select one complete table; see `effpose lut list`); repeat for several cost terms",
    )
    p.add_argument(
        "--lambda",
        dest="lambdas",
        action="append",
        type=float,
        metavar="L",
        help="weight of the cost term (one, or one per --cost; default 0.02). On synthetic data the MSE gradient "
        "reaching alpha is ~0.07x (mixed) / ~0.01x (sampled) of the lambda=1 cost gradient, so lambda >~ 0.1 lets "
        "the cost dominate (the cheapest ops win) and lambda ~0.01-0.05 trades accuracy against cost",
    )
    p.add_argument(
        "--target",
        dest="targets",
        action="append",
        type=float,
        metavar="T",
        help="budget of the matching --cost, in its unit: ms for a LUT or agent, GFLOPs (paper convention) for "
        "flops, millions for params; give one per --cost. With targets the search holds the expected cost at "
        "the budget (search.budget) instead of lambda * log_tau(cost), and the derived network is repaired to "
        "fit every budget",
    )
    p.add_argument(
        "--beta",
        type=float,
        default=1.0,
        help="weight of the budget loss beta * |max_i E[cost_i]/T_i - 1| (default 1; scale-free)",
    )
    p.add_argument(
        "--tau",
        dest="taus",
        action="append",
        type=float,
        metavar="T",
        help="log base of the cost term, > 1 (one, or one per --cost; default 10)",
    )
    p.add_argument(
        "--mode",
        choices=("mixed", "sampled"),
        default=d.mode,
        help="mixed: weighted sum of all candidates (Eq. 3); sampled: one Gumbel-sampled path per step",
    )
    p.add_argument(
        "--warmup-epochs", type=int, default=d.warmup_epochs, help=f"weight-only epochs (default {d.warmup_epochs})"
    )
    p.add_argument(
        "--epochs", type=int, default=d.epochs, help=f"alternating weight/alpha epochs after it (default {d.epochs})"
    )
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument(
        "--input", type=parse_hw, default=d.input_hw, help="training input HxW (default 64x64 as the proxy)"
    )
    p.add_argument(
        "--cost-input",
        type=parse_hw,
        default=(256, 256),
        help="input HxW the cost is computed / requested at (default 256x256; a LUT file uses its own)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-lr", type=float, default=0.05, help="SGD learning rate of the weights (cosine to 0)")
    p.add_argument(
        "--arch-lr", type=float, default=d.arch_lr, help=f"Adam lr of alpha (default {d.arch_lr}; paper 3e-4)"
    )
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help=f"Gumbel temperature of sampled alpha steps at the first search epoch (default {d.gumbel_temperature})",
    )
    p.add_argument(
        "--temperature-end",
        type=float,
        default=None,
        help=f"Gumbel temperature at the last search epoch, geometric annealing (default {d.gumbel_temperature_end})",
    )
    p.add_argument(
        "--entropy-weight",
        type=float,
        default=None,
        help="weight of the mean alpha entropy in the alpha loss, ramped from 0 at the first search epoch to this "
        f"at the last: makes the search commit (default {d.entropy_weight}; 0 turns it off)",
    )
    p.add_argument(
        "--task-term",
        choices=["mse", "log-mse"],
        default=d.task_term,
        help="accuracy term of the alpha loss: the heatmap MSE (default) or its log, a relative change that weighs "
        "against the budget's relative cost whatever the loss's scale",
    )
    p.add_argument("--drop-path", type=float, default=0.2, help="drop probability of a candidate in weight steps")
    p.add_argument("--max-batches", type=int, default=None, help="cap on batches per phase and epoch (smoke runs)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's choice); a resumed run reproduces the uninterrupted one "
        "bit for bit only with the same thread count",
    )
    p.add_argument("--resume", action="store_true", help="continue the search checkpointed in OUT")
    p.add_argument("--random", type=int, metavar="N", help="random-search baseline: N random architectures")
    p.add_argument("--short-epochs", type=int, default=5, metavar="E", help="epochs per random architecture")
    p.add_argument("--json", action="store_true", help="print one JSON summary on stdout and nothing else")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, metavar="DIR")
    p.set_defaults(func=cmd_search)


def cmd_search(args: argparse.Namespace) -> int:
    import torch

    from search.loop import SearchConfig, run_random_search, run_search

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)

    cfg = SearchConfig(
        space=args.space,
        data=args.data,
        costs=args.cost or ["flops"],
        lambdas=args.lambdas or [0.02],
        taus=args.taus or [10.0],
        mode=args.mode,
        warmup_epochs=args.warmup_epochs,
        epochs=args.epochs,
        batch_size=args.batch_size,
        input_hw=args.input,
        cost_input_hw=args.cost_input,
        seed=args.seed,
        weight_lr=args.weight_lr,
        arch_lr=args.arch_lr,
        drop_path=args.drop_path,
        targets=args.targets,
        beta=args.beta,
        task_term=args.task_term,
        workers=args.workers,
        max_batches=args.max_batches,
    )
    for name, value in (
        ("gumbel_temperature", args.temperature),
        ("gumbel_temperature_end", args.temperature_end),
        ("entropy_weight", args.entropy_weight),
    ):
        if value is not None:
            setattr(cfg, name, value)
    progress = not args.no_progress
    if args.random is not None:
        summary = run_random_search(cfg, args.out, args.random, args.short_epochs, args.resume, progress)
    else:
        summary = run_search(cfg, args.out, args.resume, progress)
        if summary is None:  # another process of a torchrun search: rank 0 prints the summary
            return 0
    if args.json:
        summary = {k: v for k, v in summary.items() if k != "probs"}
        print(json.dumps(summary))
        return 0
    print(f"derived architecture: {summary['arch']}")
    print("ops: " + " ".join(summary["ops"]))
    print_budget(summary)
    if "random" in summary:
        best = summary["random"]["best"]
        print(
            f"best of {summary['random']['n']} random architectures: #{best['index']} "
            f"val accuracy {best['val_accuracy']:.3f}"
        )
    print(f"pictures: {summary['out']}/arch.png" + ("" if "random" in summary else f", {summary['out']}/search.png"))
    sys.stdout.flush()
    return 0


def print_budget(summary: dict) -> None:
    """Predicted cost against target per term, the layers the repair step changed, and convergence figures."""
    from lut_service.lut import drift_words

    for name, value in summary["predicted_cost"].items():
        line = (
            f"predicted {name}: {value['value']:.4g} {value['unit']} (input {value['input'][0]}x{value['input'][1]}, "
            f"batch {value['batch']})"
        )
        if "target" in value:
            verdict = "within budget" if value["within"] else "OVER BUDGET"
            line += f" | target {value['target']:.4g} {value['unit']}: {100 * value['used']:.1f}% used, {verdict}"
        print(line)
    for change in summary.get("repair", {}).get("changes", []):
        print(f"repair: layer {change['layer']} {change['old']} -> {change['new']} ({change['reason']})")
    conv = summary.get("convergence")
    if conv and "final_entropy" in conv:
        print(
            f"convergence: entropy {conv['final_entropy']:.3f} nats = {100 * conv['entropy_vs_uniform']:.0f}% of "
            f"uniform, layers changed in the last two epochs {conv['changed_layers_last_two']}: "
            + ("decided" if conv["decided"] else "NOT decided (more epochs, a higher --arch-lr or --entropy-weight)")
        )
    for name, m in summary.get("measured", {}).items():
        print(
            f"measured on {m['agent']}: {m['ms']:.3f} ms end to end ({m['backend']}, {m['threads']} thread(s), "
            f"batch {m['batch']}) vs predicted {summary['predicted_cost'][name]['value']:.3f} ms "
            f"({100 * (summary['predicted_cost'][name]['value'] / m['ms'] - 1):+.1f}%)"
        )
        if m.get("drift"):  # the table's reference network re-timed in the same job (lut_service.lut.drift_now)
            corrected = summary["predicted_cost"][name]["value"] * m["drift"]["factor"]
            print(
                f"  drift since the table was built: {drift_words(m['drift'])}; predicted raw "
                f"{summary['predicted_cost'][name]['value']:.3f} ms, drift-corrected {corrected:.3f} ms "
                f"({100 * (corrected / m['ms'] - 1):+.1f}%)"
            )
