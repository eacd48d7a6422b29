"""The dashboard (lut_service/ui.py) in a real headless browser: Debian's Chromium driven by Playwright,
against a real agent on 127.0.0.1 that has built two small tables.

Playwright only drives the system browser (``executable_path``); nothing downloads a browser build.
Without Chromium or the playwright package these tests skip with the reason, unless
``EFFPOSE_REQUIRE_BROWSER=1`` (``.ci/run`` sets it once it has Chromium), where they fail instead.
Screenshots go to ``tests/artifacts/ui/`` (git-ignored) or ``$EFFPOSE_UI_ARTIFACTS``.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pose.space import CANDIDATE_OPS, SKIP, TableSpec, fixed_parts, layer_key

CHROMIUM = os.environ.get("EFFPOSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ.get("EFFPOSE_UI_ARTIFACTS") or Path(__file__).resolve().parents[1] / "artifacts" / "ui")
# A space name travels from a request into the database and onto every page: it must come out as text.
HOSTILE = '<img src=x onerror="window.__xss=1">'
SPACE = {"name": f"ui {HOSTILE}", "stem_channels": 8, "stages": [[16, 2, 1], [16, 1, 2]]}
INPUT = [64, 64]
TOKEN = "dashboard-test-token"


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is not installed (pip install -e '.[test]')"
    if CHROMIUM is None:
        return "no Chromium on this machine (apt-get install chromium)"
    return None


def wait_job(url: str, job_id: str, timeout_s: float = 180.0, headers: dict | None = None) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers).json()
        if job["state"] not in ("queued", "running"):
            return job
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} unfinished after {timeout_s} s")


def build(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/v1/luts", json=body)
    if response.status_code == 202:
        job = wait_job(url, response.json()["job_id"])
        assert job["state"] == "done", job
        response = httpx.get(f"{url}/v1/luts/{job['lut_id']}")
    assert response.status_code == 200, response.text
    return response.json()


@pytest.fixture(scope="module")
def browser():
    reason = _missing_browser()
    if reason is not None:
        if os.environ.get("EFFPOSE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"EFFPOSE_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        # launch() gives the browser a fresh temporary --user-data-dir and passes --headless
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    """A fresh browser context (no cookies) per test; console errors and failed requests are collected."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    tab = context.new_page()
    tab.problems = []
    tab.on("console", lambda message: message.type == "error" and tab.problems.append(message.text))
    tab.on("pageerror", lambda error: tab.problems.append(str(error)))
    yield tab
    context.close()


@pytest.fixture(scope="module")
def agents(tmp_path_factory, agent_factory):
    """An open agent and one with protected reads, started side by side (starting is the slow part)."""
    root = tmp_path_factory.mktemp("ui")
    open_agent = agent_factory(root, name="ui")
    guarded_agent = agent_factory(root, {"EFFPOSE_TOKEN": TOKEN, "EFFPOSE_PROTECT_READS": "1"}, "protected")
    with ThreadPoolExecutor(1) as pool:
        starting = pool.submit(guarded_agent.start)
        try:
            open_agent.start()
        finally:
            starting.result()
    try:
        yield open_agent, guarded_agent
    finally:
        open_agent.stop()
        guarded_agent.stop()


@pytest.fixture(scope="module")
def ui_agent(agents):
    """The open agent, once it has built the same small table on onnxruntime-cpu and torch-cpu."""
    agent = agents[0]
    docs = {
        backend: build(agent.url, {"space": SPACE, "backend": backend, "input": INPUT})
        for backend in ("onnxruntime-cpu", "torch-cpu")
    }
    return agent, docs


def heatmap_cells(page, selector: str = "#heatmap") -> list[dict]:
    return page.eval_on_selector_all(
        f"{selector} td.cell",
        """cells => cells.map(c => ({layer: Number(c.parentElement.dataset.layer), op: c.dataset.op,
            state: c.dataset.state, key: c.dataset.key || null, ms: c.dataset.ms || null,
            ratio: c.dataset.ratio || null, text: c.textContent.trim(), title: c.title}))""",
    )


def test_table_page_heatmap_has_one_cell_per_layer_and_op_with_the_documents_values(page, ui_agent):
    agent, docs = ui_agent
    doc = docs["onnxruntime-cpu"]
    entries = {entry["key"]: entry for entry in doc["entries"]}
    spec = TableSpec.from_fields(doc)
    layers = spec.space.layers(spec.input_hw)
    page.goto(f"{agent.url}/ui/tables/{doc['id']}")
    cells = heatmap_cells(page)
    assert len(cells) == len(layers) * len(CANDIDATE_OPS)
    by_cell = {(c["layer"], c["op"]): c for c in cells}
    assert len(by_cell) == len(cells)
    states = set()
    for layer in layers:
        for op in CANDIDATE_OPS:
            cell = by_cell[(layer.index, op)]
            if op == SKIP:
                assert cell["state"] == ("skip" if layer.skip_reason() is None else "illegal")
                states.add(cell["state"])
                continue
            key = layer_key(op, layer, spec.batch)
            assert cell["state"] == "measured" and cell["key"] == key
            assert float(cell["ms"]) == entries[key]["median_ms"]
            assert float(cell["text"]) == pytest.approx(entries[key]["median_ms"], abs=5e-4, rel=5e-3)
            assert key in cell["title"] and "IQR" in cell["title"]
    assert states == {"skip", "illegal"}  # the space has both
    assert page.locator("#heatmap tr.stage").count() == len(spec.space.stages)
    for part, key in fixed_parts(spec).items():
        shown = page.locator(f"table.fixed tr[data-part='{part}'] td[data-ms]")
        assert float(shown.get_attribute("data-ms")) == entries[key]["median_ms"]
    # the hostile space name is shown as text, never run
    assert HOSTILE in page.inner_text("main")
    assert page.locator("main img").count() == 0 and page.evaluate("window.__xss") is None
    link = page.get_by_role("link", name="Download JSON")
    assert link.get_attribute("download") and page.request.get(agent.url + link.get_attribute("href")).json() == doc
    page.screenshot(path=ARTIFACTS / "table.png", full_page=True)
    assert not page.problems


def test_device_tables_and_compare_pages(page, ui_agent):
    agent, docs = ui_agent
    ort, torch_doc = docs["onnxruntime-cpu"], docs["torch-cpu"]
    device = httpx.get(f"{agent.url}/v1/device").json()
    page.goto(f"{agent.url}/")
    assert page.url.endswith("/ui")
    text = page.inner_text("main")
    assert device["id"] in text and all(backend in text for backend in device["backends"] + list(device["unavailable"]))
    page.screenshot(path=ARTIFACTS / "device.png", full_page=True)

    page.click("text=Tables")
    rows = page.locator("#tables tbody tr[data-lut-id]")
    assert sorted(rows.evaluate_all("rs => rs.map(r => r.dataset.lutId)")) == sorted([ort["id"], torch_doc["id"]])
    page.select_option("select[name=backend]", "torch-cpu")
    page.click("text=Filter")
    assert rows.evaluate_all("rs => rs.map(r => r.dataset.lutId)") == [torch_doc["id"]]
    assert "backend=torch-cpu" in page.url
    page.screenshot(path=ARTIFACTS / "tables.png", full_page=True)

    page.goto(f"{agent.url}/ui/compare")
    page.select_option("select[name=a]", ort["id"])
    page.select_option("select[name=b]", torch_doc["id"])
    page.click("button:has-text('Compare')")
    a = {e["key"]: e["median_ms"] for e in ort["entries"]}
    b = {e["key"]: e["median_ms"] for e in torch_doc["entries"]}
    cells = heatmap_cells(page, "#ratio")
    spec = TableSpec.from_fields(ort)
    layers = spec.space.layers(spec.input_hw)
    assert len(cells) == len(layers) * len(CANDIDATE_OPS)
    for cell in cells:
        if cell["op"] != SKIP:
            key = layer_key(cell["op"], layers[cell["layer"]], spec.batch)
            assert float(cell["ratio"]) == pytest.approx(b[key] / a[key], rel=1e-9)
    prefers = page.eval_on_selector_all(
        "#ratio tr[data-layer]", "rows => rows.map(r => [...r.querySelectorAll('td.fastest')].map(c => c.textContent))"
    )
    for layer, (pref_a, pref_b) in zip(layers, prefers, strict=True):
        for table, preferred in ((a, pref_a), (b, pref_b)):
            ops = [op for op in CANDIDATE_OPS if op != SKIP]
            assert preferred == min(ops, key=lambda op: table[layer_key(op, layer, spec.batch)])
    assert len(heatmap_cells(page, "#heat-a")) == len(heatmap_cells(page, "#heat-b")) == len(cells)
    page.screenshot(path=ARTIFACTS / "compare.png", full_page=True)
    assert not page.problems


def test_running_jobs_progress_updates_without_a_reload(page, ui_agent):
    """Job A keeps the worker busy for several seconds and fails in part: every entry but the overhead
    probe must run 5000 calls in 0.5 s. Job B waits behind it. The jobs page, loaded once, must follow
    both to their end by itself: B from queued to done, A to failed with its per-entry errors and partial."""
    agent, _ = ui_agent
    slow = {"min_samples": 5000, "max_samples": 5000, "max_seconds": 120, "target_rel_iqr": 0, "timeout_s": 0.5}
    tiny = {"name": "tiny", "stem_channels": 8, "stages": [[16, 2, 1]]}
    first = httpx.post(
        f"{agent.url}/v1/luts", json={"space": tiny, "backend": "torch-cpu", "input": [128, 128], "budget": slow}
    ).json()
    second = httpx.post(
        f"{agent.url}/v1/luts", json={"space": {**tiny, "name": "queued"}, "backend": "torch-cpu", "input": [48, 48]}
    ).json()
    page.goto(f"{agent.url}/ui/jobs")
    page.evaluate("window.__loaded_once = true")
    row_a = page.locator(f"tr.job[data-job-id='{first['job_id']}']")
    row_b = page.locator(f"tr.job[data-job-id='{second['job_id']}']")
    initial_b = (row_b.get_attribute("data-state"), int(row_b.locator(".job-done").inner_text()))
    total_b = int(row_b.locator(".job-total").inner_text())
    assert initial_b[0] in ("queued", "running") and initial_b[1] < total_b, "job B ended before the page loaded"
    page.screenshot(path=ARTIFACTS / "jobs-running.png", full_page=True)
    page.wait_for_function(
        "ids => ids.every(id => document.querySelector(`tr[data-job-id='${id}']`).dataset.active === '0')",
        arg=[first["job_id"], second["job_id"]],
        timeout=180_000,
    )
    assert page.evaluate("window.__loaded_once") is True  # the same document: no reload happened
    job_b = httpx.get(f"{agent.url}/v1/jobs/{second['job_id']}").json()
    assert job_b["state"] == "done" and row_b.locator(".job-done").inner_text() == str(job_b["done"]) == str(total_b)
    assert row_b.locator("progress").evaluate("p => p.value") == total_b
    job_a = httpx.get(f"{agent.url}/v1/jobs/{first['job_id']}").json()
    assert job_a["state"] == "failed" and job_a["partial"] and job_a["errors"]
    assert row_a.locator(".job-state").inner_text() == "failed"
    assert row_a.locator(".job-partial").inner_text() == "partial"
    assert row_a.locator(".job-done").inner_text() == str(job_a["done"])
    shown = row_a.locator(".job-errors li").all_inner_texts()
    assert shown == [f"{error['key']}: {error['error']}" for error in job_a["errors"]]
    page.screenshot(path=ARTIFACTS / "jobs-finished.png", full_page=True)
    assert not page.problems


def copy_tables(source: Path, target: Path, lut_id: str) -> dict:
    """Copy every stored row of one agent's database into another's (a running agent reads its tables from
    the database on each page), and give ``lut_id``'s document the stability and fidelity sections a
    build with those checks stores, hostile text included. Returns that document."""
    with sqlite3.connect(target) as conn:
        conn.execute("ATTACH DATABASE ? AS source", (str(source),))
        for table in ("devices", "luts", "measurements", "jobs"):
            conn.execute(f"INSERT OR IGNORE INTO main.{table} SELECT * FROM source.{table}")
        doc = json.loads(conn.execute("SELECT document FROM luts WHERE id = ?", (lut_id,)).fetchone()[0])
        points = [
            {"ops": [], "predicted_ms": 1.0 + i / 10, "measured_ms": (1.0 + i / 10) * (0.9 + i / 50)} for i in range(9)
        ]
        doc["stability"] = {"status": "unstable", "drift": 0.07, "steal": 0.15, "note": f"<script>{HOSTILE}</script>"}
        doc["fidelity"] = {"within_5pct": 0.4, "within_10pct": 0.8, "kendall_tau": 0.9, "archs": points}
        conn.execute("UPDATE luts SET document = ? WHERE id = ?", (json.dumps(doc), lut_id))
    return doc


@pytest.fixture(scope="module")
def guarded(agents, ui_agent):
    """The agent with protected reads (EFFPOSE_PROTECT_READS=1), holding the open agent's tables."""
    agent, docs = ui_agent
    return agents[1], copy_tables(agent.db_path, agents[1].db_path, docs["onnxruntime-cpu"]["id"])


def test_protected_reads_need_the_token_or_the_login_cookie(page, guarded):
    agent, doc = guarded
    url, lut_id = agent.url, doc["id"]
    page.goto(f"{url}/ui/tables/{lut_id}")
    assert "/ui/login" in page.url and page.locator("#heatmap").count() == 0
    assert doc["backend"] not in page.inner_text("main")  # nothing of the table before login
    page.fill("input[name=token]", "wrong")
    page.click("button:has-text('Log in')")
    assert page.locator("#login-error").inner_text() == "wrong token"
    assert page.problems and all("401" in problem for problem in page.problems)  # the refused login itself
    page.problems.clear()
    page.screenshot(path=ARTIFACTS / "login.png", full_page=True)
    page.fill("input[name=token]", TOKEN)
    page.click("button:has-text('Log in')")
    assert page.url == f"{url}/ui/tables/{lut_id}" and page.locator("#heatmap td.cell").count() > 0
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and TOKEN not in cookie["value"]
    assert page.evaluate("document.cookie") == ""  # invisible to scripts
    # the cookie lets the page's own reads of the JSON API through, never a write
    assert page.request.get(f"{url}/v1/luts/{lut_id}").json() == doc
    assert page.request.post(f"{url}/v1/luts", data={"space": "small", "backend": "torch-cpu"}).status == 401
    # stability and fidelity from the document: shown as text, with the scatter of every held-out network
    assert page.locator("#scatter circle.point").count() == len(doc["fidelity"]["archs"])
    assert page.locator("#scatter polygon.band5").count() == page.locator("#scatter polygon.band10").count() == 1
    stability = page.inner_text("#stability")
    assert "unstable" in stability and f"<script>{HOSTILE}</script>" in stability
    assert page.evaluate("window.__xss") is None
    page.screenshot(path=ARTIFACTS / "table-fidelity.png", full_page=True)
    page.click("text=Log out")
    assert "/ui/login" in page.url and page.context.cookies() == []
    page.goto(f"{url}/ui/jobs")
    assert "/ui/login" in page.url
    assert not page.problems


def test_protected_reads_over_plain_http(guarded):
    """The same rules without a browser: only health, the login form and the fixed CSS/JS are open; the
    bearer token opens everything; the login cookie opens reads only."""
    agent, doc = guarded
    url, lut_id = agent.url, doc["id"]
    for path in ("/v1/health", "/ui/login", "/ui/static/app.css", "/ui/static/app.js"):
        assert httpx.get(url + path).status_code == 200, path
    for path in ("/", "/ui", "/ui/tables", f"/ui/tables/{lut_id}", "/ui/jobs", f"/ui/compare?a={lut_id}&b=x"):
        refused = httpx.get(url + path)
        assert refused.status_code == 303 and refused.headers["location"].startswith("/ui/login?next=%2F"), path
        assert not refused.content
    for path in (f"/v1/luts/{lut_id}", "/v1/device", "/v1/jobs/x"):
        assert httpx.get(url + path).status_code == 401
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    page = httpx.get(f"{url}/ui/tables/{lut_id}", headers=bearer)
    assert page.status_code == 200 and "default-src 'none'" in page.headers["content-security-policy"]
    assert HOSTILE not in page.text and "&lt;img src=x onerror=&#34;window.__xss=1&#34;&gt;" in page.text
    wrong = httpx.post(f"{url}/ui/login", data={"token": TOKEN + "x", "next": "/ui/jobs"})
    assert wrong.status_code == 401 and "set-cookie" not in wrong.headers
    login = httpx.post(f"{url}/ui/login", data={"token": TOKEN, "next": "//evil.example/ui"})
    assert login.status_code == 303 and login.headers["location"] == "/ui"  # never off this agent
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    with httpx.Client(base_url=url, cookies=login.cookies) as browser_like:
        assert browser_like.get("/ui/jobs").status_code == 200
        assert browser_like.get(f"/v1/luts/{lut_id}").json() == doc
        assert browser_like.post("/v1/luts", json={"space": "small", "backend": "torch-cpu"}).status_code == 401
    forged = {"effpose_session": TOKEN}
    assert httpx.get(f"{url}/ui/jobs", cookies=forged).status_code == 303
