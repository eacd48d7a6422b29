"""``effpose lut serve|build|show|validate`` (registered by effpose.cli)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pose.space import SPACES, TableSpec, parse_hw


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lut_service.app import create_app
    from lut_service.settings import Settings

    settings = Settings.from_env(db_url=args.db, host=args.host, port=args.port)
    print(f"effpose lut serve: database {_migrate(settings.db_url)}", file=sys.stderr)
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.token:
        print(
            f"effpose lut serve: warning: listening on {settings.host} without EFFPOSE_TOKEN: "
            "anyone who can reach this port can queue profiling jobs",
            file=sys.stderr,
        )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=args.log_level)
    return 0


def _migrate(url: str) -> str:
    """Upgrade the store at ``url`` to the head revision; a line saying where it stands (password masked)."""
    from lut_service.db import make_engine, safe_url, upgrade

    engine = make_engine(url)
    try:
        revisions = upgrade(engine)
    finally:
        engine.dispose()
    moved = f"{revisions.before or 'empty'} -> {revisions.after}" if revisions.before != revisions.after else ""
    return f"{safe_url(url)} (schema revision {revisions.after}{f', upgraded {moved}' if moved else ''})"


def _db(args: argparse.Namespace) -> int:
    """``effpose lut db upgrade|current``: the store's schema revision, by hand."""
    from lut_service.db import current, make_engine, safe_url
    from lut_service.settings import Settings

    url = Settings.from_env(db_url=args.db).db_url
    if args.db_command == "upgrade":
        print(f"database {_migrate(url)}")
        return 0
    engine = make_engine(url)
    try:
        revisions = current(engine)
    finally:
        engine.dispose()
    state = revisions.after or "empty (no schema yet)"
    behind = "" if revisions.after == revisions.head else f"; head is {revisions.head}: run `effpose lut db upgrade`"
    print(f"database {safe_url(url)}: revision {state}{behind}")
    return 0


def _list(args: argparse.Namespace) -> int:
    """``effpose lut list``: the tables of every device in the agent's store (one line each, or JSON)."""
    from lut_service.client import AgentClient

    filters = {"device": args.device, "backend": args.backend, "space": args.space, "batch": args.batch}
    with AgentClient(args.agent, retries=args.retries) as client:
        luts = client.list_luts(**filters, threads=args.threads)
    if args.json:
        print(json.dumps({"agent": args.agent, "luts": luts}))
        return 0
    if not luts:
        print("no stored tables match")
    for lut in luts:
        h, w = lut["input"]
        state = "complete" if lut["complete"] else f"{lut['entries']}/{lut['total']} entries"
        device = lut["device"]
        where = f"{device.get('cpu', '?')}" + (f", {', '.join(device['gpus'])}" if device.get("gpus") else "")
        print(
            f"{lut['id']}  device {lut['device_id']} ({where})  {lut['backend']}  {lut['space']} {h}x{w}  "
            f"batch {lut['batch']}  threads {lut['threads']}  {lut['clock']}  {state}"
        )
    return 0


def _table_spec(args: argparse.Namespace) -> TableSpec:
    """The table ``--space``/``--input``/``--batch``/``--threads``/``--joints`` name. A space file is read
    here: the client sends it inline (the agent never reads paths), ``small``/``large`` by name."""
    if args.space not in SPACES and not Path(args.space).is_file():
        raise ValueError(f"--space {args.space!r}: expected small, large or a search-space JSON file")
    return TableSpec(args.space, args.input, args.batch, args.joints, threads=args.threads)


def _build(args: argparse.Namespace) -> int:
    from lut_service.client import AgentClient
    from lut_service.lut import document_summary, save_document
    from lut_service.stability import describe, unstable_warning

    spec = _table_spec(args)
    with AgentClient(args.agent, retries=args.retries) as client:
        doc = client.request_lut(spec, args.backend, progress=not args.quiet)
    path = save_document(doc, args.output)
    summary = document_summary(doc)
    warning = unstable_warning(doc.get("stability"))
    if warning:  # on stderr, also with --json: a user must see it
        print(f"effpose lut build: warning: {warning}", file=sys.stderr)
    if args.json:
        stability = {k: v for k, v in (doc.get("stability") or {}).items() if k not in ("parts", "checkpoints")}
        print(json.dumps({"path": str(path), "id": doc["id"], "entries": summary["entries"], "stability": stability}))
    else:
        print(f"wrote {path}: LUT {doc['id']}, {summary['entries']} entries, {doc['backend']} on {summary['device']}")
        for line in describe(doc):
            if not line.startswith("WARNING"):
                print(f"  {line}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from lut_service.lut import document_summary, load_document
    from lut_service.stability import describe

    doc = load_document(args.file)
    summary = document_summary(doc, slowest=args.top)
    if args.json:
        extra = {k: doc.get(k) for k in ("stability", "fidelity", "thread_advice")}
        print(json.dumps({**summary, **extra}))
        return 0
    print(f"LUT {summary['id']}: {summary['backend']} on {summary['device']}")
    h, w = summary["input"]
    print(f"  batch {summary['batch']}, threads {summary['threads']}, input {h}x{w}, {summary['entries']} entries")
    print("  entries per part:")
    for group, item in summary["per_stage"].items():
        print(f"    {group:<10} {item['entries']:>4}   {item['min_ms']:9.4f} .. {item['max_ms']:9.4f} ms")
    print(f"  slowest {len(summary['slowest'])}:")
    for entry in summary["slowest"]:
        print(f"    {entry['median_ms']:9.4f} ms  {entry['key']}")
    spread = summary["iqr_over_median"]
    print(
        "  IQR/median: min {min:.3f}  median {median:.3f}  p90 {p90:.3f}  max {max:.3f}".format(**spread)
        + f"  (samples {summary['samples']['min']}..{summary['samples']['max']})"
    )
    for line in describe(doc):
        print(f"  {line}")
    return 0


def _validate(args: argparse.Namespace) -> int:
    from lut_service.client import AgentClient
    from lut_service.lut import drift_words, validate_on_agent
    from lut_service.stability import fidelity_line

    if args.samples < 2:
        raise ValueError(f"--samples must be at least 2, got {args.samples}")
    spec = _table_spec(args)
    with AgentClient(args.agent, retries=args.retries) as client:
        report = validate_on_agent(
            client, spec, args.backend, samples=args.samples, seed=args.seed, progress=not args.quiet
        )
    report["space"] = args.space
    stats = report
    if args.json:
        print(json.dumps(report))
        return 0
    cell = f"{args.backend}, batch {args.batch}, {args.threads} thread(s), clock {report['clock']}"
    print(f"LUT {report['lut_id']} ({cell})")
    print(f"  {report['samples']} random {args.space} architectures, measured end to end on the agent (interleaved)")
    print(f"  within +-5%: {stats['within_5pct']:.0%}   within +-10%: {stats['within_10pct']:.0%}")
    print(f"  MAPE {stats['mape']:.2%}   bias {stats['bias']:+.2%}")
    print(f"  Kendall tau {stats['kendall_tau']:.3f}   Spearman {stats['spearman']:.3f}")
    corrected = stats["drift_corrected"]
    print(
        f"  drift since the LUT build {stats['drift']:+.2%} (uniform reference networks); corrected for it: "
        f"within +-5% {corrected['within_5pct']:.0%}, +-10% {corrected['within_10pct']:.0%}"
    )
    now, fixed = stats["drift_now"], stats["drift_now_corrected"]
    print(f"  {drift_words(now)}")
    print(
        f"  raw predictions: within +-5% {stats['within_5pct']:.0%}, MAPE {stats['mape']:.2%}; corrected (x "
        f"{now['factor']:.3f}): within +-5% {fixed['within_5pct']:.0%}, MAPE {fixed['mape']:.2%}"
    )
    if stats.get("build_fidelity"):
        print(f"  {fidelity_line(stats['build_fidelity'])}")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``lut`` and its subcommands to the ``effpose`` parser."""
    from lut_service.timing import BACKENDS

    lut = commands.add_parser("lut", help="profiler agent and latency lookup tables")
    sub = lut.add_subparsers(dest="lut_command", required=True, metavar="SUBCOMMAND")

    serve = sub.add_parser("serve", help="run the profiler agent (FastAPI on uvicorn)")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1 or $EFFPOSE_HOST)")
    serve.add_argument("--port", type=int, default=None, help="port (default 8000 or $EFFPOSE_PORT)")
    serve.add_argument("--db", default=None, help="SQLAlchemy URL (default $EFFPOSE_DB_URL or a SQLite file)")
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    serve.set_defaults(func=_serve)

    db = sub.add_parser("db", help="the agent store's schema: upgrade it or show its revision")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    for action, text in (("upgrade", "upgrade to the head revision"), ("current", "show the revision")):
        one = db_sub.add_parser(action, help=text)
        one.add_argument("--db", default=None, help="SQLAlchemy URL (default $EFFPOSE_DB_URL or a SQLite file)")
        one.set_defaults(func=_db)

    build = sub.add_parser("build", help="request a LUT from an agent and save it as JSON")
    build.add_argument("--agent", required=True, help="agent URL, e.g. http://127.0.0.1:8000")
    build.add_argument("--space", required=True, help="small, large or a search-space JSON file")
    build.add_argument("--backend", required=True, choices=BACKENDS)
    build.add_argument("--batch", type=int, default=1)
    build.add_argument("--threads", type=int, default=1)
    build.add_argument("--input", type=parse_hw, default=(256, 256), help="HxW (default 256x256)")
    build.add_argument("--joints", type=int, default=16)
    build.add_argument("--retries", type=int, default=3)
    build.add_argument("-o", "--output", required=True, help="LUT JSON file to write")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.add_argument("--json", action="store_true", help="print one JSON object")
    build.set_defaults(func=_build)

    validate = sub.add_parser(
        "validate", help="compare LUT predictions with whole-network latency measured by the agent"
    )
    validate.add_argument("--agent", required=True, help="agent URL, e.g. http://127.0.0.1:8000")
    validate.add_argument("--space", required=True, help="small, large or a search-space JSON file")
    validate.add_argument("--backend", required=True, choices=BACKENDS)
    validate.add_argument("--samples", type=int, default=50, help="random architectures (default 50)")
    validate.add_argument("--batch", type=int, default=1)
    validate.add_argument("--threads", type=int, default=1)
    validate.add_argument("--input", type=parse_hw, default=(256, 256), help="HxW (default 256x256)")
    validate.add_argument("--joints", type=int, default=16)
    validate.add_argument("--seed", type=int, default=0)
    validate.add_argument("--retries", type=int, default=3)
    validate.add_argument("--quiet", action="store_true", help="no progress bar")
    validate.add_argument("--json", action="store_true", help="print one JSON object")
    validate.set_defaults(func=_validate)

    listing = sub.add_parser("list", help="list the stored tables of every device in an agent's store")
    listing.add_argument("--agent", required=True, help="agent URL, e.g. http://127.0.0.1:8000")
    listing.add_argument("--device", default=None, help="only this device id")
    listing.add_argument("--backend", default=None, choices=BACKENDS)
    listing.add_argument("--space", default=None, help="only this search space (its name)")
    listing.add_argument("--batch", type=int, default=None)
    listing.add_argument("--threads", type=int, default=None)
    listing.add_argument("--retries", type=int, default=3)
    listing.add_argument("--json", action="store_true", help="print one JSON object")
    listing.set_defaults(func=_list)

    show = sub.add_parser("show", help="summarize a LUT file: entries per stage, slowest ops, spread")
    show.add_argument("file")
    show.add_argument("--top", type=int, default=10, help="how many slowest entries to list")
    show.add_argument("--json", action="store_true", help="print one JSON object")
    show.set_defaults(func=_show)
