"""The MQTT client of the fleet link: one named thread, TLS with the device certificate, a
retained birth and last will, reconnects with capped exponential backoff and jitter, and
every callback hopped onto the daemon's event loop.

Anchors: paho's own reconnect (capped backoff, reset on CONNACK) and Home Assistant's MQTT
client (callbacks onto the loop with `call_soon_threadsafe`, resubscribe on connect, birth
and retained will, no retries on bad credentials). Each connection gets a fresh paho
client, so nothing from a dead connection (queued publishes, message ids) leaks into the
next: the outbox, not paho's memory, is what gets resent.

Refusals that retrying cannot fix stop the link and are reported with their reason: the
broker's certificate fails verification against the fleet CA, the broker rejects the
device's certificate (TLS alert: bad, unknown CA, expired, revoked, required), or CONNACK
says not authorized / bad credentials / banned. `retry()` starts again (new certificate).
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

log = logging.getLogger(__name__)

LinkState = Literal["stopped", "connecting", "connected", "backoff", "failed"]
# TLS alerts and verification failures: the certificates are wrong, not the network.
_FATAL_TLS = (
    "bad certificate", "unknown ca", "certificate expired", "certificate revoked",
    "certificate required", "certificate unknown", "unsupported certificate",
    "access denied", "certificate verify failed",
)
# CONNACK reason codes that mean "these credentials will never be accepted".
_FATAL_CONNACK = frozenset({0x84, 0x85, 0x86, 0x87, 0x8A, 0x8C})
_LOG_ERR = 8  # paho's MQTT_LOG_ERR


@dataclass(frozen=True, slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class LinkConfig:
    host: str
    port: int
    client_id: str
    tls: ssl.SSLContext
    keepalive: int
    will: Will
    subscriptions: tuple[str, ...]
    reconnect_min: float = 1.0
    reconnect_max: float = 120.0


@dataclass
class LinkStatus:
    state: LinkState = "stopped"
    since: float = field(default_factory=time.time)
    reason: str | None = None
    attempts: int = 0
    connected_at: float | None = None
    next_retry_at: float | None = None


class LinkHandlers:
    """What the link tells its owner, always on the event loop. Override what you need."""

    def connected(self) -> None: ...

    def disconnected(self, reason: str) -> None: ...

    def failed(self, reason: str) -> None: ...

    def published(self, mid: int, ok: bool, reason: str) -> None: ...

    def message(self, topic: str, payload: bytes, properties: Any) -> None: ...


def tls_context(cert: str, key: str, ca: str) -> ssl.SSLContext:
    """TLS 1.2+ with the device certificate, trusting only the fleet CA, host name checked."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


class MqttLink:
    """One connection at a time to the broker, in the thread "mqtt-link"."""

    def __init__(
        self,
        config: LinkConfig,
        loop: asyncio.AbstractEventLoop,
        handlers: LinkHandlers,
        *,
        rng: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self.config = config
        self.status = LinkStatus()
        self._loop = loop
        self._handlers = handlers
        self._rng = rng
        self._client: Any = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._retry = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._connack: int | None = None

    # -- control (event loop) ---------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="mqtt-link", daemon=True)
            self._thread.start()

    async def stop(self, timeout: float = 5.0) -> None:
        """Disconnect cleanly (no will) and join the thread."""
        self._stop.set()  # the link thread sends DISCONNECT itself (see `_session`)
        self._retry.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, timeout)

    def retry(self) -> None:
        """Leave the failed state and connect again (a new certificate was installed)."""
        self._retry.set()

    @property
    def connected(self) -> bool:
        return self.status.state == "connected"

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False,
        properties: Any = None,
    ) -> int | None:
        """Queue a message on the live connection; its message id, or None if not connected
        (the caller keeps the data: nothing is buffered in memory here)."""
        with self._lock:
            client = self._client
            if client is None or self.status.state != "connected":
                return None
            info = client.publish(topic, payload, qos=qos, retain=retain, properties=properties)
        if info.rc != 0:
            return None
        return int(info.mid)

    def subscribe(self, topic: str) -> bool:
        """Subscribe on the live connection (retained messages on it arrive at once); False
        if not connected. Not remembered across reconnects: callers ask again."""
        with self._lock:
            client = self._client
            if client is None or self.status.state != "connected":
                return False
            rc, _ = client.subscribe(topic, qos=1)
        return int(rc) == 0

    def unsubscribe(self, topic: str) -> None:
        with self._lock:
            if self._client is not None and self.status.state == "connected":
                self._client.unsubscribe(topic)

    # -- the thread -------------------------------------------------------------------

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._set("connecting")
            fatal, reason = self._session()
            if self._stop.is_set():
                break
            if fatal:
                self._set("failed", reason)
                self._hop(self._handlers.failed, reason)
                self._retry.clear()
                self._retry.wait()
                failures = 0
                continue
            if self.status.connected_at is not None and self._connack == 0:
                failures = 0  # the last session got its CONNACK: start backing off afresh
            failures += 1
            cap = min(self.config.reconnect_max, self.config.reconnect_min * 2 ** (failures - 1))
            delay = self._rng(cap / 2, cap)  # "equal jitter": never 0, never in lockstep
            self.status.next_retry_at = time.time() + delay
            self._set("backoff", reason)
            self._stop.wait(delay)
        self._set("stopped")

    def _session(self) -> tuple[bool, str]:
        """One connection until it ends; (fatal, reason)."""
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

        cfg = self.config
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=cfg.client_id,
                             protocol=mqtt.MQTTv5)
        client.tls_set_context(cfg.tls)
        client.will_set(cfg.will.topic, cfg.will.payload, qos=cfg.will.qos,
                        retain=cfg.will.retain)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_log = self._on_log
        # Only this thread touches the TLS socket. Driven by our own loop() (not
        # loop_start), paho writes a packet from whichever thread calls publish() unless a
        # write-registration callback is set; an OpenSSL connection used by two threads at
        # once corrupts the heap (a CI run died of "free(): corrupted unsorted chunks"
        # mid-download). With the callback, publish() only queues and wakes loop() here.
        client.on_socket_register_write = _queued_for_the_link_thread
        client.on_socket_unregister_write = _queued_for_the_link_thread
        self._last_error = None
        self._connack = None
        self.status.connected_at = None
        try:
            client.connect(cfg.host, cfg.port, keepalive=cfg.keepalive, clean_start=True)
        except ssl.SSLCertVerificationError as exc:
            return True, f"the broker's certificate is not trusted: {exc.verify_message}"
        except ssl.SSLError as exc:
            return _classify_tls(str(exc))
        except OSError as exc:
            return False, f"cannot reach {cfg.host}:{cfg.port}: {exc.strerror or exc}"
        with self._lock:
            self._client = client
        try:
            leaving: float | None = None
            while True:
                if leaving is None and self._stop.is_set():
                    leaving = time.monotonic() + 2.0  # a clean DISCONNECT: no will
                    client.disconnect()
                rc = client.loop(0.5)
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                if leaving is not None and time.monotonic() > leaving:
                    break
        finally:
            with self._lock:
                self._client = None
        if self._connack is not None and self._connack in _FATAL_CONNACK:
            return True, f"the broker refused the device: {_connack_name(self._connack)}"
        if self._connack is None and self._last_error is not None:
            fatal, why = _classify_tls(self._last_error)
            return fatal, why
        return False, self._last_error or "connection lost"

    # -- paho callbacks (network thread) ------------------------------------------------

    def _on_connect(self, client: Any, _userdata: Any, _flags: Any, reason: Any,
                    _props: Any) -> None:
        self._connack = int(reason.value)
        if reason.is_failure:
            self._last_error = f"CONNACK {reason}"
            client.disconnect()
            return
        for topic in self.config.subscriptions:
            client.subscribe(topic, qos=1)
        self.status.connected_at = time.time()
        self.status.attempts = 0
        self._set("connected")
        self._hop(self._handlers.connected)

    def _on_disconnect(self, _client: Any, _userdata: Any, _flags: Any, reason: Any,
                       _props: Any) -> None:
        if self.status.state == "connected":
            self._hop(self._handlers.disconnected, str(reason))

    def _on_publish(self, _client: Any, _userdata: Any, mid: int, reason: Any,
                    _props: Any) -> None:
        # 0x10 "No matching subscribers" is a success: the broker has the message.
        ok = not reason.is_failure or int(reason.value) == 0x10
        self._hop(self._handlers.published, mid, ok, str(reason))

    def _on_message(self, _client: Any, _userdata: Any, msg: Any) -> None:
        self._hop(self._handlers.message, msg.topic, bytes(msg.payload), msg.properties)

    def _on_log(self, _client: Any, _userdata: Any, level: int, text: str) -> None:
        if level == _LOG_ERR and "socket" in text:  # how a TLS 1.3 alert after the handshake shows
            self._last_error = text

    # -- helpers ----------------------------------------------------------------------

    def _set(self, state: LinkState, reason: str | None = None) -> None:
        if state != self.status.state:
            self.status.state = state
            self.status.since = time.time()
        if state in ("backoff", "failed"):
            self.status.reason = reason
            self.status.attempts += 1
        elif state == "connected":
            self.status.reason = None
            self.status.next_retry_at = None

    def _hop(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: the daemon is gone
            self._stop.set()


def _queued_for_the_link_thread(*_args: Any) -> None:
    """paho's write-registration hook: nothing to register, the link thread's loop() polls
    the socket for writing whenever packets are queued."""


def _classify_tls(text: str) -> tuple[bool, str]:
    low = text.lower().replace("_", " ")
    for marker in _FATAL_TLS:
        if marker in low:
            return True, f"the broker refused the device's certificate ({marker}): {text}"
    return False, f"TLS error: {text}"


def _connack_name(code: int) -> str:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    return str(ReasonCode(PacketTypes.CONNACK, identifier=code))
