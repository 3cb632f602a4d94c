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
        except (PkiError, ValueError, OSError) as exc:  # DeployError is a ValueError
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


def _deployer() -> Any:
    from controller.db import open_engine
    from controller.deploy import Deployer

    s = _settings()
    return Deployer(s, open_engine(s.url))


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
                   f"pattern readwrite {prefix}/+/%u/#\n"
                   f"pattern read {prefix}/+/_artifacts/#\n")
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
@click.option("--group", "groups", multiple=True, help="Put the device in this group (repeat).")
def approve(csr: Path, days: int, out: Path | None, groups: tuple[str, ...]) -> None:
    """Sign a device's CSR and record the device (and the audit key it carries)."""
    s = _settings()
    approved = FleetKeys(s.home).approve(csr.read_bytes(), days=days)
    target = out or csr.with_name(f"{approved.device_id}.pem")
    target.write_bytes(approved.cert_pem)
    _store().add_device(approved)
    if groups:
        _deployer().set_groups(approved.device_id, list(groups))
    click.echo(f"approved {approved.device_id} in fleet {approved.fleet} until "
               f"{approved.not_after:%Y-%m-%d}; on the device run:")
    click.echo(f"  edge-agent device install-cert {target} --ca {s.home / CA_CERT} "
               f"--signing-key {s.home / SIGNING_PUB}")


@device.command("group")
@click.argument("device_id")
@click.argument("groups", nargs=-1, required=True)
@click.option("--replace", is_flag=True, help="Leave every other group.")
def device_group(device_id: str, groups: tuple[str, ...], replace: bool) -> None:
    """Put a device in groups (deployments target groups with --group)."""
    now = _deployer().set_groups(device_id, list(groups), replace=replace)
    click.echo(f"{device_id}: {', '.join(now)}")


@device.command("groups")
@click.option("--json", "as_json", is_flag=True)
def device_groups(as_json: bool) -> None:
    """Every group and its devices."""
    groups = _deployer().groups()
    if as_json:
        _emit(groups)
        return
    for g, devices in groups.items():
        click.echo(f"{g}: {' '.join(devices)}")


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
    deployments = _deployer().latest()
    for r in rows:
        r["deployment"] = deployments.get(r["device"])
    if as_json:
        _emit(rows)
        return
    if not rows:
        click.echo("no devices approved")
        return
    now = time.time()
    click.echo(f"{'DEVICE':<18} {'STATE':<8} {'SEEN':>8} {'VERSION':<8} {'BACKLOG':<20} "
               f"{'MODELS':<24} DEPLOYMENT")
    for r in rows:
        seen = f"{now - r['last_seen']:.0f}s" if r["last_seen"] else "never"
        backlog = ",".join(f"{k}={v}" for k, v in (r["backlog"] or {}).items() if v) or "-"
        dep = r["deployment"]
        where = f"{dep['deployment']} v{dep['version']} {dep['state']}" if dep else "-"
        click.echo(f"{r['device']:<18} {r['state']:<8} {seen:>8} "
                   f"{r['agent_version'] or '-':<8} {backlog:<20} "
                   f"{','.join(m or '?' for m in r['models']) or '-':<24} {where}")


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


# -- artifacts and deployments -----------------------------------------------------------


@main.group(cls=_Group)
def artifacts() -> None:
    """Model files devices download (HTTPS) or receive in chunks (MQTT)."""


@artifacts.command("add")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--model", "alias", required=True, help="The model alias devices serve it as.")
@click.option("--name", default=None, help="Variant name (default: FORMAT-QUANT-TARGET).")
@click.option("--task", type=click.Choice(["chat", "completion", "embedding"]), default="chat",
              show_default=True)
@click.option("--quantization", default=None, help="Default: read from the file name.")
@click.option("--target", default="cpu", show_default=True,
              help="Device class it runs on: cpu, cuda, rocm, vulkan, npu, ...")
@click.option("--format", "fmt", type=click.Choice(["gguf", "onnx"]), default=None)
@click.option("--json", "as_json", is_flag=True)
def artifacts_add(file: Path, alias: str, name: str | None, task: str, quantization: str | None,
                  target: str, fmt: str | None, as_json: bool) -> None:
    """Copy a model file into the artifact directory and record it as a variant."""
    row = _deployer().add_artifact(file, alias=alias, name=name, task=task,
                                   quantization=quantization, target=target, fmt=fmt)
    if as_json:
        _emit(row)
    else:
        click.echo(f"{alias}/{row['name']}: {row['file']} {row['size']} bytes sha256 "
                   f"{row['sha256']}")


@artifacts.command("list")
@click.option("--json", "as_json", is_flag=True)
def artifacts_list(as_json: bool) -> None:
    """Every recorded variant."""
    rows = _deployer().artifacts()
    if as_json:
        _emit(rows)
        return
    for r in rows:
        where = f"mqtt:{r['published_chunk_size']}" if r["published_chunk_size"] else "https"
        click.echo(f"{r['alias']:<20} {r['name']:<24} {r['quantization']:<8} {r['target']:<6} "
                   f"{r['size']:>12} {r['sha256'][:12]} {where}")


@artifacts.command("serve")
@click.argument("directory", type=click.Path(path_type=Path, file_okay=False, exists=True),
                required=False)
@click.option("--host", default="0.0.0.0", show_default=True)  # noqa: S104 - operator's choice
@click.option("--port", type=click.IntRange(1, 65535), default=8443, show_default=True)
@click.option("--dns", multiple=True, help="Host name devices use (repeat); for the cert.")
@click.option("--ip", multiple=True, help="IP address devices use (repeat); for the cert.")
def artifacts_serve(directory: Path | None, host: str, port: int, dns: tuple[str, ...],
                    ip: tuple[str, ...]) -> None:
    """Serve DIRECTORY (default: the artifact directory) over HTTPS with Range, to devices
    holding a fleet certificate, until SIGTERM."""
    import signal
    import threading

    from controller.artifacts import make_server
    from controller.pki import CA_CERT

    s = _settings()
    folder = directory or _deployer().artifact_dir
    if not dns and not ip:
        _fail("give at least one --dns or --ip (the names devices reach this server by)", 2)
    cert, key = FleetKeys(s.home).server_cert(list(dns), list(ip))
    crt, k = write_pair(s.home, "artifact-server", cert, key)
    server = make_server(folder, host, port, crt, k, s.home / CA_CERT)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    click.echo(f"serving {folder} on https://{host}:{server.server_address[1]}", err=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


@artifacts.command("publish")
@click.argument("ref")
@click.option("--chunk-size", type=click.IntRange(4096, 16 << 20), default=1 << 20,
              show_default=True, help="Bytes per chunk message.")
def artifacts_publish(ref: str, chunk_size: int) -> None:
    """Put an artifact on the broker (retained, in numbered chunks with a manifest of their
    sha256), for devices whose only link is the broker. REF: sha256 prefix or ALIAS/NAME."""
    from controller.deploy import Publisher, publish_artifact

    s = _settings()
    dep = _deployer()
    row = dep.artifact(ref)
    fleet_name = FleetKeys(s.home).fleet
    t0 = time.monotonic()
    with Publisher(s) as pub:
        m = publish_artifact(pub, s.topic_prefix, fleet_name, dep.artifact_dir / row["file"],
                             chunk_size)
    if m.sha256 != row["sha256"]:
        _fail(f"the file of {ref} changed on disk: sha256 {m.sha256}, recorded {row['sha256']}")
    dep.mark_published(m.sha256, chunk_size)
    click.echo(f"published {row['alias']}/{row['name']}: {len(m.chunks)} chunks of "
               f"{chunk_size} bytes in {time.monotonic() - t0:.1f}s")


@main.group(cls=_Group)
def deploy() -> None:
    """Signed deployments of models, policies and settings."""


@deploy.command("create")
@click.option("--model", "models", multiple=True, help="Model alias to deploy (repeat).")
@click.option("--policy", "policies", multiple=True, metavar="[KIND=]FILE",
              help="rbac.yaml or selection.yaml content to install (repeat).")
@click.option("--set", "sets", multiple=True, metavar="KEY=JSON",
              help="A remotely changeable agent setting (repeat), e.g. runtime.queue_size=32.")
@click.option("--group", default=None)
@click.option("--device", "device_id", default=None)
@click.option("--all", "everyone", is_flag=True)
@click.option("--mqtt", is_flag=True, help="Devices fetch over the broker (artifacts publish).")
@click.option("--pin", "pins", multiple=True, metavar="ALIAS/VARIANT",
              help="Also install this variant whatever selection says (repeat).")
@click.option("--window", "windows", multiple=True, metavar="HH:MM-HH:MM",
              help="Large downloads only in this local-time window (repeat).")
@click.option("--bandwidth", type=click.IntRange(1), default=None, help="Bytes/s cap per device.")
@click.option("--disk-reserve", type=click.IntRange(0), default=None,
              help="Bytes of disk a device keeps free.")
@click.option("--probation", type=float, default=None, help="Seconds a new variant's failures "
              "roll it back.")
@click.option("--smoke-prompt", default=None)
@click.option("--smoke-seconds", type=float, default=None)
@click.option("--json", "as_json", is_flag=True)
def deploy_create(models: tuple[str, ...], policies: tuple[str, ...], sets: tuple[str, ...],
                  group: str | None, device_id: str | None, everyone: bool, mqtt: bool,
                  pins: tuple[str, ...], windows: tuple[str, ...], bandwidth: int | None,
                  disk_reserve: int | None, probation: float | None,
                  smoke_prompt: str | None, smoke_seconds: float | None,
                  as_json: bool) -> None:
    """Sign a desired-state document for each targeted device and publish it (retained)."""
    from controller.deploy import Publisher, read_policy
    from fleet.deploy import Limits, Window

    s = _settings()
    dep = _deployer()
    pinned: dict[str, list[str]] = {}
    for p in pins:
        alias, _, name = p.partition("/")
        pinned.setdefault(alias, []).append(name)
    docs = [dep.model_doc(a, mqtt=mqtt, pin=pinned.get(a, []), smoke_prompt=smoke_prompt,
                          smoke_seconds=smoke_seconds) for a in models]
    policy_texts = dict(read_policy(p) for p in policies)
    settings: dict[str, Any] = {}
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--set wants KEY=VALUE, got {item!r}", 2)
        try:
            settings[key] = json.loads(value)
        except ValueError:
            settings[key] = value
    limits: dict[str, Any] = {}
    if bandwidth is not None:
        limits["bandwidth_bytes_per_s"] = bandwidth
    if disk_reserve is not None:
        limits["disk_reserve_bytes"] = disk_reserve
    if probation is not None:
        limits["probation_seconds"] = probation
    wins = []
    for w in windows:
        start, _, end = w.partition("-")
        wins.append(Window(start=start, end=end))
    name, items = dep.create(models=docs, policies=policy_texts, settings=settings,
                             windows=wins, limits=Limits(**limits), group=group,
                             device=device_id, everyone=everyone)
    with Publisher(s) as pub:
        pub.publish([(i.topic, i.payload) for i in items])
    dep.published(name, [i.device for i in items])
    if as_json:
        _emit({"deployment": name, "devices": {i.device: i.version for i in items}})
    else:
        click.echo(f"deployment {name}: signed and published to {len(items)} device(s): "
                   + ", ".join(f"{i.device} (v{i.version})" for i in items))


@deploy.command("status")
@click.argument("deployment")
@click.option("--json", "as_json", is_flag=True)
@click.option("--wait", is_flag=True, help="Until every device is done (active, failed, "
              "rolled back or rejected); exit 1 after --timeout or if any is not active.")
@click.option("--timeout", type=float, default=600.0, show_default=True)
def deploy_status(deployment: str, as_json: bool, wait: bool, timeout: float) -> None:
    """Where each device of a deployment is, per model, with reasons."""
    dep = _deployer()
    deadline = time.monotonic() + timeout
    st = dep.status(deployment)
    while wait and any(d["state"] not in ("active", "failed", "rolled-back", "rejected")
                       for d in st["devices"]):
        if time.monotonic() > deadline:
            break
        time.sleep(0.5)  # polling the controller's database, which the workers update
        st = dep.status(deployment)
    if as_json:
        _emit(st)
    else:
        click.echo(f"deployment {st['deployment']} ({st['selector']})")
        for d in st["devices"]:
            click.echo(f"  {d['device']} v{d['version']}: {d['state']}")
            for alias, step in d["models"].items():
                pct = f" {step['percent']:.0f}%" if step["percent"] is not None else ""
                why = f" - {step['reason']}" if step["reason"] else ""
                click.echo(f"    {alias} {step['variant'] or '-'}: {step['step']}{pct}{why}")
            for step in d["policies"]:
                click.echo(f"    {step['step']}: {step['reason']}")
    if wait and any(d["state"] != "active" for d in st["devices"]):
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
