"""Timing backends: torch-cpu, torch-cuda, onnxruntime-cpu, onnxruntime-cuda.

Every backend turns (module, input shape, threads) into a ``Runner``: a callable that runs the module
once on fixed random input and returns that call's time in milliseconds. ``measure`` drives a runner:
warm-up, then repeats until IQR/median is under the budget's target or its time cap, and returns the
median with its spread. The same runners time whole networks (``measure_module``), so an op and a
network are timed by one harness and a per-call overhead entry makes their sums comparable.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lut_service.settings import Budget

BACKENDS: tuple[str, ...] = ("torch-cpu", "torch-cuda", "onnxruntime-cpu", "onnxruntime-cuda")
DTYPES: tuple[str, ...] = ("float32",)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    samples: int

    @property
    def rel_iqr(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else 0.0


def summarize(samples_ms: list[float] | np.ndarray) -> Timing:
    values = np.asarray(samples_ms, dtype=np.float64)
    p10, p25, p50, p75, p90 = np.percentile(values, [10, 25, 50, 75, 90])
    return Timing(float(p50), float(p10), float(p90), float(p75 - p25), int(values.size))


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


CLOCKS = ("auto", "wall")
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


def _timer(name: str) -> Callable[[], int]:
    return time.thread_time_ns if name == "thread-cpu" else time.perf_counter_ns


class Runner:
    """One prepared module on one backend; ``run(calls)`` executes it ``calls`` times back to back and
    returns the mean milliseconds per call (one timing sample)."""

    def run(self, calls: int = 1) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:
        pass


def _random_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


class TorchCpuRunner(Runner):
    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], threads: int, clock: str = "wall") -> None:
        torch.set_num_threads(threads)  # process-wide; the agent runs exactly one profiling worker
        self.now = _timer(clock)
        self.module = module.eval()
        self.x = _random_input(input_shape)

    def run(self, calls: int = 1) -> float:
        module, x = self.module, self.x
        now = self.now
        with torch.inference_mode():
            start = now()
            for _ in range(calls):
                module(x)
            return (now() - start) / 1e6 / calls


class TorchCudaRunner(Runner):
    """CUDA events around the call: GPU time including launch gaps, without host-side jitter."""

    def __init__(self, module: nn.Module, input_shape: tuple[int, ...], threads: int) -> None:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = True
        self.module = module.eval().cuda()
        self.x = _random_input(input_shape).cuda()
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


def ort_session_options(threads: int):  # noqa: ANN201 - onnxruntime type
    """Fixed threads, sequential execution: the settings every ORT timing here uses."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return options


@functools.cache
def _preload_cuda_dlls() -> None:
    """Let onnxruntime-gpu (>= 1.21) load CUDA/cuDNN from the nvidia-* wheels torch installed; once."""
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


class OrtRunner(Runner):
    """Exports the module to ONNX, times ``run_with_iobinding`` with input and output bound once.

    IO binding keeps input/output copies out of the timed call, so what remains per call besides the
    kernels is the fixed session overhead that the overhead entry measures.
    """

    def __init__(
        self,
        module: nn.Module,
        input_shape: tuple[int, ...],
        threads: int,
        device: str,
        workdir: Path,
        clock: str = "wall",
    ) -> None:
        import onnxruntime as ort

        from pose.export import export_onnx

        if device == "cuda":
            _preload_cuda_dlls()
        module = module.eval()
        batch, channels, h, w = input_shape
        # Export (untimed) on one torch thread: a torch thread pool that waits on a busy core makes the
        # TorchScript exporter many times slower on a loaded machine.
        torch.set_num_threads(1)
        fd, name = tempfile.mkstemp(suffix=".onnx", dir=workdir)
        os.close(fd)
        path = Path(name)
        try:
            export_onnx(module, path, (h, w), batch, channels=channels)
            providers = (
                ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
            )
            self.session = ort.InferenceSession(str(path), ort_session_options(threads), providers=providers)
        finally:
            path.unlink(missing_ok=True)
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise RuntimeError("onnxruntime could not load its CUDA execution provider (check CUDA/cuDNN libraries)")
        x = _random_input(input_shape)
        out_shape = self.session.get_outputs()[0].shape  # static: exported at this exact shape
        if not all(isinstance(d, int) for d in out_shape):
            with torch.inference_mode():
                out_shape = list(module(x).shape)
        self.device = device
        self.now = _timer(clock)
        self.binding = self.session.io_binding()
        self.x = ort.OrtValue.ortvalue_from_numpy(x.numpy(), device, 0)
        self.y = ort.OrtValue.ortvalue_from_shape_and_type(out_shape, np.float32, device, 0)
        self.binding.bind_ortvalue_input(self.session.get_inputs()[0].name, self.x)
        self.binding.bind_ortvalue_output(self.session.get_outputs()[0].name, self.y)

    def run(self, calls: int = 1) -> float:
        session, binding, now = self.session, self.binding, self.now
        start = now()
        for _ in range(calls):
            session.run_with_iobinding(binding)  # synchronous, also on the CUDA EP
        return (now() - start) / 1e6 / calls

    def close(self) -> None:
        del self.binding, self.session, self.x, self.y


def make_runner(
    backend: str,
    module: nn.Module,
    input_shape: tuple[int, ...],
    threads: int,
    workdir: Path | None = None,
    clock: str = "auto",
) -> Runner:
    """Prepare ``module`` at ``input_shape`` (N, C, H, W) on ``backend``; raise RuntimeError if unavailable.

    ``clock`` is ``auto`` (see ``clock_name``), ``wall``, or a name ``clock_name`` returned.
    """
    reason = unavailable_reason(backend)
    if reason is not None:
        raise RuntimeError(reason)
    timer = clock if clock in CLOCK_NAMES else clock_name(backend, threads, clock)
    if backend == "torch-cpu":
        return TorchCpuRunner(module, input_shape, threads, timer)
    if backend == "torch-cuda":
        return TorchCudaRunner(module, input_shape, threads)
    workdir = Path(workdir or tempfile.gettempdir())
    device = "cuda" if backend == "onnxruntime-cuda" else "cpu"
    return OrtRunner(module, input_shape, threads, device, workdir, timer)


def measure(run: Callable[[int], float], budget: Budget, should_stop: Callable[[], bool] | None = None) -> Timing:
    """Warm up, then repeat until IQR/median < target (after ``min_samples``) or the time cap is hit.

    A sample is the mean of enough back-to-back calls to last ``min_sample_ms``, so microsecond-scale
    entries are not dominated by timer resolution; sample means of ops add up like network means do.
    """
    warm_start = time.perf_counter()
    warm: list[float] = []
    while len(warm) < budget.warmup_runs or time.perf_counter() - warm_start < budget.warmup_s:
        warm.append(run(1))
    per_call = min(warm[-3:]) if warm else 0.0
    calls = max(1, min(10_000, math.ceil(budget.min_sample_ms / per_call))) if per_call > 0 else 1
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
    return summarize(samples)


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
