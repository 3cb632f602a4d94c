"""Listeners: the API Unix socket (or one systemd hands us), optional TCP; peer credentials.

The Unix socket is created here rather than by aiohttp so we control its mode, group and
stale-file handling, and so every request can read the kernel-verified credentials of
its connection (SO_PEERCRED) — the identity RBAC builds on.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
import stat
import struct
from pathlib import Path

from aiohttp import web

from agent.errors import ListenerError
from agent.security.identity import PeerCredentials

MAX_SOCKET_PATH = 107  # sun_path is 108 bytes including the terminating NUL
SD_LISTEN_FDS_START = 3


_UCRED = struct.Struct("3i")


def peer_credentials(request: web.BaseRequest) -> PeerCredentials | None:
    """SO_PEERCRED of the request's connection; None for TCP connections."""
    transport = request.transport
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def peer_name(request: web.BaseRequest) -> str:
    """Who is connected, as per-client limits count them: "uid:1000" on the Unix socket
    (kernel-verified, so it cannot be forged), "addr:127.0.0.1" over TCP."""
    cred = peer_credentials(request)
    return f"uid:{cred.uid}" if cred is not None else f"addr:{request.remote}"


def _live_listener(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            return False
        raise
    finally:
        probe.close()
    return True


def bind_unix_socket(path: Path, *, mode: int = 0o660, group: str | None = None) -> socket.socket:
    """Create the listening socket: parent 0750, socket `mode`, stale file replaced.

    Refuses if another process is accepting on `path`: two agents must never share a
    registry by accident.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise ListenerError(
            f"socket path {path} is {len(os.fsencode(path))} bytes; the limit is "
            f"{MAX_SOCKET_PATH} — choose a shorter EDGE_AGENT_SOCKET"
        )
    gid = _group_id(group) if group else -1
    parent = path.absolute().parent
    if not os.path.lexists(parent):
        parent.mkdir(parents=True, mode=0o750)
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        try:  # on the directory we just made, not on whatever the path names by now
            os.fchmod(fd, 0o750)
            if gid != -1:
                os.fchown(fd, -1, gid)
        finally:
            os.close(fd)
    check_socket_directory(parent)
    if path.exists() or path.is_symlink():
        st = path.lstat()
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(f"{path} exists and is not a socket; refusing to replace it")
        if _live_listener(path):
            raise ListenerError(f"another edge-agent is already serving on {path}")
        path.unlink()  # stale: left by a process that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    path.chmod(mode)
    if gid != -1:
        os.chown(path, -1, gid)
    sock.listen(128)
    sock.setblocking(False)
    return sock


def check_socket_directory(parent: Path) -> None:
    """Refuse a socket directory another account could have made or can write into.

    Only "world-writable without the sticky bit" used to be refused: a directory that
    another uid created in /tmp (or a symlink to one) was accepted, and that uid replaced
    the socket and received a root client's prompt ([hardening] finding 2). Now the
    directory itself must be a real directory (not a symlink) owned by this daemon's euid
    or root and writable by no one else; each directory above it must be owned by root or
    the euid and, if others may write into it, sticky (as /tmp is: nobody else can then
    rename what sits in it)."""
    euid = os.geteuid()
    st = parent.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise ListenerError(f"socket directory {parent} is a symlink; name the real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise ListenerError(f"{parent} is not a directory")
    if st.st_uid not in (euid, 0):
        raise ListenerError(f"socket directory {parent} belongs to uid {st.st_uid}, not to this "
                            f"daemon (uid {euid}) or root; use a directory of your own")
    if st.st_mode & 0o022:
        raise ListenerError(f"socket directory {parent} is writable by group or others (mode "
                            f"{stat.S_IMODE(st.st_mode):04o}); use a private one (0750)")
    for above in parent.parents:
        st = above.stat()
        link = above.lstat()
        owners = {st.st_uid, link.st_uid}
        if not owners <= {euid, 0}:
            raise ListenerError(f"{above}, above the socket directory, belongs to uid "
                                f"{max(owners - {euid, 0})}: another account could swap "
                                "the socket directory; choose a path owned by root or you")
        if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
            raise ListenerError(f"{above}, above the socket directory, is writable by group "
                                "or others and not sticky: another account could swap the "
                                "socket directory")


def _group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError as exc:
        raise ListenerError(f"socket group {name!r} does not exist") from exc


def inherited_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_FDS), if meant for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    count = int(os.environ.get("LISTEN_FDS", "0"))
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        s = socket.socket(fileno=fd)
        s.setblocking(False)
        socks.append(s)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return socks


def socket_identity(path: Path) -> tuple[int, int]:
    """(device, inode) of the socket file we bound, to recognise it at exit."""
    st = path.stat()
    return st.st_dev, st.st_ino


def remove_socket_file(path: Path, identity: tuple[int, int]) -> None:
    """Unlink our socket file on shutdown, only if it is still the one we created."""
    with contextlib.suppress(OSError):
        if socket_identity(path) == identity:
            path.unlink()
