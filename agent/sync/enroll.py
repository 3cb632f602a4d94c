"""Enrollment: the device's identity in the fleet and the files that prove it.

The device id is the key id of its Ed25519 audit key (16 hex digits, stable for the life
of the device's keys). `enroll` writes a CSR for the device's own TLS key (ECDSA P-256,
never sent anywhere) naming the device and its fleet and carrying the audit public key, so
the controller pins the key that signs this device's audit checkpoints when it approves.
`install_cert` checks and installs what the controller returns: the certificate (for
this key, this device, issued by the CA given, currently valid), the fleet CA (the only
CA the broker is verified against) and the controller's deployment-signing public key
(Ed25519, pinned; every deployment must be signed by it).

Files in `<home>/keys/`: device-tls-p256.pem (0600), device-cert.pem, fleet-ca.pem,
deploy-signing.pub.pem, enrollment.json (all 0640, written atomically).
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from agent.errors import DeviceKeyError
from agent.security.keys import (
    KEY_FILE,
    key_id_of,
    load_device_public_key,
    load_or_create_device_key,
    load_or_create_tls_key,
)
from fleet.files import write_atomic
from fleet.topics import check_name
from localdb import StateDir

if TYPE_CHECKING:
    from cryptography import x509

CERT_FILE = "device-cert.pem"
CA_FILE = "fleet-ca.pem"
SIGNING_KEY_FILE = "deploy-signing.pub.pem"
STATE_FILE = "enrollment.json"
FLEET_URN = "urn:edge-agent:fleet:"
AUDIT_KEY_URN = "urn:edge-agent:audit-key:ed25519:"

EnrollmentState = Literal["not-enrolled", "pending", "enrolled"]


class EnrollmentError(DeviceKeyError):
    """What the controller sent does not fit this device; the message says why."""


@dataclass(frozen=True, slots=True)
class Enrollment:
    """What `device info` shows and the link needs."""

    state: EnrollmentState
    device_id: str
    fleet: str | None = None
    cert_not_after: str | None = None  # ISO 8601 UTC
    cert_serial: str | None = None
    ca_sha256: str | None = None
    signing_key_id: str | None = None

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def device_id(home: Path) -> str:
    """This device's id: its audit key's id (creating the key on a fresh device)."""
    return load_or_create_device_key(home).key_id


def paths(home: Path) -> dict[str, Path]:
    keys = StateDir(home).keys
    return {"cert": keys / CERT_FILE, "ca": keys / CA_FILE, "signing": keys / SIGNING_KEY_FILE,
            "state": keys / STATE_FILE}


def status(home: Path) -> Enrollment:
    """The enrollment state, read without creating anything (a fresh home: not enrolled)."""
    p = paths(home)
    try:
        data = json.loads(p["state"].read_text(encoding="utf-8"))
    except (OSError, ValueError):
        data = None
    if not isinstance(data, dict):
        key_id = _existing_key_id(home)
        return Enrollment(state="not-enrolled", device_id=key_id or "unknown")
    fields: dict[str, Any] = {k: data.get(k) for k in Enrollment.__dataclass_fields__}
    return Enrollment(**fields)


def _existing_key_id(home: Path) -> str | None:
    """The device id if the device key exists (a read-only command must not create it)."""
    if not (StateDir(home).keys / KEY_FILE).exists():
        return None
    return key_id_of(load_device_public_key(home))


def enroll(home: Path, fleet: str) -> bytes:
    """A CSR (PEM) for this device in `fleet`; records the pending enrollment."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    check_name("fleet", fleet)
    audit_key = load_or_create_device_key(home)
    tls_key = load_or_create_tls_key(home)
    dev = audit_key.key_id
    raw = base64.urlsafe_b64encode(audit_key.public_key_raw()).decode("ascii").rstrip("=")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, dev),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet),
        ]))
        .add_extension(x509.SubjectAlternativeName([
            x509.UniformResourceIdentifier(f"{FLEET_URN}{fleet}:device:{dev}"),
            x509.UniformResourceIdentifier(f"{AUDIT_KEY_URN}{raw}"),
        ]), critical=False)
        .sign(tls_key, hashes.SHA256())
    )
    pem = csr.public_bytes(serialization.Encoding.PEM)
    current = status(home)
    if current.state != "enrolled":
        _write_state(home, Enrollment(state="pending", device_id=dev, fleet=fleet))
    return pem


def install_cert(
    home: Path, cert_pem: bytes, ca_pem: bytes, signing_key_pem: bytes
) -> Enrollment:
    """Check and install the controller's answer; raises EnrollmentError naming the problem."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        ca = x509.load_pem_x509_certificate(ca_pem)
    except ValueError as exc:
        raise EnrollmentError(f"not a PEM certificate: {exc}") from exc
    try:
        signing = serialization.load_pem_public_key(signing_key_pem)
    except ValueError as exc:
        raise EnrollmentError("the signing key is not a PEM public key") from exc
    if not isinstance(signing, ed25519.Ed25519PublicKey):
        raise EnrollmentError("the deployment-signing key must be Ed25519")
    tls_key = load_or_create_tls_key(home)
    dev = device_id(home)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != tls_key.public_key().public_bytes(*spki):
        raise EnrollmentError("the certificate is not for this device's TLS key")
    if _common_name(cert) != dev:
        raise EnrollmentError(f"the certificate names device {_common_name(cert)!r}, not {dev}")
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError) as exc:
        raise EnrollmentError(f"the certificate was not issued by that CA: {exc}") from exc
    now = datetime.now(UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise EnrollmentError(
            f"the certificate is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d})"
        )
    fleet = _fleet_of(cert)
    p = paths(home)
    for name, data in (("cert", cert_pem), ("ca", ca_pem), ("signing", signing_key_pem)):
        _write_file(p[name], data)
    enrollment = Enrollment(
        state="enrolled",
        device_id=dev,
        fleet=fleet,
        cert_not_after=cert.not_valid_after_utc.isoformat(),
        cert_serial=format(cert.serial_number, "x"),
        ca_sha256=hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest(),
        signing_key_id=key_id_of(signing),
    )
    _write_state(home, enrollment)
    return enrollment


def _common_name(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def _fleet_of(cert: x509.Certificate) -> str:
    from cryptography.x509.oid import NameOID

    attrs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not attrs:
        raise EnrollmentError("the certificate names no fleet (OU)")
    fleet = str(attrs[0].value)
    try:
        check_name("fleet", fleet)
    except ValueError as exc:
        raise EnrollmentError(str(exc)) from exc
    return fleet


def _write_state(home: Path, enrollment: Enrollment) -> None:
    _write_file(paths(home)["state"], json.dumps(enrollment.as_json(), indent=1).encode())


def _write_file(path: Path, data: bytes) -> None:
    """Replace `path` whole, 0640, in the (0700) key directory."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_atomic(path, data, 0o640)
