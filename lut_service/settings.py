"""Agent settings, read once from the environment (``EFFPOSE_*``) and passed explicitly to ``create_app``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


def default_db_url() -> str:
    """SQLite file under the user's data directory (``$XDG_DATA_HOME/effpose/agent.db``)."""
    base = Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share")
    return f"sqlite:///{base / 'effpose' / 'agent.db'}"


@dataclass(frozen=True)
class Budget:
    """How long one LUT entry is timed: warm-up, then repeats until IQR/median < target or a time cap.

    Defaults are sized so the full LUT of both spaces builds in about 30 s per CPU backend (issue 6).
    """

    warmup_runs: int = 2
    warmup_s: float = 0.02  # at least this much warm-up time as well as warmup_runs calls
    min_samples: int = 9
    max_samples: int = 300
    target_rel_iqr: float = 0.03  # stop once IQR / median is below this
    max_seconds: float = 0.25  # per-entry time cap for the timed repeats
    min_sample_ms: float = 0.5  # one sample averages back-to-back calls until it lasts this long
    # Wall-clock limit of one entry (building, ONNX export, warm-up and samples): an entry over it is
    # recorded as an error on its job and the job goes on. Checked before every call of the op.
    timeout_s: float = 120.0
    # The build's stability guard and shipped fidelity (lut_service/build.py, docs/design.md section 5):
    # reference networks are timed before, between and after the parts of a build; a part across which
    # they moved more than ``stability_threshold`` (a fraction) is measured again, at most
    # ``stability_retries`` times, before the table is stored as unstable. ``fidelity_networks`` held-out
    # random networks are timed at the end and scored against the table (0: none).
    stability_threshold: float = 0.03
    stability_retries: int = 2
    fidelity_networks: int = 5

    def merged(self, overrides: dict | None) -> Budget:
        """This budget with the non-None fields of ``overrides`` applied."""
        if not overrides:
            return self
        names = {f.name for f in fields(self)}
        return replace(self, **{k: v for k, v in overrides.items() if k in names and v is not None})


def _flag(raw: str, name: str) -> bool:
    value = raw.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={raw!r}: expected 1/0, true/false, yes/no or on/off")


def _positive(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{name}={raw!r} must be above 0")
    return value


def _env_budget() -> Budget:
    defaults = Budget()
    values = {}
    for f in fields(Budget):
        raw = os.environ.get(f"EFFPOSE_PROFILE_{f.name.upper()}")
        if raw is not None:
            try:
                values[f.name] = type(getattr(defaults, f.name))(raw)
            except ValueError as exc:
                raise ValueError(f"EFFPOSE_PROFILE_{f.name.upper()}={raw!r} is not a number") from exc
    return replace(defaults, **values)


@dataclass(frozen=True)
class Settings:
    db_url: str = field(default_factory=default_db_url)
    host: str = "127.0.0.1"
    port: int = 8000
    token: str | None = None  # bearer token required on every write (any method but GET/HEAD) when set
    protect_reads: bool = False  # with a token: GETs need it too (except /v1/health, for healthchecks)
    budget: Budget = field(default_factory=Budget)
    # Bounds checked before any tensor is allocated (a request beyond them gets 422 naming the limit).
    max_body_bytes: int = 1 << 20  # larger request bodies get 413 before they are read
    max_batch: int = 256
    max_input_side: int = 2048
    max_keys: int = 4096
    max_layers: int = 256  # searchable layers of a space (small 28, large 34)
    max_channels: int = 4096  # stem, stage and head widths
    max_networks: int = 200  # archs per POST /v1/networks (every one is held in memory at once)
    max_tensor_elements: int = 1 << 28  # largest activation (batch x C x H x W) a request may need
    max_weight_elements: int = 1 << 24  # largest op weights (the published spaces need < 1M)
    poll_interval_s: float = 1.0  # how often the idle worker looks at the jobs table
    # a running job whose holder's heartbeat is older than this is taken over by another start of the
    # device's agent (lut_service.claims); the holder beats every quarter of it
    job_stale_s: float = 60.0
    clock: str = "auto"  # "auto": thread CPU time on 1-thread CPU backends, else wall; "wall": always wall

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        env = os.environ
        values: dict[str, object] = {
            "db_url": env.get("EFFPOSE_DB_URL") or default_db_url(),
            "host": env.get("EFFPOSE_HOST", "127.0.0.1"),
            "port": int(env.get("EFFPOSE_PORT", "8000")),
            "token": (env.get("EFFPOSE_TOKEN") or "").strip() or None,  # whitespace around it is not part of it
            "protect_reads": _flag(env.get("EFFPOSE_PROTECT_READS", ""), "EFFPOSE_PROTECT_READS"),
            "budget": _env_budget(),
            "clock": env.get("EFFPOSE_PROFILE_CLOCK", "auto"),
            "job_stale_s": _positive(env.get("EFFPOSE_JOB_STALE_S") or "60", "EFFPOSE_JOB_STALE_S"),
        }
        for name, var in (
            ("max_body_bytes", "EFFPOSE_MAX_BODY_BYTES"),
            ("max_batch", "EFFPOSE_MAX_BATCH"),
            ("max_input_side", "EFFPOSE_MAX_INPUT_SIDE"),
            ("max_keys", "EFFPOSE_MAX_KEYS"),
            ("max_tensor_elements", "EFFPOSE_MAX_TENSOR_ELEMENTS"),
            ("max_weight_elements", "EFFPOSE_MAX_WEIGHT_ELEMENTS"),
            ("max_layers", "EFFPOSE_MAX_LAYERS"),
            ("max_channels", "EFFPOSE_MAX_CHANNELS"),
            ("max_networks", "EFFPOSE_MAX_NETWORKS"),
        ):
            if env.get(var):
                try:
                    values[name] = int(env[var])
                except ValueError:
                    raise ValueError(f"{var}={env[var]!r} is not an integer") from None
                if values[name] < 1:
                    raise ValueError(f"{var}={env[var]!r} must be at least 1")
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values["protect_reads"] and not values["token"]:
            raise ValueError("EFFPOSE_PROTECT_READS=1 needs EFFPOSE_TOKEN: reads cannot be protected without a token")
        if values["clock"] not in ("auto", "wall"):
            raise ValueError(f"EFFPOSE_PROFILE_CLOCK={values['clock']!r}: expected auto or wall")
        return cls(**values)  # type: ignore[arg-type]
