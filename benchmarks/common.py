"""Shared plumbing for the benchmark scripts: machine description, results files, one-call runners.

Scripts run as ``python benchmarks/NAME.py`` (the script's folder is then on ``sys.path``), so they
import this module as ``from common import ...``.

Timing follows docs/design.md §5 and uses the project's one harness, ``lut_service.timing``: warm-up
calls, many repeats, median with p10/p90 and IQR (``timing_stats``), fixed thread counts
(``ort_session``), random inputs, CUDA events (or a synchronize) around GPU work. Candidates are timed
round-robin in a freshly shuffled order every round (``shuffled_rounds``), so slow drift on a shared
machine (another process waking up, thermal or frequency changes) hits every candidate alike instead
of biasing whichever was measured last. The agent runs as ``lut_service.local.LocalAgent``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from lut_service.timing import Timing, shuffled_rounds, timing_stats, wall_clock

RESULTS_DIR = Path(__file__).resolve().parent / "results"


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


def stats_dict(timing: Timing) -> dict:
    """A ``Timing`` as the results JSON stores it, with IQR/median (flagged noisy at >= 10 %)."""
    return {**asdict(timing), "iqr_over_median": round(timing.rel_iqr, 4)}


def interleaved_timing(
    runners: dict[str, Callable[[], float]],
    repeats: int,
    warmup: int = 3,
    max_seconds: float | None = None,
    min_repeats: int = 3,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Timing]:
    """``lut_service.timing.shuffled_rounds`` with a progress bar, summarised per runner.

    Every runner is called once per round in a shuffled order; ``max_seconds`` bounds the timed phase
    once every runner has ``min_repeats`` samples. Each runner does its own setup outside the timed
    region and returns the elapsed milliseconds of one call (see ``ort_cpu_runner``, ``torch_cpu_runner``, ...).
    """
    bar = _progress(repeats, "timing rounds") if progress else None
    try:
        samples = shuffled_rounds(
            runners, repeats, warmup, max_seconds, min_repeats, seed, (lambda: bar.update(1)) if bar else None
        )
    finally:
        if bar is not None:
            bar.close()
    return {name: timing_stats(values) for name, values in samples.items()}


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False)


# --------------------------------------------------------------------------- one-call runners
# A user's view of one inference: ``session.run`` with a numpy feed on the CPU (not the agent's IO
# binding), the thread count re-pinned before every torch call (interleaved candidates differ in it).


def ort_cpu_runner(session, inputs: np.ndarray) -> Callable[[], float]:
    """Runner for one ORT CPU inference on a fixed random input (a session from ``timing.ort_session``)."""
    name = session.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(inputs, dtype=np.float32)}
    return wall_clock(lambda: session.run(None, feed))


def ort_cuda_runner(session, inputs: np.ndarray) -> Callable[[], float]:
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


def torch_cpu_runner(model, inputs, threads: int) -> Callable[[], float]:
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


def torch_cuda_runner(model, inputs) -> Callable[[], float]:
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


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` (e.g. ``LocalAgent.pid``) has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
