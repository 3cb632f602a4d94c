"""API bearer tokens: creation, listing, revocation and verification against the registry DB.

A token reads `ea_<token_id>_<secret>`. The token_id is the public lookup key; only an
Argon2id hash of the secret is stored, so the database never holds a usable token. The
token is shown once, when created.

Verification re-reads the token's row on every call (a point query on a unique index,
microseconds), so a revoke or an expiry takes effect at once in every process; only the
Argon2 result is cached in memory, keyed by sha256(token), for `cache_ttl` seconds.

Errors: the `TokenError`/`AuditError`/`DeviceKeyError` branches of `agent.errors`.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from agent.errors import (
    ExpiredToken,
    InvalidToken,
    RevokedToken,
    TokenAttemptsExceeded,
    TokenError,
    TokenExists,
    TokenNotFound,
)
from agent.security.tables import ApiToken
from localdb import Database

__all__ = [
    "FAILURES_ALLOWED",
    "FAILURE_WINDOW",
    "TOKEN_PREFIX",
    "ExpiredToken",
    "InvalidToken",
    "RevokedToken",
    "TokenAttemptsExceeded",
    "TokenError",
    "TokenExists",
    "TokenInfo",
    "TokenNotFound",
    "TokenStore",
    "default_hasher",
    "parse_duration",
]

TOKEN_PREFIX = "ea_"  # noqa: S105 - a format prefix, not a secret
_TOKEN = re.compile(r"^ea_([0-9a-f]{16})_([A-Za-z0-9_-]{20,128})$")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}$")
_DURATION = re.compile(r"^(\d+)([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_CACHED = 1024
FAILURES_ALLOWED = 5  # failed token attempts per peer ...
FAILURE_WINDOW = 60.0  # ... in this many seconds, then TokenAttemptsExceeded (429)
TokenStatus = Literal["active", "expired", "revoked"]


def parse_duration(text: str) -> timedelta:
    """'30d', '12h', '90m', '3600s', '2w' → timedelta; ValueError otherwise."""
    m = _DURATION.fullmatch(text.strip())
    if not m or int(m.group(1)) == 0:
        raise ValueError(f"invalid duration {text!r}: use a positive number with s, m, h, d or w "
                         "(e.g. 30d, 12h)")
    return timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def _utc(value: datetime | str | None) -> datetime | None:
    """SQLite hands datetimes back naive (or as text on raw reads); they are UTC."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


@dataclass(frozen=True, slots=True)
class TokenInfo:
    """A token's public record (never its secret or hash)."""

    token_id: str
    name: str
    role: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def status(self, now: datetime) -> TokenStatus:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return "active"

    def as_json(self, now: datetime) -> dict[str, str | None]:
        def iso(d: datetime | None) -> str | None:
            return d.isoformat() if d is not None else None

        return {"name": self.name, "token_id": self.token_id, "role": self.role,
                "status": self.status(now), "created_at": iso(self.created_at),
                "expires_at": iso(self.expires_at), "revoked_at": iso(self.revoked_at)}


def _info(row: ApiToken) -> TokenInfo:
    created = _utc(row.created_at)
    assert created is not None
    return TokenInfo(row.token_id, row.name, row.role, created, _utc(row.expires_at),
                     _utc(row.revoked_at))


def default_hasher() -> PasswordHasher:
    """Argon2id with OWASP's minimum (19 MiB, 2 passes, 1 lane).

    The secrets are 256 random bits, so the hash need not make guessing slow; it keeps a
    leaked database useless while costing an edge device tens of ms, not a second, per
    uncached check. Parameters live in each hash, so changing them never breaks old tokens.
    """
    return PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1)


_LOOKUP = ("SELECT token_id, name, role, created_at, expires_at, revoked_at, secret_hash "
           "FROM api_tokens WHERE token_id = ?")


class TokenStore:
    """Tokens in the registry DB; `verify`/`averify` authenticate a presented token."""

    def __init__(
        self,
        db: Database,
        *,
        hasher: PasswordHasher | None = None,
        cache_ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        max_concurrent_hashes: int = 2,
    ) -> None:
        self.db = db
        self.hasher = hasher or default_hasher()
        self.cache_ttl = cache_ttl
        self._clock = clock
        self._now = now
        # Argon2 results only: sha256(token) → (fresh until, secret_hash it matched).
        self._verified: dict[bytes, tuple[float, str]] = {}
        self._lock = threading.Lock()
        # Bounds the CPU a flood of bad tokens can take: each costs one Argon2 hash.
        self._hash_slots = asyncio.Semaphore(max_concurrent_hashes)
        # Failed attempts per peer (uid or address): past FAILURES_ALLOWED in
        # FAILURE_WINDOW seconds the peer is refused without hashing.
        self._failures: dict[str, deque[float]] = {}
        self._dummy_hash: str | None = None

    # -- management (CLI) --------------------------------------------------------------

    def create(
        self, name: str, role: str, expires_in: timedelta | None = None
    ) -> tuple[str, TokenInfo]:
        """A new token; returns (the token, shown only now, and its record)."""
        if not _NAME.fullmatch(name):
            raise TokenError(f"invalid token name {name!r}: letters, digits, '_', '.', '@', '-' "
                             "(up to 64, not starting with '.', '@' or '-')")
        token_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = self._now()
        row = ApiToken(
            token_id=token_id, name=name, role=role,
            secret_hash=self.hasher.hash(secret), created_at=now,
            expires_at=now + expires_in if expires_in is not None else None,
        )
        try:
            with self.db.write() as s:
                # Only a token that is not revoked holds its name: revoking frees it (the
                # revoked row stays, for `tokens list` and the audit log's references).
                held = s.scalar(select(ApiToken).where(ApiToken.name == name,
                                                       ApiToken.revoked_at.is_(None)))
                if held is not None:
                    raise TokenExists(
                        f"a token named {name!r} exists ({_info(held).status(now)}); revoke "
                        "it to re-use the name, or pick another name")
                s.add(row)
                s.flush()
                info = _info(row)
        except IntegrityError as exc:  # a concurrent create with the same name
            raise TokenExists(f"a token named {name!r} exists") from exc
        return f"{TOKEN_PREFIX}{token_id}_{secret}", info

    def list_tokens(self) -> list[TokenInfo]:
        with self.db.read() as s:
            rows = s.scalars(select(ApiToken).order_by(ApiToken.created_at, ApiToken.id))
            return [_info(r) for r in rows]

    def revoke(self, name: str) -> TokenInfo:
        """Revoke by name; idempotent (an already revoked token keeps its revocation time).

        A name may have revoked predecessors (a revoke frees it); the token revoked is the
        one not yet revoked, else the newest, so repeating a revoke changes nothing."""
        with self.db.write() as s:
            row = s.scalar(select(ApiToken).where(ApiToken.name == name)
                           .order_by(ApiToken.revoked_at.is_not(None), ApiToken.id.desc())
                           .limit(1))
            if row is None:
                raise TokenNotFound(f"no token named {name!r} (see `edge-agent tokens list`)")
            if row.revoked_at is None:
                row.revoked_at = self._now()
            info = _info(row)
        with self._lock:
            self._verified = {k: v for k, v in self._verified.items()
                              if v[1] != row.secret_hash}
        return info

    # -- verification ------------------------------------------------------------------

    def verify(self, token: str) -> TokenInfo:
        """The record of a valid token; raises InvalidToken/ExpiredToken/RevokedToken."""
        info, secret, secret_hash, key = self._lookup(token)
        if not self._cached(key, secret_hash):
            self._check_secret(secret_hash, secret, key)
        assert info is not None  # _check_secret refused the stand-in of an unknown id
        return self._check_status(info)

    async def averify(self, token: str, peer: str | None = None) -> TokenInfo:
        """`verify` for the event loop: Argon2 (cache misses) runs in a worker thread.
        `peer` (who connected: "uid:1000", an address) is refused with
        TokenAttemptsExceeded after FAILURES_ALLOWED failures in FAILURE_WINDOW seconds."""
        if peer is not None:
            self._check_attempts(peer)
        try:
            info, secret, secret_hash, key = self._lookup(token)
            if not self._cached(key, secret_hash):
                async with self._hash_slots:
                    await asyncio.to_thread(self._check_secret, secret_hash, secret, key)
        except InvalidToken:
            if peer is not None:
                self._failed(peer)
            raise
        assert info is not None  # _check_secret refused the stand-in of an unknown id
        return self._check_status(info)

    def _check_attempts(self, peer: str) -> None:
        times = self._failures.get(peer)
        if not times:
            return
        now = self._clock()
        while times and times[0] <= now - FAILURE_WINDOW:
            times.popleft()
        if len(times) >= FAILURES_ALLOWED:
            wait = max(1, int(times[0] + FAILURE_WINDOW - now) + 1)
            raise TokenAttemptsExceeded(
                f"too many failed token attempts from this client; retry in {wait}s", wait)

    def _failed(self, peer: str) -> None:
        if peer not in self._failures and len(self._failures) >= MAX_CACHED:
            self._failures.clear()  # a flood of distinct peers: forget, never grow
        self._failures.setdefault(peer, deque(maxlen=FAILURES_ALLOWED)).append(self._clock())

    def invalidate(self) -> None:
        """Forget cached Argon2 results."""
        with self._lock:
            self._verified.clear()

    def close(self) -> None:
        """Nothing to release: reads go through the database's own read path."""

    def _lookup(self, token: str) -> tuple[TokenInfo | None, str, str, bytes]:
        m = _TOKEN.fullmatch(token)
        if m is None:
            raise InvalidToken("malformed API token (expected ea_<id>_<secret>)")
        token_id, secret = m.group(1), m.group(2)
        # One statement on the database's point-read connection: its own snapshot, never
        # waits for the write lock, a few µs per request.
        with self.db.point_read() as conn:
            row = conn.execute(_LOOKUP, (token_id,)).fetchone()
        key = hashlib.sha256(token.encode()).digest()
        if row is None:
            # The same answer, after the same Argon2 work, as a wrong secret: an unknown
            # id must not be told apart (by message or by time) from a known one.
            return None, secret, self._stand_in_hash(), key
        created = _utc(row[3])
        assert created is not None
        info = TokenInfo(row[0], row[1], row[2], created, _utc(row[4]), _utc(row[5]))
        return info, secret, row[6], key

    def _stand_in_hash(self) -> str:
        if self._dummy_hash is None:
            self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(24))
        return self._dummy_hash

    def _cached(self, key: bytes, secret_hash: str) -> bool:
        hit = self._verified.get(key)
        return hit is not None and hit[1] == secret_hash and hit[0] > self._clock()

    def _check_secret(self, secret_hash: str, secret: str, key: bytes) -> None:
        try:
            self.hasher.verify(secret_hash, secret)
        except (VerificationError, InvalidHashError) as exc:
            raise InvalidToken("invalid API token") from exc
        now = self._clock()
        with self._lock:
            if len(self._verified) >= MAX_CACHED:
                self._verified = {k: v for k, v in self._verified.items() if v[0] > now}
                if len(self._verified) >= MAX_CACHED:
                    self._verified.clear()
            self._verified[key] = (now + self.cache_ttl, secret_hash)

    def _check_status(self, info: TokenInfo) -> TokenInfo:
        # Checked after the secret, so only the holder learns a token is revoked or expired.
        if info.revoked_at is not None:
            raise RevokedToken(f"API token {info.name!r} was revoked")
        if info.expires_at is not None and info.expires_at <= self._now():
            raise ExpiredToken(f"API token {info.name!r} expired at "
                               f"{info.expires_at.isoformat(timespec='seconds')}")
        return info
