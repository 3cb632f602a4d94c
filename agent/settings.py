"""Agent settings: pydantic models, one per concern, composed; TOML file + EDGE_AGENT_* env.

Precedence, highest first: environment (`EDGE_AGENT_HOME`, `EDGE_AGENT_RUNTIME__THREADS`),
then the TOML file (`--config`, `EDGE_AGENT_CONFIG`, else `/etc/edge-agent/agent.toml` if
it exists), then the defaults here. A bad value raises `SettingsError` whose message is one
line naming the key, where it came from and what is allowed.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from agent.errors import SettingsError
from localdb.layout import StateDir

ENV_PREFIX = "EDGE_AGENT_"
ENV_NESTED = "__"
DEFAULT_CONFIG = Path("/etc/edge-agent/agent.toml")

# EDGE_AGENT_* variables that are read by something other than these settings, so the
# unknown-variable check (`check_environment`) lets them be. Anything else under the
# prefix that names no setting is an error: a typo must not silently keep the default.
NOT_SETTINGS = frozenset({
    f"{ENV_PREFIX}CONFIG",  # which TOML file to read (config_path)
    f"{ENV_PREFIX}WHEEL_CACHE",  # scripts/build-wheelhouse.sh, set in a developer's shell
})
NOT_SETTINGS_PREFIXES = (
    f"{ENV_PREFIX}TEST_",  # the test suite's own knobs (EDGE_AGENT_TEST_ONNX_SMOLLM2)
)


FlashAttention = Literal["auto", "on", "off"]  # llama.cpp's fused attention kernel

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class ServerSettings(_Section):
    """The local API listeners."""

    socket_mode: int = Field(
        default=0o660, ge=0, le=0o777, description="Permission bits of the API socket file."
    )
    socket_group: str | None = Field(
        default=None, description="Group that owns the socket (apps in it may connect)."
    )
    tcp_enabled: bool = Field(
        default=False, description="Also listen on 127.0.0.1 (requires a bearer token)."
    )
    tcp_port: int = Field(default=11435, ge=1, le=65535, description="Port of the TCP listener.")
    max_body_bytes: int = Field(
        default=1_048_576, ge=1024, description="Largest request body accepted (413 above)."
    )
    shutdown_grace_seconds: float = Field(
        default=10.0, ge=0, description="How long in-flight requests may finish on SIGTERM."
    )
    header_timeout_seconds: float = Field(
        default=20.0,
        gt=0,
        description="How long a connection may take to send a request's line and headers, "
        "counted from when it opened or its previous response ended; it is closed after "
        "that (a client trickling bytes, or an idle keep-alive connection).",
    )
    body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long a request's body may take to arrive once its headers have; "
        "408 and the connection closed after that.",
    )
    write_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long a write may wait for the client to read: a client that has "
        "not drained the response buffer within it has its connection closed and its "
        "generation stopped.",
    )
    max_requests_per_peer: int = Field(
        default=8,
        ge=1,
        description="Requests one client (a uid on the socket, an address over TCP) may "
        "have in progress at once; 429 beyond (health checks are not counted).",
    )


    @field_validator("socket_mode", mode="before")
    @classmethod
    def _octal(cls, v: object) -> object:
        # Modes are written in octal ("0660", "0o660"); a bare int is taken as is.
        if isinstance(v, str) and v.strip().startswith("0"):
            try:
                return int(v.strip().removeprefix("0o").removeprefix("0O") or "0", 8)
            except ValueError:
                return v
        return v


OnnxGraphOptimization = Literal["disable", "basic", "extended", "all"]

# Execution providers in the order the ONNX backend tries them (the first the variant asks
# for comes first, then these, then the CPU): accelerators before the CPU, vendor-specific
# before generic. Only providers onnxruntime.get_available_providers() lists are tried.
DEFAULT_ONNX_PROVIDERS = (
    "TensorrtExecutionProvider",
    "CUDAExecutionProvider",
    "MIGraphXExecutionProvider",
    "ROCMExecutionProvider",
    "QNNExecutionProvider",
    "OpenVINOExecutionProvider",
    "CoreMLExecutionProvider",
    "DmlExecutionProvider",
    "CPUExecutionProvider",
)


class OnnxSettings(_Section):
    """The ONNX Runtime backend (ONNX variants: embeddings and onnxruntime-genai models)."""

    providers: tuple[str, ...] = Field(
        default=DEFAULT_ONNX_PROVIDERS,
        min_length=1,
        description="Execution providers in priority order; the one selection chose is tried "
        "first, then these, skipping any onnxruntime does not list; CPU is always last.",
    )
    intra_op_threads: int | None = Field(
        default=None, ge=1, description="Threads inside one operator; default: runtime.threads."
    )
    inter_op_threads: int = Field(
        default=1, ge=1, description="Operators run in parallel (1: sequential execution)."
    )
    graph_optimization: OnnxGraphOptimization = Field(
        default="all", description="Graph optimisation level: disable, basic, extended or all."
    )
    memory_arena: bool = Field(
        default=True,
        description="Keep a CPU memory arena (faster repeated calls; holds its peak memory).",
    )
    embedding_batch_size: int = Field(
        default=32, ge=1, le=2048, description="Texts run through an embedding model at once."
    )
    max_embedding_inputs: int = Field(
        default=2048, ge=1, description="Most texts one /v1/embeddings request may carry."
    )


class RuntimeSettings(_Section):
    """Model loading, memory and concurrency."""

    threads: int | None = Field(
        default=None, ge=1, description="Inference threads; default: physical cores."
    )
    keep_alive_seconds: float = Field(
        default=300.0, ge=0, description="Unload a model this long after its last request."
    )
    memory_fraction: float = Field(
        default=0.75,
        gt=0,
        le=1,
        description="Share of RAM loaded models may use in total, less the selection "
        "policy's headroom; selection judges variants by the same budget. The policy file "
        "may lower it, never raise it.",
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        ge=0,
        description="Absolute cap on the memory loaded models may use together (the budget "
        "is the smaller of this and the RAM share).",
    )
    max_loaded_models: int = Field(default=2, ge=1, description="Most models loaded at once.")
    queue_size: int = Field(
        default=8, ge=0, description="Requests that may wait per model before 429."
    )
    context_length: int = Field(
        default=4096,
        ge=128,
        description="Context window to load models with (capped by the model); each of a "
        "GGUF model's `parallel` concurrent sequences gets a window of its own (the KV "
        "cache is sized for all of them; variant selection counts them all in a variant's "
        "estimate, which the memory budget holds it to at load).",
    )
    max_tokens_ceiling: int = Field(
        default=2048,
        ge=0,
        description="Most tokens one answer (each of its `n` choices) may generate, "
        "whatever the request asks: a request that sets no max_tokens (OpenAI: up to the "
        "context) or a larger one is cut here with finish_reason length, as the context "
        "window cuts it. 0: only the context window bounds it.",
    )
    parallel: int = Field(
        default=4,
        ge=1,
        le=64,
        description="Requests one GGUF model generates at once, batched into one decode "
        "step (continuous batching); more wait in its queue. Also the most `n` choices. "
        "Each holds a KV window of `context_length`, which selection counts.",
    )
    prompt_chunk: int = Field(
        default=256,
        ge=16,
        le=512,
        description="Prompt tokens evaluated per decode step: a long prompt arriving "
        "mid-stream delays the other streams by at most one chunk.",
    )
    flash_attention: FlashAttention = Field(
        default="auto",
        description="llama.cpp's fused attention kernel: auto (llama-server's default: on "
        "where the backend supports it), on, or off. On measured 15-25% faster decoding "
        "on a 2-core x86 CPU; its logits differ from the unfused path in the last digits.",
    )
    onnx: OnnxSettings = Field(
        default_factory=OnnxSettings,
        description="ONNX Runtime session options and execution providers.",
    )


class BenchSettings(_Section):
    """On-device benchmarks (`edge-agent bench`) and the background benchmark job."""

    auto: bool = Field(
        default=False,
        description="Benchmark newly installed variants in the background (low priority; "
        "pauses while requests are served).",
    )
    auto_interval_seconds: float = Field(
        default=600.0, ge=10, description="How often the background job looks for new variants."
    )
    generation_tokens: int = Field(
        default=64, ge=8, le=4096, description="Tokens generated to measure generation speed."
    )
    perplexity_window: int = Field(
        default=256, ge=16, le=4096, description="Tokens per perplexity window (each scored "
        "from its own start)."
    )
    perplexity_max_tokens: int = Field(
        default=4096, ge=64, description="Most corpus tokens scored for perplexity."
    )
    embedding_inputs: int = Field(
        default=64, ge=1, description="Texts embedded to measure embedding throughput."
    )


class SelectionSettings(_Section):
    """Variant selection."""

    policy_file: Path | None = Field(
        default=None,
        description="Selection policy YAML; default: one a deployment installed, else the "
        "packaged policies/selection.yaml.",
    )
    hardware_root: Path | None = Field(
        default=None,
        description="Judge variants against the hardware captured under this directory "
        "instead of this device's (simulation and tests of other devices' choices).",
    )


class SecuritySettings(_Section):
    """Access control and audit."""

    rbac_file: Path | None = Field(
        default=None, description="RBAC policy YAML; default: one a deployment installed, "
        "else the packaged policies/rbac.yaml."
    )
    audit_checkpoint_every: int = Field(
        default=1000, ge=1, description="Sign an audit checkpoint every this many records."
    )
    audit_checkpoint_seconds: float = Field(
        default=300.0, gt=0, description="...or at least this often while records arrive."
    )
    audit_min_free_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=0,
        description="Below this much free space on the home's filesystem, requests that "
        "must be audited are refused (503 + Retry-After) and /readyz says not ready; 0: "
        "no watermark.",
    )
    audit_queue_max: int = Field(
        default=10_000,
        ge=1,
        description="Requests that must be audited are refused (503) while this many audit "
        "records wait to be written; append() itself refuses at twice this (logged).",
    )
    audit_denial_window_seconds: float = Field(
        default=60.0,
        ge=0,
        description="Repeats of a denial (same peer, route and reason) within this window "
        "are counted into one summary record instead of one record each; 0: no summaries.",
    )


class SyncSettings(_Section):
    """The fleet link over MQTT (active once the device is enrolled and a broker is set)."""

    broker_host: str | None = Field(
        default=None, description="MQTT broker host name; unset: no cloud link (offline)."
    )
    broker_port: int = Field(default=8883, ge=1, le=65535, description="Broker TLS port.")
    topic_prefix: str = Field(
        default="edge/v1",
        pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$",
        description="Topic prefix: messages go to <prefix>/<fleet>/<device>/<kind>.",
    )
    keepalive_seconds: int = Field(default=30, ge=5, le=3600, description="MQTT keep-alive.")
    reconnect_min_seconds: float = Field(
        default=1.0, gt=0, description="First reconnect delay (doubles, with jitter)."
    )
    reconnect_max_seconds: float = Field(
        default=120.0, gt=0, description="Cap on the reconnect delay."
    )
    batch_records: int = Field(
        default=500, ge=1, le=10_000, description="Records per message when flushing a class."
    )
    max_inflight: int = Field(
        default=8, ge=1, le=100, description="Messages awaiting the broker's PUBACK."
    )
    max_unconfirmed: int = Field(
        default=64, ge=1, le=10_000,
        description="Batches awaiting the controller's confirmation (beyond it the flush "
        "waits: the device's disk, not the broker, holds what the controller has not taken).",
    )
    confirm_timeout_seconds: float = Field(
        default=30.0, gt=0, description="A batch the controller has not confirmed this long "
        "after its PUBACK is sent again.",
    )
    flush_messages_per_second: float = Field(
        default=50.0, gt=0, description="Rate limit of the flush after a reconnect."
    )
    quota_telemetry_bytes: int = Field(
        default=16 << 20, ge=4096, description="Telemetry kept offline; the oldest is dropped "
        "past it and the count reported."
    )
    quota_events_bytes: int = Field(
        default=8 << 20, ge=4096, description="Device events kept offline; oldest dropped past it."
    )
    alarm_audit_bytes: int = Field(
        default=256 << 20, ge=4096, description="Unshipped audit past this raises an alarm "
        "(audit is never dropped)."
    )
    alarm_deploy_bytes: int = Field(
        default=4 << 20, ge=4096, description="Unshipped deployment status past this raises an "
        "alarm (never dropped)."
    )
    heartbeat_seconds: float = Field(default=60.0, ge=1, description="Heartbeat job period.")
    telemetry_seconds: float = Field(default=300.0, ge=1, description="Telemetry job period.")
    flush_retry_seconds: float = Field(
        default=10.0, ge=0.1, description="How often the flush job retries while connected."
    )
    gc_seconds: float = Field(default=86_400.0, ge=60, description="Blob garbage collection.")
    background_nice: int = Field(
        default=10, ge=0, le=19, description="How much lower than serving a deployment's "
        "download, verification and install run (nice increment of their thread; 0: same "
        "priority). Serving comes first: on a small device a download at the same priority "
        "stalled requests for seconds."
    )


class LoggingSettings(_Section):
    """Logs go to stderr (journald under systemd)."""

    level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="Minimum level logged."
    )
    json_format: bool = Field(default=False, description="One JSON object per log line.")
    log_content: bool = Field(
        default=False, description="Log prompt and completion text (off: privacy by default)."
    )


class Settings(BaseSettings):
    """All settings of the agent, composed from one model per concern."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED,
        extra="forbid",
        validate_default=True,
    )

    home: Path = Field(
        default=Path("/var/lib/edge-agent"),
        description="State directory: registry database, model store, keys.",
    )
    socket: Path = Field(
        default=Path("/run/edge-agent/agent.sock"), description="Path of the API Unix socket."
    )
    server: ServerSettings = Field(default_factory=ServerSettings, description="API listeners.")
    runtime: RuntimeSettings = Field(default_factory=RuntimeSettings, description="Inference.")
    selection: SelectionSettings = Field(
        default_factory=SelectionSettings, description="Variant selection."
    )
    security: SecuritySettings = Field(
        default_factory=SecuritySettings, description="Access control and audit."
    )
    sync: SyncSettings = Field(default_factory=SyncSettings, description="Fleet link (MQTT).")
    bench: BenchSettings = Field(
        default_factory=BenchSettings, description="On-device benchmarks."
    )
    logging: LoggingSettings = Field(default_factory=LoggingSettings, description="Logging.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The TOML file arrives as init kwargs; the environment must override it.
        return (env_settings, init_settings)

    @property
    def state(self) -> StateDir:
        """The state directory's layout (database, store, keys, locks)."""
        return StateDir(self.home)


def config_path(explicit: Path | None, environ: Mapping[str, str] | None = None) -> Path | None:
    """Which TOML file applies: --config, then EDGE_AGENT_CONFIG, then the system default."""
    env = os.environ if environ is None else environ
    if explicit is not None:
        return explicit
    if env.get(f"{ENV_PREFIX}CONFIG"):
        return Path(env[f"{ENV_PREFIX}CONFIG"])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(config: Path | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read settings from the TOML file (if any) and the environment."""
    env = os.environ if environ is None else environ
    check_environment(env)
    path = config_path(config, env)
    data: dict[str, Any] = {}
    if path is not None:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"cannot read config file {path}: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"config file {path} is not valid TOML: {exc}") from exc
    # pydantic-settings reads os.environ; honour an explicit mapping (tests) by swapping it.
    saved = None
    if environ is not None:
        saved = dict(os.environ)
        os.environ.clear()
        os.environ.update({k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)})
    try:
        # "config" selects the file; it is not itself a setting.
        settings = Settings(**data)
        overlay = _deployed_overlay(settings.home)
        if overlay:
            merged = _merge(data, overlay)
            try:
                settings = Settings(**merged)
            except ValidationError as exc:
                # A deployed value that does not validate here must not stop the device
                # from starting: it keeps its local settings and says why.
                import logging

                logging.getLogger(__name__).warning(
                    "ignoring deployed settings: %s", _describe(exc, path, env))
        return settings
    except ValidationError as exc:
        raise SettingsError(_describe(exc, path, env)) from exc
    finally:
        if saved is not None:
            os.environ.clear()
            os.environ.update(saved)


DEPLOYED_SETTINGS = "deployed-settings.json"


def environment_names() -> list[str]:
    """Every EDGE_AGENT_* variable that sets something: each leaf setting, and each
    section (pydantic-settings also takes a whole section as JSON)."""
    names: list[str] = []

    def walk(model: type[BaseModel], prefix: list[str]) -> None:
        for name, field in model.model_fields.items():
            loc = [*prefix, name]
            names.append(ENV_PREFIX + ENV_NESTED.join(p.upper() for p in loc))
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, loc)

    walk(Settings, [])
    return names


def check_environment(environ: Mapping[str, str]) -> None:
    """Refuse an EDGE_AGENT_* variable that maps to no setting (SettingsError, exit 2),
    naming the closest one. pydantic-settings ignores such a variable, so a typo like
    EDGE_AGENT_RUNTIME_THREADS (one underscore) silently left the default in place,
    although docs/settings.md promises that no typo falls back. Variables other tools read
    under the prefix are listed in NOT_SETTINGS / NOT_SETTINGS_PREFIXES."""
    known: list[str] | None = None
    for name in sorted(environ):
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in NOT_SETTINGS \
                or upper.startswith(NOT_SETTINGS_PREFIXES):
            continue
        if known is None:
            known = environment_names()
        if upper in known:
            continue
        # Compared without the prefix they all share (it would make anything look close).
        tails = [k.removeprefix(ENV_PREFIX) for k in (*known, *NOT_SETTINGS)]
        near = difflib.get_close_matches(upper.removeprefix(ENV_PREFIX), tails, n=1,
                                         cutoff=0.6)
        hint = (f"did you mean {ENV_PREFIX}{near[0]}?" if near
                else "the settings and their variables are listed in docs/settings.md")
        raise SettingsError(f"environment {name} is not a setting; {hint}")


def _deployed_overlay(home: Path) -> dict[str, Any]:
    """Settings a signed deployment changed (agent/sync/deploy.py writes the file after the
    signature and the allow-list checks): above the TOML file, below the environment.
    Keys outside the allow-list are ignored here too, so a hand-edited file cannot widen it.
    """
    import json
    import logging

    from fleet.deploy import REMOTE_SETTINGS

    try:
        raw = json.loads((home / DEPLOYED_SETTINGS).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logging.getLogger(__name__).warning("ignoring unreadable deployed settings: %s", exc)
        return {}
    if not isinstance(raw, dict):
        return {}
    env = os.environ
    out: dict[str, Any] = {}
    for key, value in raw.items():
        env_name = ENV_PREFIX + ENV_NESTED.join(p.upper() for p in str(key).split("."))
        if key in REMOTE_SETTINGS and env_name not in env:
            out[key] = value
    return out


def _merge(data: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for key, value in overlay.items():
        section, _, leaf = key.partition(".")
        node = merged.setdefault(section, {})
        if isinstance(node, dict):
            node[leaf] = value
    return merged


def _describe(exc: ValidationError, path: Path | None, env: Mapping[str, str]) -> str:
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    env_name = ENV_PREFIX + ENV_NESTED.join(p.upper() for p in loc)
    if env_name in env or (len(loc) > 1 and f"{ENV_PREFIX}{loc[0].upper()}" in env):
        source = f"environment {env_name}"
    elif path is not None:
        source = f"config file {path}"
    else:
        source = "defaults"
    if err["type"] == "extra_forbidden":
        allowed = _known_keys(loc[:-1])
        return f"unknown setting {key} in {source}; allowed here: {', '.join(allowed)}"
    return f"invalid setting {key} in {source}: {err['msg']} (got {err.get('input')!r})"


def _known_keys(prefix: list[str]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in prefix:
        field = model.model_fields.get(part)
        ann = field.annotation if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def iter_setting_keys() -> list[tuple[str, str, str]]:
    """Every leaf setting as (dotted key, env var, description), for docs and tests."""
    out: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: list[str]) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, [*prefix, name])
                continue
            loc = [*prefix, name]
            env = ENV_PREFIX + ENV_NESTED.join(p.upper() for p in loc)
            out.append((".".join(loc), env, field.description or ""))

    walk(Settings, [])
    return out
