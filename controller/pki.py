"""The fleet's keys: the fleet CA (ECDSA P-256) that signs device, controller and broker
certificates, and the deployment-signing key (Ed25519) whose public half every device
pins at enrollment.

Private keys are written 0600 in the controller's home and never printed. A device is
approved from its CSR only: the CSR's signature proves it holds the TLS key, its subject
names the device (CN) and fleet (OU), and its SAN carries the device's Ed25519 audit key,
which the controller records to verify that device's audit checkpoints.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.files import write_atomic
from fleet.topics import check_name

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

CA_CERT = "fleet-ca.pem"
CA_KEY = "fleet-ca.key"
SIGNING_KEY = "deploy-signing.key"
SIGNING_PUB = "deploy-signing.pub.pem"
FLEET_FILE = "fleet.json"
FLEET_URN = "urn:edge-agent:fleet:"
AUDIT_KEY_URN = "urn:edge-agent:audit-key:ed25519:"
CONTROLLER_CN = "controller"


class PkiError(Exception):
    """A key or certificate cannot be made or accepted; the message says why."""


@dataclass(frozen=True, slots=True)
class Approved:
    device_id: str
    fleet: str
    audit_key: str  # base64 of the raw Ed25519 public key
    serial: str
    not_after: datetime
    cert_pem: bytes


def _write_private(path: Path, data: bytes) -> None:
    """A new key, 0600; never over an existing one (FileExistsError)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data, 0o600, exclusive=True)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, data, 0o644)


class FleetKeys:
    """The keys of one fleet, in a controller home."""

    def __init__(self, home: Path) -> None:
        self.home = home

    # -- init -------------------------------------------------------------------------

    def init(self, fleet: str, *, years: int = 10) -> None:
        """Create the fleet CA and the deployment-signing key; refuses to overwrite."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec, ed25519
        from cryptography.x509.oid import NameOID

        check_name("fleet", fleet)
        if (self.home / CA_KEY).exists():
            raise PkiError(f"{self.home} already has fleet keys; refusing to replace them")
        ca_key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([
            x509.NameAttribute(NameOID.COMMON_NAME, f"edge-agent fleet CA {fleet}"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet),
        ])
        now = datetime.now(UTC)
        ca = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(ca_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=365 * years))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA256())
        )
        signing = ed25519.Ed25519PrivateKey.generate()
        pkcs8 = serialization.PrivateFormat.PKCS8
        none = serialization.NoEncryption()
        _write_private(self.home / CA_KEY, ca_key.private_bytes(
            serialization.Encoding.PEM, pkcs8, none))
        _write_private(self.home / SIGNING_KEY, signing.private_bytes(
            serialization.Encoding.PEM, pkcs8, none))
        _write_public(self.home / CA_CERT, ca.public_bytes(serialization.Encoding.PEM))
        _write_public(self.home / SIGNING_PUB, signing.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        _write_public(self.home / FLEET_FILE, json.dumps({"fleet": fleet}).encode())

    @property
    def fleet(self) -> str:
        try:
            return str(json.loads((self.home / FLEET_FILE).read_text())["fleet"])
        except (OSError, ValueError, KeyError) as exc:
            raise PkiError(f"{self.home} has no fleet keys (run `keys init` first)") from exc

    def ca(self) -> tuple[x509.Certificate, EllipticCurvePrivateKey]:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        try:
            cert = x509.load_pem_x509_certificate((self.home / CA_CERT).read_bytes())
            key = serialization.load_pem_private_key((self.home / CA_KEY).read_bytes(), None)
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot read the fleet CA in {self.home}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError("the fleet CA key is not an EC key")
        return cert, key

    def signing_key(self) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        key = serialization.load_pem_private_key((self.home / SIGNING_KEY).read_bytes(), None)
        if not isinstance(key, ed25519.Ed25519PrivateKey):
            raise PkiError("the deployment-signing key is not Ed25519")
        return key

    # -- issuing ----------------------------------------------------------------------

    def _issue(self, subject: x509.Name, public_key: Any, *, days: int, server: bool,
               san: list[x509.GeneralName], not_before: datetime | None = None,
               not_after: datetime | None = None) -> x509.Certificate:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes
        from cryptography.x509.oid import ExtendedKeyUsageOID

        ca, ca_key = self.ca()
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(ca.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - timedelta(minutes=5))
            .not_valid_after(not_after or now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                           critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    def approve(self, csr_pem: bytes, *, days: int = 365,
                not_before: datetime | None = None,
                not_after: datetime | None = None) -> Approved:
        """Check a device's CSR and sign it; `not_before`/`not_after` only for tests."""
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        try:
            csr = x509.load_pem_x509_csr(csr_pem)
        except ValueError as exc:
            raise PkiError(f"not a PEM certificate request: {exc}") from exc
        if not csr.is_signature_valid:
            raise PkiError("the request's signature does not verify (not made with its key)")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.curve.name != "secp256r1":
            raise PkiError("device keys must be ECDSA P-256")
        cn = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        ou = csr.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if not cn or not ou:
            raise PkiError("the request must name the device (CN) and its fleet (OU)")
        device, fleet = str(cn[0].value), str(ou[0].value)
        check_name("device id", device)
        if device == CONTROLLER_CN:
            raise PkiError(f"{CONTROLLER_CN!r} is reserved for the controller")
        if fleet != self.fleet:
            raise PkiError(f"the request is for fleet {fleet!r}; this controller signs for "
                           f"{self.fleet!r}")
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound as exc:
            raise PkiError("the request carries no device audit key (SAN)") from exc
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        audit = [u.removeprefix(AUDIT_KEY_URN) for u in uris if u.startswith(AUDIT_KEY_URN)]
        if len(audit) != 1 or not re.fullmatch(r"[A-Za-z0-9_-]{43}", audit[0]):
            raise PkiError("the request must carry exactly one Ed25519 audit key")
        raw = base64.urlsafe_b64decode(audit[0] + "=")
        from fleet.auditchain import ed25519_public_key

        ed25519_public_key(raw)  # a malformed key is refused here, not at verify time
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, fleet)])
        cert = self._issue(subject, pub, days=days, server=False, san=[
            x509.UniformResourceIdentifier(f"{FLEET_URN}{fleet}:device:{device}")],
            not_before=not_before, not_after=not_after)
        return Approved(device, fleet, base64.b64encode(raw).decode("ascii"),
                        format(cert.serial_number, "x"), cert.not_valid_after_utc,
                        cert.public_bytes(serialization.Encoding.PEM))

    def client_cert(self, name: str, *, days: int = 825) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for a controller process (CN `controller`, `name` in SAN)."""
        return self._leaf(CONTROLLER_CN, days=days, server=False, names=[name])

    def server_cert(self, dns: list[str], ips: list[str], *, days: int = 825
                    ) -> tuple[bytes, bytes]:
        """(cert PEM, key PEM) for the broker (or the artifact server)."""
        return self._leaf(dns[0] if dns else ips[0], days=days, server=True, names=dns, ips=ips)

    def _leaf(self, cn: str, *, days: int, server: bool, names: list[str],
              ips: list[str] | None = None) -> tuple[bytes, bytes]:
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        key = ec.generate_private_key(ec.SECP256R1())
        san: list[x509.GeneralName] = [x509.DNSName(n) for n in names] if server else \
            [x509.UniformResourceIdentifier(f"urn:edge-agent:controller:{n}") for n in names]
        san += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips or []]
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                             x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, self.fleet)])
        cert = self._issue(subject, key.public_key(), days=days, server=server, san=san)
        return (cert.public_bytes(serialization.Encoding.PEM),
                key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))


def write_pair(directory: Path, stem: str, cert: bytes, key: bytes) -> tuple[Path, Path]:
    """Write `<stem>.pem` (0644) and `<stem>.key` (0600) into `directory`."""
    crt, k = directory / f"{stem}.pem", directory / f"{stem}.key"
    _write_public(crt, cert)
    k.unlink(missing_ok=True)
    _write_private(k, key)
    return crt, k
