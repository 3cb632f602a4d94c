"""`edge-agent device ...`: what this device (or a captured tree) has."""

from __future__ import annotations

from pathlib import Path

import click

from agent.cli.common import AgentGroup, emit_json, json_option, root_option


@click.group(cls=AgentGroup)
def device() -> None:
    """Inspect this device's hardware and runtimes."""


@device.command("info")
@root_option("Read a tree laid out like a device's / (proc/, sys/, dev/) instead of this system.")
@json_option
def info(root: Path | None, as_json: bool) -> None:
    """Detected CPU, memory, GPUs, NPUs, board and inference runtimes."""
    from agent.hardware import detect, summary

    profile = detect(root or Path("/"), probe_runtimes=root is None)
    if as_json:
        emit_json(profile)
    else:
        click.echo(summary(profile))
