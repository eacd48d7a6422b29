"""``effpose data synth``, ``train``, ``eval`` and ``infer`` (registered by ``pose.cli.register``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from pose.data import SPEC_HELP


def register_workflow(commands: argparse._SubParsersAction) -> None:
    from pose.train import add_train_arguments, cmd_train

    data = commands.add_parser("data", help="datasets: generate synthetic people")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    synth = data_commands.add_parser("synth", help="draw a synthetic dataset in the COCO or MPII layout")
    synth.add_argument("--out", required=True, metavar="DIR", help="dataset root to create")
    synth.add_argument("--images", type=int, default=256, help="training images (validation gets a quarter)")
    synth.add_argument("--keypoints", choices=("coco", "mpii"), default="coco", help="layout and joint set")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0: the same data every time)")
    synth.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    synth.add_argument("--json", action="store_true", help="print one JSON object and nothing else")
    synth.set_defaults(func=cmd_data_synth)

    train = commands.add_parser("train", help="train a pose network (torchrun -m pose.train for several processes)")
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
        generate(out, args.images, args.seed, args.size, progress=bar)
    result = {
        "out": str(out),
        "keypoints": args.keypoints,
        "train_images": args.images,
        "val_images": total - args.images,
        "seed": args.seed,
    }
    print(json.dumps(result) if args.json else f"wrote {total} images ({args.keypoints} layout) to {out}")
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
