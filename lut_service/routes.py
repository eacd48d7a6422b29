"""HTTP API under ``/v1``: health, device, LUT requests, jobs, LUT documents (strong ETag)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

import lut_service
from lut_service import crud
from lut_service.db import session_scope
from lut_service.fastpath import etag_matches
from lut_service.models import Device, Job, Lut
from lut_service.plan import largest_activation, largest_weight
from lut_service.schemas import (
    DeviceInfo,
    ErrorMessage,
    Health,
    JobAccepted,
    JobStatus,
    LutAccepted,
    LutDocument,
    LutList,
    LutRequest,
    LutSummary,
    NetworksRequest,
    TableRequest,
)
from lut_service.settings import Settings
from lut_service.stability import advice_from_store
from lut_service.timing import BACKENDS, clock_name, unavailable_reason
from pose.space import SPACES, TableSpec, table_keys

router = APIRouter(prefix="/v1")

# Answers of guard.GuardMiddleware (before routing), declared so the OpenAPI schema lists every status.
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {
        "model": ErrorMessage,
        "description": "EFFPOSE_TOKEN is set and 'Authorization: Bearer <token>' is missing or wrong "
        "(reads only with EFFPOSE_PROTECT_READS=1)",
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorMessage, "description": "the backend is not available here, or a bad Content-Length"},
    **UNAUTHORIZED,
    413: {"model": ErrorMessage, "description": "the request body exceeds max_body_bytes (EFFPOSE_MAX_BODY_BYTES)"},
    422: {"description": "invalid request (the message names the field or the limit)"},
}


def get_session(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.sessions) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]
INT32_MAX = 2**31 - 1  # integer columns are 32-bit on PostgreSQL


@dataclass(frozen=True)
class ResolvedRequest:
    """A checked request: the table it names, its canonical form (stored, and hashed into the LUT id) and
    the keys a complete table of it holds (``pose.space.table_keys``)."""

    spec: TableSpec
    canonical: dict[str, Any]
    keys: list[str]


def resolve_request(body: TableRequest, settings: Settings) -> ResolvedRequest:
    """Check a request against this device and the limits (422/400 naming the setting), before anything
    is built or allocated: cheap bounds first, then the backend, then the memory a module would need."""
    spec = _table_spec(body)
    _check_bounds(spec, settings)
    if isinstance(body, NetworksRequest) and len(body.archs) > settings.max_networks:
        raise HTTPException(
            422,
            f"{len(body.archs)} archs exceed the limit of {settings.max_networks} networks per request "
            "(max_networks, EFFPOSE_MAX_NETWORKS)",
        )
    _check_backend(body.backend, spec.threads)
    _check_memory(spec, settings)
    keys = table_keys(spec)
    if len(keys) > settings.max_keys:
        raise HTTPException(
            422,
            f"the space has {len(keys)} unique keys, above the limit of {settings.max_keys} "
            "(max_keys, EFFPOSE_MAX_KEYS)",
        )
    clock = clock_name(body.backend, spec.threads, settings.clock)
    return ResolvedRequest(spec, {**spec.as_fields(), "backend": body.backend, "clock": clock}, keys)


def _table_spec(body: TableRequest) -> TableSpec:
    """The request's table; its space is a name or an inline ``SpaceSpec``, never a path on this machine."""
    if isinstance(body.space, str) and body.space not in SPACES:
        raise HTTPException(
            422, f"unknown search space {body.space!r}: expected one of {', '.join(SPACES)} or an inline space"
        )
    try:
        return body.table_spec()
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def _check_bounds(spec: TableSpec, settings: Settings) -> None:
    """Input size, batch, layers and channels within the agent's limits."""
    height, width = spec.input_hw
    if min(height, width) < 8 or max(height, width) > settings.max_input_side:
        raise HTTPException(
            422,
            f"input {height}x{width} out of range: each side must be 8 up to the limit of {settings.max_input_side} "
            "(max_input_side, EFFPOSE_MAX_INPUT_SIDE)",
        )
    if spec.batch > settings.max_batch:
        raise HTTPException(
            422, f"batch {spec.batch} exceeds the limit of {settings.max_batch} (max_batch, EFFPOSE_MAX_BATCH)"
        )
    space = spec.space
    if space.num_layers > settings.max_layers:
        raise HTTPException(
            422,
            f"space {space.name!r} has {space.num_layers} layers, above the limit of {settings.max_layers} "
            "(max_layers, EFFPOSE_MAX_LAYERS)",
        )
    widths = {"stem_channels": space.stem_channels}
    widths.update({f"stages[{i}] channels": stage.channels for i, stage in enumerate(space.stages)})
    widths.update({f"head_widths[{i}]": w for i, w in enumerate(spec.head_widths)})
    for name, channels in widths.items():
        if not 1 <= channels <= settings.max_channels:
            raise HTTPException(
                422,
                f"{name} = {channels} channels is outside 1..{settings.max_channels} "
                "(the limit max_channels, EFFPOSE_MAX_CHANNELS)",
            )


def _check_backend(backend: str, threads: int) -> None:
    """The backend runs here (400 otherwise), and a CPU backend gets no more threads than usable CPUs."""
    reason = unavailable_reason(backend)
    if reason is not None:
        raise HTTPException(400, reason)
    if backend.endswith("-cpu"):
        usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if usable and threads > usable:
            raise HTTPException(422, f"threads {threads} exceeds the {usable} CPUs usable on this device")


def _check_memory(spec: TableSpec, settings: Settings) -> None:
    """The largest activation and the widest op's weights within the limits, before anything is allocated."""
    elements = largest_activation(spec)
    if elements > settings.max_tensor_elements:
        raise HTTPException(
            422,
            f"request needs a tensor of {elements} elements, above the limit of {settings.max_tensor_elements} "
            "(max_tensor_elements, EFFPOSE_MAX_TENSOR_ELEMENTS; reduce batch, input size or channels)",
        )
    weights = largest_weight(spec.space)
    if weights > settings.max_weight_elements:
        raise HTTPException(
            422,
            f"the widest candidate op needs {weights} weights, above the limit of {settings.max_weight_elements} "
            "(max_weight_elements, EFFPOSE_MAX_WEIGHT_ELEMENTS; reduce channels)",
        )


def _document_response(body: bytes, etag: str, status_code: int = 200) -> Response:
    return Response(body, status_code, media_type="application/json", headers={"ETag": etag})


@router.get("/health", response_model=Health)
def health(request: Request) -> Health:
    return Health(version=lut_service.__version__, worker_alive=request.app.state.worker.alive)


@router.get("/device", response_model=DeviceInfo, responses=UNAUTHORIZED)
def device(request: Request, session: SessionDep) -> DeviceInfo:
    """This device, its backends, and which thread count ran a reference network fastest here (from the
    timings builds and networks jobs already stored: ``stability.advice_from_store``)."""
    unavailable = {b: r for b in BACKENDS if (r := unavailable_reason(b)) is not None}
    return DeviceInfo(
        id=request.app.state.device_id,
        fingerprint=request.app.state.fingerprint,
        backends=[b for b in BACKENDS if b not in unavailable],
        unavailable=unavailable,
        thread_advice=advice_from_store(session, request.app.state.device_id),
    )


@router.post(
    "/luts",
    status_code=202,
    response_model=LutAccepted,
    responses={
        **ERRORS,
        200: {"model": LutDocument, "description": "every entry is already stored"},
        409: {"model": ErrorMessage, "description": "a conflicting concurrent request; retry"},
    },
)
def request_lut(body: LutRequest, request: Request, session: SessionDep) -> Response:
    """Queue the profiling of the missing entries (202 + job), or return the table when it is complete (200)."""
    state = request.app.state
    resolved = resolve_request(body, state.settings)
    lut_id = crud.lut_id_for(state.device_id, resolved.canonical)
    budget = body.budget.model_dump(exclude_none=True) if body.budget else {}
    with state.submit_lock:  # one agent process: identical concurrent requests end up on one job
        lut = crud.get_or_create_lut(session, lut_id, state.device_id, resolved.canonical, resolved.keys)
        document = crud.complete_document(session, lut)
        if document is not None:
            session.commit()
            return _document_response(*document)
        job = crud.active_job(session, lut_id)
        if job is None:
            done = len(crud.stored_measurements(session, lut))
            try:
                job = crud.create_job(session, lut, done, budget)
                session.commit()
            except IntegrityError:  # another process created the active job first
                session.rollback()
                job = crud.active_job(session, lut_id)
                if job is None:
                    raise HTTPException(409, "conflicting request; retry") from None
        else:
            session.commit()
    state.worker.wake()
    return JSONResponse(
        LutAccepted(job_id=job.id, lut_id=lut_id).model_dump(),
        status_code=202,
        headers={"Location": f"/v1/jobs/{job.id}"},
    )


@router.post("/networks", status_code=202, response_model=JobAccepted, responses=ERRORS)
def measure_networks(body: NetworksRequest, request: Request, session: SessionDep) -> JSONResponse:
    """Queue an end-to-end timing of whole networks (interleaved, same harness and clock as the LUT entries).

    The result (one latency per arch, in order) appears on ``GET /v1/jobs/{id}`` when the job is done.
    """
    state = request.app.state
    resolved = resolve_request(body, state.settings)
    for i, ops in enumerate(body.archs):
        try:
            resolved.spec.arch(ops)
        except ValidationError as exc:
            messages = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
            raise HTTPException(422, f"archs[{i}]: {messages}") from None
    budget = body.budget.model_dump(exclude_none=True) if body.budget else {}
    job = crud.create_networks_job(session, state.device_id, {**resolved.canonical, "archs": body.archs}, budget)
    session.commit()
    state.worker.wake()
    return JSONResponse({"job_id": job.id}, status_code=202, headers={"Location": f"/v1/jobs/{job.id}"})


@router.get("/jobs/{job_id}", response_model=JobStatus, responses={**UNAUTHORIZED, 404: {"model": ErrorMessage}})
def get_job(job_id: str, session: SessionDep) -> JobStatus:
    job = session.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"unknown job {job_id!r}")
    return JobStatus(
        id=job.id,
        kind=job.kind,
        lut_id=job.lut_id,
        state=job.state,
        done=job.done,
        total=job.total,
        errors=job.errors,
        partial=job.state == "failed" and job.kind == "lut" and 0 < job.done < job.total,
        result=job.result,
        device_id=job.device_id,
        attempts=job.attempts,
    )


def lut_summary(session: Session, lut: Lut, device: Device) -> LutSummary:
    """What the table list says about one table (no entries: those are in its document)."""
    request = lut.request
    stored = len(lut.keys) if lut.document is not None else len(crud.stored_measurements(session, lut))
    return LutSummary(
        id=lut.id,
        device_id=lut.device_id,
        device={"id": device.id, **device.fingerprint},
        backend=lut.backend,
        batch=lut.batch,
        threads=lut.threads,
        dtype=lut.dtype,
        clock=request["clock"],
        input=list(request["input"]),
        space=request["space"]["name"],
        joints=request["joints"],
        head_widths=list(request["head_widths"]),
        head_style=request["head_style"],
        sic=request["sic"],
        complete=lut.document is not None,
        entries=stored,
        total=len(lut.keys),
        created_at=lut.created_at.isoformat(),
    )


@router.get("/luts", response_model=LutList, responses=UNAUTHORIZED)
def list_tables(
    session: SessionDep,
    device: str | None = None,
    backend: str | None = None,
    space: str | None = None,
    batch: Annotated[int | None, Query(ge=1, le=INT32_MAX)] = None,  # a stored column's range: no 500 on 10**30
    threads: Annotated[int | None, Query(ge=1, le=1024)] = None,  # the request limit (schemas.TableRequest)
) -> LutList:
    """Every stored table of every device in this store, newest first, filtered by the given fields
    (``space`` is the space's name). Agents that share a store (a fleet) all list the same tables, with
    each table's device fingerprint; ``GET /v1/luts/{id}`` then serves any of them, read-only."""
    devices = {d.id: d for d in crud.list_devices(session)}
    luts = crud.list_luts(session, device_id=device, backend=backend, batch=batch, threads=threads)
    chosen = [lut for lut in luts if space is None or lut.request["space"]["name"] == space]
    return LutList(luts=[lut_summary(session, lut, devices[lut.device_id]) for lut in chosen])


def _load_document(request: Request, lut_id: str) -> tuple[bytes, str]:
    """The complete document (body, ETag) from the database, cached in memory; 404/409 otherwise."""
    with session_scope(request.app.state.sessions) as session:
        lut = session.get(Lut, lut_id)
        if lut is None:
            raise HTTPException(404, f"unknown LUT {lut_id!r}")
        if lut.device_id != request.app.state.device_id and lut.document is None:
            # another device's table, read-only here: only its own agent stores its document
            done = len(crud.stored_measurements(session, lut))
            raise HTTPException(
                409,
                f"LUT {lut_id} of device {lut.device_id} is incomplete ({done}/{len(lut.keys)} entries); "
                f"only device {lut.device_id}'s agent builds it",
            )
        document = crud.complete_document(session, lut)
        if document is None:
            done = len(crud.stored_measurements(session, lut))
            job = crud.active_job(session, lut_id)
            hint = f"job {job.id} is {job.state}" if job else "no job is running: POST /v1/luts again to resume"
            raise HTTPException(409, f"LUT {lut_id} is incomplete ({done}/{len(lut.keys)} entries); {hint}")
    request.app.state.documents[lut_id] = document
    return document


@router.get(
    "/luts/{lut_id}",
    response_model=LutDocument,
    responses={
        304: {"description": "If-None-Match matched the ETag"},
        **UNAUTHORIZED,
        404: {"model": ErrorMessage},
        409: {"model": ErrorMessage},
    },
)
async def get_lut(lut_id: str, request: Request) -> Response:
    """Complete documents never change, so a cached one is answered on the event loop: no thread-pool
    hop and no DB session per request (benchmarks/agent_load.py: ~0.75 -> ~0.27 ms server CPU per
    request). Only a cache miss reads the database, in the thread pool."""
    cached = request.app.state.documents.get(lut_id)
    if cached is None:
        cached = await run_in_threadpool(_load_document, request, lut_id)
    body, etag = cached
    if etag_matches(request.headers.get("if-none-match"), etag):
        return Response(status_code=304, headers={"ETag": etag})
    return _document_response(body, etag)
