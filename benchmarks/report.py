"""Print Markdown tables of the latest results (for benchmarks/README.md).

python benchmarks/report.py            # results/*.json (full runs)
python benchmarks/report.py --quick    # results/quick/*.json (smoke checks)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common import RESULTS_DIR


def _md(headers: list[str], rows: list[list[object]]) -> str:
    def cell(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1 else f"{v:.2f}"
        return "-" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _meta(doc: dict) -> str:
    meta = doc.get("meta", {})
    machine = meta.get("machine", {})
    load = ", ".join(f"{x:.1f}" for x in machine.get("load_average_1_5_15") or [])
    return f"`{meta.get('command')}` at {meta.get('timestamp_utc')} (load average {load})"


def model_latency(doc: dict) -> str:
    cells = doc["settings"]["cells"]
    headers = ["model", "params (M)", "GFLOPs (paper)"] + [
        f"{c['backend']} {c['threads']}t ms" if c["backend"].endswith("cpu") else f"{c['backend']} ms" for c in cells
    ]
    rows = []
    for name, m in doc["models"].items():
        row: list[object] = [name, round(m["params"] / 1e6, 2), m["gflops_paper"]]
        for c in cells:
            s = m["stats"][c["key"]]
            row.append(f"{s['median_ms']:.2f} (IQR {100 * s['iqr_over_median']:.0f}%)")
        rows.append(row)
    text = _md(headers, rows)
    sp = doc.get("speedup")
    if sp:
        parts = ", ".join(f"{c['key'].removesuffix('_ms')} {sp[c['key'].removesuffix('_ms')]:.1f}x" for c in cells)
        verdict = "met" if sp["met"] else "NOT met"
        text += f"\n\nSpeed-up {sp['pair']}: {parts}. Target >= {sp['target']:g}x on {sp['target_on']}: **{verdict}**."
    return text


def lut_build(doc: dict) -> str:
    rows = [
        [
            r["backend"],
            r["seconds"],
            r["entries"],
            r["max_iqr_over_median"],
            r["entries_over_5pct"],
            r["median_iqr_over_median"],
            "met" if r["met"] else "**NOT met**",
        ]
        for r in doc["runs"]
    ]
    spaces = "+".join(doc["settings"]["spaces"])
    return f"Spaces {spaces}, batch {doc['settings']['batch']}, {doc['settings']['threads']} thread.\n\n" + _md(
        ["backend", "seconds", "entries", "max IQR/median", "entries > 5%", "median IQR/median", "target"], rows
    )


def agent_load(doc: dict) -> str:
    s = doc["settings"]
    rows = [
        [
            name,
            m["requests"],
            m["errors"],
            m["rps"],
            m["p50_ms"],
            m["p99_ms"],
            m["max_ms"],
            m["agent_cpu_ms_per_request"],
        ]
        for name, m in doc["modes"].items()
    ]
    verdict = "met" if doc["target"]["met"] else "**NOT met**"
    return (
        f"{s['clients']} clients ({s['client']} HTTP/1.1 keep-alive), {s['seconds_per_phase']:g} s per phase, "
        f"LUT of {s['entries']} entries ({s['document_bytes']} bytes); paced = {s['paced_rate_per_client']:g} "
        "req/s per client.\n\n"
        + _md(["phase", "requests", "errors", "rps", "p50 ms", "p99 ms", "max ms", "agent CPU ms/req"], rows)
        + f"\n\nHeadline (closed loop): {doc['rps']:.0f} req/s, p50 {doc['p50_ms']:.2f} ms, "
        f"p99 {doc['p99_ms']:.2f} ms, {doc['errors']} errors. Target p99 <= 10 ms, 0 errors: {verdict}."
    )


def _scalars(doc: dict) -> dict:
    """Top-level numbers and the numbers one level down (what an unknown result file headlines)."""
    out: dict = {}
    for key, value in doc.items():
        if key in ("meta", "settings"):
            continue
        if isinstance(value, dict):
            inner = {k: v for k, v in value.items() if isinstance(v, int | float | str | bool) or v is None}
            if inner:
                out[key] = inner
        elif not isinstance(value, list):
            out[key] = value
    return out


RENDERERS = {"model_latency": model_latency, "lut_build": lut_build, "agent_load": agent_load}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="read results/quick/")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    directory = args.results_dir / "quick" if args.quick else args.results_dir
    for path in sorted(directory.glob("*.json")):
        doc = json.loads(path.read_text())
        name = path.stem
        render = next((r for key, r in RENDERERS.items() if name.startswith(key)), None)
        print(f"### {name}\n\n{_meta(doc)}\n")
        if render is not None:
            try:
                print(render(doc))
            except (KeyError, TypeError) as exc:
                print(f"(cannot render: missing {exc})")
        else:
            print("```json\n" + json.dumps(_scalars(doc), indent=1)[:2000] + "\n```")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
