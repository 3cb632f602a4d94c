"""The device's keys: the Ed25519 signing key (audit checkpoints; its key id is the device
id) and the ECDSA P-256 TLS client key (the fleet link). Both created once, kept 0600.

The private key lives in `<home>/keys/device-ed25519.pem` (PKCS8 PEM, unencrypted: the
file mode is the protection, so a key file readable or writable by group or others is
refused). The public half is also written to `device-ed25519.pub.pem` (0644, though the
directory stays 0700) so that it can be handed to auditors, who verify checkpoints without
the private key. Key material is never logged; only paths and the key id are.

Errors: `agent.errors.DeviceKeyError`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import DeviceKeyError
from fleet.files import write_atomic

# `cryptography` is imported where a key is used, not here: an idle daemon whose key
# already exists signs nothing until its first audit checkpoint (~7 MB of RSS saved).
if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey
    from cryptography.hazmat.primitives.asymmetric.ed25519 import (
        Ed25519PrivateKey,
        Ed25519PublicKey,
    )

__all__ = [
    "KEY_FILE",
    "PUBLIC_KEY_FILE",
    "TLS_KEY_FILE",
    "DeviceKey",
    "DeviceKeyError",
    "LazyDeviceKey",
    "key_id_of",
    "load_device_public_key",
    "load_or_create_device_key",
    "load_or_create_tls_key",
    "load_public_key",
    "open_device_key",
    "tls_key_path",
    "verify",
]

log = logging.getLogger(__name__)

KEY_DIR = "keys"
KEY_FILE = "device-ed25519.pem"
TLS_KEY_FILE = "device-tls-p256.pem"
PUBLIC_KEY_FILE = "device-ed25519.pub.pem"
_RAW_KEY_LEN = 32


def key_id_of(public_key: Ed25519PublicKey) -> str:
    """First 16 hex chars of sha256 over the raw 32-byte public key."""
    from cryptography.hazmat.primitives import serialization

    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


class DeviceKey:
    """The device's Ed25519 private key; `repr()` shows only the key id."""

    __slots__ = ("_private", "key_id", "path")

    def __init__(self, private_key: Ed25519PrivateKey, path: Path | None = None) -> None:
        self._private = private_key
        self.path = path
        self.key_id = key_id_of(private_key.public_key())

    @classmethod
    def generate(cls) -> DeviceKey:
        """A fresh in-memory key (tests, benchmarks)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self._private.public_key()

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def public_key_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def public_key_raw(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self.public_key.public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def __repr__(self) -> str:
        return f"DeviceKey(key_id={self.key_id!r})"


def load_public_key(key: bytes | str | Ed25519PublicKey | DeviceKey) -> Ed25519PublicKey:
    """A public key from PEM (text or bytes), 32 raw bytes, or a key object."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    if isinstance(key, DeviceKey | LazyDeviceKey):
        return key.public_key
    if isinstance(key, Ed25519PublicKey):
        return key
    data = key.encode("ascii") if isinstance(key, str) else key
    if len(data) == _RAW_KEY_LEN and not data.startswith(b"-----"):
        return Ed25519PublicKey.from_public_bytes(data)
    try:
        loaded = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise DeviceKeyError("not an Ed25519 public key (expected PEM or 32 raw bytes)") from exc
    if not isinstance(loaded, Ed25519PublicKey):
        raise DeviceKeyError(f"not an Ed25519 public key: {type(loaded).__name__}")
    return loaded


def verify(
    public_key: bytes | str | Ed25519PublicKey | DeviceKey, signature: bytes, data: bytes
) -> bool:
    """True if `signature` is a valid Ed25519 signature of `data` by `public_key`."""
    from cryptography.exceptions import InvalidSignature

    try:
        load_public_key(public_key).verify(signature, data)
    except InvalidSignature:
        return False
    return True


def _key_dir(home: Path) -> Path:
    return home / KEY_DIR


def _owners(home: Path) -> set[int]:
    """Who may own the key directory and files: this process's euid and the account that
    owns the home (the daemon's; root's CLI reads a non-root daemon's keys)."""
    try:
        return {os.geteuid(), home.stat().st_uid}
    except OSError:
        return {os.geteuid()}


def _checked_key_dir(home: Path, *, create: bool) -> Path:
    """`<home>/keys/`, refused if another account could have planted or swapped a key in it:
    a symlink, not a directory, owned by someone else, or writable by group or others
    ([hardening] finding 10: a 0777 or symlinked keys/ was accepted)."""
    kdir = _key_dir(home)
    if create and not os.path.lexists(kdir):
        kdir.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = kdir.lstat()
    except FileNotFoundError:
        return kdir  # nothing to trust yet; reading a key in it fails with its own message
    if stat.S_ISLNK(st.st_mode):
        raise DeviceKeyError(f"key directory {kdir} is a symlink; it must be a real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise DeviceKeyError(f"key directory {kdir} is not a directory")
    if st.st_uid not in _owners(home):
        raise DeviceKeyError(f"key directory {kdir} belongs to uid {st.st_uid}, not to the "
                             "agent's account")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:  # the key files' own modes (0600, checked on read) keep them private
        raise DeviceKeyError(f"key directory {kdir} has mode {mode:04o}: only its owner may "
                             f"write in it (fix: chmod 700 {kdir})")
    return kdir


def load_or_create_device_key(home: Path) -> DeviceKey:
    """The key in `<home>/keys/`, generated on first use; an unsafe key file is refused."""
    kdir = _checked_key_dir(home, create=True)
    path = kdir / KEY_FILE
    if not path.exists() and not path.is_symlink():
        _create_key_file(path)
    key = DeviceKey(_read_private_key(path, _owners(home)), path)
    _ensure_public_key_file(kdir / PUBLIC_KEY_FILE, key)
    return key


def load_device_public_key(home: Path) -> Ed25519PublicKey:
    """The device's public key, from the .pub.pem file or else derived from the private key."""
    kdir = _checked_key_dir(home, create=False)
    pub = kdir / PUBLIC_KEY_FILE
    if pub.is_file():
        return load_public_key(pub.read_bytes())
    if (kdir / KEY_FILE).exists():
        return _read_private_key(kdir / KEY_FILE, _owners(home)).public_key()
    raise DeviceKeyError(f"no device key in {kdir} (the agent creates it on first start)")


def _create_key_file(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _create_private_file(path, pem)


def _create_private_file(path: Path, pem: bytes) -> None:
    """Create `path` with `pem`, mode 0600, atomically; an existing file wins (a second
    process starting at the same moment links first or finds a complete file)."""
    try:
        write_atomic(path, pem, 0o600, exclusive=True)
        log.info("created key %s", path)
    except FileExistsError:
        pass


def load_or_create_tls_key(home: Path) -> EllipticCurvePrivateKey:
    """The device's TLS client key (ECDSA P-256: what every broker and cloud IoT service
    accepts), created on first use; it never leaves the device, only CSRs do."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    kdir = _checked_key_dir(home, create=True)
    path = kdir / TLS_KEY_FILE
    if not path.exists() and not path.is_symlink():
        pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _create_private_file(path, pem)
    try:
        key = serialization.load_pem_private_key(_read_key_bytes(path, _owners(home)),
                                                 password=None)
    except (ValueError, TypeError) as exc:
        raise DeviceKeyError(f"TLS key {path} is not an unencrypted PKCS8 PEM key") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
        raise DeviceKeyError(f"TLS key {path} is not an ECDSA P-256 key")
    return key


def tls_key_path(home: Path) -> Path:
    return _key_dir(home) / TLS_KEY_FILE


def _read_private_key(path: Path, owners: set[int]) -> Ed25519PrivateKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    data = _read_key_bytes(path, owners)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        # No detail from the parser: it could echo key bytes.
        raise DeviceKeyError(f"device key {path} is not an unencrypted PKCS8 PEM key") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise DeviceKeyError(f"device key {path} is not an Ed25519 key")
    return key


def _read_key_bytes(path: Path, owners: set[int]) -> bytes:
    """The key file's bytes, after the checks that need no cryptography: regular file,
    not a symlink, mode 0600 or stricter, owned by one of `owners` (a root process too:
    a key file another account owns is one that account could have written)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise DeviceKeyError(f"cannot open device key {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeviceKeyError(f"device key {path} is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise DeviceKeyError(
                f"device key {path} has mode {mode:04o}: it must not be readable or writable "
                f"by group or others (fix: chmod 600 {path})"
            )
        if st.st_uid not in owners:
            raise DeviceKeyError(f"device key {path} belongs to uid {st.st_uid}, not to the "
                                 "agent's account")
        with os.fdopen(fd, "rb", closefd=False) as fh:
            return fh.read()
    finally:
        os.close(fd)


def _ensure_public_key_file(path: Path, key: DeviceKey) -> None:
    pem = key.public_key_pem()
    try:
        if path.is_file() and path.read_bytes() == pem:
            return
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(pem)
        tmp.chmod(0o644)
        tmp.replace(path)
    except OSError as exc:
        # Convenience copy only; the private key can always derive it.
        log.warning("cannot write public key file %s: %s", path, exc.strerror)


class LazyDeviceKey:
    """The device key, parsed (and `cryptography` imported) on first use.

    Made by `open_device_key` when the key file already exists and passed its file checks;
    the audit log signs its first checkpoint with it, long after an idle start.
    """

    __slots__ = ("_home", "_key")

    def __init__(self, home: Path) -> None:
        self._home = home
        self._key: DeviceKey | None = None

    def load(self) -> DeviceKey:
        if self._key is None:
            self._key = load_or_create_device_key(self._home)
        return self._key

    @property
    def key_id(self) -> str:
        return self.load().key_id

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.load().public_key

    def sign(self, data: bytes) -> bytes:
        return self.load().sign(data)

    def __repr__(self) -> str:
        return f"LazyDeviceKey(home={str(self._home)!r})"


def open_device_key(home: Path) -> DeviceKey | LazyDeviceKey:
    """The daemon's key: created now on first start, else checked now and parsed when used."""
    path = _checked_key_dir(home, create=False) / KEY_FILE
    if not path.exists() and not path.is_symlink():
        return load_or_create_device_key(home)
    _read_key_bytes(path, _owners(home))  # an unsafe key file still stops the start
    return LazyDeviceKey(home)
