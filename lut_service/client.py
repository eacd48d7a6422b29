"""httpx client of the agent: request a LUT, follow its job with a progress bar, fetch with an ETag cache.

Connection errors are retried with exponential backoff; an unreachable agent or an error answer
raises ``AgentError`` naming the URL and the agent's message.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import httpx
from tqdm import tqdm

from lut_service.lut import load_document, save_document, validate_document
from pose.space import TableSpec


class AgentError(RuntimeError):
    """The agent is unreachable or answered an error; the message names the URL and the reason."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "effpose" / "luts"


def _detail(response: httpx.Response) -> str:
    """The agent's error message: ``detail`` as a string, or FastAPI's validation list flattened."""
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        return response.text.strip() or response.reason_phrase
    if isinstance(detail, list):
        parts = []
        for item in detail:
            loc = ".".join(str(x) for x in item.get("loc", []) if x != "body")
            parts.append(f"{loc}: {item.get('msg', item)}" if loc else str(item.get("msg", item)))
        return "; ".join(parts)
    return str(detail)


def _request_body(spec: TableSpec, backend: str, budget: dict[str, Any] | None) -> dict[str, Any]:
    """The fields POST /v1/luts and POST /v1/networks share: the table spec, the backend, the budget."""
    body: dict[str, Any] = {**spec.as_fields(space_by_name=True), "backend": backend}
    if budget:
        body["budget"] = budget
    return body


class AgentClient:
    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        cache_dir: str | Path | None = None,
        retries: int = 3,
        timeout: float = 30.0,
        backoff_s: float = 0.5,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"agent URL must start with http:// or https://, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.retries = retries
        self.backoff_s = backoff_s
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        token = token if token is not None else os.environ.get("EFFPOSE_TOKEN") or None
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport ------------------------------------------------------------------------------
    def _request(self, method: str, path: str, ok: tuple[int, ...] = (200,), **kwargs: Any) -> httpx.Response:
        url = f"{self.base_url}{path}"
        last: Exception | None = None
        for attempt in range(self.retries + 1):
            try:
                response = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                last = exc
                if attempt < self.retries:
                    time.sleep(self.backoff_s * 2**attempt)
                continue
            if response.status_code in ok:
                return response
            if response.status_code >= 500 and attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
                continue
            raise AgentError(
                f"agent at {url} answered {response.status_code}: {_detail(response)}", response.status_code
            )
        raise AgentError(f"agent at {url} is unreachable after {self.retries + 1} attempts: {last}")

    # -- API ------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._request("GET", "/v1/health").json()

    def device(self) -> dict[str, Any]:
        return self._request("GET", "/v1/device").json()

    def job(self, job_id: str) -> dict[str, Any]:
        return self._request("GET", f"/v1/jobs/{job_id}").json()

    def list_luts(self, **filters: str | int | None) -> list[dict[str, Any]]:
        """``GET /v1/luts``: stored tables of every device in the agent's store, newest first, filtered by
        ``device``, ``backend``, ``space`` (its name), ``batch``, ``threads``."""
        params = {name: value for name, value in filters.items() if value is not None}
        return self._request("GET", "/v1/luts", params=params).json()["luts"]

    def submit(self, body: dict[str, Any]) -> httpx.Response:
        """POST /v1/luts as is: 202 (job) or 200 (complete document)."""
        return self._request("POST", "/v1/luts", ok=(200, 202), json=body)

    def request_lut(
        self,
        spec: TableSpec,
        backend: str,
        budget: dict[str, Any] | None = None,
        progress: bool = True,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Ask for the LUT of ``spec`` on ``backend``, wait for its job (progress bar done/total on stderr),
        return the document."""
        response = self.submit(_request_body(spec, backend, budget))
        if response.status_code == 200:
            doc = response.json()
            self._store(doc, response.headers.get("etag"))
            return doc
        accepted = response.json()
        self.wait(accepted["job_id"], progress=progress, poll_s=poll_s, timeout_s=timeout_s)
        return self.get_lut(accepted["lut_id"])

    def wait(
        self, job_id: str, progress: bool = True, poll_s: float = 0.5, timeout_s: float | None = None
    ) -> dict[str, Any]:
        """Poll a job until it is done; AgentError when it failed (with its errors) or timed out."""
        start = time.monotonic()
        bar = tqdm(total=None, desc="agent job", unit="step", file=sys.stderr, disable=not progress)
        try:
            while True:
                job = self.job(job_id)
                bar.total = job["total"]
                bar.n = job["done"]
                bar.set_postfix_str(job["state"])
                bar.refresh()
                if job["state"] == "done":
                    return job
                if job["state"] == "failed":
                    errors = "; ".join(f"{e['key']}: {e['error']}" for e in job["errors"][:3])
                    stored = f"; {job['done']} of {job['total']} stored, request again to retry the rest"
                    raise AgentError(
                        f"agent at {self.base_url}: job {job_id} failed ({len(job['errors'])} errors"
                        f"{stored if job.get('partial') else ''}): {errors}"
                    )
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    raise AgentError(f"agent at {self.base_url}: job {job_id} not done after {timeout_s:.0f} s")
                time.sleep(poll_s)
        finally:
            bar.close()

    def measure_networks(
        self,
        spec: TableSpec,
        archs: list[list[str]],
        backend: str,
        budget: dict[str, Any] | None = None,
        progress: bool = True,
        poll_s: float = 0.5,
        timeout_s: float | None = None,
    ) -> dict[str, Any]:
        """Latencies of whole networks (``archs``: op lists of ``spec``'s space and head) measured on the
        agent's device: ``{"clock", "latencies": [...]}``."""
        body = {**_request_body(spec, backend, budget), "archs": archs}
        job_id = self._request("POST", "/v1/networks", ok=(202,), json=body).json()["job_id"]
        return self.wait(job_id, progress=progress, poll_s=poll_s, timeout_s=timeout_s)["result"]

    # -- LUT fetch with the on-disk ETag cache --------------------------------------------------------
    def _cache_path(self, lut_id: str) -> Path:
        safe = "".join(c for c in lut_id if c.isalnum() or c in "-_")
        return self.cache_dir / f"{safe}.json"

    def cached(self, lut_id: str) -> tuple[str, dict[str, Any]] | None:
        """The on-disk ETag cache entry of a LUT, (etag, document), or None: for offline fallbacks."""
        path = self._cache_path(lut_id)
        try:
            blob = json.loads(path.read_text())
            return blob["etag"], blob["document"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _store(self, doc: dict[str, Any], etag: str | None) -> None:
        if not etag:
            return
        try:
            save_document({"etag": etag, "document": doc}, self._cache_path(doc["id"]))
        except OSError as exc:  # a read-only cache must not break fetching
            warnings.warn(f"cannot write LUT cache {self.cache_dir}: {exc}", stacklevel=3)

    def get_lut(self, lut_id: str, use_stale: bool = True) -> dict[str, Any]:
        """GET /v1/luts/{id}, sending If-None-Match when cached; 304 -> the cached copy.

        When the agent is unreachable and a cached copy exists (``use_stale``), return it with a warning.
        """
        cached = self.cached(lut_id)
        headers = {"If-None-Match": cached[0]} if cached else {}
        try:
            response = self._request("GET", f"/v1/luts/{lut_id}", ok=(200, 304), headers=headers)
        except AgentError as exc:
            if cached is not None and use_stale and exc.status is None:
                warnings.warn(f"{exc}; using the cached LUT {lut_id}", stacklevel=2)
                return cached[1]
            raise
        if response.status_code == 304 and cached is not None:
            return cached[1]
        doc = response.json()
        validate_document(doc, f"LUT {lut_id} from {self.base_url}")
        self._store(doc, response.headers.get("etag"))
        return doc


def fetch_lut(source: str | Path, cache_dir: str | Path | None = None, **client_kwargs: Any) -> dict[str, Any]:
    """A LUT document from a JSON file or an agent URL ``http://host:port/v1/luts/{id}``."""
    text = str(source)
    if text.startswith(("http://", "https://")):
        base, sep, lut_id = text.rstrip("/").rpartition("/v1/luts/")
        if not sep or not lut_id:
            raise ValueError(f"LUT URL must look like http://HOST:PORT/v1/luts/ID, got {text!r}")
        with AgentClient(base, cache_dir=cache_dir, **client_kwargs) as client:
            return client.get_lut(lut_id)
    return load_document(source)
