"""Device fingerprint: what makes timings comparable. Same hardware and software -> same id."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from functools import lru_cache
from typing import Any

# Test only: simulate several devices on one machine (tests/lut_service/test_fleet.py runs two agents
# into one store). When set, the device id is this value and the fingerprint records it; never set it on
# a real agent, since the id then no longer follows the hardware and software.
DEVICE_ID_OVERRIDE = "EFFPOSE_DEVICE_ID_OVERRIDE"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _physical_cores() -> int | None:
    """Distinct (physical id, core id) pairs from /proc/cpuinfo; None where that file is absent."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return None
    cores = set()
    for block in text.split("\n\n"):
        fields = dict(line.split(":", 1) for line in block.splitlines() if ":" in line)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        if "core id" in fields:
            cores.add((fields.get("physical id", "0"), fields["core id"]))
    return len(cores) or None


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


@lru_cache(maxsize=1)
def fingerprint() -> dict[str, Any]:
    """Hardware and library versions of this process's machine (cached: it cannot change while running)."""
    import numpy
    import onnxruntime
    import torch

    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "machine": platform.machine(),
        "physical_cores": _physical_cores(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "os": platform.system(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxruntime_providers": sorted(
            p for p in onnxruntime.get_available_providers() if p != "AzureExecutionProvider"
        ),
        "numpy": numpy.__version__,
        "gpus": [],
        "cuda": None,
        "cudnn": None,
        "driver": None,
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["driver"] = _nvidia_driver()
    from lut_service.timing import allocator_description

    info["allocator"] = allocator_description()  # the agent's worker applies it (timing.tune_allocator)
    override = os.environ.get(DEVICE_ID_OVERRIDE, "").strip()
    if override:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,32}", override):
            raise ValueError(f"{DEVICE_ID_OVERRIDE}={override!r}: expected 1-32 letters, digits, '.', '_' or '-'")
        info["device_id_override"] = override
    return info


def device_id(info: dict[str, Any]) -> str:
    """Stable id: a hash of the canonical JSON of the fingerprint (the test override as it is)."""
    if info.get("device_id_override"):
        return str(info["device_id_override"])
    blob = json.dumps(info, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
