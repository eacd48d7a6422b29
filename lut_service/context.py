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
overhead (timed on its own with ``profilers.overhead_probe``), which removes the profiler's own cost
and the wall-clock inflation of per-node times on a loaded machine. A layer key shared by several
layers (same shapes) pools their samples; stem and head pool all uniform networks.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lut_service.profilers import Timing, _random_input, _timer, clock_name, ort_session_options, summarize
from lut_service.settings import Budget
from pose.space import MBCONV_OPS, ArchSpec, SearchSpace, head_key, layer_key, stem_key

CONTEXT_BACKENDS: tuple[str, ...] = ("torch-cpu", "onnxruntime-cpu")
_LAYER_RE = re.compile(r"/layers\.(\d+)/")


@dataclass(frozen=True)
class ContextNet:
    """One uniform network and which LUT key each of its parts (``stem``, ``layers.i``, ``head``) stands for."""

    op: str
    arch: ArchSpec
    parts: dict[str, str]


def context_nets(
    space: SearchSpace,
    input_hw: tuple[int, int],
    batch: int,
    joints: int,
    head_widths: tuple[int, ...],
    head_style: str,
    sic: bool,
) -> list[ContextNet]:
    """One uniform network per MBConv op; together their parts cover every stem, head and layer key."""
    del joints  # the head key carries it through head_key's arguments below
    nets = []
    layers = space.layers(input_hw)
    for op in MBCONV_OPS:
        arch = ArchSpec(
            space=space.to_spec(),
            ops=[op] * len(layers),
            head_widths=tuple(head_widths),
            head_style=head_style,
            sic=sic,
        )
        parts = {"stem": stem_key(space, input_hw, batch)}
        for layer in layers:
            key = layer_key(op, layer, batch)
            if key is not None:
                parts[f"layers.{layer.index}"] = key
        nets.append(ContextNet(op, arch, parts))
    return nets


def _part_of(name: str) -> str:
    """Which network part an onnxruntime node belongs to, from the torch module path in its name.

    Nodes outside stem and layers (layout reorders around the graph, the heatmap output) are fixed per
    network and count as ``head``."""
    match = _LAYER_RE.match(name)
    if match:
        return f"layers.{match.group(1)}"
    return "stem" if name.startswith("/stem/") else "head"


class PartRunner:
    """A whole network on one backend: ``run(calls)`` times it end to end (as ``profilers.Runner``),
    ``parts(rounds)`` returns per-part times (ms) of ``rounds`` instrumented calls."""

    def run(self, calls: int = 1) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def parts(self, rounds: int) -> list[dict[str, float]]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchPartRunner(PartRunner):
    """torch eager; parts timed by forward pre/post hooks on ``stem``, each ``layers[i]`` and ``head``."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], threads: int, clock: str) -> None:
        torch.set_num_threads(threads)
        self.model = model.eval()
        self.x = _random_input(input_shape)
        self.now = _timer(clock)

    def run(self, calls: int = 1) -> float:
        model, x, now = self.model, self.x, self.now
        with torch.inference_mode():
            start = now()
            for _ in range(calls):
                model(x)
            return (now() - start) / 1e6 / calls

    def parts(self, rounds: int) -> list[dict[str, float]]:
        now = self.now
        current: dict[str, float] = {}
        started: dict[str, int] = {}
        handles = []
        named = [("stem", self.model.stem), ("head", self.model.head)]
        named += [(f"layers.{i}", layer) for i, layer in enumerate(self.model.layers)]
        for name, module in named:

            def pre(_m: nn.Module, _a: object, name: str = name) -> None:
                started[name] = now()

            def post(_m: nn.Module, _a: object, _o: object, name: str = name) -> None:
                current[name] = current.get(name, 0.0) + (now() - started[name]) / 1e6

            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))
        out = []
        try:
            with torch.inference_mode():
                for _ in range(rounds):
                    current = {}
                    self.model(self.x)
                    out.append(current)
        finally:
            for handle in handles:
                handle.remove()
        return out

    def close(self) -> None:
        del self.model, self.x


class OrtPartRunner(PartRunner):
    """onnxruntime: the network exported once; one plain session (IO binding, as ``profilers.OrtRunner``)
    and one with per-node profiling for the parts."""

    def __init__(self, model: nn.Module, input_shape: tuple[int, ...], threads: int, workdir: Path, clock: str) -> None:
        import onnxruntime as ort

        from pose.export import export_onnx

        batch, channels, h, w = input_shape
        torch.set_num_threads(1)  # export on one torch thread (see profilers.OrtRunner)
        fd, name = tempfile.mkstemp(suffix=".onnx", dir=workdir)
        os.close(fd)
        path = Path(name)
        self.workdir = workdir
        try:
            export_onnx(model.eval(), path, (h, w), batch, channels=channels)
            providers = ["CPUExecutionProvider"]
            self.session = ort.InferenceSession(str(path), ort_session_options(threads), providers=providers)
            options = ort_session_options(threads)
            options.enable_profiling = True
            options.profile_file_prefix = str(workdir / f"profile-{path.stem}")
            self.profiled = ort.InferenceSession(str(path), options, providers=providers)
        finally:
            path.unlink(missing_ok=True)
        x = _random_input(input_shape).numpy()
        self.now = _timer(clock)
        self.binding = self.session.io_binding()
        self.x = ort.OrtValue.ortvalue_from_numpy(x, "cpu", 0)
        out_shape = self.session.get_outputs()[0].shape
        self.y = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32, "cpu", 0)
        self.binding.bind_ortvalue_input(self.session.get_inputs()[0].name, self.x)
        self.binding.bind_ortvalue_output(self.session.get_outputs()[0].name, self.y)
        self.pbinding = self.profiled.io_binding()
        self.pbinding.bind_ortvalue_input(self.profiled.get_inputs()[0].name, self.x)
        self.pbinding.bind_ortvalue_output(self.profiled.get_outputs()[0].name, self.y)

    def run(self, calls: int = 1) -> float:
        session, binding, now = self.session, self.binding, self.now
        start = now()
        for _ in range(calls):
            session.run_with_iobinding(binding)
        return (now() - start) / 1e6 / calls

    def parts(self, rounds: int) -> list[dict[str, float]]:
        for _ in range(rounds):
            self.profiled.run_with_iobinding(self.pbinding)
        path = Path(self.profiled.end_profiling())
        try:
            events = json.loads(path.read_text())
        finally:
            path.unlink(missing_ok=True)
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
        starts = np.array([a for a, _ in runs])
        out: list[dict[str, float]] = [defaultdict(float) for _ in runs]
        for event in events:
            name = event.get("name", "")
            if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
                continue
            i = int(np.searchsorted(starts, event["ts"], side="right")) - 1
            if 0 <= i < len(runs) and event["ts"] <= runs[i][1]:
                out[i][_part_of(name)] += event["dur"] / 1000.0
        return [dict(parts) for parts in out]

    def close(self) -> None:
        del self.binding, self.pbinding, self.session, self.profiled, self.x, self.y


def make_part_runner(
    backend: str, model: nn.Module, input_shape: tuple[int, ...], threads: int, workdir: Path, clock: str
) -> PartRunner:
    if backend not in CONTEXT_BACKENDS:
        raise ValueError(f"in-context measurement supports {', '.join(CONTEXT_BACKENDS)}, not {backend!r}")
    timer = clock if clock in ("thread-cpu", "wall") else clock_name(backend, threads, clock)
    if backend == "torch-cpu":
        return TorchPartRunner(model, input_shape, threads, timer)
    return OrtPartRunner(model, input_shape, threads, workdir, timer)


def measure_in_context(
    backend: str,
    nets: list[ContextNet],
    joints: int,
    input_shape: tuple[int, int, int, int],
    threads: int,
    overhead_ms: float,
    budget: Budget,
    workdir: Path,
    clock: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Timing] | None:
    """Timing (overhead excluded) of every key the ``nets`` cover; None when stopped.

    End-to-end samples of all networks are interleaved (``worker.interleaved_samples``, the harness of
    ``POST /v1/networks``); then instrumented rounds run round-robin across the networks until every
    network has ``budget.min_samples`` rounds and the time cap (``budget.max_seconds`` per key) is spent,
    at most ``budget.max_samples`` rounds.
    """
    from lut_service.worker import interleaved_samples
    from pose.models import PoseNet

    runners: list[PartRunner] = []
    try:
        for i, net in enumerate(nets):
            if should_stop is not None and should_stop():
                return None
            runners.append(make_part_runner(backend, PoseNet(net.arch, joints), input_shape, threads, workdir, clock))
            if progress is not None:
                progress(i + 1)
        totals = interleaved_samples([r.run for r in runners], budget, should_stop)
        if totals is None:
            return None
        keys = {key for net in nets for key in net.parts.values()} | {"head"}
        cap = budget.max_seconds * len(keys) / 2  # seconds for all instrumented calls together
        rounds: list[list[dict[str, float]]] = [[] for _ in runners]
        if backend == "torch-cpu":  # hooks: one instrumented call per network per round, round-robin
            start = time.perf_counter()
            while True:
                for i, runner in enumerate(runners):
                    rounds[i].extend(runner.parts(2)[1:])  # the first call re-warms after the other networks
                n = len(rounds[0])
                if should_stop is not None and should_stop():
                    return None
                if n >= budget.max_samples or (n >= budget.min_samples and time.perf_counter() - start >= cap):
                    break
        else:  # one profiling session per network: its calls run back to back, as many as fit in the cap
            for i, runner in enumerate(runners):
                if should_stop is not None and should_stop():
                    return None
                per_call_s = max(float(np.median(totals[i])), 0.01) / 1e3
                calls = int(min(budget.max_samples, max(budget.min_samples, cap / len(runners) / per_call_s)))
                rounds[i] = runner.parts(calls + 1)[1:]  # the first profiled call warms that session up
    finally:
        for runner in runners:
            runner.close()
    occurrences: dict[str, list[Timing]] = defaultdict(list)
    for net, total, net_rounds in zip(nets, totals, rounds, strict=True):
        medians = {part: float(np.median([r.get(part, 0.0) for r in net_rounds])) for part in net_rounds[0]}
        attributed = sum(medians.values())
        scale = max(float(np.median(total)) - overhead_ms, 0.0) / attributed if attributed > 0 else 1.0
        for part in net_rounds[0]:
            key = net.parts.get(part, part)  # "head" stays "head" until the caller names it
            occurrences[key].append(summarize([scale * r.get(part, 0.0) for r in net_rounds]))
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
    space: SearchSpace,
    input_hw: tuple[int, int],
    batch: int,
    joints: int,
    head_widths: tuple[int, ...],
    head_style: str,
    sic: bool,
    threads: int,
    overhead_ms: float,
    budget: Budget,
    workdir: Path,
    clock: str = "auto",
    should_stop: Callable[[], bool] | None = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Timing] | None:
    """Every stem, head and layer key of the space measured in context (keys as ``plan.plan_entries``)."""
    nets = context_nets(space, input_hw, batch, joints, head_widths, head_style, sic)
    timings = measure_in_context(
        backend,
        nets,
        joints,
        (batch, 3, *input_hw),
        threads,
        overhead_ms,
        budget,
        workdir,
        clock,
        should_stop,
        progress,
    )
    if timings is None:
        return None
    timings[head_key(space, input_hw, joints, tuple(head_widths), head_style, sic, batch)] = timings.pop("head")
    return timings
