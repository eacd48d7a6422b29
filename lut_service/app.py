"""``create_app(settings)``: the FastAPI application; its lifespan owns the database and the worker."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

import lut_service
from lut_service import crud
from lut_service.db import init_db, make_engine, session_scope
from lut_service.fastpath import CachedLutMiddleware
from lut_service.fingerprint import device_id, fingerprint
from lut_service.guard import GuardMiddleware
from lut_service.routes import router
from lut_service.settings import Settings
from lut_service.ui import router as ui_router
from lut_service.worker import Worker


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(settings.db_url)
        sessions = init_db(engine)
        info = fingerprint()
        app.state.settings = settings
        app.state.sessions = sessions
        app.state.fingerprint = info
        app.state.device_id = device_id(info)
        app.state.submit_lock = threading.Lock()
        app.state.documents = {}
        with session_scope(sessions) as session:
            crud.ensure_device(session, app.state.device_id, info)
        app.state.worker = Worker(
            sessions,
            settings.budget,
            settings.poll_interval_s,
            device_id=app.state.device_id,
            stale_s=settings.job_stale_s,
        )
        app.state.worker.start()  # this device's jobs only; ones left unfinished by a dead agent first
        try:
            yield
        finally:
            app.state.worker.stop()
            engine.dispose()

    app = FastAPI(
        title="effpose profiler agent",
        version=lut_service.__version__,
        description="Measures every candidate op of a search space on this device into a lookup table.",
        lifespan=lifespan,
    )
    app.include_router(router)
    app.include_router(ui_router)  # the dashboard's HTML pages under /ui (not in the OpenAPI schema)
    app.add_middleware(CachedLutMiddleware)  # complete LUT documents answered before routing
    # Added last, so outermost: auth and the body limit come before the fast path and any parsing.
    app.add_middleware(
        GuardMiddleware,
        token=settings.token,
        protect_reads=settings.protect_reads,
        max_body_bytes=settings.max_body_bytes,
    )
    return app


def app_from_env() -> FastAPI:
    """Factory for ``uvicorn --factory lut_service.app:app_from_env``."""
    return create_app(Settings.from_env())
