"""The audit chain as a wire and storage format, shared by the device and the controller:
records hash-chained by sha256, checkpoints signed with the device's Ed25519 key, and the
verification that finds the first bad sequence (deleted, edited, reordered, truncated,
forked). docs/audit.md gives the exact bytes.

The device writes and verifies its log with it (agent.security.audit); the controller
verifies what the device shipped (controller.audit) with the same code, so both always
agree on what "intact" means.
"""

from __future__ import annotations

import hashlib
import json
from base64 import b64decode
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # cryptography is imported where a signature is checked
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

__all__ = [
    "CHECKPOINT_FIELDS",
    "GENESIS",
    "RECORD_FIELDS",
    "Checkpoint",
    "Record",
    "VerifyResult",
    "canonical_json",
    "checkpoint_message",
    "ed25519_public_key",
    "record_digest",
    "verify_chain",
]

GENESIS: Final = "0" * 64
RECORD_FIELDS: Final = (
    "seq", "time", "subject", "uid", "pid", "action", "resource", "decision", "outcome",
    "details", "digest",
)
CHECKPOINT_FIELDS: Final = ("seq", "digest", "time", "key_id", "signature")


def ed25519_public_key(raw: bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its 32 raw bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    return Ed25519PublicKey.from_public_bytes(raw)


def _signature_valid(public_key: Ed25519PublicKey, signature: bytes, data: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        public_key.verify(signature, data)
    except InvalidSignature:
        return False
    return True


def canonical_json(obj: Any) -> str:
    """The JSON text that is hashed: sorted keys, no spaces, UTF-8 (not \\u-escaped)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_digest(prev_digest: str, content: Mapping[str, Any]) -> str:
    """sha256 hex of UTF-8(prev_digest_hex + canonical_json(record without digest))."""
    return hashlib.sha256((prev_digest + canonical_json(content)).encode("utf-8")).hexdigest()


def checkpoint_message(seq: int, digest: str) -> bytes:
    """The exact bytes a checkpoint signs: ASCII `"<seq>:<digest hex>"`, e.g. b"1000:ab12…"."""
    return f"{seq}:{digest}".encode("ascii")


@dataclass(frozen=True, slots=True)
class Record:
    """One stored audit record, as read back."""

    seq: int
    time: str
    subject: str
    uid: int | None
    pid: int | None
    action: str
    resource: str
    decision: str
    outcome: str
    details: dict[str, Any]
    digest: str

    def content(self) -> dict[str, Any]:
        """The hashed fields: everything but the digest."""
        return {
            "seq": self.seq, "time": self.time, "subject": self.subject, "uid": self.uid,
            "pid": self.pid, "action": self.action, "resource": self.resource,
            "decision": self.decision, "outcome": self.outcome, "details": self.details,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.content(), "digest": self.digest}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Record:
        fields: dict[str, Any] = {k: data.get(k) for k in RECORD_FIELDS}
        return cls(**fields)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A device-key signature over the chain head at `seq` (signature is base64)."""

    seq: int
    digest: str
    time: str
    key_id: str
    signature: str

    def to_dict(self) -> dict[str, Any]:
        return {c: getattr(self, c) for c in CHECKPOINT_FIELDS}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Checkpoint:
        fields: dict[str, Any] = {k: data.get(k) for k in CHECKPOINT_FIELDS}
        return cls(**fields)

    def signature_ok(self, public_key: Ed25519PublicKey) -> bool:
        try:
            sig = b64decode(self.signature, validate=True)
            msg = checkpoint_message(self.seq, self.digest)
        except (ValueError, TypeError, UnicodeEncodeError):
            return False
        return _signature_valid(public_key, sig, msg)


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """Outcome of a verification; `first_bad_seq` is where the chain first fails.

    `signed_through` is the highest seq vouched for by a valid checkpoint; records after
    it are chained but not yet signed.
    """

    ok: bool
    first_bad_seq: int | None
    reason: str
    records: int
    checkpoints: int
    first_seq: int | None = None
    last_seq: int | None = None
    signed_through: int | None = None

    def line(self) -> str:
        if not self.ok:
            return f"audit chain broken at seq {self.first_bad_seq}: {self.reason}"
        if self.records == 0:
            return f"audit chain ok: no records, {self.checkpoints} checkpoint(s)"
        unsigned = (self.last_seq or 0) - (self.signed_through or (self.first_seq or 1) - 1)
        tail = f", {unsigned} record(s) after the last checkpoint" if unsigned > 0 else ""
        return (
            f"audit chain ok: {self.records} record(s) (seq {self.first_seq}..{self.last_seq}), "
            f"{self.checkpoints} checkpoint(s){tail}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "first_bad_seq": self.first_bad_seq, "reason": self.reason,
            "records": self.records, "checkpoints": self.checkpoints,
            "first_seq": self.first_seq, "last_seq": self.last_seq,
            "signed_through": self.signed_through,
        }


def verify_chain(
    records: Iterable[Record],
    cps: Sequence[Checkpoint],
    pub: Ed25519PublicKey,
    anchor: tuple[int, str | None] | None,
) -> VerifyResult:
    """The checks of docs/audit.md, in seq order. `anchor` (seq, digest) is the chain's
    known predecessor (an export's, or what a verifier has already accepted); without one,
    the chain starts at genesis or at a signed checkpoint (a pruned prefix)."""
    issues: list[tuple[int, str]] = []
    valid: dict[int, list[Checkpoint]] = {}
    any_at: set[int] = set()
    for cp in cps:
        any_at.add(cp.seq)
        if cp.signature_ok(pub):
            valid.setdefault(cp.seq, []).append(cp)
        else:
            issues.append((cp.seq, f"checkpoint at seq {cp.seq} has an invalid signature "
                                   f"(key_id {cp.key_id})"))
    signed_through: int | None = None

    def check_cps_at(seq: int, digest: str) -> None:
        nonlocal signed_through
        for cp in valid.get(seq, ()):
            if cp.digest != digest:
                issues.append((seq, f"checkpoint at seq {seq} does not match the chain "
                                    "(record or checkpoint altered)"))
            else:
                signed_through = seq

    it = iter(records)
    first = next(it, None)
    count = 0
    first_seq = last_seq = None
    chain_issue: tuple[int, str] | None = None
    if first is None:
        if anchor is not None and anchor[1] is not None:
            check_cps_at(anchor[0], anchor[1])
        elif valid:
            signed_through = max(valid)
    else:
        first_seq = first.seq
        prev: str | None
        if anchor is not None:
            base, prev = anchor
            if base == 0 and prev != GENESIS:
                chain_issue = (1, "export anchor at seq 0 is not the genesis digest")
            elif prev is None:
                chain_issue = (first.seq, "export has no digest for the record before it")
            else:
                check_cps_at(base, prev)
        elif first.seq == 1:
            base, prev = 0, GENESIS
        else:
            base = first.seq - 1
            at_base = valid.get(base)
            if at_base:
                prev = at_base[0].digest
                check_cps_at(base, prev)
            elif base in any_at:
                # Its forged signature is already an issue at `base`; keep walking from it.
                prev = next(cp.digest for cp in cps if cp.seq == base)
            else:
                lower = max((s for s in valid if s < first.seq), default=0)
                prev = None
                chain_issue = (
                    lower + 1,
                    f"records {lower + 1}..{base} are missing (records start at seq "
                    f"{first.seq} but no signed checkpoint vouches for seq {base})",
                )
        expected = base + 1
        if chain_issue is None and prev is not None:
            for rec in _prepend(first, it):
                if rec.seq != expected:
                    if rec.seq < expected:
                        chain_issue = (rec.seq, "record out of order or duplicated")
                    elif rec.seq == expected + 1:
                        chain_issue = (expected, f"record {expected} is missing (deleted)")
                    else:
                        chain_issue = (expected, f"records {expected}..{rec.seq - 1} are "
                                                 "missing (deleted)")
                    break
                if record_digest(prev, rec.content()) != rec.digest:
                    chain_issue = (rec.seq, "record does not match its digest "
                                            "(edited, inserted or reordered)")
                    break
                check_cps_at(rec.seq, rec.digest)
                prev = rec.digest
                last_seq = rec.seq
                expected += 1
                count += 1
            if chain_issue is None:
                for seq in sorted(s for s in any_at if s >= expected):
                    chain_issue = (expected, f"records from seq {expected} are missing: a "
                                             f"checkpoint covers seq {seq} (log truncated)")
                    break
    if chain_issue is not None:
        issues.append(chain_issue)
    if issues:
        bad_seq, reason = min(issues, key=lambda i: i[0])
        return VerifyResult(False, bad_seq, reason, count, len(cps), first_seq, last_seq,
                            signed_through)
    return VerifyResult(True, None, "ok", count, len(cps), first_seq, last_seq, signed_through)


def _prepend(first: Record, rest: Iterator[Record]) -> Iterator[Record]:
    yield first
    yield from rest
