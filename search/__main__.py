"""``python -m search ARGS`` is ``effpose search ARGS``; it is the entry point for several processes:

    torchrun --standalone --nproc_per_node 2 -m search --space small --data coco:ROOT --cost flops --out DIR

Under ``torchrun`` the data is split across the processes, alpha and the weights stay identical in all of
them, and only rank 0 writes (``search.distributed``). The random baseline (``--random``) runs in one
process only.
"""

from __future__ import annotations

import argparse
import os
import sys

from search.cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m search")
    commands = parser.add_subparsers(dest="command", required=True)
    register(commands)
    args = parser.parse_args(["search", *(sys.argv[1:] if argv is None else argv)])
    try:
        if args.random is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError("--random (the random baseline) runs in one process: start it without torchrun")
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, RuntimeError) as exc:
        print(f"search: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
