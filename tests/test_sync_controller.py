"""The controller scales out: worker processes on an MQTT 5 shared subscription against
PostgreSQL split the traffic, store every record once, and confirm batches to devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fleet_env import Broker, Client, Pki, Postgres, scratch_dir, tls_client_context, wait_until
from sqlalchemy import func, select

from controller.db import open_engine
from controller.store import FleetStore
from controller.tables import Ingested, Telemetry

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with scratch_dir("ea-pg-") as path:
        pg = Postgres(path / "pg").start()
        try:
            yield pg
        finally:
            pg.stop()


def _snapshot(i: int) -> dict[str, object]:
    return {"boot": "b", "uptime_s": float(i), "rss_bytes": 1, "cpu_percent": 0.0,
            "disk_free_bytes": 1, "disk_total_bytes": 2}


# CI size; EDGE_TEST_SCALE_MESSAGES=20000 is the long form (about a minute more here).
SCALE = int(os.environ.get("EDGE_TEST_SCALE_MESSAGES", "4000"))


def test_two_workers_on_a_shared_subscription_store_every_message_once(
    tmp_path: Path, pki: Pki, broker: Broker, postgres: Postgres
) -> None:
    url = postgres.create_database("fleet_scale")
    store = FleetStore(open_engine(url))
    cert, key, approved = pki.stand_in(tmp_path, "dev-scale")
    store.add_device(approved)
    env = {**os.environ, "EDGE_CONTROLLER_HOME": str(pki.home),
           "EDGE_CONTROLLER_DATABASE_URL": url, "EDGE_CONTROLLER_BROKER_HOST": "127.0.0.1",
           "EDGE_CONTROLLER_BROKER_PORT": str(broker.port)}
    workers = [subprocess.Popen([sys.executable, "-m", "controller", "serve", "--name", name],
                                env=env, stderr=subprocess.PIPE, text=True)
               for name in ("w-a", "w-b")]
    device = Client(broker, tls_client_context(pki.ca, cert, key), "dev-scale")
    acks = Client(broker, tls_client_context(pki.ca, cert, key), "dev-scale-acks")
    try:
        # Publish only once the broker has both workers' shared subscriptions.
        wait_until(lambda: broker.subscribed("$share/ingest/edge/v1/+/+/telemetry") >= 2, 30,
                   "both workers to subscribe")
        acks.connect()
        assert acks.connected.wait(10)
        acks.client.subscribe("edge/v1/testfleet/dev-scale/ack", qos=1)
        device.client.max_inflight_messages_set(100)
        device.connect()
        assert device.connected.wait(10)
        topic = "edge/v1/testfleet/dev-scale/telemetry"
        infos = []
        for i in range(1, SCALE + 1):
            body = {"v": 1, "device": "dev-scale", "dropped": 0,
                    "records": [{"id": i, "time": float(i), "snapshot": _snapshot(i)}]}
            infos.append(device.client.publish(topic, json.dumps(body).encode(), qos=1))
        # Redeliveries: the first 500 again, as a device that lost its PUBACKs would.
        for i in range(1, 501):
            body = {"v": 1, "device": "dev-scale", "dropped": 0,
                    "records": [{"id": i, "time": float(i), "snapshot": _snapshot(i)}]}
            infos.append(device.client.publish(topic, json.dumps(body).encode(), qos=1))
        for info in infos:
            info.wait_for_publish(60)

        def stored() -> int:
            with store.engine.connect() as conn:
                return int(conn.execute(select(func.count()).select_from(Telemetry)).scalar_one())

        wait_until(lambda: stored() == SCALE, 120, f"{SCALE} telemetry records in PostgreSQL")
        with store.engine.connect() as conn:
            distinct = conn.execute(select(func.count(func.distinct(Telemetry.record_id)))).scalar()
            shares = dict(conn.execute(select(Ingested.worker, Ingested.messages).where(
                Ingested.kind == "telemetry")).all())
        assert distinct == SCALE
        assert set(shares) == {"w-a", "w-b"} and all(n > SCALE // 10 for n in shares.values()), \
            shares
        wait_until(lambda: sum(shares.values()) >= SCALE + 500
                   or _messages(store) >= SCALE + 500, 60,
                   "every message (duplicates included) to be handled")
        # Every stored batch was confirmed to the device.
        wait_until(lambda: len(acks.received("/ack")) >= SCALE, 60, "the confirmations")
        confirmed = {a["first"] for a in acks.received("/ack")}
        assert confirmed == set(range(1, SCALE + 1))
    finally:
        device.close()
        acks.close()
        for w in workers:
            w.terminate()
        for w in workers:
            assert w.wait(20) == 0, w.stderr.read() if w.stderr else ""


def _messages(store: FleetStore) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.sum(Ingested.messages)).where(
            Ingested.kind == "telemetry")).scalar() or 0)
