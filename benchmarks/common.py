"""Shared plumbing for the benchmark scripts: machine description, results files, interleaved timing.

Scripts run as ``python benchmarks/NAME.py`` (the script's folder is then on ``sys.path``), so they
import this module as ``from common import ...``.

Timing follows REFERENCE §7: warm-up calls, many repeats, median with p10/p90 and IQR, fixed thread
counts, random inputs, CUDA events (or a synchronize) around GPU work. Candidates are timed
round-robin in a freshly shuffled order every round, so slow drift on a shared machine (another
process waking up, thermal or frequency changes) hits every candidate alike instead of biasing
whichever was measured last.
"""

from __future__ import annotations

import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
NOISY_IQR_OVER_MEDIAN = 0.1  # torch.utils.benchmark flags measurements at or above this spread

Runner = Callable[[], float]  # one timed call; returns elapsed milliseconds


# --------------------------------------------------------------------------- machine description


def cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (falls back to ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def gpu_name() -> str | None:
    if not cuda_available():
        return None
    import torch

    return torch.cuda.get_device_name(0)


def machine_info() -> dict:
    """What a reader needs to interpret a timing: hardware, library versions, threads, load."""
    info: dict = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env_threads": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "gpu": gpu_name(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_default_threads"] = torch.get_num_threads()
        info["cuda"] = torch.version.cuda if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    try:
        import onnxruntime as ort

        info["onnxruntime"] = ort.__version__
        info["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:
        info["onnxruntime"] = None
    return info


def machine_summary(info: dict | None = None) -> str:
    """One line for the top of a printed report."""
    info = info or machine_info()
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (
        f"{info['cpu_model']} ({info['usable_cpus']} usable CPUs{gpu}); torch {info.get('torch')}, "
        f"onnxruntime {info.get('onnxruntime')}, numpy {info['numpy']}; "
        f"load avg {', '.join(f'{x:.2f}' for x in info['load_average_1_5_15'] or [])}"
    )


# --------------------------------------------------------------------------- results


def write_results(name: str, data: dict, results_dir: str | Path | None = None, quick: bool = False) -> Path:
    """Write ``data`` plus a ``meta`` block (machine, command line, UTC timestamp) to ``NAME.json``.

    ``quick=True`` writes to ``quick/NAME.json`` under the results folder (git-ignored), so a smoke
    check never overwrites the committed full-run results. The write is atomic (temp file + rename)
    so an interrupted run never leaves a half file behind.
    """
    directory = Path(results_dir) if results_dir is not None else RESULTS_DIR
    if quick:
        directory = directory / "quick"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    document = dict(data)
    document["meta"] = {
        "benchmark": name,
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "timestamp_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": machine_info(),
        **data.get("meta", {}),
    }
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=False, default=_json_default) + "\n")
    tmp.replace(path)
    return path


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)  # type: ignore[arg-type]
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Plain aligned text table; floats get 2 decimals (3 significant digits below 1)."""

    def cell(value: object) -> str:
        if isinstance(value, float):
            if value != value:  # NaN
                return "-"
            return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"
        return "-" if value is None else str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in text)) if text else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    # first column (names) left-aligned, the rest right-aligned
    lines += [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in text
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- statistics and timing


@dataclass
class Stats:
    """Summary of repeated timings in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    mean_ms: float
    samples: int

    @property
    def iqr_over_median(self) -> float:
        return self.iqr_ms / self.median_ms if self.median_ms > 0 else float("inf")

    @property
    def noisy(self) -> bool:
        return self.iqr_over_median >= NOISY_IQR_OVER_MEDIAN

    def to_dict(self) -> dict:
        return {**asdict(self), "iqr_over_median": round(self.iqr_over_median, 4)}


def summarize(samples_ms: Sequence[float]) -> Stats:
    if len(samples_ms) == 0:
        raise ValueError("no timing samples to summarise")
    a = np.asarray(samples_ms, dtype=np.float64)
    p10, q1, median, q3, p90 = np.percentile(a, [10, 25, 50, 75, 90])
    return Stats(float(median), float(p10), float(p90), float(q3 - q1), float(a.mean()), int(a.size))


def interleaved_timing(
    runners: dict[str, Runner],
    repeats: int,
    warmup: int = 3,
    max_seconds: float | None = None,
    min_repeats: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Stats]:
    """Time every runner ``repeats`` times, one call of each per round, in a shuffled order per round.

    ``max_seconds`` bounds the timed phase: rounds stop early once it is spent and every runner has
    at least ``min_repeats`` samples. Each runner does its own setup outside the timed region and
    returns the elapsed milliseconds of one call (see ``wall_clock``, ``torch_cpu_runner``, ...).
    """
    if not runners:
        raise ValueError("nothing to time")
    names = list(runners)
    for _ in range(warmup):
        for name in names:
            runners[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    rng = random.Random(seed)
    bar = _progress(repeats, "timing rounds") if progress else None
    start = time.perf_counter()
    for round_index in range(repeats):
        order = names[:]
        rng.shuffle(order)
        for name in order:
            samples[name].append(runners[name]())
        if bar is not None:
            bar.update(1)
        spent = time.perf_counter() - start
        if max_seconds is not None and spent > max_seconds and round_index + 1 >= min_repeats:
            break
    if bar is not None:
        bar.close()
    return {name: summarize(values) for name, values in samples.items()}


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


def wall_clock(fn: Callable[[], object], before: Callable[[], object] | None = None) -> Runner:
    """Runner timing ``fn()`` with ``perf_counter``; ``before()`` runs untimed first (e.g. set threads)."""

    def run() -> float:
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3

    return run


# --------------------------------------------------------------------------- onnxruntime


def ort_session(path: str | Path, threads: int = 1, device: str = "cpu", spinning: bool = True):
    """An ORT session with a fixed intra-op thread count and sequential execution.

    ``spinning`` is ORT's default (workers busy-wait briefly between ops). Turning it off makes
    2-thread runs much slower here (e.g. efficientpose-a 12.3 ms instead of 6.9 ms: every op pays a
    thread wake-up), so it stays on, as a user would run it; the spin after a run is short enough
    not to disturb the next interleaved candidate.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise RuntimeError(
                "onnxruntime-cuda needs onnxruntime-gpu with a CUDA GPU; this onnxruntime offers "
                f"{ort.get_available_providers()}"
            )
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), options, providers=providers)


def ort_cpu_runner(session, inputs: np.ndarray) -> Runner:
    """Runner for one ORT CPU inference on a fixed random input."""
    name = session.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(inputs, dtype=np.float32)}
    return wall_clock(lambda: session.run(None, feed))


def ort_cuda_runner(session, inputs: np.ndarray) -> Runner:
    """Runner for one ORT CUDA inference with input and output bound on the GPU (no host copies timed).

    ``run_with_iobinding`` synchronises the stream before returning, so wall-clock time is the GPU time.
    """
    import onnxruntime as ort

    binding = session.io_binding()
    device_input = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(inputs, dtype=np.float32), "cuda", 0)
    binding.bind_ortvalue_input(session.get_inputs()[0].name, device_input)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)
    return wall_clock(lambda: session.run_with_iobinding(binding))


# --------------------------------------------------------------------------- torch


def torch_cpu_runner(model, inputs, threads: int) -> Runner:
    """Runner for one torch CPU forward under ``inference_mode`` with a fixed thread count.

    The thread count is (re)set before every call, outside the timed region, because it is
    process-global and interleaved candidates may use different counts.
    """
    import torch

    model.eval()

    def forward() -> None:
        with torch.inference_mode():
            model(inputs)

    return wall_clock(forward, before=lambda: torch.set_num_threads(threads))


def torch_cuda_runner(model, inputs) -> Runner:
    """Runner for one torch CUDA forward timed with CUDA events (model and inputs already on the GPU)."""
    import torch

    model.eval()
    torch.backends.cudnn.benchmark = True  # fixed input shape: let cuDNN pick its fastest kernels (warm-up)
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)

    def run() -> float:
        with torch.inference_mode():
            start.record()
            model(inputs)
            end.record()
        end.synchronize()
        return float(start.elapsed_time(end))

    return run


def require_cuda(backend: str) -> None:
    """Exit with a clear message when a CUDA backend is asked for on a machine without a GPU."""
    if backend.endswith("-cuda") and not cuda_available():
        sys.exit(
            f"{Path(sys.argv[0]).name}: error: backend {backend} needs a CUDA GPU, "
            "but torch.cuda.is_available() is False on this machine"
        )
    if backend == "onnxruntime-cuda":
        import onnxruntime as ort

        if "CUDAExecutionProvider" not in ort.get_available_providers():
            sys.exit(
                f"{Path(sys.argv[0]).name}: error: backend onnxruntime-cuda needs onnxruntime-gpu "
                f"(this onnxruntime offers {ort.get_available_providers()})"
            )


# --------------------------------------------------------------------------- profiler agent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class AgentHandle:
    """A running agent subprocess: its base URL, process id (for CPU accounting) and log file."""

    url: str
    pid: int
    log_path: Path

    def cpu_seconds(self) -> float:
        """User + system CPU time the agent process has used so far (Linux /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def agent_process(
    db_path: str | Path,
    port: int | None = None,
    env: dict[str, str] | None = None,
    log_path: str | Path | None = None,
    start_timeout_s: float = 60.0,
    log_level: str = "warning",
) -> Iterator[AgentHandle]:
    """Run ``effpose lut serve`` on 127.0.0.1 with a SQLite file as a subprocess; yield its handle.

    The agent is a separate process, as in production, so the load generator or the benchmark's own
    timing never shares its interpreter. Its output goes to ``log_path`` (or a temp file) and the tail
    is shown if it fails to start. ``log_level`` defaults to ``warning``: uvicorn's per-request access
    log (level ``info``) would otherwise be part of what a load test measures. The process is
    terminated (then killed) on exit.
    """
    import httpx

    port = port or free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "effpose", "lut", "serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--db", f"sqlite:///{Path(db_path).resolve()}", "--log-level", log_level]
    log_file = Path(log_path) if log_path else Path(db_path).with_suffix(".agent.log")
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            deadline = time.monotonic() + start_timeout_s
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"agent exited with code {proc.returncode}:\n{_tail(log_file)}")
                try:
                    httpx.get(f"{url}/openapi.json", timeout=2.0)
                    break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"agent did not answer on {url} within {start_timeout_s:.0f} s:\n{_tail(log_file)}"
                    )
                time.sleep(0.2)
            yield AgentHandle(url, proc.pid, log_file)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no agent log)"
