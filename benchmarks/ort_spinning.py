"""ORT thread pools when many sessions are interleaved (issue 12 item 4): spinning on, off, or parked.

The agent times many ONNX Runtime sessions in one process, round-robin (6-12 in a build, 46-56 in a
validation). At 2 intra-op threads every session has its own pool, and with spinning on (ORT's default)
a pool keeps its worker busy-waiting for a while after its ``run`` returns, on the cores the next
session needs. This benchmark builds the same random small-space networks three times, one session per
network each, with

- ``spin``: spinning on (ORT's default, a deployment's setting);
- ``settle``: spinning on while a run lasts, parked as soon as it returns (``session.force_spinning_stop``,
  what ``lut_service.timing.ort_session`` now does);
- ``nospin``: spinning off;

and in every cycle times each network *alone* (``spin``, back-to-back calls: the deployment's view, the
truth) and *interleaved* with the others of its kind (one untimed and one timed call per network per
round, as ``timing.interleaved_samples`` does). Per cycle and mode: the median ratio interleaved/alone and
Kendall tau between them. Cycles alternate the modes within minutes, so drift of the machine hits them
alike.

    python benchmarks/ort_spinning.py            # 12 networks, 4 cycles (~4 min on 2 idle cores)
    python benchmarks/ort_spinning.py --quick    # 4 networks, 1 cycle (< 1 min)

Writes ``benchmarks/results/ort_spinning.json`` (``quick/`` for --quick).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
from common import format_table, machine_summary, write_results
from scipy import stats

from lut_service.lut import random_archs
from lut_service.timing import ort_session, random_input
from pose.export import export_onnx
from pose.models import PoseNet
from pose.space import TableSpec

MODES = {"spin": (True, False), "settle": (True, True), "nospin": (False, False)}  # (spinning, settle)


class Session:
    """One exported network in one ORT session, input and output bound once (as the agent's runner)."""

    def __init__(self, path: Path, threads: int, spinning: bool, settle: bool) -> None:
        import onnxruntime as ort

        self.session = ort_session(path, threads, spinning=spinning, settle=settle)
        x = random_input((1, 3, 256, 256)).numpy()
        self.x = ort.OrtValue.ortvalue_from_numpy(x)
        y = self.session.run(None, {self.session.get_inputs()[0].name: x})[0]
        self.y = ort.OrtValue.ortvalue_from_numpy(np.zeros_like(y))
        self.binding = self.session.io_binding()
        self.binding.bind_ortvalue_input(self.session.get_inputs()[0].name, self.x)
        self.binding.bind_ortvalue_output(self.session.get_outputs()[0].name, self.y)

    def run(self) -> float:
        import time

        start = time.perf_counter()
        self.session.run_with_iobinding(self.binding)
        return (time.perf_counter() - start) * 1e3


def alone(sessions: list[Session], calls: int) -> np.ndarray:
    """Each network on its own: warm-up, then the median of back-to-back calls."""
    out = []
    for s in sessions:
        for _ in range(3):
            s.run()
        out.append(float(np.median([s.run() for _ in range(calls)])))
    return np.array(out)


def interleaved(sessions: list[Session], rounds: int) -> np.ndarray:
    """Round-robin, direction reversed every round, one untimed call before each timed one."""
    samples: list[list[float]] = [[] for _ in sessions]
    order = list(range(len(sessions)))
    for _ in range(rounds):
        for i in order:
            sessions[i].run()
            samples[i].append(sessions[i].run())
        order.reverse()
    return np.array([float(np.median(s)) for s in samples])


def cycle(sets: dict[str, list[Session]], rounds: int) -> dict[str, dict]:
    """Alone (spin) before and after; interleaved in every mode between."""
    before = alone(sets["spin"], rounds)
    measured = {f"interleaved {mode}": interleaved(sessions, rounds) for mode, sessions in sets.items()}
    measured["alone settle"] = alone(sets["settle"], rounds)
    truth = (before + alone(sets["spin"], rounds)) / 2
    out = {"alone spin ms": [round(v, 3) for v in truth]}
    for name, values in measured.items():
        out[name] = {
            "ratio": round(float(np.median(values / truth)), 4),
            "kendall_tau": round(float(stats.kendalltau(truth, values).statistic), 3),
            "ms": [round(v, 3) for v in values],
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 networks, 1 cycle")
    parser.add_argument("--networks", type=int, default=None, help="default 12 (quick 4)")
    parser.add_argument("--cycles", type=int, default=None, help="default 4 (quick 1)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--results-dir", default=None)
    args = parser.parse_args(argv)
    count = args.networks or (4 if args.quick else 12)
    cycles = args.cycles or (1 if args.quick else 4)
    print(machine_summary(), file=sys.stderr)
    spec = TableSpec("small", (256, 256), 1, threads=args.threads)
    archs = random_archs(spec.space, count, seed=3)
    with tempfile.TemporaryDirectory(prefix="effpose-spin-") as tmp:
        paths = [
            export_onnx(PoseNet(spec.arch(ops), 16).eval(), Path(tmp) / f"{i}.onnx", (256, 256))
            for i, ops in enumerate(archs)
        ]
        sets = {mode: [Session(p, args.threads, *flags) for p in paths] for mode, flags in MODES.items()}
        results = []
        for i in range(cycles):
            results.append(cycle(sets, args.rounds))
            print(f"cycle {i + 1}/{cycles} done", file=sys.stderr)
    names = [k for k in results[0] if k != "alone spin ms"]
    rows = [[i + 1, name, r[name]["ratio"], r[name]["kendall_tau"]] for i, r in enumerate(results) for name in names]
    print(format_table(["cycle", "timed as", "median ratio to alone (spin)", "Kendall tau vs alone"], rows))
    data = {"networks": count, "threads": args.threads, "rounds": args.rounds, "modes": list(MODES), "cycles": results}
    path = write_results("ort_spinning", data, args.results_dir, quick=args.quick)
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
