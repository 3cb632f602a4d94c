"""Deployments on the wire: the desired-state document the controller signs for one device,
its signed envelope, the artifact manifest of the MQTT chunk path, and the status steps
devices report.

The controller signs the canonical JSON of a `DesiredState` with the fleet's deployment
key (Ed25519); the device verifies it with the key it pinned at enrollment before it reads
anything else of the document. A document names its device and carries a version that
only increases per device, so it can be neither replayed to another device nor rolled back
to an older one.
"""

from __future__ import annotations

import base64
import json
import re
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fleet.auditchain import canonical_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

MAX_DOCUMENT: Final = 1 << 20  # bytes of a signed document
SHA256: Final = r"^[0-9a-f]{64}$"
Alias = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")]
Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
Step = Literal["queued", "waiting", "downloading", "verifying", "installed", "smoke-testing",
               "active", "failed", "rolled-back", "rejected"]
STEPS: Final = ("queued", "waiting", "downloading", "verifying", "installed", "smoke-testing",
                "active", "failed", "rolled-back", "rejected")
# Settings a deployment may change, and nothing else (applied at the agent's next start).
REMOTE_SETTINGS: Final = frozenset({
    "runtime.keep_alive_seconds", "runtime.max_loaded_models", "runtime.queue_size",
    "runtime.context_length", "sync.heartbeat_seconds", "sync.telemetry_seconds",
    "sync.quota_telemetry_bytes", "logging.level",
})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """Where a variant's file comes from: an HTTPS URL (Range-resumable) or the broker."""

    https: str | None = None
    mqtt: bool = False

    @field_validator("https")
    @classmethod
    def _safe_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError("artifact URLs must be https://host/...")
        segments = parts.path.split("/")
        if ".." in segments or "." in segments or "\\" in parts.path or "%2e" in v.lower():
            raise ValueError("artifact URL path must not contain '.' or '..' segments")
        return v

    @model_validator(mode="after")
    def _one(self) -> Source:
        if (self.https is None) == (not self.mqtt):
            raise ValueError("a source is exactly one of https or mqtt")
        return self


class VariantDoc(_Strict):
    """One variant the device may choose, as selection reads it, and where to get it."""

    name: Name
    format: Literal["gguf", "onnx"]
    quantization: Annotated[str, Field(max_length=16)]
    target: Annotated[str, Field(max_length=32)] = "cpu"
    size: int = Field(gt=0, description="Bytes; a download larger than this is refused.")
    sha256: Annotated[str, Field(pattern=SHA256)]
    file: Name = Field(description="File name on the device (no path).")
    source: Source


class ModelDoc(_Strict):
    alias: Alias
    task: Literal["chat", "completion", "embedding"]
    variants: list[VariantDoc] = Field(min_length=1, max_length=32)
    pin: list[Name] = Field(default_factory=list, description="Variants installed whatever "
                            "selection says.")
    smoke_prompt: Annotated[str, Field(max_length=512)] = "Hello"
    smoke_max_seconds: float = Field(default=60.0, gt=0, le=3600)


class Window(_Strict):
    """Large downloads happen only between `start` and `end`, device local time."""

    start: Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]
    end: Annotated[str, Field(pattern=r"^([01]\d|2[0-3]):[0-5]\d$")]


class Limits(_Strict):
    bandwidth_bytes_per_s: int | None = Field(default=None, gt=0)
    disk_reserve_bytes: int = Field(default=500_000_000, ge=0)
    large_download_bytes: int = Field(default=50_000_000, ge=0, description="Downloads "
                                      "bigger than this wait for a window (if any).")
    probation_seconds: float = Field(default=300.0, ge=0, description="After switching, "
                                     "this many failures of the new variant roll it back.")
    probation_failures: int = Field(default=3, ge=1)


class DesiredState(_Strict):
    """What one device should run. Signed by the controller (see `SignedDocument`)."""

    v: Literal[1] = 1
    fleet: Name
    device: Name
    version: int = Field(ge=1, description="Only increases per device.")
    deployment: Name
    created: float
    models: list[ModelDoc] = Field(default_factory=list, max_length=64)
    policies: dict[Literal["rbac", "selection"], Annotated[str, Field(max_length=256_000)]] = \
        Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    windows: list[Window] = Field(default_factory=list, max_length=8)
    limits: Limits = Field(default_factory=Limits)

    @field_validator("settings")
    @classmethod
    def _allowed(cls, v: dict[str, Any]) -> dict[str, Any]:
        bad = sorted(set(v) - REMOTE_SETTINGS)
        if bad:
            raise ValueError(f"settings not changeable remotely: {', '.join(bad)}")
        return v


class SignedDocument(_Strict):
    """The envelope on `<device>/desired`: the payload's exact bytes and their signature."""

    v: Literal[1] = 1
    key_id: Annotated[str, Field(max_length=64)]
    payload: Annotated[str, Field(max_length=MAX_DOCUMENT * 2)]  # base64 of canonical JSON
    signature: Annotated[str, Field(max_length=128)]  # base64 Ed25519


class SignatureError(ValueError):
    """The document is not signed by the pinned key (or not signed at all)."""


def sign(state: DesiredState, key: Ed25519PrivateKey, key_id: str) -> bytes:
    payload = canonical_json(state.model_dump(mode="json")).encode("utf-8")
    doc = SignedDocument(key_id=key_id, payload=base64.b64encode(payload).decode("ascii"),
                         signature=base64.b64encode(key.sign(payload)).decode("ascii"))
    return doc.model_dump_json().encode("utf-8")


def verify(raw: bytes, key: Ed25519PublicKey, key_id: str) -> DesiredState:
    """The document, only if `key` signed exactly these bytes; raises SignatureError (or
    ValueError for a document that is signed but invalid), whatever the bytes are."""
    from cryptography.exceptions import InvalidSignature

    if len(raw) > MAX_DOCUMENT * 2:
        raise SignatureError("document too large")
    try:
        doc = SignedDocument.model_validate(json.loads(raw))
        payload = base64.b64decode(doc.payload, validate=True)
        signature = base64.b64decode(doc.signature, validate=True)
    except ValueError as exc:
        raise SignatureError(f"not a signed document: {str(exc)[:200]}") from exc
    except RecursionError:  # json recurses once per level: 2 MB of '[' is far too deep
        raise SignatureError("not a signed document: nested too deeply") from None
    if doc.key_id != key_id:
        raise SignatureError(f"signed with key {doc.key_id!r}, not the pinned key {key_id!r}")
    try:
        key.verify(signature, payload)
    except InvalidSignature as exc:
        raise SignatureError("the signature does not verify: tampered or forged") from exc
    try:
        return DesiredState.model_validate(json.loads(payload))
    except RecursionError:
        raise ValueError("the document is nested too deeply") from None


class ArtifactManifest(_Strict):
    """What `artifacts publish` puts (retained) on `<prefix>/<fleet>/_artifacts/<sha>/manifest`;
    chunk n is retained on `.../<sha>/<n>`, checked against `chunks[n]` before use."""

    v: Literal[1] = 1
    sha256: Annotated[str, Field(pattern=SHA256)]
    size: int = Field(gt=0)
    chunk_size: int = Field(gt=0, le=16 << 20)
    chunks: list[Annotated[str, Field(pattern=SHA256)]]

    @model_validator(mode="after")
    def _count(self) -> ArtifactManifest:
        if len(self.chunks) != -(-self.size // self.chunk_size):
            raise ValueError("chunk count does not match size / chunk_size")
        return self


def artifact_topic(prefix: str, fleet: str, sha256: str, part: str | int) -> str:
    if not re.fullmatch(SHA256, sha256):
        raise ValueError("not a sha256")
    return f"{prefix}/{fleet}/_artifacts/{sha256}/{part}"


class DeployStatus(BaseModel):
    """One step of one deployment on one device (outbox class `deploy`: never dropped)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    deployment: Name
    version: int
    step: Step
    model: Alias | None = None
    variant: Name | None = None
    percent: float | None = Field(default=None, ge=0, le=100)
    reason: Annotated[str, Field(max_length=1024)] | None = None
    bytes_moved: int | None = None
    time: float


def public_key_id(key: Ed25519PublicKey) -> str:
    """The key id devices pin: the first 16 hex of sha256 over the raw public key."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]

