"""Benchmark results: what a variant measured on this hardware, stored and read back.

Results are kept per (variant, hardware fingerprint): `fingerprint(profile)` digests what
makes figures comparable (CPU, RAM size, accelerators, runtime versions) and nothing that
changes from one run to the next (available memory). The latest run of a variant on a
fingerprint replaces the previous one. Selection reads them as `VariantSpec.measured`
(`with_measurements`), so it stays a pure function of its inputs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import select

from localdb import utcnow
from registry.errors import ModelNotFound
from registry.profile import HardwareProfile
from registry.service import Registry
from registry.tables import BenchResult, Model, Variant
from registry.types import Measured, VariantSpec

__all__ = ["BenchRow", "fingerprint", "record", "results", "with_measurements"]


class BenchRow(BaseModel):
    """One stored result, as `edge-agent bench` and selection's explanation show it."""

    alias: str
    variant: str
    format: str
    quantization: str
    file_size: int | None
    fingerprint: str
    measured_at: datetime
    measured: Measured
    details: dict[str, Any]


def fingerprint(profile: HardwareProfile) -> str:
    """16 hex digits naming the hardware and runtimes results were measured on."""
    rt = profile.runtimes
    facts = {
        "cpu": [profile.cpu.arch, profile.cpu.vendor, profile.cpu.model,
                profile.cpu.cores_physical, profile.cpu.cores_logical,
                sorted(profile.cpu.features)],
        "ram": profile.memory.total_bytes,
        "gpus": sorted([g.vendor, g.name, g.memory_bytes or 0] for g in profile.gpus),
        "npus": sorted([n.kind, n.name] for n in profile.npus),
        "runtimes": [rt.llama_cpp_version, rt.onnxruntime_version, sorted(rt.onnx_providers),
                     sorted(rt.llama_backends)],
        "board": profile.board,
    }
    blob = json.dumps(facts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def record(
    reg: Registry, alias: str, variant: str, hw: str, measured: Measured,
    details: dict[str, Any] | None = None,
) -> None:
    """Store `measured` for `alias`/`variant` on fingerprint `hw`, replacing an older result."""
    with reg.db.write() as s:
        v = s.scalar(
            select(Variant).join(Model).where(Model.alias == alias, Variant.name == variant)
        )
        if v is None:
            raise ModelNotFound(f"{alias} has no variant {variant!r}")
        row = s.scalar(
            select(BenchResult).where(BenchResult.variant_id == v.id,
                                      BenchResult.fingerprint == hw)
        )
        if row is None:
            row = BenchResult(variant_id=v.id, fingerprint=hw)
            s.add(row)
        for key, value in measured.model_dump().items():
            setattr(row, key, value)
        row.details = dict(details or {})
        row.measured_at = utcnow()


def results(reg: Registry, alias: str, hw: str | None = None) -> list[BenchRow]:
    """Stored results of `alias`'s variants (on fingerprint `hw`, or on any), by variant."""
    with reg.db.read() as s:
        q = (select(BenchResult, Variant).join(Variant).join(Model)
             .where(Model.alias == alias).order_by(Variant.name, BenchResult.fingerprint))
        if hw is not None:
            q = q.where(BenchResult.fingerprint == hw)
        return [
            BenchRow(
                alias=alias, variant=v.name, format=v.format, quantization=v.quantization,
                file_size=v.file_size, fingerprint=r.fingerprint, measured_at=r.measured_at,
                measured=Measured(**{k: getattr(r, k) for k in Measured.model_fields}),
                details=dict(r.details),
            )
            for r, v in s.execute(q)
        ]


def with_measurements(specs: Sequence[VariantSpec], rows: Sequence[BenchRow]) -> list[VariantSpec]:
    """`specs` with each measured variant's figures attached (rows of one fingerprint)."""
    by_name = {r.variant: r.measured for r in rows}
    return [
        s.model_copy(update={"measured": by_name[s.name]}) if s.name in by_name else s
        for s in specs
    ]
