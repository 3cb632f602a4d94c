"""The controller's tables. Every record a device sends is keyed by (device, its own id),
so storing is idempotent: a redelivery or a second worker never double-counts."""

from __future__ import annotations

from typing import Any, ClassVar

from sqlalchemy import JSON, BigInteger, Boolean, Float, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON}


class Device(Base):
    """An approved device and what the controller last heard from it."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    fleet: Mapped[str] = mapped_column(String(64))
    audit_key: Mapped[str] = mapped_column(String(64))  # base64 raw Ed25519 public key
    cert_serial: Mapped[str] = mapped_column(String(64))
    cert_not_after: Mapped[float] = mapped_column(Float)
    approved_at: Mapped[float] = mapped_column(Float)
    online: Mapped[bool] = mapped_column(Boolean, default=False)
    boot: Mapped[str | None] = mapped_column(String(64))
    status_time: Mapped[float | None] = mapped_column(Float)
    last_seen: Mapped[float | None] = mapped_column(Float)
    agent_version: Mapped[str | None] = mapped_column(String(64))
    reported: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    reported_time: Mapped[float | None] = mapped_column(Float)
    backlog: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Telemetry(Base):
    __tablename__ = "telemetry"
    __table_args__ = (UniqueConstraint("device_id", "record_id", name="uq_telemetry_record"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    record_id: Mapped[int] = mapped_column(BigInteger)
    time: Mapped[float] = mapped_column(Float)
    body: Mapped[dict[str, Any]] = mapped_column(JSON)


class TelemetryDrop(Base):
    """Records a device dropped over quota, as its batches reported them (once each)."""

    __tablename__ = "telemetry_drops"
    __table_args__ = (UniqueConstraint("device_id", "first_record", name="uq_drop_batch"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    first_record: Mapped[int] = mapped_column(BigInteger)
    dropped: Mapped[int] = mapped_column(Integer)


class Event(Base):
    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("device_id", "record_id", name="uq_event_record"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    record_id: Mapped[int] = mapped_column(BigInteger)
    time: Mapped[float] = mapped_column(Float)
    alias: Mapped[str] = mapped_column(String(256))
    kind: Mapped[str] = mapped_column(String(64))
    details: Mapped[dict[str, Any]] = mapped_column(JSON)


class AuditRecord(Base):
    """A device's audit record exactly as it chained it."""

    __tablename__ = "audit_records"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    time: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(256))
    uid: Mapped[int | None] = mapped_column(BigInteger)
    pid: Mapped[int | None] = mapped_column(BigInteger)
    action: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(512))
    decision: Mapped[str] = mapped_column(String(8))
    outcome: Mapped[str] = mapped_column(String(32))
    details: Mapped[str] = mapped_column(Text)  # canonical JSON, as hashed
    digest: Mapped[str] = mapped_column(String(64))


class AuditCheckpoint(Base):
    __tablename__ = "audit_checkpoints"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    cp_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)  # the device's row id
    seq: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(64))
    time: Mapped[str] = mapped_column(String(32))
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))


class AuditConflict(Base):
    """The same seq received again with another digest: the device's log forked or was
    edited after shipping. Kept as evidence; `audit verify` reports it."""

    __tablename__ = "audit_conflicts"
    __table_args__ = (UniqueConstraint("device_id", "seq", "received_digest",
                                       name="uq_audit_conflict"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    stored_digest: Mapped[str] = mapped_column(String(64))
    received_digest: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[float] = mapped_column(Float)


class Ingested(Base):
    """Which worker stored how many records (the test of shared subscriptions reads it)."""

    __tablename__ = "ingest_counts"
    __table_args__ = (UniqueConstraint("worker", "kind", name="uq_ingest_worker_kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    worker: Mapped[str] = mapped_column(String(128))
    kind: Mapped[str] = mapped_column(String(32))
    messages: Mapped[int] = mapped_column(BigInteger, default=0)
    records: Mapped[int] = mapped_column(BigInteger, default=0)


# -- deployments ------------------------------------------------------------------------


class Artifact(Base):
    """A model file the controller can deploy: one variant of one model alias."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("alias", "name", name="uq_artifact_variant"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    alias: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str] = mapped_column(String(64))  # the variant's name
    task: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(8))
    quantization: Mapped[str] = mapped_column(String(16))
    target: Mapped[str] = mapped_column(String(32))
    file: Mapped[str] = mapped_column(String(64))  # name under the artifact directory
    size: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    added: Mapped[float] = mapped_column(Float)
    published_chunk_size: Mapped[int | None] = mapped_column(Integer)  # on the broker if set


class DeviceGroup(Base):
    """Group membership (`device approve --group`, `device group`)."""

    __tablename__ = "device_groups"

    device_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    group: Mapped[str] = mapped_column("group_name", String(64), primary_key=True)


class Deployment(Base):
    """What an operator asked for once: `deploy create`."""

    __tablename__ = "deployments"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # also the name devices see
    created: Mapped[float] = mapped_column(Float)
    selector: Mapped[str] = mapped_column(String(128))  # group:G | device:D | all
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)  # models, policies, settings, limits


class DeploymentTarget(Base):
    """The signed document one device of a deployment got; its version only increases."""

    __tablename__ = "deployment_targets"
    __table_args__ = (UniqueConstraint("device_id", "version", name="uq_target_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment: Mapped[str] = mapped_column(String(64), index=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(BigInteger)
    document: Mapped[str] = mapped_column(Text)  # the signed envelope, as published
    published: Mapped[float | None] = mapped_column(Float)


class DeployStep(Base):
    """One status step a device reported (idempotent by the device's own record id)."""

    __tablename__ = "deploy_steps"
    __table_args__ = (UniqueConstraint("device_id", "record_id", name="uq_deploy_record"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"),
                                    primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(String(64), index=True)
    record_id: Mapped[int] = mapped_column(BigInteger)
    deployment: Mapped[str] = mapped_column(String(64), index=True)
    version: Mapped[int] = mapped_column(BigInteger)
    step: Mapped[str] = mapped_column(String(16))
    model: Mapped[str | None] = mapped_column(String(64))
    variant: Mapped[str | None] = mapped_column(String(64))
    percent: Mapped[float | None] = mapped_column(Float)
    reason: Mapped[str | None] = mapped_column(Text)
    bytes_moved: Mapped[int | None] = mapped_column(BigInteger)
    time: Mapped[float] = mapped_column(Float)
