"""The queen's configuration file (DESIGN 5): one YAML file, every key
optional, unknown keys refused with their path."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["ConfigError", "QueenConfig", "load_config", "DEFAULT_LISTEN"]

DEFAULT_LISTEN = "127.0.0.1:7833"


class ConfigError(Exception):
    """The configuration is invalid; the message names the file and key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Geo(_Strict):
    region: str | None = None
    country: str | None = None
    latitude: float | None = None
    longitude: float | None = None


class WorkerConfig(_Strict):
    id: str = Field(min_length=1)
    url: str = Field(min_length=1, description="OpenAI-compatible base URL, e.g. http://h:8080/v1")
    pool: str | None = None
    model: str | None = None
    models: list[str] = Field(default_factory=list)
    capability: str = "text-gen"
    backend: str | None = None
    gpus: int = Field(default=0, ge=0)
    gpu_ids: list[str] = Field(default_factory=list)
    vram_total: int | None = Field(default=None, ge=0)
    vram_free: int | None = Field(default=None, ge=0)
    slots: int = Field(default=1, ge=1)
    cost_per_token: float | None = Field(default=None, ge=0)
    tokens_per_sec: float | None = Field(default=None, gt=0)
    latency_ms: float | None = Field(default=None, ge=0)
    geo: Geo | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    priority: int | None = None
    api_key_env: str | None = Field(
        default=None, min_length=1,
        description="environment variable holding the worker's API key (sent as Bearer)")

    @field_validator("url")
    @classmethod
    def _http(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _key_is_set(cls, name: str | None) -> str | None:
        # Said at start, not as 401s from the worker once traffic arrives.
        if name is not None and not os.environ.get(name, "").strip():
            raise ValueError(f"the environment variable {name} is not set")
        return name


class ModelConfig(_Strict):
    id: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    size_bytes: int | None = Field(default=None, ge=0)
    vram_required: int | None = Field(default=None, ge=0)
    context_length: int | None = Field(default=None, ge=1)
    family: str | None = None
    quantization: str | None = None
    capability: str | None = None


class QuotaConfig(_Strict):
    tokens_per_day: int | None = Field(default=None, ge=0)
    max_concurrent: int | None = Field(default=None, ge=0)
    requests_per_minute: int | None = Field(default=None, ge=0)
    vram_bytes: int | None = Field(default=None, ge=0)


class TenantConfig(_Strict):
    id: str = Field(min_length=1)
    name: str | None = None
    weight: float = Field(default=1.0, gt=0)
    quota: QuotaConfig = Field(default_factory=QuotaConfig)


class LimitsConfig(_Strict):
    timeout_ms: int | None = Field(default=None, ge=1)
    max_operations: int | None = Field(default=None, ge=1)
    memory_bytes: int | None = Field(default=None, ge=1)
    max_string_bytes: int | None = Field(default=None, ge=1)
    max_array_items: int | None = Field(default=None, ge=1)
    max_map_entries: int | None = Field(default=None, ge=1)
    max_call_levels: int | None = Field(default=None, ge=1)
    max_expr_depth: int | None = Field(default=None, ge=1)
    max_fn_expr_depth: int | None = Field(default=None, ge=1)

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class QueueConfig(_Strict):
    capacity: int | None = Field(default=None, ge=1, description="None: unbounded")
    # A job waiting this long moves up one priority class, so low classes
    # are never starved by a steady stream of higher ones.
    aging_ms: int = Field(default=10_000, ge=1)
    default_timeout_ms: int = Field(default=300_000, ge=1)


class HealthConfig(_Strict):
    interval_ms: int = Field(default=5_000, ge=50)
    timeout_ms: int = Field(default=2_000, ge=10)
    failures_before_down: int = Field(default=2, ge=1)


class QueenConfig(_Strict):
    mode: Literal["home", "platform"] = "home"
    listen: str = DEFAULT_LISTEN
    admin_token_env: str = "RBEE_ADMIN_TOKEN"
    state_path: str = "~/.local/share/rbee/queen.db"
    scheduler: str | None = None
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    queue: QueueConfig = Field(default_factory=QueueConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    max_attempts: int = Field(default=3, ge=1, description="dispatch attempts per job")
    decision_log_size: int = Field(default=10_000, ge=1)
    # Job records kept in the database; the oldest go first.
    job_log_size: int = Field(default=100_000, ge=1)
    # On SIGTERM, how long requests in flight may take to finish before they
    # are cancelled; no new connection is accepted meanwhile.
    shutdown_grace_ms: int = Field(default=30_000, ge=0)
    workers: list[WorkerConfig] = Field(default_factory=list)
    models: list[ModelConfig] = Field(default_factory=list)
    tenants: list[TenantConfig] = Field(default_factory=list)

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:7833 (port 0: any free port)")
        return value

    @property
    def host(self) -> str:
        return self.listen.rpartition(":")[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def database(self) -> Path:
        return Path(self.state_path).expanduser()


def _describe(error: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        return f"{path}: unknown key"
    return f"{path}: {error['msg']} (got {error.get('input')!r})"


def parse_config(data: Any, source: str = "<config>") -> QueenConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of settings, got {type(data).__name__}")
    try:
        return QueenConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: str | Path | None) -> QueenConfig:
    """Reads the YAML file; the scheduler path is made relative to it."""
    if path is None:
        return QueenConfig()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    config = parse_config(data, str(path))
    if config.scheduler and not Path(config.scheduler).is_absolute():
        config.scheduler = str((path.parent / config.scheduler).resolve())
    return config
