"""The agent's web dashboard: read-only HTML pages under ``/ui``, rendered on the server.

Pages read the database through the same ``crud`` functions (and, for the device and a job's status,
the same route functions) as the JSON API, so a page can never show something the API would not.
The layer x op structure of a table comes from ``pose.space`` (``TableSpec``), never from parsing keys.
Templates (``templates/``) are Jinja2 with autoescaping on; the one CSS and one JS file (``static/``)
ship with the package, so the pages work with no internet access. Charts are HTML tables and inline
SVG; the JS only polls ``GET /v1/jobs/{id}`` to update running jobs in place.

Authentication is ``guard.GuardMiddleware``'s: with ``EFFPOSE_PROTECT_READS=1`` a page needs the bearer
token or the login cookie set by ``POST /ui/login`` (HttpOnly, SameSite=Strict).
"""

from __future__ import annotations

import hmac
import json
import math
from dataclasses import dataclass, field, replace
from datetime import datetime
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader
from sqlalchemy.orm import Session

from lut_service import crud
from lut_service.guard import COOKIE_NAME, LOGIN_PATH, cookie_value
from lut_service.models import ACTIVE_STATES, Job, Lut
from lut_service.routes import SessionDep, device, get_job
from pose.space import CANDIDATE_OPS, SKIP, Layer, Stage, TableSpec, fixed_parts, layer_key

router = APIRouter(include_in_schema=False)

TEMPLATES = Environment(
    loader=PackageLoader("lut_service", "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True
)
STATIC_TYPES = {"app.css": "text/css; charset=utf-8", "app.js": "text/javascript; charset=utf-8"}
STATIC = {name: (resources.files("lut_service") / "static" / name).read_bytes() for name in STATIC_TYPES}
# Everything the pages load comes from this agent; no inline script or style, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
HEAT_SHADES = 10  # colour classes .h0 (fastest) .. .h9 (slowest) in app.css
RATIO_SHADES = 9  # .r0 (second table 4x faster) .. .r4 (equal) .. .r8 (4x slower)


def fmt_ms(value: float | None) -> str:
    """Milliseconds with about three significant digits."""
    if value is None:
        return "–"
    size = abs(value)
    digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 1 else 3
    return f"{value:.{digits}f}"


def fmt_time(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "–"


def fmt_field(value: Any, name: str = "") -> str:
    """A summary number: shares (``within_5pct`` and the like) as percentages, other floats to 4 digits."""
    if isinstance(value, float) and not isinstance(value, bool):
        return f"{value:.0%}" if name.endswith("pct") else f"{value:.4g}"
    return "–" if value is None else str(value)


TEMPLATES.filters.update(ms=fmt_ms, time=fmt_time, field=fmt_field, path=lambda text: quote(str(text), safe=""))


def render(request: Request, template: str, status: int = 200, **context: Any) -> HTMLResponse:
    settings = request.app.state.settings
    html = TEMPLATES.get_template(template).render(
        signed_in=COOKIE_NAME in request.cookies,
        protected=settings.token is not None and settings.protect_reads,
        **context,
    )
    return HTMLResponse(html, status, headers=SECURITY_HEADERS)


def not_found(request: Request, what: str) -> HTMLResponse:
    return render(request, "message.html", 404, title="Not found", message=what)


# --------------------------------------------------------------------------------------------
# Page models: plain data the templates lay out.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One (layer, op) of a heat-map. ``state``: measured, pending (not stored yet), skip or illegal."""

    op: str
    state: str
    key: str | None = None
    entry: dict[str, Any] | None = None
    title: str = ""
    shade: int = 0


@dataclass(frozen=True)
class LayerRow:
    layer: Layer
    cells: list[Cell]
    fastest: str | None  # the cheapest measured MBConv op (skip, free where legal, left out)


@dataclass(frozen=True)
class StageGroup:
    index: int
    stage: Stage
    rows: list[LayerRow]


@dataclass
class TableView:
    """A table as the pages show it: its fields, entries by key, and the heat-map built from its spec."""

    fields: dict[str, Any]
    entries: dict[str, dict[str, Any]]
    spec: TableSpec
    stages: list[StageGroup] = field(default_factory=list)
    fixed: list[tuple[str, str, dict[str, Any] | None]] = field(default_factory=list)
    total_range: tuple[float, float] | None = None


def entry_title(key: str, entry: dict[str, Any]) -> str:
    """The hover text of a cell: its key and the spread of its samples."""
    median = entry["median_ms"]
    spread = entry["iqr_ms"] / median if median > 0 else 0.0
    return (
        f"{key}\nmedian {fmt_ms(median)} ms, p10 {fmt_ms(entry['p10_ms'])} – p90 {fmt_ms(entry['p90_ms'])} ms\n"
        f"IQR {fmt_ms(entry['iqr_ms'])} ms ({spread:.1%} of the median), {entry['samples']} samples"
    )


def shade(value: float, low: float, high: float, shades: int) -> int:
    """Colour class of ``value`` on a log scale from ``low`` (0) to ``high`` (shades - 1)."""
    if value <= 0 or low <= 0 or high <= low:
        return 0
    position = (math.log(value) - math.log(low)) / (math.log(high) - math.log(low))
    return min(shades - 1, max(0, round(position * (shades - 1))))


def layer_cell(layer: Layer, op: str, batch: int, entries: dict[str, dict[str, Any]]) -> Cell:
    if op == SKIP:
        reason = layer.skip_reason()
        if reason is not None:
            return Cell(op, "illegal", title=f"skip is illegal here: {reason}")
        return Cell(op, "skip", title="skip: identity, costs nothing")
    key = layer_key(op, layer, batch)
    assert key is not None
    entry = entries.get(key)
    if entry is None:
        return Cell(op, "pending", key, title=f"{key}\nnot measured yet")
    return Cell(op, "measured", key, entry, entry_title(key, entry))


def table_view(fields: dict[str, Any], entries: dict[str, dict[str, Any]]) -> TableView:
    """Lay out a table (document, or a stored request with the entries measured so far) by layer and op."""
    spec = TableSpec.from_fields(fields)
    view = TableView(fields, entries, spec)
    layers = spec.space.layers(spec.input_hw)
    grid = [[layer_cell(layer, op, spec.batch, entries) for op in CANDIDATE_OPS] for layer in layers]
    values = [c.entry["median_ms"] for row in grid for c in row if c.entry is not None and c.entry["median_ms"] > 0]
    low, high = (min(values), max(values)) if values else (0.0, 0.0)
    for layer, cells in zip(layers, grid, strict=True):
        cells = [replace(c, shade=shade(c.entry["median_ms"], low, high, HEAT_SHADES)) if c.entry else c for c in cells]
        measured = [c for c in cells if c.entry is not None]
        fastest = min(measured, key=lambda c: c.entry["median_ms"]).op if measured else None  # type: ignore[index]
        if not view.stages or view.stages[-1].index != layer.stage:
            view.stages.append(StageGroup(layer.stage, spec.space.stages[layer.stage], []))
        view.stages[-1].rows.append(LayerRow(layer, cells, fastest))
    view.fixed = [(part, key, entries.get(key)) for part, key in fixed_parts(spec).items()]
    view.total_range = network_range(view)
    return view


def network_range(view: TableView) -> tuple[float, float] | None:
    """Predicted latency of the cheapest and the dearest network of the space (None while incomplete)."""
    fixed = [entry for _, _, entry in view.fixed]
    if any(entry is None for entry in fixed):
        return None
    low = high = sum(entry["median_ms"] for entry in fixed)  # type: ignore[index]
    for group in view.stages:
        for row in group.rows:
            costs = [0.0 if c.state == "skip" else c.entry["median_ms"] if c.entry else None for c in row.cells]
            legal = [cost for cost, c in zip(costs, row.cells, strict=True) if c.state != "illegal"]
            if any(cost is None for cost in legal):
                return None
            low += min(legal)  # type: ignore[type-var]
            high += max(legal)  # type: ignore[type-var]
    return low, high


# --------------------------------------------------------------------------------------------
# Fidelity and stability: fields later builds add to a document; shown when present.
# --------------------------------------------------------------------------------------------


def scalars(data: Any) -> dict[str, Any]:
    """The top-level numbers, strings and booleans of a dict (the summary line of a nested section)."""
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, str | int | float | bool) or v is None}


def fidelity_points(fidelity: Any) -> list[tuple[float, float]]:
    """(measured, predicted) ms of every held-out network listed in a fidelity section."""
    points: list[tuple[float, float]] = []
    if not isinstance(fidelity, dict):
        return points
    for value in fidelity.values():
        if isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    measured, predicted = item.get("measured_ms"), item.get("predicted_ms")
                    if isinstance(measured, int | float) and isinstance(predicted, int | float) and measured > 0:
                        points.append((float(measured), float(predicted)))
    return points


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values in [low, high]."""
    if high <= low:
        return [low]
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.ceil(low / step) * step
    return [round(first + i * step, 10) for i in range(int((high - first) / step) + 1)]


def scatter(points: list[tuple[float, float]], size: int = 320, margin: int = 44) -> dict[str, Any] | None:
    """Geometry of the predicted-vs-measured SVG: points, the diagonal, the +-5 % and +-10 % bands."""
    if not points:
        return None
    values = [v for point in points for v in point]
    low, high = min(values) * 0.9, max(values) * 1.1
    inner = size - 2 * margin

    def x(value: float) -> float:
        return round(margin + (value - low) / (high - low) * inner, 2)

    def y(value: float) -> float:
        return round(size - margin - (value - low) / (high - low) * inner, 2)

    def band(rel: float) -> str:
        corners = [(low, low * (1 + rel)), (high, high * (1 + rel)), (high, high * (1 - rel)), (low, low * (1 - rel))]
        return " ".join(f"{x(a)},{y(b)}" for a, b in corners)

    ticks = [(t, x(t), y(t), fmt_ms(t)) for t in nice_ticks(low, high)]
    within = sum(abs(p / m - 1) <= 0.10 for m, p in points)
    return {
        "size": size,
        "margin": margin,
        "inner": inner,
        "points": [
            (x(m), y(p), f"measured {fmt_ms(m)} ms, predicted {fmt_ms(p)} ms ({p / m - 1:+.1%})") for m, p in points
        ],
        "diagonal": (x(low), y(low), x(high), y(high)),
        "band5": band(0.05),
        "band10": band(0.10),
        "ticks": ticks,
        "within10": within,
    }


# --------------------------------------------------------------------------------------------
# Reading tables: complete documents through crud.complete_document, the rest from stored rows.
# --------------------------------------------------------------------------------------------


def load_table(session: Session, lut: Lut) -> tuple[dict[str, Any] | None, TableView]:
    """The document (None while incomplete) and the view of what is stored so far."""
    stored = crud.complete_document(session, lut)
    if stored is not None:
        document = json.loads(stored[0])
        return document, table_view(document, {e["key"]: e for e in document["entries"]})
    rows = crud.stored_measurements(session, lut)
    entries = {
        key: {
            "key": key,
            "median_ms": row.median_ms,
            "p10_ms": row.p10_ms,
            "p90_ms": row.p90_ms,
            "iqr_ms": row.iqr_ms,
            "samples": row.samples,
        }
        for key, row in rows.items()
    }
    return None, table_view(lut.request, entries)


def build_time(jobs: list[Job]) -> tuple[float | None, datetime | None]:
    """Seconds the table's finished jobs took (queueing included) and when the last one finished."""
    finished = [job for job in jobs if job.state not in ACTIVE_STATES and job.updated_at and job.created_at]
    if not finished:
        return None, None
    seconds = sum((job.updated_at - job.created_at).total_seconds() for job in finished)
    return seconds, max(job.updated_at for job in finished)


def lut_summary(session: Session, lut: Lut) -> dict[str, Any]:
    """One line of the table list."""
    document = json.loads(lut.document) if lut.document else None
    jobs = crud.list_jobs(session, lut_id=lut.id, limit=50)
    seconds, finished_at = build_time(jobs)
    stored = len(lut.keys) if document else len(crud.stored_measurements(session, lut))
    active = next((job for job in jobs if job.state in ACTIVE_STATES), None)
    space = lut.request.get("space", {})
    return {
        "lut": lut,
        "space": space.get("name", "inline") if isinstance(space, dict) else str(space),
        "input": "x".join(str(side) for side in lut.request.get("input", [])),
        "complete": document is not None,
        "stored": stored,
        "active": active,
        "seconds": seconds,
        "finished_at": finished_at,
        "stability": scalars((document or {}).get("stability")),
        "fidelity": scalars((document or {}).get("fidelity")),
    }


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text not in (None, "") else None
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Routes.
# --------------------------------------------------------------------------------------------


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/ui", 307)


@router.get("/ui/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        return Response("not found", 404, media_type="text/plain")
    return Response(STATIC[name], media_type=STATIC_TYPES[name], headers={"X-Content-Type-Options": "nosniff"})


@router.get("/ui", response_class=HTMLResponse)
def device_page(request: Request, session: SessionDep) -> HTMLResponse:
    info = device(request, session)
    extra = {k: v for k, v in info.model_dump().items() if k not in {"id", "fingerprint", "backends", "unavailable"}}
    luts = crud.list_luts(session)
    per_device: dict[str, int] = {}
    for lut in luts:
        per_device[lut.device_id] = per_device.get(lut.device_id, 0) + 1
    active = [job for job in crud.list_jobs(session, limit=50) if job.state in ACTIVE_STATES]
    return render(
        request,
        "device.html",
        title="Device",
        info=info,
        extra=extra,
        devices=crud.list_devices(session),
        per_device=per_device,
        active_jobs=len(active),
    )


@router.get("/ui/tables", response_class=HTMLResponse)
def tables_page(
    request: Request,
    session: SessionDep,
    device: str = "",
    backend: str = "",
    batch: str = "",
    threads: str = "",
) -> HTMLResponse:
    everything = crud.list_luts(session)
    filters = {"device_id": device or None, "backend": backend or None}
    filters |= {"batch": _int_or_none(batch), "threads": _int_or_none(threads)}
    luts = crud.list_luts(session, **filters)  # type: ignore[arg-type]
    choices = {
        "device": sorted({lut.device_id for lut in everything}),
        "backend": sorted({lut.backend for lut in everything}),
        "batch": sorted({lut.batch for lut in everything}),
        "threads": sorted({lut.threads for lut in everything}),
    }
    return render(
        request,
        "tables.html",
        title="Tables",
        rows=[lut_summary(session, lut) for lut in luts],
        choices=choices,
        chosen={"device": device, "backend": backend, "batch": batch, "threads": threads},
        total=len(everything),
    )


@router.get("/ui/tables/{lut_id}", response_class=HTMLResponse)
def table_page(request: Request, lut_id: str, session: SessionDep) -> HTMLResponse:
    lut = session.get(Lut, lut_id)
    if lut is None:
        return not_found(request, f"no table {lut_id!r} in this store")
    document, view = load_table(session, lut)
    fidelity = (document or {}).get("fidelity")
    jobs = [get_job(job.id, session) for job in crud.list_jobs(session, lut_id=lut.id, limit=20)]
    return render(
        request,
        "table.html",
        title=f"Table {lut.id}",
        lut=lut,
        document=document,
        view=view,
        ops=CANDIDATE_OPS,
        stored=len(view.entries.keys() & set(lut.keys)),
        stability=(document or {}).get("stability"),
        stability_summary=scalars((document or {}).get("stability")),
        fidelity=fidelity if isinstance(fidelity, dict) else None,
        fidelity_summary=scalars(fidelity),
        plot=scatter(fidelity_points(fidelity)),
        jobs=jobs,
    )


@router.get("/ui/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep) -> HTMLResponse:
    jobs = crud.list_jobs(session, limit=200)
    rows = [(job, get_job(job.id, session)) for job in jobs]
    return render(
        request,
        "jobs.html",
        title="Jobs",
        unfinished=[row for row in rows if row[0].state in ACTIVE_STATES],
        finished=[row for row in rows if row[0].state not in ACTIVE_STATES],
    )


@dataclass(frozen=True)
class RatioCell:
    """One (layer, op) of the comparison: the second table's median over the first's."""

    op: str
    state: str  # measured (both), skip or illegal
    ratio: float | None = None
    title: str = ""
    shade: int = RATIO_SHADES // 2


@dataclass(frozen=True)
class RatioRow:
    layer: Layer
    cells: list[RatioCell]
    fastest_a: str | None
    fastest_b: str | None


def ratio_cell(a: Cell, b: Cell) -> RatioCell:
    if a.entry is None or b.entry is None or a.entry["median_ms"] <= 0:
        return RatioCell(a.op, a.state if a.state in ("skip", "illegal") else "pending", title=a.title)
    ratio = b.entry["median_ms"] / a.entry["median_ms"]
    # log2 of the ratio, clipped to +-2 (4x either way), on RATIO_SHADES classes centred on equal
    level = max(-2.0, min(2.0, math.log2(ratio))) if ratio > 0 else -2.0
    title = f"{a.key}\nA {fmt_ms(a.entry['median_ms'])} ms, B {fmt_ms(b.entry['median_ms'])} ms: B/A = {ratio:.2f}x"
    return RatioCell(a.op, "measured", ratio, title, round((level + 2) / 4 * (RATIO_SHADES - 1)))


def compare_views(a: TableView, b: TableView) -> dict[str, Any]:
    """Per-cell ratios B/A, each table's preferred op per layer, and how often they agree."""
    stages = []
    ratios: list[float] = []
    for group_a, group_b in zip(a.stages, b.stages, strict=True):
        rows = []
        for row_a, row_b in zip(group_a.rows, group_b.rows, strict=True):
            cells = [ratio_cell(ca, cb) for ca, cb in zip(row_a.cells, row_b.cells, strict=True)]
            ratios += [c.ratio for c in cells if c.ratio is not None and c.ratio > 0]
            rows.append(RatioRow(row_a.layer, cells, row_a.fastest, row_b.fastest))
        stages.append((group_a, rows))
    layers = [row for _, rows in stages for row in rows]
    fixed = []
    for (part, key, entry_a), (_, _, entry_b) in zip(a.fixed, b.fixed, strict=True):
        ratio = (
            entry_b["median_ms"] / entry_a["median_ms"] if entry_a and entry_b and entry_a["median_ms"] > 0 else None
        )
        fixed.append((part, key, entry_a, entry_b, ratio))
    return {
        "stages": stages,
        "fixed": fixed,
        "agree": sum(row.fastest_a == row.fastest_b for row in layers),
        "layers": len(layers),
        "geomean": math.exp(sum(map(math.log, ratios)) / len(ratios)) if ratios else None,
    }


def same_layout(a: TableView, b: TableView) -> bool:
    """Cells line up only when both tables have the same layers (space and input size); batch may differ."""
    return a.spec.space.layers(a.spec.input_hw) == b.spec.space.layers(b.spec.input_hw)


@router.get("/ui/compare", response_class=HTMLResponse)
def compare_page(request: Request, session: SessionDep, a: str = "", b: str = "") -> HTMLResponse:
    complete = [lut for lut in crud.list_luts(session) if lut.document is not None]
    context: dict[str, Any] = {"title": "Compare", "choices": complete, "a": a, "b": b, "ops": CANDIDATE_OPS}
    chosen = [session.get(Lut, lut_id) if lut_id else None for lut_id in (a, b)]
    if a and b:
        missing = [lut_id for lut_id, lut in zip((a, b), chosen, strict=True) if lut is None]
        if missing:
            return render(request, "compare.html", 404, error=f"no table {missing[0]!r} in this store", **context)
        (doc_a, view_a), (doc_b, view_b) = (load_table(session, lut) for lut in chosen)  # type: ignore[arg-type]
        context |= {"lut_a": chosen[0], "lut_b": chosen[1], "view_a": view_a, "view_b": view_b}
        if doc_a is None or doc_b is None:
            context["error"] = "both tables must be complete to compare them"
        elif not same_layout(view_a, view_b):
            context["error"] = "the tables have different layers (space or input size): cells do not line up"
        else:
            context["comparison"] = compare_views(view_a, view_b)
    return render(request, "compare.html", **context)


def safe_next(target: str | None) -> str:
    """Only a dashboard path of this agent (no open redirect to another site)."""
    if target and target.startswith("/ui") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui"


@router.get(LOGIN_PATH, response_class=HTMLResponse)
def login_form(request: Request, next: str = "/ui") -> HTMLResponse:  # noqa: A002 - the query parameter's name
    return render(request, "login.html", title="Log in", next=safe_next(next), error=None)


@router.post(LOGIN_PATH, response_class=HTMLResponse)
async def login(request: Request) -> Response:
    """Check the token (constant time) and keep a cookie that lets this browser read (never write)."""
    token = request.app.state.settings.token
    form = parse_qs((await request.body()).decode("utf-8", "replace"))
    target = safe_next((form.get("next") or ["/ui"])[0])
    if token is None:
        return RedirectResponse(target, 303)
    given = (form.get("token") or [""])[0].strip()
    if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
        return render(request, "login.html", 401, title="Log in", next=target, error="wrong token")
    response = RedirectResponse(target, 303)
    response.set_cookie(
        COOKIE_NAME,
        cookie_value(token.encode("utf-8")),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/ui/logout")
def logout() -> Response:
    response = RedirectResponse(LOGIN_PATH, 303)
    response.delete_cookie(COOKIE_NAME, path="/", httponly=True, samesite="strict")
    return response
