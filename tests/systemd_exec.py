"""Runs a command the way systemd runs a unit's ExecStart, for a machine where systemd is not
PID 1 (this one, CI): what the unit file says, applied to the process before it execs.

What is applied, read from the unit (nothing is hard-coded here):
- socket activation: the listening socket as fd 3, LISTEN_FDS=1, LISTEN_PID=<the pid that
  execs>, LISTEN_FDNAMES from the socket unit's name;
- sd_notify: NOTIFY_SOCKET; WatchdogSec= → WATCHDOG_USEC (and WATCHDOG_PID), unless the
  caller gives a shorter one to observe pings quickly;
- Environment= (specifiers %t %S %C %E), UMask=, RuntimeDirectory=, StateDirectory=,
  CacheDirectory=, ConfigurationDirectory= (created under a root directory, with their
  modes and $RUNTIME_DIRECTORY etc.);
- NoNewPrivileges=, CapabilityBoundingSet= (empty: every capability dropped from the
  bounding, permitted, effective, inheritable and ambient sets, so uid 0 is powerless);
- SystemCallFilter= (groups expanded by `systemd-analyze syscall-filter`, this systemd's own
  tables), SystemCallArchitectures=native, MemoryDenyWriteExecute= and
  RestrictAddressFamilies= as seccomp filters built the way systemd 252 builds them
  (libseccomp, one filter each); a call outside the allow list gets SystemCallErrorNumber=
  (else kills the process), as under systemd.

Not applied: the mount, user and cgroup namespaces (ProtectSystem=, PrivateTmp=, MemoryMax=,
...), which need systemd itself; `systemd-analyze verify` and `security` check those lines.

Run as `python systemd_exec.py UNIT -- ARGV...`, with the listening socket passed as fd
$EA_LISTEN_FD, the directories of StateDirectory= and the like under $EA_ROOT (instead
of /), and a JSON object of environment in $EA_EXTRA_ENV (for what a drop-in would set).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import re
import socket
import subprocess
import sys
from functools import cache
from pathlib import Path

Unit = dict[str, list[tuple[str, str]]]


def parse_unit(text: str) -> Unit:
    """Sections → (key, value) in file order; continuation lines joined, comments dropped."""
    out: Unit = {}
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            out.setdefault(section, [])
            continue
        key, _, value = line.partition("=")
        out.setdefault(section, []).append((key.strip(), value.strip()))
    return out


def values(unit: Unit, section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def last(unit: Unit, section: str, key: str, default: str = "") -> str:
    found = values(unit, section, key)
    return found[-1] if found else default


def seconds(value: str) -> float:
    """A systemd time span ("30s", "1min 30s", "500ms", "2") in seconds."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)\s*([a-z]*)", value):
        total += float(number) * units[unit or "s"]
    return total


# --------------------------------------------------------------------- system call sets


@cache
def syscall_groups() -> dict[str, list[str]]:
    """Every @group of this systemd, as `systemd-analyze syscall-filter` prints them."""
    text = subprocess.run(["systemd-analyze", "syscall-filter", "--no-pager"], check=True,
                          capture_output=True, text=True).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(names: list[str]) -> set[str]:
    groups = syscall_groups()
    out: set[str] = set()
    for name in names:
        if name.startswith("@"):
            out |= expand(groups[name])
        else:
            out.add(name)
    return out


def allowed_syscalls(unit: Unit) -> set[str] | None:
    """The allow list SystemCallFilter= lines add up to (None: no filter). As systemd does:
    the first line sets the kind; later lines add (plain) or remove (`~`); an allow list
    implicitly holds @default."""
    lines = values(unit, "Service", "SystemCallFilter")
    if not lines:
        return None
    assert not lines[0].startswith("~"), "the unit is expected to use an allow list"
    allowed = expand(["@default"])
    for line in lines:
        deny = line.startswith("~")
        names = expand(line.lstrip("~").split())
        allowed = allowed - names if deny else allowed | names
    return allowed


# ----------------------------------------------------------------------------- seccomp

_lib = ctypes.CDLL(ctypes.util.find_library("seccomp") or "libseccomp.so.2", use_errno=True)
_lib.seccomp_init.restype = ctypes.c_void_p
_lib.seccomp_init.argtypes = [ctypes.c_uint32]
_lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
_lib.seccomp_load.argtypes = [ctypes.c_void_p]
_lib.seccomp_release.argtypes = [ctypes.c_void_p]

ACT_KILL_PROCESS = 0x80000000
ACT_ALLOW = 0x7FFF0000
CMP_EQ, CMP_GT, CMP_MASKED_EQ = 4, 6, 7
PROT_WRITE, PROT_EXEC, SHM_EXEC = 0x2, 0x4, 0o100000
AF_MAX = 46
FAMILIES = {"AF_UNIX": socket.AF_UNIX, "AF_INET": socket.AF_INET, "AF_INET6": socket.AF_INET6}


def act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


_lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                        ctypes.c_uint, ctypes.POINTER(_ArgCmp)]


class Filter:
    """One seccomp filter (native architecture only; others are killed, as
    SystemCallArchitectures=native)."""

    def __init__(self, default: int) -> None:
        self.ctx = _lib.seccomp_init(default)
        assert self.ctx, "seccomp_init failed"

    def add(self, action: int, name: str, *cmps: tuple[int, int, int, int]) -> None:
        nr = _lib.seccomp_syscall_resolve_name(name.encode())
        if nr < 0:  # not a system call of this architecture
            return
        arr = (_ArgCmp * max(len(cmps), 1))(*[_ArgCmp(*c) for c in cmps])
        rc = _lib.seccomp_rule_add_array(self.ctx, action, nr, len(cmps), arr)
        assert rc == 0, f"seccomp rule for {name}: {os.strerror(-rc)}"

    def load(self) -> None:
        rc = _lib.seccomp_load(self.ctx)
        assert rc == 0, f"seccomp_load: {os.strerror(-rc)}"
        _lib.seccomp_release(self.ctx)


def syscall_filter(allowed: set[str], denied_action: int) -> Filter:
    f = Filter(denied_action)
    for name in sorted(allowed):
        f.add(ACT_ALLOW, name)
    return f


def mdwe_filter() -> Filter:
    """MemoryDenyWriteExecute=yes as systemd 252 installs it (seccomp, EPERM)."""
    f = Filter(ACT_ALLOW)
    wx = PROT_WRITE | PROT_EXEC
    f.add(act_errno(errno.EPERM), "mmap", (2, CMP_MASKED_EQ, wx, wx))
    f.add(act_errno(errno.EPERM), "mprotect", (2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
    f.add(act_errno(errno.EPERM), "pkey_mprotect", (2, CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
    f.add(act_errno(errno.EPERM), "shmat", (2, CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
    return f


def address_family_filter(names: list[str]) -> Filter:
    """RestrictAddressFamilies= (an allow list): socket() of any other family fails."""
    allowed = {FAMILIES[n] for n in names}
    f = Filter(ACT_ALLOW)
    refuse = act_errno(errno.EAFNOSUPPORT)
    for family in range(AF_MAX + 1):
        if family not in allowed:
            f.add(refuse, "socket", (0, CMP_EQ, family, 0))
    f.add(refuse, "socket", (0, CMP_GT, AF_MAX, 0))
    return f


# ----------------------------------------------------------------------- capabilities

PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 24, 47, 4
_libc = ctypes.CDLL(None, use_errno=True)


def _prctl(*args: int) -> None:
    if _libc.prctl(*[ctypes.c_ulong(a) for a in args]) != 0:
        raise OSError(ctypes.get_errno(), f"prctl{args}")


def drop_all_capabilities() -> None:
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for cap in range(last_cap + 1):
        _prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    libcap = ctypes.CDLL(ctypes.util.find_library("cap") or "libcap.so.2", use_errno=True)
    libcap.cap_init.restype = ctypes.c_void_p
    libcap.cap_set_proc.argtypes = [ctypes.c_void_p]
    empty = libcap.cap_init()  # permitted, effective and inheritable all clear
    if libcap.cap_set_proc(empty) != 0:
        raise OSError(ctypes.get_errno(), "cap_set_proc")


def capabilities_now() -> dict[str, int]:
    """The Cap* lines of /proc/self/status, as integers."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Cap"):
            key, _, value = line.partition(":")
            out[key] = int(value.strip(), 16)
    return out


# ------------------------------------------------------------ directories and socket

# systemd's directory settings: where each lives under `root` (/ on a real system), the
# environment variable that names it, and the specifier that expands to its parent.
DIRECTORIES = {
    "RuntimeDirectory": ("run", "RUNTIME_DIRECTORY", "%t"),
    "StateDirectory": ("var/lib", "STATE_DIRECTORY", "%S"),
    "CacheDirectory": ("var/cache", "CACHE_DIRECTORY", "%C"),
    "ConfigurationDirectory": ("etc", "CONFIGURATION_DIRECTORY", "%E"),
}


def specifiers(root: Path) -> dict[str, str]:
    return {spec: str(root / parent) for parent, _, spec in DIRECTORIES.values()}


def expand_specifiers(value: str, root: Path) -> str:
    for spec, path in specifiers(root).items():
        value = value.replace(spec, path)
    return value


def make_directories(unit: Unit, root: Path) -> dict[str, str]:
    """Create the unit's *Directory= under `root` with their modes; their variables."""
    env = {}
    for key, (parent, variable, _) in DIRECTORIES.items():
        names = last(unit, "Service", key).split()
        mode = int(last(unit, "Service", f"{key}Mode", "0755"), 8)
        for name in names:
            path = root / parent / name
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(mode)
        if names:
            env[variable] = ":".join(str(root / parent / n) for n in names)
    return env


def listen(socket_unit: Path, root: Path) -> tuple[socket.socket, Path]:
    """What the socket unit does: the ListenStream= path (under `root`), its directory
    (DirectoryMode=) and the socket's mode (SocketMode=), listening. Ownership
    (SocketUser=, SocketGroup=) is left to systemd: the test runs as one uid."""
    unit = parse_unit(socket_unit.read_text())
    path = root / last(unit, "Socket", "ListenStream").lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(int(last(unit, "Socket", "DirectoryMode", "0755"), 8))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    path.chmod(int(last(unit, "Socket", "SocketMode", "0666"), 8))
    sock.listen(int(last(unit, "Socket", "Backlog", "4096")))
    return sock, path


def exec_start(unit: Unit) -> list[str]:
    """ExecStart= as argv (no quoting or prefixes are used in our units)."""
    return last(unit, "Service", "ExecStart").split()


# ---------------------------------------------------------------------------- the exec


def main(argv: list[str]) -> None:
    unit_path, sep, *command = argv
    assert sep == "--" and command
    unit = parse_unit(Path(unit_path).read_text())
    root = Path(os.environ.get("EA_ROOT", "/"))
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    for assignment in values(unit, "Service", "Environment"):
        for item in assignment.split():
            key, _, value = item.strip('"').partition("=")
            env[key] = expand_specifiers(value, root)
    env |= make_directories(unit, root)
    env |= json.loads(os.environ.get("EA_EXTRA_ENV", "{}"))
    pid = str(os.getpid())  # exec keeps the pid: what systemd sets in the child it forked
    if "EA_LISTEN_FD" in os.environ:
        fd = int(os.environ["EA_LISTEN_FD"])
        if fd != 3:
            os.dup2(fd, 3)
            os.close(fd)
        os.set_inheritable(3, True)
        env |= {"LISTEN_FDS": "1", "LISTEN_PID": pid,
                "LISTEN_FDNAMES": Path(unit_path).with_suffix(".socket").name}
    if "WATCHDOG_USEC" in env:
        env["WATCHDOG_PID"] = pid
    elif last(unit, "Service", "WatchdogSec"):
        env |= {"WATCHDOG_USEC": str(int(seconds(last(unit, "Service", "WatchdogSec")) * 1e6)),
                "WATCHDOG_PID": pid}
    os.umask(int(last(unit, "Service", "UMask", "0022"), 8))
    if last(unit, "Service", "NoNewPrivileges") == "yes":
        _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if values(unit, "Service", "CapabilityBoundingSet") == [""]:
        drop_all_capabilities()
    filters: list[Filter] = []
    families = last(unit, "Service", "RestrictAddressFamilies")
    if families:
        filters.append(address_family_filter(families.split()))
    if last(unit, "Service", "MemoryDenyWriteExecute") == "yes":
        filters.append(mdwe_filter())
    allowed = allowed_syscalls(unit)
    if allowed is not None:
        assert last(unit, "Service", "SystemCallArchitectures") == "native"
        code = last(unit, "Service", "SystemCallErrorNumber")
        denied = act_errno(getattr(errno, code)) if code else ACT_KILL_PROCESS
        filters.append(syscall_filter(allowed, denied))  # last: it must allow the others' loads
    for f in filters:
        f.load()
    os.execve(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
