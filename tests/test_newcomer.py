"""The README's quick start, run as a newcomer runs it: the marked blocks
(`<!-- quickstart … -->` before a fenced block), as printed, in a copy of the checkout.

The first block (`make run`) runs in the background like the first terminal; the test
waits for the daemon's own READY=1 over sd_notify (NOTIFY_SOCKET goes to that block only),
never on a sleep. Every later block then runs "in another terminal": same directory, no
EDGE_* variables (`make test` exports some; they are removed for every block), shell
blocks with bash, Python blocks with the venv's Python (the README says so). A block fails
the test if it exits non-zero, prints nothing, or prints an API error.

The copy shares this checkout's set-up venv through a `.venv` symlink, so nothing is
installed or compiled; its files keep their modification times, none newer than the
venv's stamp, so its `make setup` has nothing to do (were it to run, it would point the
shared venv's editable install at the copy). The daemon's default model comes from the
offline package (a copy), so one run costs one daemon start and three small answers.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAMP = ROOT / ".venv" / ".setup-done"
READY_WITHIN = 180  # seconds: make's checks, the model's copy, the daemon's start
BLOCK_WITHIN = 120  # seconds for each later block (one short answer on a slow CPU)
pytestmark = [pytest.mark.slow, pytest.mark.timeout(READY_WITHIN + 4 * BLOCK_WITHIN)]

MARKED = re.compile(r"^<!-- quickstart\b[^>]*-->\n```(\w+)\n(.*?)^```", re.M | re.S)


@dataclass(frozen=True)
class Block:
    lang: str
    text: str

    @property
    def name(self) -> str:
        return self.text.split()[0]


def quickstart() -> list[Block]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [Block(lang, body) for lang, body in MARKED.findall(text)]


BLOCKS = quickstart()


def clean_env() -> dict[str, str]:
    """This environment as a new terminal has it: no edge-agent settings, no outer make."""
    drop = ("EDGE_", "NOTIFY_SOCKET", "LISTEN_", "WATCHDOG_", "MAKEFLAGS", "MAKELEVEL",
            "MFLAGS")
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def copy_checkout(dest: Path) -> None:
    """The checkout's files (tracked, and new ones not ignored), their times kept but none
    newer than the venv's stamp; `.venv` is this checkout's, linked."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, check=True, capture_output=True,
    ).stdout.decode()
    stamp = STAMP.stat().st_mtime
    for rel in filter(None, listed.split("\0")):
        src = ROOT / rel
        if not src.is_file():  # deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        st = target.stat()
        if st.st_mtime >= stamp:
            os.utime(target, (st.st_atime, stamp - 1))
    (dest / ".venv").symlink_to(ROOT / ".venv")


@dataclass
class Checkout:
    path: Path
    log: Path


@pytest.fixture(scope="module")
def started() -> Iterator[Checkout]:
    """The first block, running in a copy of the checkout, once the daemon is ready."""
    assert STAMP.exists(), "run `make setup` first: the test reuses its venv"
    assert BLOCKS and BLOCKS[0].lang == "sh", "the quick start begins with a shell block"
    # Short: the socket path (work/var/agent.sock) must fit a sockaddr_un.
    work = Path(tempfile.mkdtemp(prefix="ea-new-", dir="/tmp"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    proc: subprocess.Popen[bytes] | None = None
    log = work / "first-terminal.log"
    stamp_before = STAMP.stat().st_mtime_ns
    try:
        checkout = work / "checkout"
        copy_checkout(checkout)
        notify_path = work / "notify"
        notify.bind(str(notify_path))
        notify.settimeout(0.5)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-e", "-o", "pipefail", "-c", BLOCKS[0].text], cwd=checkout,
                env={**clean_env(), "NOTIFY_SOCKET": str(notify_path)},
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_WITHIN
        messages: list[str] = []
        while "READY=1" not in messages:
            if proc.poll() is not None:
                pytest.fail(f"{BLOCKS[0].text.strip()!r} exited {proc.returncode} before "
                            f"the daemon was ready:\n{log.read_text()[-6000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"no READY=1 within {READY_WITHIN} s:\n{log.read_text()[-6000:]}")
            with contextlib.suppress(TimeoutError):
                messages.extend(notify.recv(4096).decode().split("\n"))
        assert STAMP.stat().st_mtime_ns == stamp_before, "the copy's make re-ran the set-up"
        yield Checkout(checkout, log)
    finally:
        if proc is not None:
            _interrupt(proc)
        notify.close()
        shutil.rmtree(work, ignore_errors=True)


def _interrupt(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C in the first terminal: SIGINT to its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_the_readme_marks_a_quick_start() -> None:
    names = [b.name for b in BLOCKS]
    assert names[:1] == ["make"], names
    assert "curl" in names and "import" in names, names
    assert any(n.endswith("edge-agent") for n in names), names


@pytest.mark.parametrize("block", BLOCKS[1:], ids=lambda b: f"{b.lang}-{b.name}")
def test_the_quickstart_block_works_as_printed(started: Checkout, block: Block) -> None:
    if block.lang == "python":
        argv = [str(started.path / ".venv/bin/python"), "-c", block.text]
    else:
        assert block.lang == "sh", f"no way to run a {block.lang} block"
        argv = ["bash", "-e", "-o", "pipefail", "-c", block.text]
    result = subprocess.run(argv, cwd=started.path, env=clean_env(), stdin=subprocess.DEVNULL,
                            capture_output=True, text=True, timeout=BLOCK_WITHIN, check=False)
    said = f"{block.text}\n--- stdout\n{result.stdout}\n--- stderr\n{result.stderr}"
    assert result.returncode == 0, said + _daemon_log(started)
    assert result.stdout.strip(), "printed nothing:\n" + said
    assert '"error"' not in result.stdout, said + _daemon_log(started)


def _daemon_log(started: Checkout) -> str:
    return f"\n--- first terminal (make run)\n{started.log.read_text()[-4000:]}"
