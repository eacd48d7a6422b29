"""Read latency under a profiling worker: ``GET /v1/luts/{id}`` while the agent builds another table.

The agent has one profiling worker thread in the same process as its HTTP server, and that worker
commits every entry to SQLite as soon as it is measured. A client that fetches a finished table while
the worker profiles (CPU-bound timing, ONNX export) and writes (SQLite commits) should still get it
promptly. This benchmark measures that against a baseline with an idle worker, in the same run and
with the same client:

1. start ``effpose lut serve`` (``lut_service.local.LocalAgent``) on a fresh SQLite file and build a
   small complete table (the one that is read);
2. ``idle``: one client reads it for ``--seconds`` while the worker has nothing to do;
3. ``busy``: a second table is requested (a real build with the agent's default budget) and the same
   client reads the first one until that job is done (at most ``--max-busy-seconds``); the entries the
   worker stored meanwhile are counted, so the phase says how much writing it saw;
4. ``idle after``: the baseline again once the worker is idle, so drift during the run shows.

The client sends ``--rate`` requests/s (0: closed loop), alternating a full read (200, the document)
and a conditional one (``If-None-Match`` with the table's ETag, 304), one keep-alive connection, and
twice a second polls the job (busy) or ``/v1/health`` (idle) so both phases send the same mix. Latency
runs from just before the request to the end of the body.

    python benchmarks/read_latency.py --quick     # tiny spaces, 3 s idle phases (< 1 min)
    python benchmarks/read_latency.py             # small space -> results/read_latency.json

Formerly two timed assertions in tests/lut_service/test_reliability.py; a benchmark on a quiet
machine is where such numbers belong.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from common import RESULTS_DIR, format_table, machine_summary, write_results

from lut_service.local import LocalAgent

# The table that is read: its numbers do not matter, only that it is complete and of realistic size.
FAST_BUDGET = {"warmup_runs": 1, "warmup_s": 0.0, "min_samples": 3, "max_samples": 5, "max_seconds": 0.05}
TINY = {"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 1]]}
TINY_WRITER = {"name": "writer", "stem_channels": 8, "stages": [[16, 2, 2], [24, 2, 2]]}
KINDS = ("full", "etag")
POLL_EVERY_S = 0.5


@dataclass(frozen=True)
class Table:
    """The complete table that is read: its id, document bytes and ETag."""

    lut_id: str
    document: bytes
    etag: str


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny spaces and 3 s idle phases (a smoke check)")
    parser.add_argument("--seconds", type=float, help="seconds per idle phase (default 20, quick 3)")
    parser.add_argument("--max-busy-seconds", type=float, help="cap on the busy phase (default 300, quick 40)")
    parser.add_argument("--rate", type=float, default=20.0, help="requests/s of the reader; 0 = closed loop")
    parser.add_argument("--backend", default="torch-cpu", help="backend of the table that is read")
    parser.add_argument("--writer-backend", default="onnxruntime-cpu", help="backend of the table being built")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--name", default="read_latency", help="results file stem")
    args = parser.parse_args(argv)
    if args.rate < 0:
        parser.error("--rate must be >= 0")
    args.seconds = args.seconds or (3.0 if args.quick else 20.0)
    args.max_busy_seconds = args.max_busy_seconds or (40.0 if args.quick else 300.0)
    if args.quick:
        args.read_table = {"space": TINY, "input": [64, 64]}
        args.write_table = {"space": TINY_WRITER, "input": [80, 80]}
    else:
        args.read_table = {"space": "small", "input": [256, 256]}
        args.write_table = {"space": "small", "input": [256, 256]}
    return args


def wait_job(http: httpx.Client, job_id: str, timeout_s: float) -> dict:
    """Poll a job until it leaves queued/running; raise if it fails or outlasts ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = http.get(f"/v1/jobs/{job_id}").json()
        if job["state"] not in ("queued", "running"):
            if job["state"] != "done":
                raise RuntimeError(f"job {job_id} ended {job['state']}: {job.get('errors')}")
            return job
        time.sleep(0.1)
    raise RuntimeError(f"job {job_id} still running after {timeout_s:.0f} s")


def build_table(http: httpx.Client, body: dict, timeout_s: float = 600.0) -> Table:
    """Request a table and wait for it."""
    answer = http.post("/v1/luts", json=body)
    answer.raise_for_status()
    if answer.status_code == 202:
        wait_job(http, answer.json()["job_id"], timeout_s)
        lut_id = answer.json()["lut_id"]
    else:
        lut_id = answer.json()["id"]
    document = http.get(f"/v1/luts/{lut_id}")
    document.raise_for_status()
    return Table(lut_id, document.content, document.headers["etag"])


def read_phase(http: httpx.Client, table: Table, rate: float, until: float, poll_path: str) -> dict:
    """Read the table until ``until`` (perf_counter) or until the polled job is no longer running.

    Returns latencies (s) per kind, error counts and the last polled job (busy phase)."""
    latencies: dict[str, list[float]] = {kind: [] for kind in KINDS}
    errors: Counter = Counter()
    interval = 1.0 / rate if rate > 0 else 0.0
    next_send = next_poll = time.perf_counter()
    job = None
    i = 0
    while (now := time.perf_counter()) < until:
        if now >= next_poll:
            next_poll = now + POLL_EVERY_S
            polled = http.get(poll_path).json()
            if "state" in polled:
                job = polled
                if polled["state"] not in ("queued", "running"):
                    break
        if interval and now < next_send:
            time.sleep(min(next_send - now, max(next_poll - now, 0.0)))
            continue
        next_send += interval
        kind = KINDS[i % len(KINDS)]
        i += 1
        headers = {"If-None-Match": table.etag} if kind == "etag" else {}
        start = time.perf_counter()
        try:
            response = http.get(f"/v1/luts/{table.lut_id}", headers=headers)
        except httpx.HTTPError as exc:
            errors[type(exc).__name__] += 1
            continue
        elapsed = time.perf_counter() - start
        expected = (304, b"") if kind == "etag" else (200, table.document)
        if (response.status_code, response.content) != expected:
            errors[f"{kind}: status {response.status_code}"] += 1
        else:
            latencies[kind].append(elapsed)
    return {"latencies": latencies, "errors": errors, "job": job}


def summarize_latencies(latencies_s: list[float]) -> dict:
    """Request count and p50/p90/p99/max/mean in milliseconds."""
    lat = np.asarray(latencies_s) * 1e3
    if lat.size == 0:
        return {"requests": 0}
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return {
        "requests": int(lat.size),
        "p50_ms": round(float(p50), 3),
        "p90_ms": round(float(p90), 3),
        "p99_ms": round(float(p99), 3),
        "max_ms": round(float(lat.max()), 3),
        "mean_ms": round(float(lat.mean()), 3),
    }


def run_phases(http: httpx.Client, args: argparse.Namespace) -> tuple[dict, dict]:
    """Build the table that is read, then the idle, busy and idle-after phases."""
    table = build_table(http, {**args.read_table, "backend": args.backend, "budget": FAST_BUDGET})
    say(f"table {table.lut_id}: {len(table.document)} bytes, ETag {table.etag}")
    phases: dict[str, dict] = {}
    say(f"idle: {args.seconds:g} s ...")
    phases["idle"] = read_phase(http, table, args.rate, time.perf_counter() + args.seconds, "/v1/health")
    accepted = http.post("/v1/luts", json={**args.write_table, "backend": args.writer_backend})
    accepted.raise_for_status()
    if accepted.status_code != 202:
        raise RuntimeError("the table to build was already complete: nothing for the worker to do")
    job_id = accepted.json()["job_id"]
    say(f"busy: reading while job {job_id} builds a {args.writer_backend} table (<= {args.max_busy_seconds:g} s) ...")
    started = time.perf_counter()
    phases["busy"] = read_phase(http, table, args.rate, started + args.max_busy_seconds, f"/v1/jobs/{job_id}")
    phases["busy"]["seconds"] = time.perf_counter() - started
    job = phases["busy"]["job"] or {}
    writer = {"job": job_id, "state": job.get("state"), "entries_stored": job.get("done"), "total": job.get("total")}
    if job.get("state") in ("queued", "running"):
        say("the job outlasted the busy phase; waiting for it before the idle-after phase ...")
        wait_job(http, job_id, 3600.0)
    say(f"idle after: {args.seconds:g} s ...")
    phases["idle after"] = read_phase(http, table, args.rate, time.perf_counter() + args.seconds, "/v1/health")
    writer["document_bytes"] = len(table.document)
    return phases, writer


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    say(f"machine: {machine_summary()}")
    with tempfile.TemporaryDirectory(prefix="read_latency_") as tmp, LocalAgent(Path(tmp) / "agent.db") as agent:
        with httpx.Client(base_url=agent.url, timeout=30.0) as http:
            raw, writer = run_phases(http, args)
    modes = {
        name: {kind: summarize_latencies(phase["latencies"][kind]) for kind in KINDS}
        | {"errors": int(sum(phase["errors"].values())), "error_kinds": dict(phase["errors"])}
        for name, phase in raw.items()
    }
    ratios = {
        kind: {
            q: round(modes["busy"][kind][q] / modes["idle"][kind][q], 2)
            for q in ("p50_ms", "p99_ms")
            if modes["busy"][kind].get(q) and modes["idle"][kind].get(q)
        }
        for kind in KINDS
    }
    data = {
        "phases": modes,
        "busy_over_idle": ratios,
        "writer": {**writer, "busy_seconds": round(raw["busy"]["seconds"], 2)},
        "settings": {
            "seconds_per_idle_phase": args.seconds,
            "max_busy_seconds": args.max_busy_seconds,
            "rate": args.rate,
            "read_table": {**args.read_table, "backend": args.backend},
            "write_table": {**args.write_table, "backend": args.writer_backend},
            "quick": args.quick,
        },
    }
    path = write_results(args.name, data, args.results_dir, quick=args.quick)
    headers = ["phase", "read", "requests", "errors", "p50 ms", "p90 ms", "p99 ms", "max ms"]
    rows = [
        [name, kind, m[kind]["requests"], m["errors"]]
        + [m[kind].get(q, float("nan")) for q in ("p50_ms", "p90_ms", "p99_ms", "max_ms")]
        for name, m in modes.items()
        for kind in KINDS
    ]
    print(
        f"GET /v1/luts/{{id}} ({writer['document_bytes']} bytes) at {args.rate:g} req/s; busy phase "
        f"{raw['busy']['seconds']:.1f} s while the worker stored {writer['entries_stored']} of "
        f"{writer['total']} entries ({args.writer_backend})"
    )
    print(format_table(headers, rows))
    print("busy / idle:", ", ".join(f"{k} p50 x{r.get('p50_ms')} p99 x{r.get('p99_ms')}" for k, r in ratios.items()))
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
