"""`edge-agent-controller`: keys, device approval, fleet status, telemetry, audit checks and
the ingest workers. Exit codes: 0 ok, 1 failed (or a broken audit chain), 2 usage."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from controller.pki import CA_CERT, SIGNING_PUB, FleetKeys, PkiError, write_pair
from controller.settings import ControllerSettings


def _fail(message: str, code: int = 1) -> NoReturn:
    click.echo(f"edge-agent-controller: error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except (PkiError, ValueError, OSError) as exc:
            _fail(str(exc))


def _settings() -> ControllerSettings:
    try:
        return ControllerSettings()
    except ValueError as exc:
        _fail(f"invalid settings: {exc}", 2)


def _store() -> Any:
    from controller.db import open_engine
    from controller.store import FleetStore

    return FleetStore(open_engine(_settings().url))


def _emit(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


@click.group(cls=_Group)
@click.option("--debug", is_flag=True, help="Debug logging.")
def main(debug: bool) -> None:
    """The edge-agent fleet controller (settings: EDGE_CONTROLLER_* environment)."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- keys -------------------------------------------------------------------------------


@main.group(cls=_Group)
def keys() -> None:
    """The fleet CA and the deployment-signing key."""


@keys.command("init")
@click.option("--fleet", required=True, help="Fleet name (one topic level).")
def keys_init(fleet: str) -> None:
    """Create the fleet CA, the deployment-signing key and this controller's client cert."""
    s = _settings()
    pki = FleetKeys(s.home)
    pki.init(fleet)
    cert, key = pki.client_cert("controller")
    write_pair(s.home, "controller", cert, key)
    click.echo(f"fleet {fleet}: CA {s.home / CA_CERT}, signing key {s.home / SIGNING_PUB}, "
               f"controller client certificate {s.home / 'controller.pem'}")


@keys.command("broker-cert")
@click.option("--dns", multiple=True, help="Host name the devices connect to (repeat).")
@click.option("--ip", multiple=True, help="IP address the devices connect to (repeat).")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="Directory for broker.pem / broker.key.")
def broker_cert(dns: tuple[str, ...], ip: tuple[str, ...], out: Path) -> None:
    """A server certificate for the MQTT broker (or the artifact server)."""
    if not dns and not ip:
        _fail("give at least one --dns or --ip", 2)
    cert, key = FleetKeys(_settings().home).server_cert(list(dns), list(ip))
    crt, k = write_pair(out, "broker", cert, key)
    click.echo(f"wrote {crt} and {k}")


@keys.command("broker-config")
@click.option("--dns", multiple=True, help="Host name the devices connect to (repeat).")
@click.option("--ip", multiple=True, help="IP address the devices connect to (repeat).")
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option("--prefix", default="edge/v1", show_default=True, help="Topic prefix.")
@click.option("--user", default=None, help="Account mosquitto runs as (it must read the key); "
              "default: the one running this command.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
def broker_config(dns: tuple[str, ...], ip: tuple[str, ...], port: int, prefix: str,
                  user: str | None, out: Path) -> None:
    """A mosquitto configuration for the fleet: TLS 1.2+, client certificates from the
    fleet CA required, the certificate's CN as user name, devices confined to their own
    topics by ACL, persistence on. Start it with `mosquitto -c OUT/mosquitto.conf`."""
    if not dns and not ip:
        _fail("give at least one --dns or --ip", 2)
    home = _settings().home
    cert, key = FleetKeys(home).server_cert(list(dns), list(ip))
    out.mkdir(parents=True, exist_ok=True)
    crt, k = write_pair(out, "broker", cert, key)
    ca = out / CA_CERT
    ca.write_bytes((home / CA_CERT).read_bytes())
    acl = out / "acl"
    acl.write_text(f"user controller\ntopic readwrite {prefix}/#\n\n"
                   f"pattern readwrite {prefix}/+/%u/#\n")
    bind = ip[0] if ip else "0.0.0.0"  # noqa: S104 - the operator names the interface
    import getpass

    (out / "mosquitto.conf").write_text(
        f"user {user or getpass.getuser()}\n"
        f"persistence true\npersistence_location {out.resolve()}/\n"
        "autosave_interval 30\n"
        "max_queued_messages 100000\n"
        f"listener {port} {bind}\nprotocol mqtt\n"
        f"cafile {ca.resolve()}\ncertfile {crt.resolve()}\nkeyfile {k.resolve()}\n"
        "require_certificate true\nuse_identity_as_username true\ntls_version tlsv1.2\n"
        f"allow_anonymous false\nacl_file {acl.resolve()}\n")
    click.echo(f"wrote {out / 'mosquitto.conf'} (listener {bind}:{port}), its certificate "
               "and ACL")


@keys.command("client-cert")
@click.argument("name")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
def client_cert(name: str, out: Path) -> None:
    """Another controller process's client certificate (CN controller)."""
    cert, key = FleetKeys(_settings().home).client_cert(name)
    crt, k = write_pair(out, name, cert, key)
    click.echo(f"wrote {crt} and {k}")


# -- devices ----------------------------------------------------------------------------


@main.group(cls=_Group)
def device() -> None:
    """Approve devices."""


@device.command("approve")
@click.argument("csr", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True)
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Where to write the certificate (default: <device>.pem beside the CSR).")
def approve(csr: Path, days: int, out: Path | None) -> None:
    """Sign a device's CSR and record the device (and the audit key it carries)."""
    s = _settings()
    approved = FleetKeys(s.home).approve(csr.read_bytes(), days=days)
    target = out or csr.with_name(f"{approved.device_id}.pem")
    target.write_bytes(approved.cert_pem)
    _store().add_device(approved)
    click.echo(f"approved {approved.device_id} in fleet {approved.fleet} until "
               f"{approved.not_after:%Y-%m-%d}; on the device run:")
    click.echo(f"  edge-agent device install-cert {target} --ca {s.home / CA_CERT} "
               f"--signing-key {s.home / SIGNING_PUB}")


# -- fleet ------------------------------------------------------------------------------


@main.group(cls=_Group)
def fleet() -> None:
    """The fleet's state."""


@fleet.command("status")
@click.option("--json", "as_json", is_flag=True)
@click.option("--wait", "wait_for", default=None, metavar="DEVICE",
              help="First wait until this device is online (exit 1 after --timeout).")
@click.option("--timeout", type=float, default=60.0, show_default=True)
def fleet_status(as_json: bool, wait_for: str | None, timeout: float) -> None:
    """Devices: online/offline (birth and will, by boot id), last seen, versions, models."""
    store = _store()
    deadline = time.monotonic() + timeout
    while wait_for is not None:
        row = next((r for r in store.fleet_status() if r["device"] == wait_for), None)
        if row is not None and row["state"] == "online":
            break
        if time.monotonic() > deadline:
            _fail(f"{wait_for} is not online after {timeout:g} s")
        time.sleep(0.5)  # polling the controller's database, which the workers update
    rows = store.fleet_status()
    if as_json:
        _emit(rows)
        return
    if not rows:
        click.echo("no devices approved")
        return
    now = time.time()
    click.echo(f"{'DEVICE':<18} {'STATE':<8} {'SEEN':>8} {'VERSION':<8} {'BACKLOG':<20} MODELS")
    for r in rows:
        seen = f"{now - r['last_seen']:.0f}s" if r["last_seen"] else "never"
        backlog = ",".join(f"{k}={v}" for k, v in (r["backlog"] or {}).items() if v) or "-"
        click.echo(f"{r['device']:<18} {r['state']:<8} {seen:>8} "
                   f"{r['agent_version'] or '-':<8} {backlog:<20} "
                   f"{','.join(m or '?' for m in r['models']) or '-'}")


@main.group(cls=_Group)
def telemetry() -> None:
    """Device telemetry."""


@telemetry.command("tail")
@click.argument("device_id")
@click.option("-n", "count", type=click.IntRange(1, 10_000), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def telemetry_tail(device_id: str, count: int, as_json: bool) -> None:
    """The newest telemetry snapshots of a device."""
    rows = _store().telemetry_tail(device_id, count)
    if as_json:
        _emit(rows)
        return
    for r in rows:
        snap = r["snapshot"]
        click.echo(f"{r['id']:>8} {time.strftime('%H:%M:%S', time.gmtime(r['time']))} "
                   f"rss {snap.get('rss_bytes', 0) / 1e6:.0f} MB cpu {snap.get('cpu_percent')}% "
                   f"models {','.join(snap.get('models', {})) or '-'}")


@main.group(cls=_Group)
def audit() -> None:
    """Devices' audit trails."""


@audit.command("verify")
@click.argument("device_id")
@click.option("--json", "as_json", is_flag=True)
def audit_verify(device_id: str, as_json: bool) -> None:
    """Check a device's shipped audit chain with its pinned key; exit 1 naming the first
    bad seq (deleted, edited, reordered, forked, truncated, bad checkpoint)."""
    from controller.store import Rejected

    try:
        result, forks = _store().audit_verify(device_id)
    except Rejected as exc:
        _fail(str(exc))
    if as_json:
        _emit({**result.to_dict(), "forks": forks})
    else:
        click.echo(result.line())
    if not result.ok:
        sys.exit(1)


# -- workers ----------------------------------------------------------------------------


@main.command()
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Worker processes to run here (each on the shared subscription).")
@click.option("--name", default=None, help="Worker name (default: host and pid).")
def serve(workers: int, name: str | None) -> None:
    """Ingest device messages until SIGTERM (run on as many hosts as needed)."""
    from controller.ingest import run_worker

    settings = _settings()
    if workers == 1:
        run_worker(settings, name)
        return
    procs = [subprocess.Popen([sys.executable, "-m", "controller", "serve",
                               "--name", f"{name or 'ingest'}-{i}"]) for i in range(workers)]
    try:
        for p in procs:
            p.wait()
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
