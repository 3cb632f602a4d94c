"""The device root: tolerant reads under a directory laid out like a device's `/`.

Hardware detection reads everything through `DeviceRoot`, so a file that is missing,
unreadable, not a regular file or oversized reads as "not present" instead of raising.
The same code then serves the live system (`/`) and captured trees (support bundles,
test fixtures under `tests/fixtures/hw/`).

Trees built from captures differ from a live system in two ways detection accepts: a
sysfs `driver` may be a plain file holding the driver's name instead of a symlink
(`DeviceRoot.link_name`), and device nodes such as `dev/accel/accel0` are empty regular
files. Command outputs a support bundle carries inside the tree live under `CAPTURE_DIR`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# proc/sys attributes are a few KiB at most; anything bigger is junk, not data.
MAX_READ_BYTES = 1 << 20
# Where a captured tree keeps what commands printed (nvidia-smi, the runtimes probe).
CAPTURE_DIR = "var/lib/edge-agent/capture"


@dataclass(frozen=True)
class DeviceRoot:
    """The directory that stands for `/`; all paths given to its methods are relative."""

    path: Path

    @property
    def is_live(self) -> bool:
        """True when this is the running system's own `/`."""
        try:
            return self.path.resolve() == Path("/").resolve()
        except OSError:
            return False

    def join(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")

    def read_bytes(self, rel: str, limit: int = MAX_READ_BYTES) -> bytes | None:
        p = self.join(rel)
        try:
            # is_file() first: opening a FIFO or device node in a junk tree would block.
            if not p.is_file():
                return None
            with p.open("rb") as f:
                return f.read(limit)
        except (OSError, ValueError):
            return None

    def read_text(self, rel: str, limit: int = MAX_READ_BYTES) -> str | None:
        data = self.read_bytes(rel, limit)
        return None if data is None else data.decode("utf-8", errors="replace")

    def read_line(self, rel: str) -> str | None:
        """The first line, stripped of whitespace and NULs; None when absent or blank."""
        text = self.read_text(rel, 64 * 1024)
        if text is None:
            return None
        line = text.split("\n", 1)[0].strip().strip("\x00").strip()
        return line or None

    def read_hex(self, rel: str) -> int | None:
        """A sysfs hex attribute such as `0x10de`; None when absent or malformed."""
        line = self.read_line(rel)
        if line is None:
            return None
        try:
            return int(line, 16)
        except ValueError:
            return None

    def exists(self, rel: str) -> bool:
        try:
            return self.join(rel).exists() or self.join(rel).is_symlink()
        except OSError:
            return False

    def is_dir(self, rel: str) -> bool:
        try:
            return self.join(rel).is_dir()
        except OSError:
            return False

    def children(self, rel: str) -> list[str]:
        """Sorted entry names of a directory; empty when it is absent or unreadable."""
        try:
            return sorted(p.name for p in self.join(rel).iterdir())
        except (OSError, ValueError):
            return []

    def link_name(self, rel: str) -> str | None:
        """The last component of a sysfs link such as `driver -> ../../drivers/nvidia`.

        Fixture trees cannot rely on symlinks surviving every tool, so a plain file of
        the same name holding the target's name (`nvidia`) is accepted as well.
        """
        p = self.join(rel)
        try:
            if p.is_symlink():
                return p.readlink().name or None
            if p.is_file():
                return self.read_line(rel)
        except (OSError, ValueError):
            return None
        return None
