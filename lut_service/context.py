"""In-context LUT measurement for CPU backends: every op is timed inside a whole network.

Why: an op timed alone runs with its own weights and activations hot in cache and pays no hand-over
from the op before it; in a network it does not. On this project's 2-core machine the sum of isolated
ops missed whole networks by -2..-6 % at batch 1 and +6 % at batch 8 (onnxruntime-cpu, 1 thread), and
torch-cpu sums ranked networks poorly (Kendall tau 0.6). Timed in context the same sums land within
about 1 % (see benchmarks/lut_fidelity.py).

How: for every candidate op a *uniform* network is built (every searchable layer uses that op; all
MBConv ops are legal at every layer, so the network is legal) and exported once. Its parts (stem, each
layer, head) are timed inside the network: onnxruntime's per-node profiler (node names carry the torch
module path, e.g. ``/layers.3/...``), torch forward hooks on the runner's clock. Separately, the whole
network is timed end to end with the same harness, clock and interleaving as ``POST /v1/networks``.
Each network's part times are scaled so that they sum to its end-to-end time minus the per-call
overhead (timed on its own with ``timing.overhead_probe``), which removes the profiler's own cost
and the wall-clock inflation of per-node times on a loaded machine. A layer key shared by several
layers (same shapes) pools their samples; stem and head pool all uniform networks.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import nn

from lut_service.settings import Budget
from lut_service.timing import Runner, Timing, TorchCpuRunner, interleaved_samples, make_runner, timing_stats
from pose.space import MBCONV_OPS, ArchSpec, TableSpec, fixed_parts, layer_key

CONTEXT_BACKENDS: tuple[str, ...] = ("torch-cpu", "onnxruntime-cpu")
_LAYER_RE = re.compile(r"/layers\.(\d+)/")


@dataclass(frozen=True)
class ContextNet:
    """One uniform network and which LUT key each of its parts (``stem``, ``layers.i``, ``head``) stands for."""

    op: str
    arch: ArchSpec
    parts: dict[str, str]


def context_nets(spec: TableSpec) -> list[ContextNet]:
    """One uniform network per MBConv op; together their parts cover every stem, head and layer key."""
    stem = fixed_parts(spec)["stem"]
    layers = spec.space.layers(spec.input_hw)
    nets = []
    for op in MBCONV_OPS:
        parts = {"stem": stem}
        for layer in layers:
            key = layer_key(op, layer, spec.batch)
            if key is not None:
                parts[f"layers.{layer.index}"] = key
        nets.append(ContextNet(op, spec.arch([op] * len(layers)), parts))
    return nets


def _part_of(name: str) -> str:
    """Which network part an onnxruntime node belongs to, from the torch module path in its name.

    Nodes outside stem and layers (layout reorders around the graph, the heatmap output) are fixed per
    network and count as ``head``."""
    match = _LAYER_RE.match(name)
    if match:
        return f"layers.{match.group(1)}"
    return "stem" if name.startswith("/stem/") else "head"


def make_part_runner(
    backend: str, model: nn.Module, input_shape: tuple[int, ...], threads: int, workdir: Path, clock: str
) -> Runner:
    """A whole network on a CPU backend: ``run(calls)`` times it end to end, ``part_times`` its parts."""
    if backend not in CONTEXT_BACKENDS:
        raise ValueError(f"in-context measurement supports {', '.join(CONTEXT_BACKENDS)}, not {backend!r}")
    return make_runner(backend, model, input_shape, threads, workdir, clock, profile=True)


def part_times(runner: Runner, rounds: int) -> list[dict[str, float]]:
    """Milliseconds of each part (``stem``, ``layers.i``, ``head``) in each of ``rounds`` instrumented calls
    of a ``make_part_runner`` network: torch forward hooks, or onnxruntime's per-node profiler (once)."""
    if isinstance(runner, TorchCpuRunner):
        model = runner.module
        modules = {"stem": model.stem, "head": model.head}
        modules |= {f"layers.{i}": layer for i, layer in enumerate(model.layers)}
        return runner.module_times(modules, rounds)
    out = []
    for nodes in runner.node_times(rounds):
        parts: dict[str, float] = defaultdict(float)
        for name, ms in nodes.items():
            parts[_part_of(name)] += ms
        out.append(dict(parts))
    return out


def measure_in_context(
    backend: str,
    nets: list[ContextNet],
    spec: TableSpec,
    overhead_ms: float,
    budget: Budget,
    workdir: Path,
    clock: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Timing] | None:
    """Timing (overhead excluded) of every key the ``nets`` (uniform networks of ``spec``) cover; None when stopped.

    Builds one ``make_part_runner`` per network (``part_runners``), measures with ``measure_parts`` and
    closes them again. The agent's build keeps its runners open instead (they are also its stability
    references) and calls ``measure_parts`` itself."""
    stop = should_stop or (lambda: False)
    runners = part_runners(backend, nets, spec, workdir, clock, stop, progress)
    if runners is None:
        return None
    try:
        return measure_parts(backend, nets, runners, overhead_ms, budget, should_stop)
    finally:
        close_runners(runners)


def measure_parts(
    backend: str,
    nets: list[ContextNet],
    runners: list[Runner],
    overhead_ms: float,
    budget: Budget,
    should_stop: Callable[[], bool] | None = None,
    totals_ms: list[float] | None = None,
) -> dict[str, Timing] | None:
    """Time the parts of ``nets`` on their prepared ``runners`` (``part_runners``); None when stopped.
    ``totals_ms``, when given, receives each network's end-to-end median (the build's stability guard
    compares its reference networks' with its checkpoints).

    End-to-end samples of all networks are interleaved (``timing.interleaved_samples``, the harness of
    ``POST /v1/networks``); then instrumented rounds run round-robin across the networks until every
    network has ``budget.min_samples`` rounds and the time cap (``budget.max_seconds`` per key) is spent,
    at most ``budget.max_samples`` rounds. Each part is timed at the runners' thread count: what is
    attributed to a layer is that layer running with the request's threads inside its network."""
    stop = should_stop or (lambda: False)
    totals = interleaved_samples([r.run for r in runners], budget, should_stop)
    if totals is None:
        return None
    if totals_ms is not None:
        totals_ms[:] = [float(np.median(t)) for t in totals]
    keys = {key for net in nets for key in net.parts.values()} | {"head"}
    cap = budget.max_seconds * len(keys) / 2  # seconds for all instrumented calls together
    if backend == "torch-cpu":
        rounds = _hook_rounds(runners, budget, cap, stop)
    else:
        rounds = _profiled_rounds(runners, totals, budget, cap, stop)
    if rounds is None:
        return None
    return _attribute(nets, totals, rounds, overhead_ms)


def part_runners(
    backend: str,
    nets: list[ContextNet],
    spec: TableSpec,
    workdir: Path,
    clock: str,
    stop: Callable[[], bool],
    progress: Callable[[int], None] | None = None,
) -> list[Runner] | None:
    """One ``make_part_runner`` per network; None (nothing left open) when stopped."""
    from pose.models import PoseNet

    runners: list[Runner] = []
    try:
        for i, net in enumerate(nets):
            if stop():
                close_runners(runners)
                return None
            model, shape = PoseNet(net.arch, spec.joints), (spec.batch, 3, *spec.input_hw)
            runners.append(make_part_runner(backend, model, shape, spec.threads, workdir, clock))
            if progress is not None:
                progress(i + 1)
    except BaseException:
        close_runners(runners)
        raise
    return runners


def close_runners(runners: list[Runner]) -> None:
    for runner in runners:
        runner.close()


def _hook_rounds(
    runners: list[Runner], budget: Budget, cap: float, stop: Callable[[], bool]
) -> list[list[dict[str, float]]] | None:
    """torch hooks: one instrumented call per network per round, round-robin, until the cap is spent."""
    rounds: list[list[dict[str, float]]] = [[] for _ in runners]
    start = time.perf_counter()
    while True:
        for i, runner in enumerate(runners):
            rounds[i].extend(part_times(runner, 2)[1:])  # the first call re-warms after the other networks
        n = len(rounds[0])
        if stop():
            return None
        if n >= budget.max_samples or (n >= budget.min_samples and time.perf_counter() - start >= cap):
            return rounds


def _profiled_rounds(
    runners: list[Runner], totals: list[list[float]], budget: Budget, cap: float, stop: Callable[[], bool]
) -> list[list[dict[str, float]]] | None:
    """One profiling session per network: its calls run back to back, as many as fit in its share of the cap."""
    rounds = []
    for runner, total in zip(runners, totals, strict=True):
        if stop():
            return None
        per_call_s = max(float(np.median(total)), 0.01) / 1e3
        calls = int(min(budget.max_samples, max(budget.min_samples, cap / len(runners) / per_call_s)))
        rounds.append(part_times(runner, calls + 1)[1:])  # the first profiled call warms that session up
    return rounds


def _attribute(
    nets: list[ContextNet], totals: list[list[float]], rounds: list[list[dict[str, float]]], overhead_ms: float
) -> dict[str, Timing]:
    """Scale each network's part times to its end-to-end median minus the overhead; pool them per key."""
    occurrences: dict[str, list[Timing]] = defaultdict(list)
    for net, total, net_rounds in zip(nets, totals, rounds, strict=True):
        medians = {part: float(np.median([r.get(part, 0.0) for r in net_rounds])) for part in net_rounds[0]}
        attributed = sum(medians.values())
        scale = max(float(np.median(total)) - overhead_ms, 0.0) / attributed if attributed > 0 else 1.0
        for part in net_rounds[0]:
            key = net.parts.get(part, part)  # "head" stays "head" until the caller names it
            occurrences[key].append(timing_stats([scale * r.get(part, 0.0) for r in net_rounds]))
    return {key: _combine(timings) for key, timings in occurrences.items()}


def _combine(timings: list[Timing]) -> Timing:
    """One key's timing from its occurrences (layers sharing the key, stem/head in every network).

    The mean of the medians, so the entries of a uniform network add up to its end-to-end time; the
    spread is each occurrence's own (pooling would count real differences between layer positions,
    e.g. the layer right after a stride-2 layer runs ~10 % slower in torch, as noise)."""
    return Timing(
        median_ms=float(np.mean([t.median_ms for t in timings])),
        p10_ms=float(np.mean([t.p10_ms for t in timings])),
        p90_ms=float(np.mean([t.p90_ms for t in timings])),
        iqr_ms=float(np.mean([t.iqr_ms for t in timings])),
        samples=sum(t.samples for t in timings),
    )


def context_lut(
    backend: str,
    spec: TableSpec,
    overhead_ms: float,
    budget: Budget,
    workdir: Path,
    clock: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Timing] | None:
    """Every stem, head and layer key of ``spec`` measured in context (keys as ``plan.plan_entries``)."""
    nets = context_nets(spec)
    timings = measure_in_context(backend, nets, spec, overhead_ms, budget, workdir, clock, should_stop, progress)
    return None if timings is None else name_head(timings, spec)


def name_head(timings: dict[str, Timing], spec: TableSpec) -> dict[str, Timing]:
    """``measure_parts`` calls the head part ``head``; the table's key for it names its widths and style."""
    timings[fixed_parts(spec)["head"]] = timings.pop("head")
    return timings
