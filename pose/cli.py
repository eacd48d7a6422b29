"""``effpose model ...`` (and the data/train/eval/infer commands registered below)."""

from __future__ import annotations

import argparse
import json
import sys

from pose.counting import count, group_counts
from pose.export import PARITY_TOLERANCE, export_onnx, parity
from pose.models import MODEL_NAMES, PoseNet, build_model, heatmap_shape, resolve_arch
from pose.space import parse_hw

ARCH_HELP = f"a preset or baseline ({', '.join(MODEL_NAMES)}) or an arch-spec JSON file"


def register(commands: argparse._SubParsersAction) -> None:
    model = commands.add_parser("model", help="inspect and export pose networks")
    model_commands = model.add_subparsers(dest="model_command", required=True, metavar="SUBCOMMAND")

    info = model_commands.add_parser("info", help="parameters and GFLOPs (paper convention and true MACs)")
    info.add_argument("arch", metavar="ARCH", help=ARCH_HELP)
    info.add_argument("--input", default="256x256", type=parse_hw, help="input HxW (default 256x256)")
    info.add_argument("--joints", default=16, type=int, help="number of heatmaps (16 MPII, 17 COCO)")
    info.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    info.set_defaults(func=cmd_model_info)

    export = model_commands.add_parser("export", help="export to ONNX and check parity with ONNX Runtime")
    export.add_argument("arch", metavar="ARCH", help=ARCH_HELP)
    export.add_argument("--onnx", required=True, metavar="FILE", help="output .onnx path")
    export.add_argument("--input", default="256x256", type=parse_hw, help="input HxW (default 256x256)")
    export.add_argument("--joints", default=16, type=int, help="number of heatmaps (16 MPII, 17 COCO)")
    export.add_argument("--batch", default="1", help="batch size, or 'dynamic' for a symbolic batch axis")
    export.add_argument("--checkpoint", help="load weights from a training checkpoint (default: random init)")
    export.set_defaults(func=cmd_model_export)

    from pose.commands import register_workflow  # data synth, train, eval, infer

    register_workflow(commands)


def model_info(arch: str, input_hw: tuple[int, int], joints: int) -> dict:
    model = build_model(arch, joints)
    counts = count(model, input_hw)
    resolved = resolve_arch(arch)
    info = {
        "arch": arch if isinstance(arch, str) else "arch-spec",
        "space": getattr(getattr(resolved, "search_space", None), "name", None),
        "params": counts.params,
        "gflops_paper": round(counts.gflops_paper, 4),
        "gmacs": round(counts.gmacs, 4),
        "input": list(input_hw),
        "heatmap": list(heatmap_shape(model, input_hw)),
        "joints": joints,
        "parts": [],
    }
    if isinstance(model, PoseNet):
        groups = group_counts(model, counts, depth=2)
        parts: dict[str, list[int]] = {}
        for name, (params, paper, true) in groups.items():
            if name.startswith("layers."):
                label = f"stage {model.stage_of_layer[int(name.split('.')[1])] + 1}"
            else:
                label = name.split(".")[0]
            entry = parts.setdefault(label, [0, 0, 0])
            entry[0] += params
            entry[1] += paper
            entry[2] += true
    else:
        parts = {k: list(v) for k, v in group_counts(model, counts, depth=1).items()}
    info["parts"] = [
        {"part": k, "params": v[0], "gflops_paper": round(v[1] / 2**30, 4), "gmacs": round(v[2] / 1e9, 4)}
        for k, v in parts.items()
    ]
    return info


def cmd_model_info(args: argparse.Namespace) -> int:
    info = model_info(args.arch, args.input, args.joints)
    if args.json:
        print(json.dumps(info))
        return 0
    h, w = info["input"]
    print(f"{args.arch}  input {h}x{w}  joints {args.joints}  heatmap {'x'.join(map(str, info['heatmap']))}")
    print(f"{'part':<12}{'params':>12}{'GFLOPs(paper)':>16}{'GMACs(true)':>14}")
    for part in info["parts"]:
        print(f"{part['part']:<12}{part['params']:>12,}{part['gflops_paper']:>16.3f}{part['gmacs']:>14.3f}")
    print(f"{'total':<12}{info['params']:>12,}{info['gflops_paper']:>16.3f}{info['gmacs']:>14.3f}")
    print(
        f"params {info['params'] / 1e6:.2f}M | GFLOPs {info['gflops_paper']:.2f} (paper convention: conv MACs, "
        f"deconvs at output size, /2^30) | {info['gmacs']:.2f} GMACs (true cost, /1e9)"
    )
    return 0


def cmd_model_export(args: argparse.Namespace) -> int:
    model = build_model(args.arch, args.joints)
    if args.checkpoint:
        from pose.checkpoint import load_model_weights

        load_model_weights(model, args.checkpoint)
    batch = "dynamic" if args.batch == "dynamic" else int(args.batch)
    path = export_onnx(model, args.onnx, args.input, batch)
    diff = parity(model, path, args.input, batch=2 if batch == "dynamic" else int(batch))
    status = "ok" if diff <= PARITY_TOLERANCE else "FAILED"
    print(f"wrote {path}; ONNX Runtime vs PyTorch max |diff| = {diff:.2e} ({status}, tolerance {PARITY_TOLERANCE:g})")
    if diff > PARITY_TOLERANCE:
        print(f"parity check failed: {diff:.2e} > {PARITY_TOLERANCE:g}", file=sys.stderr)
        return 1
    return 0
