"""The fleet link end to end with real parts: the controller's keys and CLI, mosquitto with
TLS requiring fleet client certificates, the real daemon, the real ingest worker."""

from __future__ import annotations

import json
import signal
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fleet_env import (
    Broker,
    Client,
    Controller,
    Pki,
    enroll_device,
    linked_daemon,
    tls_client_context,
    wait_until,
)

pytestmark = pytest.mark.timeout(180)


def test_enroll_connect_birth_will_and_reported(
    tmp_path: Path, pki: Pki, broker: Broker, controller: Controller
) -> None:
    home = tmp_path / "device"
    dev = enroll_device(home, pki, controller)
    d = linked_daemon(home, broker, EDGE_AGENT_SYNC__TELEMETRY_SECONDS="1").start()
    try:
        wait_until(lambda: controller.device(dev).get("state") == "online", 30,
                   "the device online at the controller")
        first_boot = controller.device(dev)["boot"]
        with d.client() as c:
            sync = c.get("/agent/v1/sync").json()
        assert sync["state"] == "connected" and sync["enrollment"]["device_id"] == dev
        wait_until(lambda: controller.device(dev).get("reported", {}).get("device") == dev, 30,
                   "reported state")
        wait_until(lambda: controller.store.telemetry_tail(dev, 1) != [], 30, "telemetry")
        status = controller.cli("fleet", "status", "--json")
        row = next(r for r in json.loads(status.stdout) if r["device"] == dev)
        assert row["state"] == "online" and row["agent_version"]
        # kill -9: no clean disconnect, so the broker publishes the will.
        assert d.proc is not None
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        wait_until(lambda: controller.device(dev).get("state") == "offline", 30,
                   "the will to mark the device offline")
        assert controller.device(dev)["boot"] == first_boot
        d2 = linked_daemon(home, broker).start()
        try:
            wait_until(lambda: controller.device(dev).get("state") == "online", 30,
                       "the device online again")
            assert controller.device(dev)["boot"] != first_boot
        finally:
            d2.stop()
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


@pytest.mark.parametrize("case", ["no certificate", "expired", "another CA"])
def test_the_broker_refuses_clients_without_a_valid_fleet_certificate(
    tmp_path: Path, pki: Pki, broker: Broker, case: str
) -> None:
    import ssl

    cert = key = None
    if case == "expired":
        past = datetime.now(UTC) - timedelta(days=30)
        cert, key = pki.device_files(tmp_path, "oldtimer", not_before=past - timedelta(days=1),
                                     not_after=past)
    elif case == "another CA":
        other = Pki(tmp_path / "other", fleet=pki.fleet)
        cert, key = other.device_files(tmp_path, "stranger")
    client = Client(broker, tls_client_context(pki.ca, cert, key), f"probe-{case[:3]}")
    try:
        client.connect()
        # Whichever comes first: a refusal, the connection dropped, or (the failure) a CONNACK.
        wait_until(lambda: client.refused.is_set() or client.dropped.is_set()
                   or client.connected.is_set(), 10, "the broker's answer")
        refused = not client.connected.is_set()
    except (ssl.SSLError, OSError):
        refused = True
    finally:
        client.close()
    assert refused, f"the broker accepted a client with {case}"


def test_a_valid_device_certificate_is_accepted_and_confined_to_its_topics(
    tmp_path: Path, pki: Pki, broker: Broker, controller: Controller
) -> None:
    cert, key, approved = pki.stand_in(tmp_path, "probe1")
    controller.store.add_device(approved)
    client = Client(broker, tls_client_context(pki.ca, cert, key), "probe1")
    acks: dict[int, Any] = {}
    client.client.on_publish = lambda _c, _u, mid, reason, _p: acks.__setitem__(mid, reason)
    client.connect()
    try:
        assert client.connected.wait(10), client.connack
        beat = {"v": 1, "device": "probe1", "boot": "b1", "time": 1.0, "uptime_s": 1.0}
        ok = client.client.publish("edge/v1/testfleet/probe1/heartbeat",
                                   json.dumps(beat).encode(), qos=1)
        # Another device's topic: the broker's ACL refuses it (MQTT 5 PUBACK reason code).
        denied = client.client.publish("edge/v1/testfleet/someone-else/status", b"{}", qos=1)
        wait_until(lambda: ok.mid in acks and denied.mid in acks, 10, "both PUBACKs")
        assert not acks[ok.mid].is_failure or acks[ok.mid].value == 0x10
        assert acks[denied.mid].is_failure and acks[denied.mid].value == 0x87, acks[denied.mid]
    finally:
        client.close()


@pytest.mark.parametrize("case", ["broker not trusted", "device certificate refused"])
def test_certificate_failures_stop_retrying_and_are_reported(
    tmp_path: Path, pki: Pki, broker: Broker, controller: Controller, case: str
) -> None:
    home = tmp_path / "device"
    enroll_device(home, pki, controller)
    keys = home / "keys"
    other = Pki(tmp_path / "other", fleet=pki.fleet)
    if case == "broker not trusted":
        # The device trusts another fleet's CA only: the broker's certificate fails.
        (keys / "fleet-ca.pem").write_bytes(other.ca.read_bytes())
    else:
        # A certificate (for the device's own key) from a CA the broker does not know.
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from agent.sync import enroll

        csr = enroll.enroll(home, pki.fleet)
        approved = other.keys.approve(csr)
        (keys / "device-cert.pem").write_bytes(approved.cert_pem)
        assert x509.load_pem_x509_certificate(approved.cert_pem).public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    d = linked_daemon(home, broker).start()
    try:
        def sync() -> dict[str, Any]:
            with d.client() as c:
                return dict(c.get("/agent/v1/sync").json())

        wait_until(lambda: sync()["state"] == "failed", 30, "the link to give up")
        status = sync()
        marker = "not trusted" if case == "broker not trusted" else "refused the device"
        assert marker in status["reason"], status
        attempts = status["attempts"]
        assert d.metric("edge_agent_sync_link_failures_total") == 1
        with d.client() as c:
            records = c.get("/agent/v1/audit", params={"n": 20}).json()["records"]
        assert any(r["action"] == "sync:connect" and r["decision"] == "deny" for r in records)
        # It stays failed: no retry storm against a broker that will never accept it.
        with d.client() as c:
            assert c.get("/readyz").status_code == 200  # and the device keeps serving
        assert sync()["attempts"] == attempts and sync()["state"] == "failed"
    finally:
        d.stop()


def test_commands_are_answered_on_the_response_topic_with_the_correlation_data(
    tmp_path: Path, pki: Pki, broker: Broker, controller: Controller
) -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    home = tmp_path / "device"
    dev = enroll_device(home, pki, controller)
    d = linked_daemon(home, broker).start()
    ops = Client(broker, tls_client_context(pki.ca, pki.home / "controller.pem",
                                            pki.home / "controller.key"), "operator")
    try:
        wait_until(lambda: controller.device(dev).get("state") == "online", 30, "online")
        ops.connect()
        assert ops.connected.wait(10)
        base = f"edge/v1/{pki.fleet}/{dev}"
        ops.client.subscribe(f"{base}/response", qos=1)

        def ask(name: str, response_topic: str, correlation: bytes) -> None:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = response_topic
            props.CorrelationData = correlation
            ops.client.publish(f"{base}/cmd", json.dumps({"v": 1, "name": name}).encode(),
                               qos=1, properties=props).wait_for_publish(5)

        ask("ping", f"{base}/response", b"req-1")
        wait_until(lambda: ops.received("/response") != [], 15, "the answer")
        _topic, payload, props = next(m for m in ops.messages if m[0].endswith("/response"))
        answer = json.loads(payload)
        assert answer["ok"] and answer["name"] == "ping" and answer["device"] == dev
        assert props.CorrelationData == b"req-1"
        # A response topic outside the device's own: no answer goes there.
        ops.client.subscribe("edge/v1/elsewhere/#", qos=1)
        ask("status", "edge/v1/elsewhere/x", b"req-2")
        ask("ping", f"{base}/response", b"req-3")  # a later command is still answered
        wait_until(lambda: len(ops.received("/response")) == 2, 15, "the second answer")
        assert not ops.received("elsewhere")
        with d.client() as c:
            records = c.get("/agent/v1/audit", params={"n": 50}).json()["records"]
        commands = [r["resource"] for r in records if r["action"] == "sync:command"]
        assert commands == ["cmd:ping", "cmd:status", "cmd:ping"]
    finally:
        ops.close()
        d.stop()


def test_the_link_alone_writes_its_tls_socket_while_traffic_flows_both_ways(
    tmp_path: Path, pki: Pki, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenSSL connections are not safe for two threads at once. paho, driven by the link's
    own loop(), wrote a packet from whichever thread called publish(); with the link thread
    reading the same connection, the heap got corrupted (a CI run of the deploy tests died
    of "free(): corrupted unsorted chunks"). Here the event loop publishes 2,000 messages
    while the controller sends 2,000 to the device: every TLS write of the device's
    connection must come from the link thread, everything must arrive, and `stop()` must
    still end the session cleanly (no will)."""
    import asyncio
    import ssl
    import threading

    from agent.sync.mqtt import LinkConfig, LinkHandlers, MqttLink, Will, tls_context

    name = "dev-threads"
    cert, key = pki.device_files(tmp_path, name)
    base = f"edge/v1/{pki.fleet}/{name}"
    writers: dict[int, set[str]] = {}
    real_send = ssl.SSLSocket.send

    def send(sock: ssl.SSLSocket, data: Any, flags: int = 0) -> int:
        writers.setdefault(sock.getsockname()[1], set()).add(threading.current_thread().name)
        return real_send(sock, data, flags)

    monkeypatch.setattr(ssl.SSLSocket, "send", send)
    ops = Client(broker, tls_client_context(pki.ca, pki.home / "controller.pem",
                                            pki.home / "controller.key"), "ops-threads").connect()
    ops.client.subscribe(f"{base}/probe/#", qos=1)
    wait_until(ops.connected.is_set, 20, "the controller client connected")
    n = 2000

    async def run() -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        connected, inbound = asyncio.Event(), asyncio.Event()
        got = 0

        class Handlers(LinkHandlers):
            def connected(self) -> None:
                connected.set()

            def message(self, topic: str, payload: bytes, properties: Any) -> None:
                nonlocal got
                got += 1
                if got == n:
                    inbound.set()

        cfg = LinkConfig(host="127.0.0.1", port=broker.port, client_id=name,
                         tls=tls_context(str(cert), str(key), str(pki.ca)), keepalive=30,
                         will=Will(f"{base}/probe/will", b'"will"'),
                         subscriptions=(f"{base}/probe/down",))
        link = MqttLink(cfg, loop, Handlers())
        link.start()
        async with asyncio.timeout(30):
            await connected.wait()
        wait_until(lambda: broker.subscribed(f"{base}/probe/down") > 0, 20, "the link subscribed")
        flood = threading.Thread(target=lambda: [
            ops.client.publish(f"{base}/probe/down", b"%d" % i, qos=1) for i in range(n)])
        flood.start()
        sent = 0
        for i in range(n):
            while link.publish(f"{base}/probe/up", b"%d" % i) is None:
                await asyncio.sleep(0.01)  # not connected: a reconnect would show below
            sent += 1
            if i % 20 == 0:
                await asyncio.sleep(0)  # let the link's callbacks hop in
        try:
            async with asyncio.timeout(60):
                await inbound.wait()
        except TimeoutError:
            raise AssertionError(f"{got} of {n} messages reached the device; threads that "
                                 f"wrote TLS sockets, by local port: {writers}") from None
        await asyncio.to_thread(flood.join)
        await link.stop()
        return sent, got

    sent, got = asyncio.run(run())
    assert (sent, got) == (n, n)
    wait_until(lambda: len(ops.received("/probe/up")) == n, 60, "the device's messages")
    # A marker published after stop() reaches the controller after any will would have.
    ops.client.publish(f"{base}/probe/marker", b"{}", qos=1)
    wait_until(lambda: len(ops.received("/probe/marker")) == 1, 20, "the marker")
    ops.close()
    assert ops.received("/probe/will") == [], "stop() left without DISCONNECT: the will went out"
    device_ports = [p for p, names in writers.items() if "mqtt-link" in names]
    assert device_ports, writers
    for port in device_ports:
        assert writers[port] == {"mqtt-link"}, f"TLS writes from {writers[port]}"
