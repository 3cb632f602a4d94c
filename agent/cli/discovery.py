"""Which home and socket the CLI uses, and why: the discovery order, in one place.

A daemon started by `make run` serves on `./var/agent.sock` with its state in `./var`; a
CLI run in another terminal, with none of the Makefile's environment, must still find it.
Each of home and socket comes from the first of:

1. `--home` / `--socket` (before or after the subcommand);
2. `EDGE_AGENT_HOME` / `EDGE_AGENT_SOCKET`;
3. the settings file (`--config`, `EDGE_AGENT_CONFIG`, else `/etc/edge-agent/agent.toml`);
4. the development state dir that `make run` marks: `var/edge-agent-dev.toml` in the
   working directory or one above it — used only when none of 1-3 chose home or socket
   (it names both), and only when the marker and its directory belong to the caller or
   root and no one else may write them, so a directory another account controls (/tmp)
   cannot redirect anyone's CLI, root's least;
5. the system paths `/var/lib/edge-agent` and `/run/edge-agent/agent.sock`.

Every choice carries its origin, so messages can say which socket was tried and why.
"""

from __future__ import annotations

import logging
import os
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from agent.settings import ENV_PREFIX, Settings, config_path, load_settings

DEV_MARKER = "edge-agent-dev.toml"
"""Written by `make run` into its state dir (`var/`): the home and socket it serves."""

HOME_ENV = f"{ENV_PREFIX}HOME"
SOCKET_ENV = f"{ENV_PREFIX}SOCKET"

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Located:
    """The settings the CLI runs with, and where its home and socket came from (for
    messages such as "installing into /x (EDGE_AGENT_HOME)")."""

    settings: Settings
    home_origin: str
    socket_origin: str


@dataclass(frozen=True, slots=True)
class DevMarker:
    """A `make run` state dir: its marker file and the home and socket it names."""

    path: Path
    home: Path
    socket: Path


def locate(
    config: Path | None,
    home: Path | None = None,
    socket: Path | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Located:
    """The settings for this invocation, with home and socket chosen in the documented
    order (module docstring); a flag acts as the matching environment variable would."""
    env = dict(os.environ if environ is None else environ)
    file_keys = _file_keys(config_path(config, env))
    origins: dict[str, str] = {}
    for key, flag, var in (("home", home, HOME_ENV), ("socket", socket, SOCKET_ENV)):
        if flag is not None:
            env[var] = str(flag)
            origins[key] = f"--{key}"
        elif env.get(var):
            origins[key] = var
        elif key in file_keys:
            origins[key] = f"config file {config_path(config, env)}"
    if not origins:
        marker = find_dev_marker(Path.cwd() if cwd is None else cwd)
        if marker is not None:
            env[HOME_ENV], env[SOCKET_ENV] = str(marker.home), str(marker.socket)
            origins = dict.fromkeys(("home", "socket"), f"make run's state dir, {marker.path}")
    settings = load_settings(config, env)
    return Located(settings, origins.get("home", "default"), origins.get("socket", "default"))


def _file_keys(path: Path | None) -> set[str]:
    """Top-level keys of the settings file; an unreadable one is load_settings' to report."""
    if path is None:
        return set()
    try:
        return set(tomllib.loads(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return set()


def find_dev_marker(start: Path) -> DevMarker | None:
    """The nearest `var/edge-agent-dev.toml` at `start` or above that is safe to follow."""
    for folder in (start, *start.parents):
        candidate = folder / "var" / DEV_MARKER
        try:
            candidate.lstat()
        except OSError:
            continue
        return read_dev_marker(candidate)  # the nearest one decides, trusted or not
    return None


def read_dev_marker(path: Path) -> DevMarker | None:
    """The marker at `path` if it and its directory belong to this user or root and are
    writable by no one else (else None, with a warning saying why it was ignored)."""
    uid = os.geteuid()
    try:
        dir_st = path.parent.lstat()
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        log.warning("ignoring %s: %s", path, exc.strerror)
        return None
    try:
        st = os.fstat(fd)
        for what, s in (("its directory", dir_st), ("it", st)):
            if stat.S_ISLNK(s.st_mode) or s.st_uid not in (uid, 0) or s.st_mode & 0o022:
                log.warning("ignoring %s: %s belongs to uid %d with mode %o; only a file of "
                            "your own or root's that no one else can write is followed",
                            path, what, s.st_uid, stat.S_IMODE(s.st_mode))
                return None
        if not stat.S_ISREG(st.st_mode) or st.st_size > 4096:
            log.warning("ignoring %s: not a small regular file", path)
            return None
        data = tomllib.loads(os.read(fd, 4096).decode("utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return None
    finally:
        os.close(fd)
    # Relative paths are relative to where `make run` ran: the folder holding var/.
    base = path.parent.parent
    home = data.get("home", str(path.parent))
    sock = data.get("socket", str(Path(home) / "agent.sock"))
    if not isinstance(home, str) or not isinstance(sock, str):
        log.warning("ignoring %s: home and socket must be strings", path)
        return None
    return DevMarker(path, base / home, base / sock)
