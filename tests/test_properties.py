"""Hypothesis property tests: request models, the RBAC policy, selection, desired-state
documents and the audit chain, each against what its docs promise.

CI-sized by the "ci" profile (about 15 s here); `HYPOTHESIS_PROFILE=long` runs 20× the
examples. Each property says what must hold for *any* input the strategy can make.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from agent.api.embeddings import EmbeddingRequest
from agent.api.errors import to_api_error
from agent.api.openai import ChatCompletionRequest, CompletionRequest
from agent.api.responses import ResponsesRequest
from agent.errors import PolicyError
from agent.security.authz import PERMISSIONS, authorize, expand_grants, load_policy
from agent.security.identity import Subject
from fleet.auditchain import canonical_json
from fleet.deploy import MAX_DOCUMENT, DesiredState, SignatureError, sign, verify
from registry.errors import NoVariantFits
from registry.profile import CpuInfo, GpuInfo, HardwareProfile, MemoryInfo, RuntimeInfo
from registry.selection import load_policy as load_selection_policy
from registry.selection import select
from registry.types import VariantSpec

settings.register_profile("ci", max_examples=60, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1200, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12,
)


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


# --- request models ----------------------------------------------------------------------

REQUESTS: dict[str, type[BaseModel]] = {
    "chat": ChatCompletionRequest, "completion": CompletionRequest,
    "responses": ResponsesRequest, "embeddings": EmbeddingRequest,
}
ALIAS = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True)
VALID = {
    "chat": st.fixed_dictionaries({
        "model": ALIAS,
        "messages": st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["system", "user", "assistant", "developer"]),
            "content": st.text(max_size=30)}), min_size=1, max_size=3)},
        optional={"max_tokens": st.integers(1, 1 << 20), "temperature": st.floats(0, 2),
                  "top_p": st.floats(0.01, 1), "n": st.integers(1, 16), "seed": st.integers(),
                  "stop": st.lists(st.text(min_size=1, max_size=5), max_size=8),
                  "stream": st.booleans(), "keep_alive": st.sampled_from(["5m", "0", 30, -1])}),
    "completion": st.fixed_dictionaries({
        "model": ALIAS,
        "prompt": st.text(max_size=30) | st.lists(st.text(max_size=10), min_size=1, max_size=16)
        | st.lists(st.integers(0, 50000), min_size=1, max_size=8)},
        optional={"max_tokens": st.integers(1, 1 << 20), "logprobs": st.integers(0, 20)}),
    "responses": st.fixed_dictionaries({
        "model": ALIAS,
        "input": st.text(max_size=30) | st.lists(st.fixed_dictionaries({
            "role": st.sampled_from(["user", "assistant", "system", "developer"]),
            "content": st.text(max_size=20)}), max_size=3)},
        optional={"instructions": st.text(max_size=20),
                  "max_output_tokens": st.integers(1, 1 << 20)}),
    "embeddings": st.fixed_dictionaries({
        "model": ALIAS,
        "input": st.text(max_size=30) | st.lists(st.text(max_size=10), min_size=1, max_size=8)},
        optional={"encoding_format": st.sampled_from(["float", "base64"]),
                  "dimensions": st.integers(1, 4096)}),
}


@pytest.mark.parametrize("kind", sorted(REQUESTS))
@given(data=st.data())
def test_valid_requests_round_trip(kind: str, data: st.DataObject) -> None:
    body = data.draw(VALID[kind])
    model = REQUESTS[kind].model_validate(body)
    dumped = model.model_dump(mode="json", by_alias=True, exclude_unset=True)
    assert REQUESTS[kind].model_validate(dumped) == model
    assert dumped == json.loads(json.dumps(body))  # nothing read differently than sent


@pytest.mark.parametrize("kind", sorted(REQUESTS))
@given(data=st.data())
def test_invalid_requests_are_a_clear_400(kind: str, data: st.DataObject) -> None:
    """Anything at all, or a valid body with one field replaced by any JSON: validation
    passes, or fails with an error the API answers with a 400 naming the field."""
    body = data.draw(VALID[kind])
    if data.draw(st.booleans()):
        body = data.draw(JSON)
    else:
        body[data.draw(st.sampled_from(sorted(body)))] = data.draw(JSON)
    try:
        REQUESTS[kind].model_validate(body)
    except ValidationError as exc:
        err = to_api_error(exc)
        assert err is not None and err.status == 400 and err.code == "invalid_value"
        assert err.message.startswith("invalid request: ") and len(err.message) < 2000


# --- the RBAC policy ----------------------------------------------------------------------

NAME = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True)
GRANTS = st.sampled_from([*PERMISSIONS, "*", "models:*", "audit:*", "inference:*"])


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    roles = draw(st.dictionaries(NAME, st.fixed_dictionaries(
        {"permissions": st.lists(GRANTS, max_size=4)}), min_size=1, max_size=4))
    subject = st.one_of(
        st.fixed_dictionaries({"uid": st.integers(0, 5)}),
        st.fixed_dictionaries({"user": st.sampled_from(["alice", "bob"])}),
        st.fixed_dictionaries({"group": st.sampled_from(["clients", "ops"])}),
        st.fixed_dictionaries({"token": st.sampled_from(["kiosk", "ci"])}),
    )
    bindings = draw(st.lists(st.tuples(subject, st.sampled_from(sorted(roles)), st.one_of(
        st.none(), st.lists(st.sampled_from(["m1", "m2", "m3"]), min_size=1, max_size=2))),
        max_size=5))
    out = []
    for subj, role, models in bindings:
        b: dict[str, Any] = {**subj, "role": role}
        if models is not None:
            b["models"] = models
        out.append(b)
    return {"version": 1, "roles": roles, "bindings": out}


SUBJECTS = st.one_of(
    st.builds(Subject, kind=st.just("uid"), uid=st.integers(0, 8),
              user=st.sampled_from([None, "alice", "bob", "carol"]),
              groups=st.frozensets(st.sampled_from(["clients", "ops", "staff"]), max_size=2)),
    st.builds(Subject, kind=st.just("token"), token=st.sampled_from(["kiosk", "ci", "other"]),
              role=st.sampled_from(["admin", "app", "nope"]), uid=st.integers(0, 8)),
)


def _expected(doc: dict[str, Any], subject: Subject, permission: str,
              model: str | None) -> bool:
    """The documented semantics, written out plainly (docs/security.md)."""
    roles = {name: expand_grants(r["permissions"]) for name, r in doc["roles"].items()}
    if subject.kind == "token" and subject.role in roles and permission in roles[subject.role]:
        return True
    for b in doc["bindings"]:
        if subject.kind == "token":
            matches = b.get("token") == subject.token
        else:
            matches = (b.get("uid") == subject.uid or b.get("user") == subject.user is not None
                       or b.get("group") in subject.groups)
        if not matches or permission not in roles[b["role"]]:
            continue
        if "models" not in b or model is None or model in b["models"]:
            return True
    return False


@given(doc=policies(), subject=SUBJECTS, permission=st.sampled_from(PERMISSIONS),
       model=st.sampled_from([None, "", "m1", "m2", "zz"]))
def test_policy_decisions_are_deny_by_default(tmp_path_factory: pytest.TempPathFactory,
                                              doc: dict[str, Any], subject: Subject,
                                              permission: str, model: str | None) -> None:
    path = tmp_path_factory.mktemp("rbac") / "rbac.yaml"
    path.write_text(yaml.safe_dump(doc))
    policy = load_policy(path)
    decision = authorize(policy, subject, permission, model)
    assert decision.allowed == _expected(doc, subject, permission, model), decision.reason
    assert decision.reason.startswith("allowed by" if decision.allowed else "denied: ")


@given(text=st.text(max_size=200) | JSON.map(yaml.safe_dump)
       | policies().flatmap(lambda d: st.sampled_from([d]).map(_breaks)).map(yaml.safe_dump))
@example(text="\x00")
@example(text="a: [")
@example(text="--- {}\n--- {}\n")
@example(text=nested(1100))
def test_malformed_policy_is_a_policy_error(tmp_path_factory: pytest.TempPathFactory,
                                            text: str) -> None:
    path = tmp_path_factory.mktemp("rbac") / "rbac.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        load_policy(path)
    except PolicyError as exc:
        assert str(path) in str(exc)


@example(data=b"\xff\xfe\x00")
@given(data=st.binary(max_size=64))
def test_policy_bytes_are_a_policy_error(tmp_path_factory: pytest.TempPathFactory,
                                         data: bytes) -> None:
    path = tmp_path_factory.mktemp("rbac") / "rbac.yaml"
    path.write_bytes(data)
    try:
        load_policy(path)
    except PolicyError as exc:
        assert str(path) in str(exc)


def _breaks(doc: dict[str, Any]) -> dict[str, Any]:
    """A policy with one mistake: an unknown key, a role no one defined, two subjects."""
    broken = json.loads(json.dumps(doc))
    broken["bindings"].append({"uid": 1, "user": "x", "role": "ghost"})
    return broken


# --- selection ----------------------------------------------------------------------------

GIB = 1 << 30
PROFILES = st.builds(
    HardwareProfile,
    cpu=st.builds(CpuInfo, arch=st.sampled_from(["x86_64", "aarch64", "riscv64"]),
                  cores_physical=st.integers(0, 16), cores_logical=st.integers(0, 32),
                  features=st.lists(st.sampled_from(["avx2", "avx512f", "neon", "dotprod"]),
                                    max_size=3).map(tuple)),
    memory=st.builds(MemoryInfo,
                     total_bytes=st.none() | st.integers(0, 64 * GIB),
                     available_bytes=st.none() | st.integers(0, 64 * GIB)),
    gpus=st.lists(st.builds(GpuInfo, vendor=st.sampled_from(["nvidia", "amd", "intel"]),
                            name=st.just("gpu"), memory_bytes=st.none() | st.integers(0, 24 * GIB)),
                  max_size=2).map(tuple),
    runtimes=st.builds(RuntimeInfo, llama_gpu_offload=st.booleans(),
                       onnx_providers=st.lists(st.sampled_from(
                           ["CPUExecutionProvider", "CUDAExecutionProvider"]), max_size=2)
                       .map(tuple),
                       backends=st.none() | st.lists(st.sampled_from(["gguf", "onnx"]),
                                                     max_size=2).map(tuple)),
)


@st.composite
def variant_sets(draw: st.DrawFn) -> list[VariantSpec]:
    n = draw(st.integers(1, 5))
    out = []
    for i in range(n):
        fmt = draw(st.sampled_from(["gguf", "onnx"]))
        out.append(VariantSpec(
            model_alias="m", name=f"v{i}", format=fmt,
            quantization=draw(st.sampled_from(["Q4_K_M", "Q8_0", "F16", "int4", "fp32", "odd"])),
            bits_per_weight=draw(st.none() | st.floats(1, 32)),
            target=draw(st.sampled_from(["cpu", "cuda", "npu", "gpu", "whatever"])),
            runtime_requirement=draw(st.none() | st.sampled_from(
                ["onnxruntime:CUDAExecutionProvider", "llama.cpp:cuda", "bogus"])),
            file_size=draw(st.none() | st.integers(0, 40 * GIB)),
            parameter_count=draw(st.none() | st.integers(0, 70_000_000_000)),
            context_length=draw(st.none() | st.integers(0, 1 << 20)),
            n_layers=draw(st.none() | st.integers(0, 128)),
            n_embd=draw(st.none() | st.integers(0, 16384)),
            n_head=draw(st.none() | st.integers(0, 128)),
            n_head_kv=draw(st.none() | st.integers(0, 128)),
            installed=draw(st.booleans()),
            estimated_memory=draw(st.none() | st.integers(0, 40 * GIB)),
        ))
    return out


SELECTION_POLICY = load_selection_policy()


@given(variants=variant_sets(), profile=PROFILES)
def test_selection_picks_a_fitting_candidate_or_says_none_fits(
        variants: list[VariantSpec], profile: HardwareProfile) -> None:
    try:
        chosen = select(variants, profile, SELECTION_POLICY)
    except NoVariantFits as exc:
        assert str(exc)
        assert all(c.verdict == "rejected" and c.reasons for c in exc.candidates)
        return
    assert chosen.chosen in variants
    assert chosen.estimated_memory <= chosen.budget
    first = chosen.candidates[0]
    assert first.verdict == "chosen" and first.variant == chosen.chosen
    assert {c.variant.name for c in chosen.candidates} == {v.name for v in variants}
    # The order of the variants does not change the choice.
    assert select(list(reversed(variants)), profile, SELECTION_POLICY).chosen == chosen.chosen


# --- desired-state documents --------------------------------------------------------------

@pytest.fixture(scope="module")
def deploy_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    return Ed25519PrivateKey.generate()


VALID_STATE = DesiredState(fleet="f1", device="d1", version=3, deployment="dep-1", created=1.0)


def _signed_payload(key: Any, payload: bytes) -> bytes:
    return json.dumps({"v": 1, "key_id": "k1",
                       "payload": base64.b64encode(payload).decode(),
                       "signature": base64.b64encode(key.sign(payload)).decode()}).encode()


@given(raw=st.binary(max_size=300) | JSON.map(lambda j: json.dumps(j).encode())
       | st.just(VALID_STATE).map(lambda s: s.model_dump_json().encode()))
@example(raw=nested(100_000).encode())
@example(raw=b'{"v": 1, "key_id": "k1", "payload": "' + b"A" * 10 + b'", "signature": "!"}')
def test_unsigned_documents_are_refused_with_a_message(deploy_key: Any, raw: bytes) -> None:
    with pytest.raises(SignatureError) as info:
        verify(raw, deploy_key.public_key(), "k1")
    assert str(info.value)


@given(change=st.dictionaries(st.sampled_from(
    ["v", "fleet", "device", "version", "deployment", "created", "models", "policies",
     "settings", "windows", "limits", "extra"]), JSON, max_size=3) | JSON)
@example(change={"settings": {"runtime.threads": 4}})
@example(change=json.loads(nested(50)))
def test_signed_documents_are_valid_or_refused(deploy_key: Any, change: Any) -> None:
    """Signed by the pinned key but possibly invalid: a DesiredState, or a ValueError with
    a message (what agent.sync.deploy turns into a rejection), never anything else."""
    base = VALID_STATE.model_dump(mode="json")
    doc = {**base, **change} if isinstance(change, dict) else change
    payload = canonical_json(doc).encode()
    try:
        state = verify(_signed_payload(deploy_key, payload), deploy_key.public_key(), "k1")
    except SignatureError:
        raise
    except ValueError as exc:
        assert str(exc)
        return
    assert state.model_dump(mode="json") == DesiredState.model_validate(doc).model_dump(
        mode="json")
    assert verify(sign(state, deploy_key, "k1"), deploy_key.public_key(), "k1") == state


def test_deeply_nested_signed_payload_is_refused(deploy_key: Any) -> None:
    payload = nested(200_000).encode()
    assert len(payload) < MAX_DOCUMENT
    with pytest.raises(ValueError, match="nested"):
        verify(_signed_payload(deploy_key, payload), deploy_key.public_key(), "k1")


# --- the audit chain ----------------------------------------------------------------------

ENTRIES = st.lists(st.fixed_dictionaries({
    "subject": st.text(max_size=12), "uid": st.none() | st.integers(0, 1 << 31),
    "action": st.text(max_size=12), "resource": st.text(max_size=20),
    "decision": st.sampled_from(["allow", "deny"]), "outcome": st.text(max_size=8),
    "details": st.dictionaries(st.text(max_size=6), JSON, max_size=3),
}), min_size=1, max_size=12)


COLUMNS = ("time", "subject", "action", "resource", "decision", "outcome", "details",
           "digest", "uid", "pid", "seq")


@dataclass
class Log:
    home: Path
    db: Any
    log: Any
    key: Any


@pytest.fixture(scope="module")
def audit_log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Log]:
    """One real log for every example: each appends to it, so it grows as a device's does."""
    from agent.security.audit import AuditLog
    from agent.security.keys import open_device_key
    from localdb import open_database

    home = tmp_path_factory.mktemp("audit")
    db = open_database(home / "registry.db")
    key = open_device_key(home)
    log = AuditLog(db, key, checkpoint_every=5)
    try:
        yield Log(home, db, log, key)
    finally:
        log.close()
        db.close()


def _edited(value: Any, at: int, byte: int) -> Any:
    """`value` with one byte of its stored form changed (ints: one digit)."""
    if isinstance(value, int):
        digits = bytearray(str(value).encode())
        digits[at % len(digits)] = ord("0") + (byte % 10)
        return int(digits) if int(digits) != value else value + 1
    raw = bytearray(value.encode("utf-8"))
    if not raw:
        return "x"
    i = at % len(raw)
    raw[i] = byte if byte != raw[i] else (byte + 1) % 256
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return bytes(raw)  # not UTF-8 any more


@given(entries=ENTRIES, data=st.data())
def test_audit_appends_verify_and_any_byte_edit_is_detected(
        audit_log: Log, entries: list[dict[str, Any]], data: st.DataObject) -> None:
    from agent.security.audit import audit_entry
    from agent.security.audit_verify import verify as verify_log

    for e in entries:
        audit_log.log.append(audit_entry(e["subject"] or None, e["action"], e["resource"],
                                         e["decision"], e["outcome"], e["details"]))
    audit_log.log.flush(10.0)
    result = verify_log(audit_log.db, audit_log.key.public_key)
    assert result.ok, result
    # Everything drawn before the log is read: hypothesis replays a case on a log that has
    # grown since, and needs the same draws.
    back = data.draw(st.integers(0, len(entries) + 20), label="records back")
    column = data.draw(st.sampled_from(COLUMNS), label="column")
    at, byte = data.draw(st.integers(0, 1 << 16)), data.draw(st.integers(0, 255))
    raw = sqlite3.connect(audit_log.home / "registry.db", isolation_level=None)
    try:
        last = raw.execute("SELECT max(seq) FROM audit_records").fetchone()[0]
        seq = max(1, last - back)
        (value,) = raw.execute(f"SELECT {column} FROM audit_records WHERE seq = ?",
                               (seq,)).fetchone()
        new = None if value is None else _edited(value, at, byte)
        if new is None or new == value:
            return
        try:
            # Bytes that are not UTF-8 go in as TEXT, as a byte edit of the file leaves them.
            cast = "CAST(? AS TEXT)" if isinstance(new, bytes) else "?"
            raw.execute(f"UPDATE audit_records SET {column} = {cast} WHERE seq = ?", (new, seq))
        except sqlite3.IntegrityError:
            return  # a seq edited into another record's: the database itself refuses it
        where = new if column == "seq" else seq
        try:
            tampered = verify_log(audit_log.db, audit_log.key.public_key)
            assert not tampered.ok, f"{column} of seq {seq}: {value!r} → {new!r} undetected"
        finally:
            raw.execute(f"UPDATE audit_records SET {column} = ? WHERE seq = ?", (value, where))
    finally:
        raw.close()
    assert verify_log(audit_log.db, audit_log.key.public_key).ok
