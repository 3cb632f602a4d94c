"""Who is calling: the `Subject` of a request, from SO_PEERCRED or a verified bearer token.

A uid subject is built only from the kernel's credentials for the connection (never from
anything the client sends), enriched with the user's name and every group the user
database says the uid belongs to (primary + supplementary). Those lookups go through NSS,
which may be slow (LDAP, sssd), so `IdentityCache` keeps them per uid for a short TTL;
`invalidate()` drops them (the daemon calls it on SIGHUP and on policy reload).
"""

from __future__ import annotations

import grp
import os
import pwd
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = [
    "DEFAULT_TTL_SECONDS",
    "IdentityCache",
    "PeerCredentials",
    "Subject",
    "SubjectKind",
    "lookup_account",
    "subject_for_uid",
    "subject_from_peer",
    "token_subject",
]

SubjectKind = Literal["uid", "token"]


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is on the other end of a Unix socket connection, as the kernel says."""

    pid: int
    uid: int
    gid: int
DEFAULT_TTL_SECONDS = 30.0


@dataclass(frozen=True, slots=True)
class Subject:
    """An authenticated caller; what RBAC bindings match and what the audit log records.

    For token subjects `uid`/`gid`/`pid` are still the peer's (when on the Unix socket),
    for the audit record only: bindings match the token's name and role, not the uid.
    """

    kind: SubjectKind
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    user: str | None = None
    groups: frozenset[str] = field(default_factory=frozenset)
    token: str | None = None  # token name, for token subjects
    role: str | None = None  # the role a token was issued with

    @property
    def display(self) -> str:
        """'uid:1000(alice)', 'uid:1234' for a uid without an account, 'token:NAME'."""
        if self.kind == "token":
            return f"token:{self.token}"
        return f"uid:{self.uid}({self.user})" if self.user else f"uid:{self.uid}"


@dataclass(frozen=True, slots=True)
class _Account:
    user: str | None
    groups: frozenset[str]


def lookup_account(uid: int, gid: int | None = None) -> tuple[str | None, frozenset[str]]:
    """User name and group names of `uid` from the user database (NSS); uncached.

    Groups are the passwd entry's primary group, every group listing the user as a
    member, and `gid` (the peer's effective gid) when it has a name.
    """
    names: set[str] = set()
    gids: set[int] = set() if gid is None else {gid}
    try:
        pw = pwd.getpwuid(uid)
    except KeyError:
        user = None
    else:
        user = pw.pw_name
        try:
            gids.update(os.getgrouplist(user, pw.pw_gid))
        except OSError:
            gids.add(pw.pw_gid)
    for g in gids:
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            continue  # a gid without a group entry cannot match a `group:` binding
    return user, frozenset(names)


class IdentityCache:
    """Per-(uid, gid) cache of user database lookups with a TTL; safe across threads."""

    def __init__(
        self,
        ttl: float = DEFAULT_TTL_SECONDS,
        *,
        clock: Callable[[], float] = time.monotonic,
        lookup: Callable[[int, int | None], tuple[str | None, frozenset[str]]] = lookup_account,
        max_entries: int = 4096,
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lookup = lookup
        self._max = max_entries
        self._entries: dict[tuple[int, int | None], tuple[float, _Account]] = {}
        self._lock = threading.Lock()

    def account(self, uid: int, gid: int | None) -> tuple[str | None, frozenset[str]]:
        """(user, groups) for this uid/gid, from the cache while fresh."""
        key = (uid, gid)
        now = self._clock()
        hit = self._entries.get(key)
        if hit is not None and hit[0] > now:
            return hit[1].user, hit[1].groups
        user, groups = self._lookup(uid, gid)
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries = {k: v for k, v in self._entries.items() if v[0] > now}
                if len(self._entries) >= self._max:
                    self._entries.clear()
            self._entries[key] = (now + self.ttl, _Account(user, groups))
        return user, groups

    def subject(self, cred: PeerCredentials) -> Subject:
        """The uid subject of a connection's peer credentials."""
        user, groups = self.account(cred.uid, cred.gid)
        return Subject(kind="uid", uid=cred.uid, gid=cred.gid, pid=cred.pid, user=user,
                       groups=groups)

    def invalidate(self) -> None:
        """Forget every cached lookup (SIGHUP, policy reload, group changes)."""
        with self._lock:
            self._entries.clear()


def subject_from_peer(cred: PeerCredentials, cache: IdentityCache | None = None) -> Subject:
    """The uid subject for SO_PEERCRED credentials; cached when `cache` is given."""
    if cache is not None:
        return cache.subject(cred)
    user, groups = lookup_account(cred.uid, cred.gid)
    return Subject(kind="uid", uid=cred.uid, gid=cred.gid, pid=cred.pid, user=user,
                   groups=groups)


def subject_for_uid(uid: int) -> Subject:
    """The subject a process of `uid` would be (primary gid from passwd); for `explain`."""
    try:
        gid: int | None = pwd.getpwuid(uid).pw_gid
    except KeyError:
        gid = None
    user, groups = lookup_account(uid, gid)
    return Subject(kind="uid", uid=uid, gid=gid, user=user, groups=groups)


def token_subject(name: str, role: str, cred: PeerCredentials | None = None) -> Subject:
    """The subject of a verified token; the peer's uid/pid are kept for the audit record."""
    return Subject(
        kind="token", token=name, role=role,
        uid=cred.uid if cred else None, gid=cred.gid if cred else None,
        pid=cred.pid if cred else None,
    )
