"""The registry's tables: models, their variants, the blobs behind them (a variant's main file
and its side files), model events, and benchmark results.

Declared on `localdb.Base`, the one metadata of the device database; the schema itself
is created by the migrations in `localdb/migrations/`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import Mapped, mapped_column, relationship

from localdb import Base, utcnow


class Model(Base):
    """A model known to this device under an alias (what apps ask for)."""

    __tablename__ = "models"
    __table_args__ = (
        CheckConstraint("task IN ('chat', 'completion', 'embedding')", name="ck_models_task"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alias: Mapped[str] = mapped_column(String(64), unique=True)
    family: Mapped[str | None] = mapped_column(String(64))
    architecture: Mapped[str | None] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(16))
    parameter_count: Mapped[int | None] = mapped_column(BigInteger)
    context_length: Mapped[int | None] = mapped_column(Integer)
    license: Mapped[str | None] = mapped_column(String(128))
    source: Mapped[str] = mapped_column(String(16), default="import")
    # The variant that serves the alias, pinned by a deployment (None: selection chooses).
    active_variant: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow
    )

    variants: Mapped[list[Variant]] = relationship(
        back_populates="model", cascade="all, delete-orphan", order_by="Variant.name"
    )


class Artifact(Base):
    """A verified, content-addressed file in the store; shared by every variant using it."""

    __tablename__ = "artifacts"
    __table_args__ = (
        CheckConstraint("state IN ('present', 'missing', 'corrupt')", name="ck_artifacts_state"),
    )

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[str] = mapped_column(String(16), default="present")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    verified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Variant(Base):
    """One runnable form of a model: format, quantization, target and its file."""

    __tablename__ = "variants"
    __table_args__ = (
        UniqueConstraint("model_id", "name", name="uq_variants_model_name"),
        CheckConstraint("format IN ('gguf', 'onnx')", name="ck_variants_format"),
        Index("ix_variants_sha256", "sha256"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model_id: Mapped[int] = mapped_column(ForeignKey("models.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    format: Mapped[str] = mapped_column(String(8))
    quantization: Mapped[str] = mapped_column(String(16))
    bits_per_weight: Mapped[float | None] = mapped_column(Float)
    target: Mapped[str] = mapped_column(String(32), default="cpu")
    runtime_requirement: Mapped[str | None] = mapped_column(String(128))
    file_size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(ForeignKey("artifacts.sha256", ondelete="RESTRICT"))
    estimated_memory: Mapped[int | None] = mapped_column(BigInteger)
    chat_template: Mapped[str | None] = mapped_column(Text)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    model: Mapped[Model] = relationship(back_populates="variants")
    artifact: Mapped[Artifact | None] = relationship()
    files: Mapped[list[VariantFile]] = relationship(
        back_populates="variant", cascade="all, delete-orphan", order_by="VariantFile.name"
    )
    bench_results: Mapped[list[BenchResult]] = relationship(
        back_populates="variant", cascade="all, delete-orphan"
    )


class VariantFile(Base):
    """A side file a variant needs next to its main file, under its own name: ONNX external
    weights, a tokenizer, onnxruntime-genai's genai_config.json."""

    __tablename__ = "variant_files"
    __table_args__ = (Index("ix_variant_files_sha256", "sha256"),)

    variant_id: Mapped[int] = mapped_column(
        ForeignKey("variants.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    sha256: Mapped[str] = mapped_column(ForeignKey("artifacts.sha256", ondelete="RESTRICT"))
    size: Mapped[int] = mapped_column(BigInteger)

    variant: Mapped[Variant] = relationship(back_populates="files")


class BenchResult(Base):
    """What `edge-agent bench` measured for one variant on one hardware fingerprint (the
    latest run replaces the previous one)."""

    __tablename__ = "bench_results"
    __table_args__ = (
        UniqueConstraint("variant_id", "fingerprint", name="uq_bench_results_variant_hw"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    variant_id: Mapped[int] = mapped_column(ForeignKey("variants.id", ondelete="CASCADE"))
    fingerprint: Mapped[str] = mapped_column(String(32))
    measured_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    load_seconds: Mapped[float] = mapped_column(Float)
    peak_rss: Mapped[int] = mapped_column(BigInteger)
    prompt_tps: Mapped[float | None] = mapped_column(Float)
    generation_tps: Mapped[float | None] = mapped_column(Float)
    perplexity: Mapped[float | None] = mapped_column(Float)
    embeddings_per_second: Mapped[float | None] = mapped_column(Float)
    agreement: Mapped[float | None] = mapped_column(Float)
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)

    variant: Mapped[Variant] = relationship(back_populates="bench_results")


class ModelEvent(Base):
    """History of a model (imported, pulled, loaded, removed); kept after the model goes."""

    __tablename__ = "model_events"
    __table_args__ = (Index("ix_model_events_alias_time", "alias", "time"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    alias: Mapped[str] = mapped_column(String(64))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    kind: Mapped[str] = mapped_column(String(32))
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
