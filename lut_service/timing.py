"""The one timing harness: statistics, clocks, backends, runners and interleaved rounds.

Everything that times something imports this module: the agent's worker (a LUT entry with ``measure``,
whole networks with ``interleaved_samples``), the in-context pass of ``lut_service.context`` (the same
runners, with ``TorchCpuRunner.module_times`` / ``OrtRunner.node_times`` for the parts of a network),
the benchmarks and the demo (one-call runners in ``shuffled_rounds``). It imports only the standard
library, numpy, torch, onnxruntime, ``pose`` and ``lut_service.settings`` (for ``Budget``; that module
imports nothing of ours), so it sits at the bottom of lut_service's import graph.

- statistics: ``Timing``, ``timing_stats``
- clocks: ``clock_name`` (which clock a backend is timed with), ``timer`` (that clock's counter)
- backends: ``BACKENDS``, ``unavailable_reason``, ``available_backends``; ``tune_allocator``
- runners: ``Runner``, ``TorchCpuRunner``, ``TorchCudaRunner``, ``OrtRunner``, ``make_runner``
- harnesses: ``measure`` (one entry, adaptive), ``interleaved_samples`` (several networks, round-robin),
  ``measure_module``, ``overhead_probe``
- one-call rounds (benchmarks, demo): ``wall_clock``, ``shuffled_rounds``

Every runner turns (module, input shape, threads) into ``run(calls)``: it runs the module ``calls``
times back to back on fixed random input and returns the mean milliseconds per call. ``measure``
drives a runner: warm-up, then repeats until IQR/median is under the budget's target or its time cap,
and returns the median with its spread. The same runners time whole networks (``measure_module``), so
an op and a network are timed by one harness and a per-call overhead entry makes their sums comparable.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lut_service.settings import Budget

BACKENDS: tuple[str, ...] = ("torch-cpu", "torch-cuda", "onnxruntime-cpu", "onnxruntime-cuda")
DTYPES: tuple[str, ...] = ("float32",)


# --------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Timing:
    """Summary of repeated timings in milliseconds (``mean_ms`` is None where it was not computed)."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    samples: int
    mean_ms: float | None = None

    @property
    def rel_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0


def timing_stats(samples_ms: list[float] | np.ndarray) -> Timing:
    """Median, p10/p90, IQR and mean of timing samples (ms)."""
    values = np.asarray(samples_ms, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no timing samples to summarise")
    p10, p25, p50, p75, p90 = np.percentile(values, [10, 25, 50, 75, 90])
    return Timing(float(p50), float(p10), float(p90), float(p75 - p25), int(values.size), float(values.mean()))


# --------------------------------------------------------------------------- clocks


CLOCKS = ("auto", "wall")  # what a request may ask for
CLOCK_NAMES = ("thread-cpu", "wall", "cuda-events")  # what a table records; make_runner accepts them too


def clock_name(backend: str, threads: int, clock: str = "auto") -> str:
    """Which clock times ``backend``: ``cuda-events`` on torch-cuda; ``thread-cpu`` for a CPU backend on
    one thread (the whole inference runs on the calling thread, so its CPU time is its latency without
    the time other processes hold the core); ``wall`` otherwise or when ``clock="wall"``."""
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; expected one of {', '.join(CLOCKS)}")
    if backend == "torch-cuda":
        return "cuda-events"
    if clock == "auto" and backend.endswith("-cpu") and threads == 1:
        return "thread-cpu"
    return "wall"


def timer(name: str) -> Callable[[], int]:
    """The nanosecond counter of clock ``name``: the calling thread's CPU time or ``perf_counter``."""
    return time.thread_time_ns if name == "thread-cpu" else time.perf_counter_ns


# --------------------------------------------------------------------------- backends and process


def unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot run here, or None when it can."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}"
    if backend == "torch-cuda" and not torch.cuda.is_available():
        return "backend 'torch-cuda' is not available on this device: torch sees no CUDA GPU"
    if backend == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            return (
                "backend 'onnxruntime-cuda' is not available on this device: onnxruntime has no "
                "CUDAExecutionProvider (install onnxruntime-gpu on a CUDA machine)"
            )
        if not torch.cuda.is_available():
            return "backend 'onnxruntime-cuda' is not available on this device: no CUDA GPU is visible"
    return None


def available_backends() -> list[str]:
    return [b for b in BACKENDS if unavailable_reason(b) is None]


# glibc malloc, set by the agent's worker at start (``tune_allocator``) and recorded in the device
# fingerprint. With glibc's default, the mmap threshold moves with the history of frees, so whether a
# large torch activation is mmapped afresh (and page-faulted in on every call) depends on what ran
# before: the same network measured 20-40 % apart between two runs, and LUT sums ranked random
# networks with Kendall tau 0.4-0.6. A fixed threshold and no trimming make it deterministic, as a
# tuned deployment would run (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` or jemalloc/tcmalloc).
ALLOCATOR_SETTINGS: dict[str, int] = {"M_MMAP_THRESHOLD": 32 << 20, "M_TRIM_THRESHOLD": 1 << 30}
_MALLOPT_PARAMS = {"M_TRIM_THRESHOLD": -1, "M_MMAP_THRESHOLD": -3}


def allocator_description() -> str:
    """What ``tune_allocator`` sets, for the device fingerprint."""
    return "glibc mallopt " + " ".join(f"{k}={v}" for k, v in ALLOCATOR_SETTINGS.items())


@functools.cache
def tune_allocator() -> bool:
    """Apply ``ALLOCATOR_SETTINGS`` to this process (glibc only); True when glibc accepted them."""
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(_MALLOPT_PARAMS[k], v) == 1 for k, v in ALLOCATOR_SETTINGS.items())


# --------------------------------------------------------------------------- runners


def random_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Fixed standard-normal input: latency does not depend on the values, only on the shape."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class Runner:
    """One prepared module on one backend; ``run(calls)`` executes it ``calls`` times back to back and
    returns the mean milliseconds per call (one timing sample). ``clock`` names the clock it reads."""

    clock: str = "wall"

    def run(self, calls: int = 1) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


class TorchCpuRunner(Runner):
    """torch eager under ``inference_mode``; ``module_times`` times named submodules by forward hooks."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], threads: int, clock: str = "wall") -> None:
        torch.set_num_threads(threads)  # process-wide; the agent runs exactly one profiling worker
        self.clock = clock
        self.now = timer(clock)
        self.module = module.eval()
        self.x = random_input(input_shape)

    def run(self, calls: int = 1) -> float:
        module, x = self.module, self.x
        now = self.now
        with torch.inference_mode():
            start = now()
            for _ in range(calls):
                module(x)
            return (now() - start) / 1e6 / calls

    def module_times(self, modules: dict[str, nn.Module], rounds: int) -> list[dict[str, float]]:
        """Milliseconds spent in each of ``modules`` (submodules of the runner's module) in each of
        ``rounds`` calls, from forward pre/post hooks on the runner's clock."""
        now = self.now
        current: dict[str, float] = {}
        started: dict[str, int] = {}
        handles = []
        for name, module in modules.items():

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
                    self.module(self.x)
                    out.append(current)
        finally:
            for handle in handles:
                handle.remove()
        return out

    def close(self) -> None:
        del self.module, self.x


class TorchCudaRunner(Runner):
    """CUDA events around the call: GPU time including launch gaps, without host-side jitter."""

    clock = "cuda-events"

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], threads: int) -> None:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = True
        self.module = module.eval().cuda()
        self.x = random_input(input_shape).cuda()
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()

    def run(self, calls: int = 1) -> float:
        module, x = self.module, self.x
        with torch.inference_mode():
            self.start.record()
            for _ in range(calls):
                module(x)
            self.end.record()
        self.end.synchronize()
        return float(self.start.elapsed_time(self.end)) / calls

    def close(self) -> None:
        del self.module, self.x
        torch.cuda.empty_cache()


def ort_session_options(threads: int, spinning: bool = True, settle: bool = True):  # noqa: ANN201 - onnxruntime type
    """Fixed intra-op threads, one inter-op thread, sequential execution: every ORT timing here.

    ``spinning`` is ORT's default (workers busy-wait briefly between ops). Turning it off made 2-thread
    runs much slower here (efficientpose-a 12.3 ms instead of 6.9 ms: every op pays a thread wake-up).
    ``settle`` (``session.force_spinning_stop``) parks a session's pool as soon as its ``run`` returns,
    so a session timed after another one does not share the cores with that one's still-spinning pool:
    with many sessions interleaved (6-12 in a build, 56 in a validation) at 2 threads on 2 cores, the
    spinning pools of idle sessions made each timed call 1.3-1.6x its time alone; settled, 0.97-1.1x
    (the same 8 networks in alternating passes, docs/design.md section 5). One-thread sessions have no
    pool, so it changes nothing there.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if settle:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


@functools.cache
def _preload_cuda_dlls() -> None:
    """Let onnxruntime-gpu (>= 1.21) load CUDA/cuDNN from the nvidia-* wheels torch installed; once."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


def ort_session(
    path: str | Path,
    threads: int = 1,
    device: str = "cpu",
    spinning: bool = True,
    profile_prefix: str | None = None,
    settle: bool = True,
):  # noqa: ANN201 - onnxruntime type
    """An ORT session of ``path`` with ``ort_session_options``; per-node profiling when ``profile_prefix``
    is given. ``device="cuda"`` needs the CUDA execution provider and raises RuntimeError without it."""
    import onnxruntime as ort

    options = ort_session_options(threads, spinning, settle)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    providers = ["CPUExecutionProvider"]
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                "onnxruntime-cuda needs onnxruntime-gpu with a CUDA GPU; this onnxruntime offers "
                f"{ort.get_available_providers()}"
            )
        _preload_cuda_dlls()
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError("onnxruntime could not load its CUDA execution provider (check CUDA/cuDNN libraries)")
    return session


class OrtRunner(Runner):
    """Exports the module to ONNX, times ``run_with_iobinding`` with input and output bound once.

    IO binding keeps input/output copies out of the timed call, so what remains per call besides the
    kernels is the fixed session overhead that the overhead entry measures. With ``profile=True`` a
    second session of the same model has ORT's per-node profiler on, for ``node_times``.
    """

    def __init__(
        self,
        module: nn.Module,
        input_shape: tuple[int, ...],
        threads: int,
        device: str,
        workdir: Path,
        clock: str = "wall",
        profile: bool = False,
    ) -> None:
        import onnxruntime as ort

        from pose.export import export_onnx

        module = module.eval()
        batch, channels, h, w = input_shape
        # Export (untimed) on one torch thread: a torch thread pool that waits on a busy core makes the
        # TorchScript exporter many times slower on a loaded machine.
        torch.set_num_threads(1)
        fd, name = tempfile.mkstemp(suffix=".onnx", dir=workdir)
        os.close(fd)
        path = Path(name)
        self.profiled = None
        try:
            export_onnx(module, path, (h, w), batch, channels=channels)
            self.session = ort_session(path, threads, device)
            if profile:
                # kept to start a fresh profiling session after each trace (``node_times``)
                self.profile_source = (path.read_bytes(), threads, device, workdir)
                self.profiled = self._profiling_session()
        finally:
            path.unlink(missing_ok=True)
        x = random_input(input_shape)
        out_shape = self.session.get_outputs()[0].shape  # static: exported at this exact shape
        if not all(isinstance(d, int) for d in out_shape):
            with torch.inference_mode():
                out_shape = list(module(x).shape)
        self.device = device
        self.clock = clock
        self.now = timer(clock)
        self.x = ort.OrtValue.ortvalue_from_numpy(x.numpy(), device, 0)
        self.y = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32, device, 0)
        self.binding = self._bind(self.session)
        self.pbinding = self._bind(self.profiled) if self.profiled is not None else None

    def _profiling_session(self):  # noqa: ANN202 - onnxruntime type
        """A new session of the exported model with ORT's per-node profiler on."""
        model, threads, device, workdir = self.profile_source
        fd, name = tempfile.mkstemp(suffix=".onnx", dir=workdir)
        os.close(fd)
        path = Path(name)
        try:
            path.write_bytes(model)
            return ort_session(path, threads, device, profile_prefix=str(workdir / f"profile-{path.stem}"))
        finally:
            path.unlink(missing_ok=True)

    def _bind(self, session):  # noqa: ANN001, ANN202 - onnxruntime types
        binding = session.io_binding()
        binding.bind_ortvalue_input(session.get_inputs()[0].name, self.x)
        binding.bind_ortvalue_output(session.get_outputs()[0].name, self.y)
        return binding

    def run(self, calls: int = 1) -> float:
        session, binding, now = self.session, self.binding, self.now
        start = now()
        for _ in range(calls):
            session.run_with_iobinding(binding)  # synchronous, also on the CUDA EP
        return (now() - start) / 1e6 / calls

    def node_times(self, rounds: int) -> list[dict[str, float]]:
        """Kernel milliseconds of each graph node (by node name) in each of ``rounds`` profiled calls.

        Ends the profiling session's trace (and deletes its file); the next call starts a new profiling
        session, so a pass can be measured again (the stability guard's re-measurement)."""
        if self.profiled is None:
            if not hasattr(self, "profile_source"):
                raise RuntimeError("node_times needs an OrtRunner built with profile=True")
            self.profiled = self._profiling_session()
            self.pbinding = self._bind(self.profiled)
        for _ in range(rounds):
            self.profiled.run_with_iobinding(self.pbinding)
        path = Path(self.profiled.end_profiling())
        self.profiled = self.pbinding = None  # its trace has ended
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
                out[i][name.removesuffix("_kernel_time")] += event["dur"] / 1000.0
        return [dict(nodes) for nodes in out]

    def close(self) -> None:
        del self.binding, self.pbinding, self.session, self.profiled, self.x, self.y


def make_runner(
    backend: str,
    module: nn.Module,
    input_shape: tuple[int, ...],
    threads: int,
    workdir: Path | None = None,
    clock: str = "auto",
    profile: bool = False,
) -> Runner:
    """Prepare ``module`` at ``input_shape`` (N, C, H, W) on ``backend``; raise RuntimeError if unavailable.

    ``clock`` is ``auto`` (see ``clock_name``), ``wall``, or a name ``clock_name`` returned. ``profile``
    (onnxruntime) also builds the per-node profiling session ``OrtRunner.node_times`` reads; a torch-cpu
    runner always offers ``module_times``.
    """
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(reason)
    clock = clock if clock in CLOCK_NAMES else clock_name(backend, threads, clock)
    if backend == "torch-cpu":
        return TorchCpuRunner(module, input_shape, threads, clock)
    if backend == "torch-cuda":
        return TorchCudaRunner(module, input_shape, threads)
    workdir = Path(workdir or tempfile.gettempdir())
    device = "cuda" if backend == "onnxruntime-cuda" else "cpu"
    return OrtRunner(module, input_shape, threads, device, workdir, clock, profile)


# --------------------------------------------------------------------------- harnesses


def calls_per_sample(per_call_ms: float, budget: Budget) -> int:
    """Back-to-back calls in one sample so that it lasts ``budget.min_sample_ms`` (1 to 10 000)."""
    return max(1, min(10_000, math.ceil(budget.min_sample_ms / per_call_ms))) if per_call_ms > 0 else 1


def measure(run: Callable[[int], float], budget: Budget, should_stop: Callable[[], bool] | None = None) -> Timing:
    """Warm up, then repeat until IQR/median < target (after ``min_samples``) or the time cap is hit.

    A sample is the mean of enough back-to-back calls to last ``min_sample_ms``, so microsecond-scale
    entries are not dominated by timer resolution; sample means of ops add up like network means do.
    """
    warm_start = time.perf_counter()
    warm: list[float] = []
    while len(warm) < budget.warmup_runs or time.perf_counter() - warm_start < budget.warmup_s:
        warm.append(run(1))
    calls = calls_per_sample(min(warm[-3:]) if warm else 0.0, budget)
    samples: list[float] = []
    start = time.perf_counter()
    while True:
        samples.append(run(calls))
        n = len(samples)
        if n >= budget.max_samples:
            break
        if n < budget.min_samples:
            continue
        if time.perf_counter() - start >= budget.max_seconds or (should_stop is not None and should_stop()):
            break
        if n < 50 or n % 5 == 0:
            q25, q50, q75 = np.percentile(samples, [25, 50, 75])
            if q50 > 0 and (q75 - q25) / q50 < budget.target_rel_iqr:
                break
    return timing_stats(samples)


def interleaved_samples(
    runs: list[Callable[[int], float]], budget: Budget, should_stop: Callable[[], bool] | None = None
) -> list[list[float]] | None:
    """Round-robin timing of several callables (alternating direction each round; each sample follows one
    untimed call, so it measures the warm steady state of back-to-back inference, as the LUT entries do,
    not the cold caches another network left behind) until every one has
    ``min_samples`` and IQR/median under target, ``max_samples`` rounds, or the time cap
    (``max_seconds`` per callable) is reached. None when stopped.

    The harness of ``POST /v1/networks`` and of the whole-network pass of the in-context measurement."""
    for run in runs:  # warm-up, and the back-to-back calls per sample as in ``measure``
        for _ in range(max(1, budget.warmup_runs)):
            run(1)
    calls = [calls_per_sample(min(run(1) for _ in range(2)), budget) for run in runs]
    samples: list[list[float]] = [[] for _ in runs]
    order = list(range(len(runs)))
    cap = budget.max_seconds * len(runs) * 4
    start = time.perf_counter()
    rounds = 0
    while True:
        for i in order:
            runs[i](1)  # untimed: the previous network evicted this one's weights; time the steady state
            samples[i].append(runs[i](calls[i]))
        order.reverse()
        rounds += 1
        if should_stop is not None and should_stop():
            return None
        if rounds >= budget.max_samples:
            break
        if rounds < budget.min_samples:
            continue
        if time.perf_counter() - start >= cap:
            break
        if all(timing_stats(values).rel_iqr < budget.target_rel_iqr for values in samples):
            break
    return samples


def measure_module(
    backend: str,
    module: nn.Module,
    input_shape: tuple[int, ...],
    threads: int,
    budget: Budget,
    workdir: Path | None = None,
    clock: str = "auto",
) -> Timing:
    """Time any one-input module (an op or a whole network) with the harness and clock the LUT entries use."""
    runner = make_runner(backend, module, input_shape, threads, workdir, clock)
    try:
        return measure(runner.run, budget)
    finally:
        runner.close()


def overhead_probe(backend: str, batch: int, input_hw: tuple[int, int]) -> tuple[nn.Module, tuple[int, ...]]:
    """The near-empty call whose time is the fixed per-inference overhead of ``backend``.

    torch: an Identity on the network input (Python dispatch and harness only; no kernel).
    onnxruntime: one ReLU on a single value per image (session.run overhead, one tiny kernel).
    """
    if backend.startswith("torch"):
        return nn.Identity(), (batch, 3, *input_hw)
    return nn.ReLU(), (batch, 1, 1, 1)


# --------------------------------------------------------------------------- one-call rounds


def wall_clock(fn: Callable[[], object], before: Callable[[], object] | None = None) -> Callable[[], float]:
    """A one-call runner: wall milliseconds (``perf_counter``) of ``fn()``; ``before()`` runs untimed first
    (e.g. to re-pin a process-wide thread count for interleaved candidates)."""

    def run() -> float:
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return run


def shuffled_rounds(
    runs: dict[str, Callable[[], float]],
    rounds: int,
    warmup: int = 3,
    max_seconds: float | None = None,
    min_rounds: int = 3,
    seed: int = 0,
    progress: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Samples (ms) of one-call runners: ``warmup`` untimed rounds, then up to ``rounds`` rounds that call
    every runner once in a freshly shuffled order, so slow drift on a shared machine hits every candidate
    alike. ``max_seconds`` ends the timed rounds early once spent and ``min_rounds`` are done;
    ``progress()`` is called after each round. Summarise with ``timing_stats``.

    The benchmarks' and the demo's harness: a user's view of one inference call (wall clock, one call per
    sample, no IO binding), where the agent's ``interleaved_samples`` times the LUT's steady state."""
    if not runs:
        raise ValueError("nothing to time")
    names = list(runs)
    for _ in range(warmup):
        for name in names:
            runs[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    rng = random.Random(seed)
    start = time.perf_counter()
    for round_index in range(rounds):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            samples[name].append(runs[name]())
        if progress is not None:
            progress()
        spent = time.perf_counter() - start
        if max_seconds is not None and spent > max_seconds and round_index + 1 >= min_rounds:
            break
    return samples
