"""The fleet link as the daemon runs it: link, outbox flushing, reported state, commands
and the scheduled jobs, started and stopped with the app.

Nothing here is on the request path. The flusher reads batches from the outbox (in worker
threads) and publishes them QoS 1, at most `max_inflight` awaiting the broker's PUBACK,
`max_unconfirmed` awaiting the controller, paced by a token bucket of
`flush_messages_per_second`.

Two acknowledgements: the broker's PUBACK moves the flush forward; the controller's
confirmation (on `<device>/ack`, after it stored the batch) releases the records from the
outbox, strictly in order per class, so a cursor never skips a batch. A broker that dies
with messages it had acknowledged (mosquitto persists only periodically) loses nothing:
unconfirmed batches are resent after a reconnect or `confirm_timeout_seconds`, and the
controller stores each record once.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import __version__
from agent.metrics import Metrics
from agent.settings import Settings
from agent.sync import enroll
from agent.sync.deploy import DeployManager
from agent.sync.deploy import Link as DeployLink
from agent.sync.jobs import Jobs
from agent.sync.mqtt import LinkConfig, LinkHandlers, MqttLink, Will, tls_context
from agent.sync.outbox import CLASSES, Batch, Outbox, Quarantined
from fleet.topics import Topics

log = logging.getLogger(__name__)

Record = Callable[[str, str, str, str, dict[str, Any]], None]  # action, resource, decision, ...


@dataclass(eq=False)
class _Sent:
    """A published batch: awaiting PUBACK (`mid`), then the controller's confirmation."""

    batch: Batch
    body: bytes
    mid: int | None
    published_at: float | None = None  # when its PUBACK came
    confirmed: bool = False


@dataclass
class _ClassState:
    after: int | None = None  # last id published on this connection (None: from the cursor)
    sent: deque[_Sent] = field(default_factory=deque)  # in publishing order
    drops_in_flight: bool = False


@dataclass
class SyncParts:
    """What the service reads from the rest of the daemon (all callables: no imports up)."""

    loaded: Callable[[], dict[str, int]]  # alias -> queue depth
    models: Callable[[], list[dict[str, Any]]]
    hardware: Callable[[], dict[str, Any]]
    policy_hashes: Callable[[], dict[str, str | None]]
    audit: Record  # (action, resource, decision, outcome, details)
    gc: Callable[[], list[str]]  # collect unreferenced blobs; the ones removed


class SyncService(LinkHandlers):
    """Owns the link, the flusher and the jobs of one daemon run."""

    def __init__(self, settings: Settings, outbox: Outbox, metrics: Metrics, parts: SyncParts,
                 *, boot: str | None = None) -> None:
        self.settings = settings
        self.cfg = settings.sync
        self.outbox = outbox
        self.metrics = metrics
        self.parts = parts
        self.boot = boot or secrets.token_hex(8)
        self.started = time.time()
        self.jobs = Jobs()
        self.link: MqttLink | None = None
        self.topics: Topics | None = None
        self.enrollment = enroll.status(settings.home)
        self.disabled: str | None = None
        self.deploy: DeployManager | None = None  # set by the app: deployments ride the link
        self._wake = asyncio.Event()
        self._classes = {cls: _ClassState() for cls in CLASSES}
        self._flusher: asyncio.Task[None] | None = None
        self._tokens = 1.0
        self._refill = time.monotonic()
        self._token_due: float | None = None  # seconds until the rate limit allows a message
        self._stopping = False

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self.jobs.add("gc", "blob garbage collection", self.cfg.gc_seconds, self._gc)
        self.jobs.add("heartbeat", "heartbeat", self.cfg.heartbeat_seconds, self._heartbeat)
        self.jobs.add("telemetry", "telemetry snapshot", self.cfg.telemetry_seconds,
                      self._telemetry, first_in=min(5.0, self.cfg.telemetry_seconds))
        self.jobs.add("flush", "outbox flush retry", self.cfg.flush_retry_seconds,
                      self._flush_tick)
        self.jobs.add("alarms", "outbox quotas and alarms", 30.0, self._check_alarms,
                      first_in=1.0)
        self._start_link()
        self.jobs.start()

    def _start_link(self) -> None:
        why = self._why_off()
        if why is not None:
            self.disabled = why
            log.info("fleet link off: %s", why)
            return
        self.disabled = None
        self.topics = Topics(self.cfg.topic_prefix, self.enrollment.fleet or "",
                             self.enrollment.device_id)
        self.link = MqttLink(self._link_config(), asyncio.get_running_loop(), self)
        self.link.start()
        self._flusher = asyncio.create_task(self._flush_loop(), name="sync-flush")
        if self.deploy is not None:
            link = self.link
            self.deploy.link = DeployLink(self.cfg.topic_prefix, self.topics.fleet,
                                          link.subscribe, link.unsubscribe, self.wake,
                                          self._reported_changed)
            self.deploy.start()

    async def _stop_link(self) -> None:
        if self.deploy is not None:
            await self.deploy.stop()
            self.deploy.link = None
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        if self.link is not None:
            if self.link.connected and self.topics is not None:
                self.link.publish(self.topics("status"), self._status("offline"), retain=True)
            await self.link.stop()
            self.link = None
        self.metrics.sync_connected.set(0)

    async def reload(self) -> None:
        """SIGHUP: take a new enrollment (certificate) into use, or retry a refused link."""
        new = enroll.status(self.settings.home)
        if new == self.enrollment and self.link is not None:
            self.link.retry()
            return
        await self._stop_link()
        self.enrollment = new
        self._start_link()

    def _why_off(self) -> str | None:
        if self.cfg.broker_host is None:
            return "no broker configured (sync.broker_host)"
        if self.enrollment.state != "enrolled":
            return f"device not enrolled ({self.enrollment.state})"
        return None

    async def stop(self, grace: float = 2.0) -> None:
        """Stop the jobs; give batches in flight `grace` seconds for their PUBACKs (what is
        not acknowledged stays on disk for the next run); close the link cleanly."""
        self._stopping = True
        await self.jobs.stop()
        deadline = time.monotonic() + grace
        while self._inflight() and self.link is not None and self.link.connected \
                and time.monotonic() < deadline:
            self._wake.clear()
            await _wait(self._wake, max(0.0, deadline - time.monotonic()))
        await self._stop_link()

    def wake(self) -> None:
        """New records are waiting (telemetry, deploy status): flush soon."""
        self._wake.set()

    def _link_config(self) -> LinkConfig:
        assert self.topics is not None and self.cfg.broker_host is not None
        p = enroll.paths(self.settings.home)
        from agent.security.keys import tls_key_path

        tls = tls_context(str(p["cert"]), str(tls_key_path(self.settings.home)), str(p["ca"]))
        return LinkConfig(
            host=self.cfg.broker_host,
            port=self.cfg.broker_port,
            client_id=self.enrollment.device_id,
            tls=tls,
            keepalive=self.cfg.keepalive_seconds,
            will=Will(self.topics("status"), self._status("offline")),
            subscriptions=(self.topics("cmd"), self.topics("ack"), self.topics("desired")),
            reconnect_min=self.cfg.reconnect_min_seconds,
            reconnect_max=self.cfg.reconnect_max_seconds,
        )

    def _status(self, state: str) -> bytes:
        return json.dumps({"v": 1, "device": self.enrollment.device_id, "state": state,
                           "boot": self.boot, "time": time.time(),
                           "agent_version": __version__}, separators=(",", ":")).encode()

    # -- link events (on the loop) ----------------------------------------------------

    def connected(self) -> None:
        assert self.link is not None and self.topics is not None
        self.metrics.sync_connected.set(1)
        for st in self._classes.values():  # resend whatever the controller has not confirmed
            st.after, st.sent, st.drops_in_flight = None, deque(), False
        self.link.publish(self.topics("status"), self._status("online"), retain=True)
        asyncio.get_running_loop().create_task(self._publish_reported(), name="sync-reported")
        self._wake.set()
        log.info("fleet link up: %s:%s as %s", self.cfg.broker_host, self.cfg.broker_port,
                 self.enrollment.device_id)

    def disconnected(self, reason: str) -> None:
        self.metrics.sync_connected.set(0)
        log.warning("fleet link down: %s", reason)

    def failed(self, reason: str) -> None:
        self.metrics.sync_connected.set(0)
        self.metrics.sync_failures.inc()
        log.error("fleet link stopped retrying: %s", reason)
        self.parts.audit("sync:connect", f"broker:{self.cfg.broker_host}", "deny", "refused",
                         {"reason": reason})

    def published(self, mid: int, ok: bool, reason: str) -> None:
        for cls, st in self._classes.items():
            for sent in st.sent:
                if sent.mid == mid:
                    if not ok:  # e.g. not authorized: keep it, the retry job sends it again
                        log.warning("broker refused a %s batch: %s", cls, reason)
                        sent.mid, sent.published_at = None, 0.0
                        return
                    sent.mid, sent.published_at = None, time.monotonic()
                    self._wake.set()
                    return

    def confirmed(self, cls: str, first: int, last: int) -> None:
        """The controller stored records `first`..`last` of `cls`: release them, in order."""
        st = self._classes.get(cls)  # type: ignore[call-overload]
        if st is None:
            return
        for sent in st.sent:
            if sent.batch.first == first and sent.batch.last == last:
                sent.confirmed = True
                break
        else:
            return  # a confirmation of a batch resent before a reconnect: already handled
        done: list[Batch] = []
        while st.sent and st.sent[0].confirmed:
            done.append(st.sent.popleft().batch)
        if done:
            asyncio.get_running_loop().create_task(self._ack(done), name="sync-ack")
        self._wake.set()

    def message(self, topic: str, payload: bytes, properties: Any) -> None:
        if self.topics is None:
            return
        if topic == self.topics("ack"):
            try:
                ack = json.loads(payload)
                self.confirmed(str(ack["cls"]), int(ack["first"]), int(ack["last"]))
            except (ValueError, KeyError, TypeError):
                log.warning("ignored a malformed confirmation on %s", topic)
        elif topic == self.topics("cmd"):
            asyncio.get_running_loop().create_task(self._command(payload, properties),
                                                   name="sync-command")
        elif self.deploy is not None and topic == self.topics("desired"):
            self.deploy.received(payload)
        elif self.deploy is not None and "/_artifacts/" in topic:
            self.deploy.chunk(topic, payload)

    # -- flushing ---------------------------------------------------------------------

    async def _ack(self, batches: list[Batch]) -> None:
        await asyncio.to_thread(self.outbox.ack, batches)
        for b in batches:
            self.metrics.sync_sent.labels(cls=b.cls).inc(len(b.records))
            if b.dropped:
                self._classes[b.cls].drops_in_flight = False

    async def _flush_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                sent = await self._flush_once()
            except Exception:
                log.exception("outbox flush failed; retrying")
                sent = 0
            if sent == 0:
                # Nothing to send, or the rate limit is reached: sleep until woken, or until
                # the next token (never a busy wait for it).
                due, self._token_due = self._token_due, None
                await _wait(self._wake, 1.0 if due is None else min(1.0, due))
            else:
                await asyncio.sleep(0)  # yield: a long flush must not starve the loop

    async def _flush_once(self) -> int:
        link, topics = self.link, self.topics
        if link is None or topics is None or not link.connected:
            return 0
        sent = self._resend_due()
        for cls in CLASSES:
            st = self._classes[cls]
            while (self._awaiting_puback() < self.cfg.max_inflight
                   and self._unconfirmed() < self.cfg.max_unconfirmed and link.connected):
                batch = await asyncio.to_thread(self.outbox.batch, cls, st.after,
                                                self.cfg.batch_records)
                if batch is None:
                    break
                # A token only for a message that goes out: a class with nothing to send
                # must not use up the classes after it (it starved telemetry once).
                if not self._take_token():
                    return sent
                if cls == "telemetry":
                    if st.drops_in_flight:
                        batch.dropped = 0
                    elif batch.dropped:
                        st.drops_in_flight = True
                body = json.dumps(batch.payload(self.enrollment.device_id),
                                  separators=(",", ":"), ensure_ascii=False).encode()
                mid = link.publish(topics(cls), body, qos=1)
                if mid is None:
                    return sent
                st.sent.append(_Sent(batch, body, mid))
                st.after = batch.last
                sent += 1
        return sent

    def _resend_due(self) -> int:
        """Publish again what the broker took but the controller never confirmed."""
        assert self.link is not None and self.topics is not None
        now = time.monotonic()
        count = 0
        for cls, st in self._classes.items():
            for s in st.sent:
                timeout = self.cfg.confirm_timeout_seconds
                due = s.published_at is not None and (
                    s.published_at == 0.0 or now - s.published_at > timeout)
                if due and not s.confirmed:
                    mid = self.link.publish(self.topics(cls), s.body, qos=1)
                    if mid is None:
                        return count
                    s.mid, s.published_at = mid, None
                    count += 1
        return count

    def _awaiting_puback(self) -> int:
        return sum(1 for st in self._classes.values() for s in st.sent if s.mid is not None)

    def _unconfirmed(self) -> int:
        return sum(len(st.sent) for st in self._classes.values())

    def _inflight(self) -> int:
        return self._unconfirmed()

    def _take_token(self) -> bool:
        rate = self.cfg.flush_messages_per_second
        now = time.monotonic()
        self._tokens = min(max(1.0, rate), self._tokens + (now - self._refill) * rate)
        self._refill = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        self._token_due = (1.0 - self._tokens) / rate
        return False

    async def _flush_tick(self) -> None:
        self._wake.set()

    # -- jobs -------------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        if self.link is None or self.topics is None or not self.link.connected:
            return
        backlog = await asyncio.to_thread(self.outbox.backlog)
        body = {"v": 1, "device": self.enrollment.device_id, "boot": self.boot,
                "time": time.time(), "uptime_s": round(time.time() - self.started, 1),
                "backlog": backlog}
        self.link.publish(self.topics("heartbeat"), json.dumps(body).encode(), qos=0)

    async def _telemetry(self) -> None:
        if self.link is None:  # not enrolled: nobody to send telemetry to
            return
        from agent.sync.telemetry import snapshot

        backlog = await asyncio.to_thread(self.outbox.backlog)
        snap = snapshot(self.metrics, boot=self.boot, started=self.started,
                        loaded=self.parts.loaded(), home=self.settings.home, backlog=backlog)
        await asyncio.to_thread(self.outbox.add, "telemetry", {"snapshot": snap})
        self._wake.set()

    async def _check_alarms(self) -> None:
        backlog = await asyncio.to_thread(self.outbox.backlog)
        alarms = await asyncio.to_thread(self.outbox.alarms)
        dropped = await asyncio.to_thread(self.outbox.dropped)
        for cls in CLASSES:
            self.metrics.sync_backlog.labels(cls=cls).set(backlog.get(cls, 0))
            self.metrics.sync_alarm.labels(cls=cls).set(1 if cls in alarms else 0)
            self.metrics.sync_dropped.labels(cls=cls).set(dropped.get(cls, 0))
        for name, what in alarms.items():
            log.warning("outbox alarm: %s has %s (kept: never dropped)", name, what)

    async def _gc(self) -> None:
        removed = await asyncio.to_thread(self.parts.gc)
        if removed:
            log.info("blob GC removed %d unreferenced blob(s)", len(removed))

    # -- reported state and commands --------------------------------------------------

    def reported(self) -> dict[str, Any]:
        return {
            "v": 1, "device": self.enrollment.device_id, "boot": self.boot, "time": time.time(),
            "agent_version": __version__, "hardware": self.parts.hardware(),
            "models": self.parts.models(), "policy_hashes": self.parts.policy_hashes(),
            "enrollment": self.enrollment.as_json(), "sync": self.status(brief=True),
        }

    def _reported_changed(self) -> None:
        """Models or policies changed (a deployment): publish the reported state again."""
        asyncio.get_running_loop().create_task(self._publish_reported(), name="sync-reported")

    async def _publish_reported(self) -> None:
        body = await asyncio.to_thread(self.reported)
        if self.link is not None and self.topics is not None:
            self.link.publish(self.topics("reported"),
                              json.dumps(body, separators=(",", ":"), default=str).encode(),
                              retain=True)

    async def _command(self, payload: bytes, properties: Any) -> None:
        from fleet.messages import Command, decode

        assert self.link is not None and self.topics is not None
        response_topic = getattr(properties, "ResponseTopic", None)
        correlation = getattr(properties, "CorrelationData", None)
        try:
            cmd = decode(Command, payload)
        except ValueError as exc:
            result: dict[str, Any] = {"ok": False, "name": "?", "error": f"invalid command: "
                                      f"{str(exc)[:200]}"}
        else:
            result = {"ok": True, "name": cmd.name, "result": await self._run_command(cmd.name)}
        self.parts.audit("sync:command", f"cmd:{result['name']}", "allow",
                         "ok" if result["ok"] else "rejected", {"via": "mqtt"})
        # Answers go only to this device's own response topic: a command cannot make the
        # device publish somewhere else (the broker's ACL would refuse it anyway).
        if response_topic != self.topics("response"):
            return
        from paho.mqtt.packettypes import PacketTypes
        from paho.mqtt.properties import Properties

        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if correlation is not None:
            props.CorrelationData = correlation
        body = {"v": 1, "device": self.enrollment.device_id, **result}
        self.link.publish(response_topic, json.dumps(body, default=str).encode(), qos=1,
                          properties=props)

    async def _run_command(self, name: str) -> dict[str, Any]:
        if name == "ping":
            return {"pong": time.time(), "boot": self.boot}
        if name == "flush":
            self._wake.set()
            return {"backlog": await asyncio.to_thread(self.outbox.backlog)}
        if name == "report":
            await self._publish_reported()
            return {"reported": True}
        return self.status()

    # -- status -----------------------------------------------------------------------

    def status(self, *, brief: bool = False) -> dict[str, Any]:
        """What /agent/v1/sync shows (`brief`: what the reported state carries)."""
        link = self.link.status if self.link is not None else None
        out: dict[str, Any] = {
            "state": link.state if link is not None else "off",
            "reason": (link.reason if link is not None else self.disabled),
            "since": link.since if link is not None else self.started,
            "broker": (f"{self.cfg.broker_host}:{self.cfg.broker_port}"
                       if self.cfg.broker_host else None),
            "boot": self.boot,
        }
        if not brief:
            out["enrollment"] = self.enrollment.as_json()
            out["backlog"] = self.outbox.backlog()
            out["dropped"] = self.outbox.dropped()
            out["alarms"] = self.outbox.alarms()
            out["quarantined"] = self.outbox.quarantined()
            out["attempts"] = link.attempts if link is not None else 0
            out["next_retry_at"] = link.next_retry_at if link is not None else None
        return out

    def on_quarantine(self, found: Sequence[Quarantined]) -> None:
        """The outbox moved rows aside: count, log and audit it (never silent)."""
        self.metrics.sync_quarantined.inc(len(found))
        for q in found:
            log.error("outbox record %s (%s) quarantined: %s", q.outbox_id, q.cls, q.reason)
            self.parts.audit("sync:quarantine", f"outbox:{q.outbox_id}", "deny", "quarantined",
                             {"cls": q.cls, "reason": q.reason})


async def _wait(event: asyncio.Event, timeout: float) -> None:
    """Wait for `event` at most `timeout` seconds. `asyncio.timeout`, not `wait_for`: on
    Python 3.11 `wait_for` can swallow a cancellation that races with the event, which left
    a cancelled flusher running and the daemon unable to stop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await event.wait()


def file_sha256(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None

