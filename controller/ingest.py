"""An ingest worker: one MQTT 5 client on the shared subscription `$share/<group>/...`,
storing every device message through `FleetStore` and acknowledging it only once stored.

Run as many as the traffic needs, on any hosts: the broker splits the messages among the
group's members (no coordinator of ours), storing is idempotent, and a message whose
store fails is not acknowledged, so the broker delivers it again. By default a worker keeps
no broker session (`session_expiry_seconds` 0): one that is gone for good must not keep
receiving its share of the messages into a queue nobody reads, as a persistent member of
a shared subscription does. What reaches no worker is not lost: devices keep every batch
until a worker confirms it stored it, and send it again.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import ssl
import threading
import time
from typing import Any

from controller.settings import ControllerSettings
from controller.store import FleetStore, Rejected
from fleet.topics import ingest_filters, parse

log = logging.getLogger(__name__)



def tls_context(settings: ControllerSettings) -> ssl.SSLContext:
    from controller.pki import CA_CERT

    cert, key = settings.cert_files
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(settings.home / CA_CERT))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


class IngestWorker:
    """Stores what devices send until `stop` is set."""

    def __init__(self, settings: ControllerSettings, store: FleetStore,
                 name: str | None = None) -> None:
        self.settings = settings
        self.store = store
        self.name = name or f"ingest-{socket.gethostname()}-{os.getpid()}"
        self.stored = 0
        self.rejected = 0
        self.connected = threading.Event()

    def run(self, stop: threading.Event) -> None:
        failures = 0
        while not stop.is_set():
            try:
                self._session(stop)
                failures = 0
            except (OSError, ssl.SSLError) as exc:
                failures += 1
                log.warning("%s: broker unreachable: %s", self.name, exc)
            cap = min(60.0, 0.5 * 2 ** min(failures, 7))
            stop.wait(random.uniform(cap / 2, cap))  # noqa: S311 - jitter, not security

    def _session(self, stop: threading.Event) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name,
                             protocol=mqtt.MQTTv5, manual_ack=True)
        client.tls_set_context(tls_context(self.settings))
        topics = ingest_filters(self.settings.topic_prefix, self.settings.group)
        batch = _Batch(self.store)

        def on_connect(c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                log.error("%s: broker refused: %s", self.name, reason)
                return
            c.subscribe([(t, 1) for t in topics])
            self.connected.set()

        def on_message(c: Any, _u: Any, msg: Any) -> None:
            where = parse(self.settings.topic_prefix, msg.topic)
            if where is None:
                batch.done.append((msg.mid, msg.qos, None))
                return
            fleet, device, kind = where
            try:
                stored = self.store.handle(fleet, device, kind, bytes(msg.payload),
                                           batch.connection())
                self.stored += 1
            except Rejected as exc:
                self.rejected += 1
                log.warning("%s: %s", self.name, exc)
                batch.done.append((msg.mid, msg.qos, None))
                return
            except Exception:
                # Not stored (the database is down?): nothing of this batch is acknowledged;
                # dropping the connection makes the broker deliver it all again.
                log.exception("%s: storing a %s message failed; the batch will be redelivered",
                              self.name, kind)
                batch.abort()
                c.disconnect()
                return
            confirm = None
            if stored.first is not None:
                confirm = (f"{self.settings.topic_prefix}/{fleet}/{device}/ack",
                           json.dumps({"v": 1, "cls": kind, "first": stored.first,
                                       "last": stored.last}).encode())
            batch.add(kind, stored.records, (msg.mid, msg.qos, confirm))
            if len(batch.done) >= self.settings.batch_commit:
                batch.commit(c)

        client.on_connect = on_connect
        client.on_message = on_message
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = int(self.settings.session_expiry_seconds)
        expiry = self.settings.session_expiry_seconds
        client.connect(self.settings.broker_host, self.settings.broker_port, keepalive=30,
                       clean_start=expiry == 0, properties=props)
        try:
            while not stop.is_set():
                if client.loop(0.05) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    break
                if batch.done:  # nothing more arrived within the loop's wait: commit now
                    batch.commit(client)
        finally:
            batch.abort()
            self.connected.clear()
            if stop.is_set():
                # Leaving for good: end the session now, so the broker stops giving this
                # worker a share of the messages (a crash leaves it for the session expiry).
                bye = Properties(PacketTypes.DISCONNECT)  # type: ignore[no-untyped-call]
                bye.SessionExpiryInterval = 0
                client.disconnect(properties=bye)
                client.loop(0.5)


class _Batch:
    """Messages stored in one open transaction; acknowledged (PUBACK to the broker, then a
    confirmation to each device) only after it commits."""

    def __init__(self, store: FleetStore) -> None:
        self.store = store
        self._conn: Any = None
        self._tx: Any = None
        self.done: list[tuple[int, int, tuple[str, bytes] | None]] = []
        self.counts: dict[str, tuple[int, int]] = {}

    def connection(self) -> Any:
        if self._conn is None:
            self._conn = self.store.engine.connect()
            self._tx = self._conn.begin()
        return self._conn

    def add(self, kind: str, records: int, ack: tuple[int, int, tuple[str, bytes] | None]
            ) -> None:
        messages, n = self.counts.get(kind, (0, 0))
        self.counts[kind] = (messages + 1, n + records)
        self.done.append(ack)

    def commit(self, client: Any) -> None:
        if self._conn is not None:
            self.store.count(self._conn, self.counts)
            self._tx.commit()
            self._conn.close()
            self._conn = self._tx = None
        for mid, qos, confirm in self.done:
            if confirm is not None:
                client.publish(confirm[0], confirm[1], qos=1)
            client.ack(mid, qos)
        self.done.clear()
        self.counts.clear()

    def abort(self) -> None:
        if self._conn is not None:
            try:
                self._tx.rollback()
            finally:
                self._conn.close()
                self._conn = self._tx = None
        self.done.clear()
        self.counts.clear()


def run_worker(settings: ControllerSettings, name: str | None = None,
               stop: threading.Event | None = None) -> None:
    """`edge-agent-controller serve`: one worker in this process until SIGTERM/SIGINT."""
    import signal

    from controller.db import open_engine

    stop = stop or threading.Event()
    worker = IngestWorker(settings, FleetStore(open_engine(settings.url), worker=name or ""),
                          name)
    worker.store.worker = worker.name
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    log.info("%s: ingesting %s", worker.name, ", ".join(
        ingest_filters(settings.topic_prefix, settings.group)))
    t0 = time.monotonic()
    worker.run(stop)
    log.info("%s: stopped after %.0f s, %d message(s) stored, %d rejected", worker.name,
             time.monotonic() - t0, worker.stored, worker.rejected)
