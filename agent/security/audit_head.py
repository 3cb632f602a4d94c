"""The audit chain's signed head, recorded outside the database (`<home>/audit-head`).

Hash chain and checkpoints live in one SQLite file, so someone who can write that file can
delete the newest records together with the checkpoints that cover them, or empty the log,
and what remains still verifies. The writer therefore also records every checkpoint it
signs, `seq digest time`, one per line, in a small file next to the database (and logs it
at INFO, to the journal): `audit verify` fails when the log no longer reaches a recorded
head or holds a different record there. The file keeps the newest `KEEP` heads, never
moves backwards (a head at or below the newest recorded one is not written), and is
replaced atomically (temporary file, fsync, rename, fsync of the directory) under a
`flock` on the directory, since the daemon and the CLI may both sign. docs/audit.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from agent.errors import AuditError
from fleet.files import write_atomic

__all__ = ["HEAD_FILE", "KEEP", "Head", "read_heads", "record_heads"]

HEAD_FILE: Final = "audit-head"
KEEP: Final = 64  # heads kept: evidence of a rewrite survives this many later checkpoints
MODE: Final = 0o640  # like the database: who may read the log may check it
_LINE = re.compile(r"^(\d{1,19}) ([0-9a-f]{64}) (\S{1,40})$")


@dataclass(frozen=True, slots=True)
class Head:
    """One signed chain head as the writer recorded it."""

    seq: int
    digest: str
    time: str

    def line(self) -> str:
        return f"{self.seq} {self.digest} {self.time}\n"


def read_heads(path: Path) -> list[Head]:
    """The heads recorded in `path`, oldest first; [] if there is no file. A line that is
    not a head (the file was edited) is an `AuditError`; so are heads out of order."""
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        return []
    except (UnicodeDecodeError, ValueError) as exc:
        raise AuditError(f"{path} is not an audit head file: {exc}") from exc
    heads: list[Head] = []
    for n, raw in enumerate(text.splitlines(), 1):
        match = _LINE.fullmatch(raw)
        if match is None:
            raise AuditError(f"{path}:{n}: not a recorded head (the file was edited)")
        head = Head(int(match[1]), match[2], match[3])
        if heads and head.seq <= heads[-1].seq:
            raise AuditError(f"{path}:{n}: seq {head.seq} does not follow {heads[-1].seq} "
                             "(the file was edited)")
        heads.append(head)
    return heads


def record_heads(path: Path, new: Sequence[Head]) -> int:
    """Add the heads in `new` (ascending) to the file, durably, except those at or below a
    head recorded already; how many were added. An edited file is left alone
    (`AuditError`): `verify` keeps failing on it until a person has moved it aside."""
    with _locked(path.parent) as owner:
        heads = read_heads(path)
        last = heads[-1].seq if heads else 0
        added = [h for h in new if h.seq > last]
        if not added:
            return 0
        keep = [*heads, *added][-KEEP:]
        # Root's CLI signing a checkpoint: the file keeps the home's owner, so that the
        # daemon can still read and extend it.
        write_atomic(path, "".join(h.line() for h in keep).encode("ascii"), MODE,
                     owner=owner if os.geteuid() == 0 and owner[0] != 0 else None)
        return len(added)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[tuple[int, int]]:
    """An exclusive flock on the directory itself (no lock file whose owner could differ);
    yields the directory's (uid, gid)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        yield st.st_uid, st.st_gid
    finally:
        os.close(fd)

