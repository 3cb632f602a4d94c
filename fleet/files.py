"""Small files written whole or not at all, with their mode from the first byte: the keys,
certificates and enrollment state both ends of the fleet keep, and the audit's recorded
heads.

Each is written under a temporary name in its own directory (O_EXCL | O_NOFOLLOW: a link
planted there is not followed), given its mode by fchmod (whatever the umask), filled,
fsync'd, then renamed over the old one — or, for a key that must never be replaced,
hard-linked into place so that an existing file wins. A crash leaves the old file or the
new one, never a part; a full disk leaves no temporary file behind.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int, *, exclusive: bool = False,
                 owner: tuple[int, int] | None = None) -> None:
    """Put `data` at `path` with `mode` (and `owner`, when given). With `exclusive`, an
    existing `path` is kept and FileExistsError raised."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash of a process that had our pid
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        try:
            os.fchmod(fd, mode)
            if owner is not None:
                os.fchown(fd, *owner)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if exclusive:
            os.link(tmp, path)  # never overwrites
        else:
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # gone already after a rename
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename or link in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
