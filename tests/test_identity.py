"""Identity from SO_PEERCRED: real throwaway users and groups, a real Unix socket, and
children that drop to those users before connecting; plus the lookup cache."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.errors import ListenerError
from agent.security.identity import IdentityCache, Subject, lookup_account, subject_for_uid
from agent.server import PeerCredentials, bind_unix_socket

ROOT = Path(__file__).resolve().parent.parent
needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("useradd") is None,
    reason="creates users and groups and drops privileges: needs root and useradd",
)


# ---------------------------------------------------------------------------- helpers


@dataclass(frozen=True)
class Account:
    user: str
    uid: int
    gid: int  # primary
    primary: str
    supplementary: tuple[str, ...]

    @property
    def supplementary_gids(self) -> list[int]:
        return [grp.getgrnam(g).gr_gid for g in self.supplementary]


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, Account]]:
    """eatest users: `member` (primary group + two supplementary), `loner` (primary only)."""
    if os.geteuid() != 0 or shutil.which("useradd") is None:
        pytest.skip("needs root and useradd")
    tag = f"eatest{os.getpid()}"
    groups = [f"{tag}p", f"{tag}a", f"{tag}b"]
    users = {"member": f"{tag}m", "loner": f"{tag}l"}
    made_groups: list[str] = []
    made_users: list[str] = []
    try:
        for g in groups:
            subprocess.run(["groupadd", g], check=True)
            made_groups.append(g)
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-g", groups[0],
                        "-G", f"{groups[1]},{groups[2]}", users["member"]], check=True)
        made_users.append(users["member"])
        subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", "-g", groups[0],
                        users["loner"]], check=True)
        made_users.append(users["loner"])
        out = {}
        for key, name in users.items():
            pw = pwd.getpwnam(name)
            supp = (groups[1], groups[2]) if key == "member" else ()
            out[key] = Account(name, pw.pw_uid, pw.pw_gid, groups[0], supp)
        yield out
    finally:
        for u in made_users:
            subprocess.run(["userdel", u], check=False)
        for g in made_groups:
            subprocess.run(["groupdel", g], check=False)


def run_as(uid: int, gid: int, groups: list[int], action: Any) -> tuple[int, bytes]:
    """Fork a child that drops to uid/gid/groups and runs `action()` -> bytes.

    Returns (child pid, what it produced); a failure in the child comes back as an
    AssertionError here.
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            out = action()
        except BaseException as exc:
            out, code = f"child failed: {exc!r}".encode(), 1
        try:
            os.write(w, out)
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as f:
        while chunk := f.read(65536):
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    data = b"".join(chunks)
    assert os.waitstatus_to_exitcode(status) == 0, data.decode(errors="replace")
    return pid, data


def http_request(
    path: Path, method: str, target: str, body: Any = None, headers: dict[str, str] | None = None
) -> bytes:
    """A raw HTTP/1.0 request over a Unix socket (no client library in a forked child)."""
    payload = b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {target} HTTP/1.0", "Host: edge-agent",
             *(f"{k}: {v}" for k, v in (headers or {}).items())]
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(path))
        s.sendall("\r\n".join(lines).encode() + b"\r\n\r\n" + payload)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def http_get(path: Path, target: str) -> bytes:
    return http_request(path, "GET", target)


def parse_http(raw: bytes) -> tuple[int, Any]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


SERVER = """
import asyncio, sys
from pathlib import Path
from aiohttp import web
from agent.security.identity import IdentityCache, subject_from_peer
from agent.server import bind_unix_socket, peer_credentials

cache = IdentityCache()

async def who(request):
    cred = peer_credentials(request)
    s = subject_from_peer(cred, cache if request.query.get("cached") else None)
    return web.json_response({"kind": s.kind, "uid": s.uid, "gid": s.gid, "pid": s.pid,
                              "user": s.user, "groups": sorted(s.groups),
                              "display": s.display})

async def main():
    app = web.Application()
    app.router.add_get("/who", who)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.SockSite(runner, bind_unix_socket(Path(sys.argv[1]), mode=0o666)).start()
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until EOF
    await runner.cleanup()

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def whoami_server(accounts: dict[str, Account]) -> Iterator[Path]:
    """A tiny aiohttp app (subprocess) answering with the subject of its peer."""
    sockdir = Path(tempfile.mkdtemp(prefix="ea-id-", dir="/tmp"))
    sockdir.chmod(0o755)  # the dropped-uid children must reach the socket
    path = sockdir / "who.sock"
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(path)], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield path
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(30)
        shutil.rmtree(sockdir, ignore_errors=True)


# ---------------------------------------------------------------------------- real users


@needs_root
@pytest.mark.parametrize("cached", [False, True])
def test_subject_of_a_real_user_with_supplementary_groups(
    accounts: dict[str, Account], whoami_server: Path, cached: bool
) -> None:
    a = accounts["member"]
    target = "/who?cached=1" if cached else "/who"
    pid, raw = run_as(a.uid, a.gid, a.supplementary_gids, lambda: http_get(whoami_server, target))
    status, body = parse_http(raw)
    assert status == 200
    assert body["kind"] == "uid" and body["uid"] == a.uid and body["gid"] == a.gid
    assert body["pid"] == pid  # the kernel's word for who connected
    assert body["user"] == a.user
    assert set(body["groups"]) == {a.primary, *a.supplementary}
    assert body["display"] == f"uid:{a.uid}({a.user})"


@needs_root
def test_groups_come_from_the_user_database(
    accounts: dict[str, Account], whoami_server: Path
) -> None:
    # A process that dropped its supplementary groups is still a member per /etc/group;
    # the user without supplementary groups gets only its primary one.
    a = accounts["member"]
    _, raw = run_as(a.uid, a.gid, [], lambda: http_get(whoami_server, "/who"))
    assert set(parse_http(raw)[1]["groups"]) == {a.primary, *a.supplementary}
    b = accounts["loner"]
    _, raw = run_as(b.uid, b.gid, [], lambda: http_get(whoami_server, "/who"))
    body = parse_http(raw)[1]
    assert body["user"] == b.user and body["groups"] == [b.primary]


@needs_root
def test_socket_mode_and_group_decide_who_may_connect(accounts: dict[str, Account]) -> None:
    a, b = accounts["member"], accounts["loner"]
    sockdir = Path(tempfile.mkdtemp(prefix="ea-id-", dir="/tmp"))
    sockdir.chmod(0o755)
    path = sockdir / "s" / "agent.sock"
    # 0660 and owned by a group only `member` has (supplementary): the kernel checks.
    sock = bind_unix_socket(path, mode=0o660, group=a.supplementary[0])
    try:
        assert oct(path.parent.stat().st_mode & 0o777) == "0o750"
        path.parent.chmod(0o755)  # let both reach the socket; its own mode decides

        def connect() -> bytes:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(str(path))
                except PermissionError:
                    return b"denied"
            return b"connected"

        assert run_as(a.uid, a.gid, a.supplementary_gids, connect)[1] == b"connected"
        assert run_as(b.uid, b.gid, [], connect)[1] == b"denied"
    finally:
        sock.close()
        shutil.rmtree(sockdir, ignore_errors=True)


@needs_root
@pytest.mark.parametrize("case", ["another uid's", "a symlink to another uid's",
                                  "group-writable", "sticky but world-writable",
                                  "under an other-writable directory", "under another uid's"])
def test_a_socket_directory_another_account_controls_is_refused(case: str) -> None:
    # [hardening] finding 2: a directory another uid made in /tmp (or a symlink to one) was
    # accepted; that uid replaced the socket and received a root client's prompt.
    nobody = pwd.getpwnam("nobody").pw_uid
    base = Path(tempfile.mkdtemp(prefix="ea-sd-", dir="/tmp"))
    try:
        base.chmod(0o755)
        d = base / "run"
        d.mkdir(mode=0o750)
        if case == "another uid's":
            os.chown(d, nobody, -1)
        elif case == "a symlink to another uid's":
            theirs = base / "theirs"
            theirs.mkdir(mode=0o750)
            os.chown(theirs, nobody, -1)
            d = base / "link"
            d.symlink_to(theirs)
        elif case == "group-writable":
            d.chmod(0o770)
        elif case == "sticky but world-writable":
            d.chmod(0o1777)
        elif case == "under an other-writable directory":
            base.chmod(0o777)
        else:
            os.chown(base, nobody, -1)
        with pytest.raises(ListenerError) as err:
            bind_unix_socket(d / "agent.sock")
        assert str(d) in str(err.value) or str(base) in str(err.value), err.value
        assert not os.path.lexists(d / "agent.sock")
        # The same path, once it is the daemon's own private directory, is accepted.
        shutil.rmtree(base)
        base.mkdir(mode=0o755)
        sock = bind_unix_socket(base / "run" / "agent.sock")
        sock.close()
        assert oct((base / "run").stat().st_mode & 0o777) == "0o750"
    finally:
        shutil.rmtree(base, ignore_errors=True)


@needs_root
def test_subject_for_uid_matches_the_account(accounts: dict[str, Account]) -> None:
    a = accounts["member"]
    s = subject_for_uid(a.uid)
    assert (s.user, s.gid) == (a.user, a.gid)
    assert s.groups == {a.primary, *a.supplementary}


# ---------------------------------------------------------------------------- unit


def test_display() -> None:
    assert Subject(kind="uid", uid=1000, user="alice").display == "uid:1000(alice)"
    assert Subject(kind="uid", uid=4321).display == "uid:4321"
    assert Subject(kind="token", token="kiosk", role="app", uid=1000).display == "token:kiosk"


def test_uid_without_account() -> None:
    user, groups = lookup_account(2_000_000_001, 2_000_000_001)
    assert user is None and groups == frozenset()


def test_root_account() -> None:
    user, groups = lookup_account(0, 0)
    assert user == "root" and "root" in groups


class FakeLookup:
    def __init__(self) -> None:
        self.calls = 0
        self.groups = frozenset({"g1"})

    def __call__(self, uid: int, gid: int | None) -> tuple[str | None, frozenset[str]]:
        self.calls += 1
        return f"user{uid}", self.groups


def test_cache_ttl_and_invalidate() -> None:
    now = [100.0]
    lookup = FakeLookup()
    cache = IdentityCache(30.0, clock=lambda: now[0], lookup=lookup)
    cred = PeerCredentials(pid=7, uid=1000, gid=1000)
    s = cache.subject(cred)
    assert (s.uid, s.gid, s.pid, s.user, s.groups) == (1000, 1000, 7, "user1000", {"g1"})
    lookup.groups = frozenset({"g2"})
    assert cache.subject(cred).groups == {"g1"} and lookup.calls == 1
    # A different pid of the same uid hits the cache; the pid is the new one.
    assert cache.subject(PeerCredentials(pid=8, uid=1000, gid=1000)).pid == 8
    now[0] += 31
    assert cache.subject(cred).groups == {"g2"} and lookup.calls == 2
    lookup.groups = frozenset({"g3"})
    cache.invalidate()
    assert cache.subject(cred).groups == {"g3"} and lookup.calls == 3


def test_cache_is_bounded() -> None:
    lookup = FakeLookup()
    cache = IdentityCache(30.0, clock=lambda: 0.0, lookup=lookup, max_entries=4)
    for uid in range(10):
        cache.account(uid, None)
    assert len(cache._entries) <= 4
