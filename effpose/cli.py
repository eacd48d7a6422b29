"""``effpose``: the only module that imports all three packages; each package owns its subcommands."""

from __future__ import annotations

import argparse
import sys

import effpose.demo
import lut_service.cli
import pose.cli
import search.cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effpose",
        description="Hardware-aware architecture search of efficient human pose estimators (EfficientPose).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    pose.cli.register(commands)
    lut_service.cli.register(commands)
    search.cli.register(commands)
    effpose.demo.register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        # Errors raised for bad input carry a message naming the problem: print it, no traceback.
        print(f"effpose {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
