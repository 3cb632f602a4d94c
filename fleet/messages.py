"""The messages devices and the controller exchange, as pydantic models: what each side
validates before it uses anything it received. Payloads are compact JSON; records of one
class travel in batches, each record with its own id, so the controller stores each
exactly once whatever is redelivered (QoS 1) or sent twice (a device that died before
it saw the broker's acknowledgement).

`v` is the protocol version; unknown fields are ignored (a newer device talking to an
older controller), unknown versions are refused.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Final, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from fleet.deploy import DeployStatus

PROTOCOL_VERSION: Final = 1
MAX_BATCH: Final = 10_000  # records per message, whatever the sender says

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
Text = Annotated[str, Field(max_length=4096)]


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    v: Literal[1] = Field(default=PROTOCOL_VERSION, description="Protocol version.")

    def encode(self) -> bytes:
        """Compact JSON (no spaces, UTF-8)."""
        return self.model_dump_json(exclude_none=False).encode("utf-8")


M = TypeVar("M", bound=_Message)


def decode(model: type[M], payload: bytes) -> M:
    """Validate a received payload as `model`; raises ValueError (pydantic's included)."""
    if len(payload) > 64 << 20:
        raise ValueError("message larger than 64 MiB")
    return model.model_validate(json.loads(payload))


# --- from the device ---------------------------------------------------------------------


class Status(_Message):
    """Birth (online) and last will (offline), retained on `<device>/status`. `boot` tells
    the controller a stale will from the current session's."""

    device: Name
    state: Literal["online", "offline"]
    boot: Name = Field(description="Random id of this daemon run.")
    time: float = Field(description="Unix time the message was made (the will: at connect).")
    agent_version: Text | None = None


class Heartbeat(_Message):
    """Periodic liveness with the outbox backlog (QoS 0)."""

    device: Name
    boot: Name
    time: float
    uptime_s: float = Field(ge=0)
    backlog: dict[str, int] = Field(default_factory=dict, description="Records waiting, per class.")


class ModelStats(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    requests: int = Field(default=0, ge=0, description="Requests answered (all statuses).")
    prompt_tokens: int = Field(default=0, ge=0)
    tokens_generated: int = Field(default=0, ge=0)
    ttft_p50_ms: float | None = Field(default=None, description="From the histogram buckets.")
    ttft_p95_ms: float | None = None
    queue_depth: int = Field(default=0, ge=0)
    loaded: bool = False


class TelemetrySnapshot(BaseModel):
    """What the device looked like at `time` (counters are totals since the daemon started)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    boot: Name
    uptime_s: float = Field(ge=0)
    models: dict[Name, ModelStats] = Field(default_factory=dict)
    errors: dict[str, int] = Field(default_factory=dict, description="HTTP errors by status.")
    rss_bytes: int = Field(ge=0)
    cpu_percent: float = Field(ge=0)
    disk_free_bytes: int = Field(ge=0)
    disk_total_bytes: int = Field(ge=0)
    temperature_c: float | None = Field(default=None, description="Hottest readable zone.")
    backlog: dict[str, int] = Field(default_factory=dict, description="Outbox, per class.")


class TelemetryRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int = Field(ge=1, description="Outbox id: unique per device, never reused.")
    time: float
    snapshot: TelemetrySnapshot


class TelemetryBatch(_Message):
    device: Name
    records: list[TelemetryRecord] = Field(max_length=MAX_BATCH)
    dropped: int = Field(default=0, ge=0, description="Records dropped over quota since the "
                         "last batch that reported drops.")


class EventRecord(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int = Field(ge=1, description="The device's event id (its model history).")
    time: float
    alias: Text
    kind: Name
    details: dict[str, Any] = Field(default_factory=dict)


class EventBatch(_Message):
    device: Name
    records: list[EventRecord] = Field(max_length=MAX_BATCH)


class AuditRecord(BaseModel):
    """One audit record exactly as the device chained it (see fleet.auditchain)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=1)
    time: str = Field(max_length=32)
    subject: str = Field(max_length=256)
    uid: int | None = None
    pid: int | None = None
    action: str = Field(max_length=64)
    resource: str = Field(max_length=512)
    decision: str = Field(max_length=8)
    outcome: str = Field(max_length=32)
    details: dict[str, Any]
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")


class AuditCheckpoint(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: int = Field(ge=1, description="The device's checkpoint row id (its cursor).")
    seq: int = Field(ge=0)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    time: str = Field(max_length=32)
    key_id: str = Field(max_length=64)
    signature: str = Field(max_length=128)


class AuditBatch(_Message):
    """Consecutive audit records (by seq) and the checkpoints signed up to them."""

    device: Name
    records: list[AuditRecord] = Field(max_length=MAX_BATCH)
    checkpoints: list[AuditCheckpoint] = Field(default_factory=list, max_length=MAX_BATCH)


class DeployRecordMsg(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int = Field(ge=1, description="Outbox id: unique per device, never reused.")
    time: float
    status: DeployStatus


class Reported(_Message):
    """The device's reported state, retained on `<device>/reported`."""

    device: Name
    boot: Name
    time: float
    agent_version: Text
    hardware: dict[str, Any] = Field(description="Profile summary: cpu, memory, gpus, npus.")
    models: list[dict[str, Any]] = Field(description="Installed models and their variants.")
    policy_hashes: dict[str, str | None] = Field(description="sha256 of rbac and selection.")
    enrollment: dict[str, Any]
    sync: dict[str, Any]


# --- to the device -----------------------------------------------------------------------


class Command(_Message):
    """A request on `<device>/cmd`; the answer goes to the MQTT 5 response topic with the
    request's correlation data."""

    name: Literal["ping", "flush", "report", "status"]
    args: dict[str, Any] = Field(default_factory=dict)


class CommandResult(_Message):
    device: Name
    name: str = Field(max_length=64)
    ok: bool
    result: dict[str, Any] = Field(default_factory=dict)
    error: Text | None = None


class DeployBatch(_Message):
    """Deployment status steps, in order (see fleet.deploy.DeployStatus)."""

    device: Name
    records: list[DeployRecordMsg] = Field(max_length=MAX_BATCH)


MESSAGES: Final[dict[str, type[_Message]]] = {
    "status": Status,
    "heartbeat": Heartbeat,
    "telemetry": TelemetryBatch,
    "events": EventBatch,
    "audit": AuditBatch,
    "reported": Reported,
    "deploy": DeployBatch,
    "cmd": Command,
    "response": CommandResult,
}
