"""`edge-agent serve`: listeners up, systemd told, signals handled, clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import gc
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from aiohttp import web

from agent.app import create_app
from agent.server import (
    bind_unix_socket,
    inherited_sockets,
    remove_socket_file,
    socket_identity,
)
from agent.settings import LoggingSettings, Settings
from agent.state import STATE, AgentState
from agent.systemd import notify, watchdog_interval, watchdog_loop

log = logging.getLogger("agent")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(cfg: LoggingSettings) -> None:
    handler = logging.StreamHandler(_log_stream())
    if cfg.json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(cfg.level.upper())
    # aiohttp's access log would print every path at INFO; keep it at debug level.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    logging.getLogger("agent.http").setLevel(
        logging.DEBUG if cfg.level == "debug" else logging.WARNING
    )


def _log_stream() -> TextIO:
    """stderr, through a descriptor of its own: llama-cpp-python points fd 2 at /dev/null
    while it loads a model (verbose=False), which silenced every thread's log lines for
    those seconds, llama.cpp's own (routed to the debug log) among them."""
    try:
        fd = os.dup(sys.stderr.fileno())
    except (AttributeError, OSError, ValueError):  # no real stderr: log where Python does
        return sys.stderr
    return os.fdopen(fd, "w", buffering=1, encoding=sys.stderr.encoding or "utf-8",
                     errors="backslashreplace")


def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit code.
    `on_ready` runs once it serves (just before READY=1): `serve --try-it` prints there,
    so nothing claims to serve before the socket is bound."""
    configure_logging(settings.logging)
    # SIGUSR1 prints every thread's stack to stderr (the journal): what an operator needs to
    # see where a stuck daemon is stuck, without a debugger on the device.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    inherited = inherited_sockets()
    socks = inherited or [
        bind_unix_socket(
            settings.socket, mode=settings.server.socket_mode, group=settings.server.socket_group
        )
    ]
    identity = None if inherited else socket_identity(settings.socket)
    try:
        app = create_app(settings)
        # Start-up leaves ~140k long-lived objects; a full GC pass over them stalls the
        # event loop for 50-70 ms. Freeze them out of GC (bench/serve.py, p99 latency).
        gc.collect()
        gc.freeze()
        asyncio.run(_run(app, socks, settings, on_ready))
    finally:
        if identity is not None:
            remove_socket_file(settings.socket, identity)
    return 0


async def _run(app: web.Application, socks: list, settings: Settings,  # type: ignore[type-arg]
               on_ready: Callable[[], None] | None = None) -> None:
    grace = settings.server.shutdown_grace_seconds
    runner = web.AppRunner(
        app,
        handle_signals=False,
        handler_cancellation=True,
        shutdown_timeout=grace,
        access_log=log.getChild("http"),
        # aiohttp closes a connection that has not sent a whole request head this long
        # after it opened or its previous response ended: slow senders, idle keep-alives.
        keepalive_timeout=settings.server.header_timeout_seconds,
        # After an answer sent before the body was read (401, 413, 429), aiohttp reads and
        # drops the rest of the body for this long, so the client can read the answer; a
        # client trickling it keeps its connection no longer than a body may take.
        lingering_time=min(10.0, settings.server.body_timeout_seconds),
    )
    await runner.setup()
    for sock in socks:
        await web.SockSite(runner, sock, shutdown_timeout=grace).start()
    if settings.server.tcp_enabled:
        await web.TCPSite(
            runner, "127.0.0.1", settings.server.tcp_port, shutdown_timeout=grace
        ).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    reloads: set[asyncio.Task[None]] = set()

    def on_hup() -> None:
        # systemd's notify-reload protocol: RELOADING=1 ... READY=1 once it took effect.
        # A signal carries no sender we can read: the audit record names the signal.
        notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        app[STATE].security.reload_policy("signal:SIGHUP")  # invalid: the old one stays
        task = loop.create_task(app[STATE].sync.reload(), name="sync-reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)
        notify("READY=1")

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    watchdog = None
    interval = watchdog_interval()
    if interval:
        watchdog = asyncio.create_task(watchdog_loop(interval), name="sd-watchdog")
    if on_ready is not None:
        on_ready()  # listening: before READY=1, so whoever waits on READY sees its output
    notify("READY=1")
    where = [str(Path(s.getsockname())) for s in socks if isinstance(s.getsockname(), str)]
    log.info("serving on %s", ", ".join(where) or "inherited sockets")
    await stop.wait()
    notify("STOPPING=1")
    log.info("stopping: finishing in-flight requests (grace %.0fs)", grace)
    state = app[STATE]
    state.stopping = True
    # Generations still running near the end of the grace period are ended by the agent,
    # so their clients get a final event instead of a cut connection.
    ender = asyncio.create_task(_end_generations(state, grace * 0.8), name="end-generations")
    if watchdog is not None:
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
    await runner.cleanup()
    ender.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ender


async def _end_generations(state: AgentState, after: float) -> None:
    await asyncio.sleep(after)
    await state.scheduler.close(0)
