"""lut_service: the profiler agent (FastAPI + SQLite), its client and the ``effpose lut`` commands."""

__version__ = "0.1.0"
