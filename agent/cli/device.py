"""`edge-agent device ...`: what this device (or a captured tree) has, and its enrollment
in a fleet (CSR out, certificate in)."""

from __future__ import annotations

from pathlib import Path

import click

from agent.cli.common import AgentGroup, Context, emit_json, fail, json_option, root_option
from agent.cli.guard import guarded

pass_ctx = click.make_pass_decorator(Context)


@click.group(cls=AgentGroup)
def device() -> None:
    """Inspect this device's hardware and runtimes; enroll it in a fleet."""


@device.command("info")
@root_option("Read a tree laid out like a device's / (proc/, sys/, dev/) instead of this system.")
@json_option
@pass_ctx
def info(ctx: Context, root: Path | None, as_json: bool) -> None:
    """Detected CPU, memory, GPUs, NPUs, board and inference runtimes; enrollment state."""
    from agent.hardware import detect, summary
    from agent.sync import enroll

    profile = detect(root or Path("/"))  # a tree: its captured runtimes.json, if any
    enrollment = None if root is not None else enroll.status(ctx.settings.home)
    if as_json:
        data = profile.model_dump(mode="json")
        if enrollment is not None:
            data["enrollment"] = enrollment.as_json()
        emit_json(data)
        return
    click.echo(summary(profile))
    if enrollment is not None:
        e = enrollment
        line = f"Fleet:       {e.state}, device {e.device_id}"
        if e.fleet:
            line += f", fleet {e.fleet}"
        if e.cert_not_after:
            line += f", certificate valid until {e.cert_not_after[:10]}"
        click.echo(line)


@device.command("id")
@pass_ctx
def id_(ctx: Context) -> None:
    """Print this device's id (its audit key's id), as the fleet knows it."""
    from agent.sync import enroll

    dev = enroll.status(ctx.settings.home).device_id
    if dev == "unknown":
        fail(f"no device key in {ctx.settings.home} yet (start the agent, or run "
             "`edge-agent device enroll`)")
    click.echo(dev)


@device.command("enroll")
@click.option("--fleet", required=True, help="The fleet to join (as the controller names it).")
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the CSR here (default: stdout).")
@pass_ctx
@guarded("device:manage", resource=lambda kw: f"fleet:{kw['fleet']}")
def enroll_(ctx: Context, fleet: str, out: Path | None) -> None:
    """Write a certificate request for this device (its TLS key never leaves it)."""
    from agent.sync import enroll

    pem = enroll.enroll(ctx.settings.home, fleet)
    if out is None:
        click.echo(pem.decode("ascii"), nl=False)
        return
    out.write_bytes(pem)
    click.echo(f"wrote {out}: have the controller approve it (edge-agent-controller device "
               f"approve {out.name}), then run `edge-agent device install-cert`", err=True)


@device.command("install-cert")
@click.argument("cert", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--ca", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              required=True, help="The fleet CA certificate (PEM).")
@click.option("--signing-key", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              required=True, help="The controller's deployment-signing public key (PEM).")
@json_option
@pass_ctx
@guarded("device:manage", resource=lambda kw: f"cert:{kw['cert'].name}")
def install_cert(ctx: Context, cert: Path, ca: Path, signing_key: Path, as_json: bool) -> None:
    """Check and install the signed certificate, the fleet CA and the signing key."""
    from agent.sync import enroll

    e = enroll.install_cert(ctx.settings.home, cert.read_bytes(), ca.read_bytes(),
                            signing_key.read_bytes())
    if as_json:
        emit_json(e.as_json())
        return
    click.echo(f"enrolled device {e.device_id} in fleet {e.fleet} (certificate until "
               f"{(e.cert_not_after or '')[:10]}); a running agent connects on reload "
               "(SIGHUP) or restart")
