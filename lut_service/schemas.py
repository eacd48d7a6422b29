"""Request and response bodies of the agent API, including the LUT document (docs/design.md §3)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pose.space import SpaceSpec, TableSpec

Backend = Literal["torch-cpu", "torch-cuda", "onnxruntime-cpu", "onnxruntime-cuda"]
JobState = Literal["queued", "running", "done", "failed"]


class BudgetOverrides(BaseModel):
    """Optional per-request timing budget (see ``settings.Budget``); not part of the LUT identity."""

    model_config = ConfigDict(extra="forbid")

    warmup_runs: int | None = Field(None, ge=0, le=1000)
    warmup_s: float | None = Field(None, ge=0, le=10)
    min_samples: int | None = Field(None, ge=1, le=10_000)
    max_samples: int | None = Field(None, ge=1, le=100_000)
    target_rel_iqr: float | None = Field(None, ge=0, le=1)
    max_seconds: float | None = Field(None, ge=0, le=120)
    min_sample_ms: float | None = Field(None, ge=0, le=1000)
    timeout_s: float | None = Field(None, gt=0, le=3600, description="wall-clock limit of one entry")
    stability_threshold: float | None = Field(
        None, gt=0, le=1, description="largest drift of the reference networks across one part of a build"
    )
    stability_retries: int | None = Field(None, ge=0, le=10, description="re-measurements of a drifted part")
    fidelity_networks: int | None = Field(None, ge=0, le=100, description="held-out networks timed per build")


Side = Annotated[int, Field(ge=8)]
Width = Annotated[int, Field(ge=1, le=4096)]


class TableRequest(BaseModel):
    """The fields ``POST /v1/luts`` and ``POST /v1/networks`` share: a ``pose.space.TableSpec`` (the table's
    identity), the backend, and an optional timing budget.

    ``space`` is ``small``, ``large`` or an inline space ``{"stem_channels", "stages": [[C, stride, n], ...]}``
    (validated by ``pose.space``, the one definition of a space); never a path on the agent's machine."""

    model_config = ConfigDict(extra="forbid")

    space: Literal["small", "large"] | SpaceSpec
    backend: Backend
    batch: int = Field(1, ge=1)
    threads: int = Field(1, ge=1, le=1024)
    dtype: Literal["float32"] = "float32"
    input: tuple[Side, Side] = Field((256, 256), description="input image [height, width]")
    joints: int = Field(16, ge=1, le=1024)
    head_widths: list[Width] = Field(default_factory=lambda: [64, 32], min_length=1, max_length=8)
    head_style: Literal["plain", "mbv1", "mbv2"] = "plain"
    sic: bool = True
    budget: BudgetOverrides | None = None

    def table_spec(self) -> TableSpec:
        """The table this request names (ValueError if ``pose.space`` rejects it)."""
        return TableSpec(
            self.space,  # type: ignore[arg-type]  # a name or an inline SpaceSpec, resolved by get_space
            self.input,
            self.batch,
            self.joints,
            tuple(self.head_widths),
            self.head_style,
            self.sic,
            self.threads,
            self.dtype,
        )


class LutRequest(TableRequest):
    """Build (or return) the LUT of this table on this device."""


class LutAccepted(BaseModel):
    job_id: str
    lut_id: str


class JobError(BaseModel):
    key: str
    error: str


class NetworkLatency(BaseModel):
    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    samples: int


class NetworkResult(BaseModel):
    clock: str
    latencies: list[NetworkLatency]


class BuildResult(BaseModel):
    """A LUT job's account of itself: what it is doing (``phase``), how its entries were measured
    (``methods``: count per method), how many fell back to being timed alone (``fallbacks``, with the
    reason) and, once done, the table's stability verdict and fidelity summary."""

    model_config = ConfigDict(extra="allow")

    phase: str
    methods: dict[str, int] = Field(default_factory=dict)
    fallbacks: int = 0
    fallback_reason: str | None = None
    stability: dict[str, Any] | None = None
    fidelity: dict[str, Any] | None = None


class JobStatus(BaseModel):
    """A job's progress and outcome.

    - ``queued``/``running``: ``done`` of ``total`` steps so far (entries stored, or networks built).
    - ``done``: finished with every entry stored (``errors`` empty); ``GET /v1/luts/{lut_id}`` answers 200.
    - ``failed``: finished with at least one error. Each failed entry is in ``errors`` as ``{key, error}``
      (a backend error, out of memory, or a measurement over its ``timeout_s``); the other entries were
      still measured and are kept, ``done`` counts them. ``partial`` is true when some entries were stored
      and some failed (a partial failure); a new ``POST /v1/luts`` measures only the missing entries.
      A job that could not run at all has one error with key ``job`` (``networks`` for a networks job).
    """

    id: str
    kind: Literal["lut", "networks"] = "lut"
    lut_id: str | None
    state: JobState
    done: int
    total: int
    errors: list[JobError]
    partial: bool = Field(False, description="failed, but some entries were measured and stored")
    device_id: str | None = Field(None, description="the device whose agent runs the job")
    attempts: int = Field(0, description="starts of the job since it last stored an entry (3 without: failed)")
    result: NetworkResult | BuildResult | None = None


class NetworksRequest(TableRequest):
    """Time whole networks end to end on this device (interleaved), with the harness the LUT entries use."""

    archs: list[list[str]] = Field(min_length=1, max_length=500, description="one op list per network")


class JobAccepted(BaseModel):
    job_id: str


class LutEntry(BaseModel):
    key: str
    median_ms: float
    p10_ms: float
    p90_ms: float
    iqr_ms: float
    samples: int
    method: str | None = Field(None, description="in-context, alone, or unknown (stored before it was recorded)")
    clock: str | None = Field(None, description="the clock this entry was timed with")


class LutDocument(BaseModel):
    """A complete lookup table. Op, stem and head medians exclude the per-call overhead, which is its own
    entry (``overhead_key``) and is summed once per network."""

    id: str
    device: dict[str, Any]
    backend: str
    batch: int
    dtype: str
    threads: int
    input: list[int]
    space: dict[str, Any]
    joints: int
    head_widths: list[int]
    head_style: str
    sic: bool
    clock: str = Field("wall", description="thread-cpu, wall or cuda-events: how every entry was timed")
    overhead_key: str
    entries: list[LutEntry]
    stability: dict[str, Any] | None = Field(
        None,
        description="the build's stability guard: status (stable, unstable, unchecked, not measured), drift, "
        "reference networks per checkpoint, hypervisor steal share and load average over the build",
    )
    fidelity: dict[str, Any] | None = Field(
        None,
        description="held-out random networks timed by the build: within 5/10 %, MAPE, bias, Kendall tau, drift, "
        "and per network predicted_ms/measured_ms",
    )
    thread_advice: list[dict[str, Any]] | None = Field(
        None, description="which thread count ran a reference network fastest on this device, from stored timings"
    )


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    version: str
    worker_alive: bool


class DeviceInfo(BaseModel):
    id: str
    fingerprint: dict[str, Any]
    backends: list[str]
    unavailable: dict[str, str]
    thread_advice: list[dict[str, Any]] = Field(
        default_factory=list,
        description="per backend/batch/space: the fastest thread count for a reference network, from the "
        "timings this agent already stored (build references, networks jobs); nothing is timed for it",
    )


class ErrorMessage(BaseModel):
    detail: str


class LutSummary(BaseModel):
    """One stored table of any device in the store (``GET /v1/luts``); the document itself is
    ``GET /v1/luts/{id}``, served by every agent of the store."""

    id: str
    device_id: str
    device: dict[str, Any] = Field(description="the device's fingerprint and id, as in the LUT document")
    backend: str
    batch: int
    threads: int
    dtype: str
    clock: str
    input: list[int]
    space: str = Field(description="the search space's name")
    joints: int
    head_widths: list[int]
    head_style: str
    sic: bool
    complete: bool = Field(description="every entry stored and the document rendered")
    entries: int = Field(description="entries stored so far")
    total: int = Field(description="entries of the complete table")
    created_at: str


class LutList(BaseModel):
    luts: list[LutSummary]
