"""``effpose data synth``, ``train``, ``eval`` and ``infer`` (registered by ``pose.cli.register``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from pose.data import SPEC_HELP
from pose.space import parse_hw

if TYPE_CHECKING:
    from pose.train import TrainConfig


def register_workflow(commands: argparse._SubParsersAction) -> None:
    data = commands.add_parser("data", help="datasets: generate synthetic people")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = data_commands.add_parser("synth", help="draw a synthetic dataset in the COCO or MPII layout")
    synth.add_argument("--out", required=True, metavar="DIR", help="dataset root to create")
    synth.add_argument("--images", type=int, default=256, help="training images (validation gets a quarter)")
    synth.add_argument("--keypoints", choices=("coco", "mpii"), default="coco", help="layout and joint set")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0: the same data every time)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument(
        "--level", choices=("standard", "easy"), default="standard", help="difficulty (easy: one person, no occluders)"
    )
    synth.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    synth.set_defaults(func=cmd_data_synth)

    train = commands.add_parser("train", help="train a pose network (several processes: torchrun ... -m effpose train)")
    add_train_arguments(train)
    train.set_defaults(func=cmd_train)

    ev = commands.add_parser("eval", help="PCKh (MPII) or OKS AP (COCO) of a checkpoint or of stored predictions")
    ev.add_argument("checkpoint", nargs="?", metavar="CHECKPOINT", help="training checkpoint (.pt) or ONNX file")
    ev.add_argument("--data", required=True, metavar="SPEC", help=SPEC_HELP)
    ev.add_argument("--predictions", metavar="FILE", help="evaluate stored predictions instead of a model")
    ev.add_argument("--split", help="split to evaluate (default val2017 / valid)")
    ev.add_argument("--flip-test", action="store_true", help="average with the flipped image (one-pixel shift)")
    ev.add_argument("--boxes", metavar="FILE", help="COCO detection results JSON with person boxes (default: GT boxes)")
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    ev.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    ev.add_argument("--save-predictions", metavar="FILE", help="also write the predictions (readable by --predictions)")
    ev.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    ev.set_defaults(func=cmd_eval)

    inf = commands.add_parser("infer", help="keypoints + drawn skeletons for images")
    inf.add_argument("model", metavar="CHECKPOINT|ONNX", help="training checkpoint or exported ONNX model")
    inf.add_argument("images", nargs="+", metavar="IMAGE")
    inf.add_argument("--out", required=True, metavar="DIR", help="folder for keypoints.json and drawn images")
    inf.add_argument(
        "--boxes", metavar="FILE", help='JSON {"image.jpg": [[x, y, w, h(, score)], ...]} (default: whole image)'
    )
    inf.add_argument("--backend", choices=("torch", "onnxruntime"), default="torch")
    inf.add_argument(
        "--color-order", choices=("RGB", "BGR"), help="override the model's colour order (ONNX: default RGB)"
    )
    inf.add_argument("--flip-test", action="store_true")
    inf.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    inf.set_defaults(func=cmd_infer)


def cmd_data_synth(args: argparse.Namespace) -> int:
    from pose.data.synthetic import generate_coco, generate_mpii

    if args.images < 1:
        raise ValueError("--images must be at least 1")
    if args.size < 64:
        raise ValueError("--size must be at least 64 pixels")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    total = args.images + max(1, args.images // 4)
    with tqdm(total=total, desc="synth", file=sys.stderr, dynamic_ncols=True) as bar:
        generate = generate_coco if args.keypoints == "coco" else generate_mpii
        generate(out, args.images, args.seed, args.size, progress=bar, level=args.level)
    result = {
        "out": str(out),
        "keypoints": args.keypoints,
        "train_images": args.images,
        "val_images": total - args.images,
        "seed": args.seed,
        "level": args.level,
    }
    print(json.dumps(result) if args.json else f"wrote {total} images ({args.keypoints} layout) to {out}")
    return 0


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """``effpose train`` flags: one per ``pose.train.TrainConfig`` field, plus ``--out``, ``--resume``, ``--json``."""
    parser.add_argument("arch", metavar="ARCH", help="a preset, a baseline or an arch-spec JSON file")
    parser.add_argument("--data", required=True, metavar="SPEC", help=SPEC_HELP)
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="run folder (last.pt, best.pt, metrics.jsonl, training.png)"
    )
    parser.add_argument("--epochs", type=int, help="default: 200 (mpii), 240 (coco), 30 (synthetic)")
    parser.add_argument("--batch-size", type=int, help="global batch size (default 32; coco 128)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    parser.add_argument(
        "--input",
        type=parse_hw,
        help="input HxW (default coco 256x192, mpii 256x256, synthetic 128x96, synthetic-mpii 128x128)",
    )
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    parser.add_argument("--resume", action="store_true", help="continue from DIR/last.pt")
    parser.add_argument("--seed", type=int, default=0, help="seed of init, sample order and augmentation")
    parser.add_argument("--max-minutes", type=float, help="stop (evaluate and save) once this much time has passed")
    parser.add_argument("--max-cpu-minutes", type=float, help="the same budget in CPU time of this process")
    parser.add_argument(
        "--on-bad-image", choices=("fail", "skip"), default="fail", help="unreadable images: stop, or skip and count"
    )
    parser.add_argument("--color-order", choices=("RGB", "BGR"), help="channel order fed to the model (default RGB)")
    parser.add_argument("--train-split", help="training split folder (default train2017 / train)")
    parser.add_argument("--val-split", help="validation split folder (default val2017 / valid)")
    parser.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and after the last)")
    parser.add_argument("--flip-test", action="store_true", help="use the flip test in the per-epoch evaluation")
    parser.add_argument(
        "--zero-init-residual",
        action="store_true",
        help="start every residual block as the identity (zero last-BN scale; the accuracy proxy's init)",
    )
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON summary object on stdout")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the ``effpose train`` flags describe (run controls stay on ``args``)."""
    from pose.train import TrainConfig

    return TrainConfig(
        arch=args.arch,
        data=args.data,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        input_hw=args.input,
        workers=args.workers,
        seed=args.seed,
        max_minutes=args.max_minutes,
        max_cpu_minutes=args.max_cpu_minutes,
        on_bad_image=args.on_bad_image,
        color_order=args.color_order,
        eval_every=args.eval_every,
        flip_test=args.flip_test,
        device=args.device,
        threads=args.threads,
        train_split=args.train_split,
        val_split=args.val_split,
        zero_init_residual=args.zero_init_residual,
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train; under torchrun every rank runs this, and only rank 0 prints the summary."""
    import torch.distributed as dist

    from pose.train import train

    cfg = train_config_from_args(args)
    try:
        summary = train(cfg, args.out, resume=args.resume)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if args.json:
        print(json.dumps(summary))
        return 0
    best = "n/a" if summary["best"] is None else f"{summary['best']:.2f}"
    print(
        f"done: {summary['epochs_run']} epochs, best {summary['metric']} {best} (epoch {summary['best_epoch']}), "
        f"{summary['skipped_images']} unreadable images skipped; wrote {summary['out']}/last.pt, best.pt, "
        "metrics.jsonl, training.png"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pose.data import build_dataset, default_input_hw, parse_spec
    from pose.evaluate import evaluate_model, evaluate_predictions, metrics_from_prediction, predict, save_predictions

    spec = parse_spec(args.data)
    split = args.split or "val"
    if args.predictions:
        if args.checkpoint:
            raise ValueError("give either CHECKPOINT or --predictions, not both")
        dataset = build_dataset(spec, split, default_input_hw(spec))
        metrics = evaluate_predictions(args.predictions, dataset)
        source = args.predictions
    else:
        if not args.checkpoint:
            raise ValueError("give a CHECKPOINT to evaluate, or --predictions FILE")
        from pose.infer import load_predictor

        model, input_hw, order, joints = load_predictor(args.checkpoint, args.backend)
        dataset = build_dataset(spec, split, input_hw, boxes=args.boxes, color_order=order)
        if dataset.num_joints != joints:
            raise ValueError(f"{args.checkpoint} predicts {joints} joints but {args.data} has {dataset.num_joints}")
        if args.save_predictions:
            prediction = predict(
                model, dataset, batch_size=args.batch_size, flip_test=args.flip_test, workers=args.workers
            )
            metrics = metrics_from_prediction(dataset, prediction)
            metrics["loss"] = float(prediction["loss"])
            save_predictions(args.save_predictions, dataset, prediction)
        else:
            metrics = evaluate_model(
                model, dataset, flip_test=args.flip_test, batch_size=args.batch_size, workers=args.workers
            )
        source = args.checkpoint
    if args.json:
        print(json.dumps(metrics))
        return 0
    metric_keys = [k for k in metrics if k not in ("loss", "samples")]
    unit = "PCKh" if "Mean" in metrics else "OKS AP"
    print(f"{unit} of {source} on {args.data} ({dataset.kind}, {len(dataset)} samples)")
    print("  ".join(f"{k:>8}" for k in metric_keys))
    print("  ".join(f"{metrics[k]:8.2f}" if metrics[k] is not None else f"{'n/a':>8}" for k in metric_keys))
    return 0


def cmd_infer(args: argparse.Namespace) -> int:
    from pose.infer import infer

    doc = infer(
        args.model,
        args.images,
        args.out,
        boxes=args.boxes,
        backend=args.backend,
        color_order=args.color_order,
        flip_test=args.flip_test,
    )
    if args.json:
        print(
            json.dumps(
                {
                    "out": args.out,
                    "keypoints": str(Path(args.out) / "keypoints.json"),
                    "images": len(doc["images"]),
                    "people": sum(len(i["people"]) for i in doc["images"]),
                }
            )
        )
    else:
        people = sum(len(i["people"]) for i in doc["images"])
        print(
            f"{people} people in {len(doc['images'])} images; "
            f"wrote {Path(args.out) / 'keypoints.json'} and drawn images"
        )
    return 0
