"""`edge-agent device ...`: what this device (or a captured tree) has."""

from __future__ import annotations

from pathlib import Path

import click

from agent.cli_common import emit_json, json_option


@click.group()
def device() -> None:
    """Inspect this device's hardware and runtimes."""


@device.command("info")
@click.option(
    "--root",
    type=click.Path(path_type=Path, file_okay=False, exists=True),
    default=None,
    help="Read a tree laid out like a device's / (proc/, sys/, dev/) instead of this system.",
)
@json_option
def info(root: Path | None, as_json: bool) -> None:
    """Detected CPU, memory, GPUs, NPUs, board and inference runtimes."""
    from agent.hardware import detect, summary

    profile = detect(root or Path("/"), probe_runtimes=root is None)
    if as_json:
        emit_json(profile)
    else:
        click.echo(summary(profile))
