"""systemd integration: sd_notify (READY, STOPPING, WATCHDOG) without libsystemd.

The protocol is one datagram to $NOTIFY_SOCKET; a library would add a C dependency.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket


def notify(message: str) -> bool:
    """Send one sd_notify message; False when not run by systemd (no NOTIFY_SOCKET)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # abstract namespace
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        # Called on the event loop: a receiver that stops reading (its queue holds ~10
        # datagrams) must not stall the daemon. A ping is dropped at once, READY/STOPPING
        # wait a little. (A test harness that read its socket only now and then froze the
        # agent after ten watchdog pings.)
        sock.settimeout(0 if message == "WATCHDOG=1" else 2.0)
        try:
            sock.connect(addr)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC in seconds, when systemd asked for pings (for this pid)."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1_000_000 / 2


async def watchdog_loop(interval: float) -> None:
    """Ping the watchdog while the event loop is healthy; cancelled on stop."""
    with contextlib.suppress(asyncio.CancelledError):
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)
