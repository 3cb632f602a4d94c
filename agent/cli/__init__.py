"""The `edge-agent` command line: one module per command group (models, device, policy,
tokens, audit; serve/run/chat/ps in `serve`), loaded only when its command runs.

Exit codes (mapped once, in `agent.cli.common.exit_code`): 0 ok, 1 the operation failed, 2 usage or
configuration error (`SettingsError`, click's usage errors). Errors are one line a person
can act on; `--debug` adds the traceback.

May import anything in `agent` and `registry`; nothing imports `agent.cli`.
"""

from __future__ import annotations

import importlib
import logging
import sys
from pathlib import Path
from typing import Any

import click

from agent import __version__
from agent.cli.common import AgentGroup, Context


class LazyGroup(AgentGroup):
    """Imports a command's module only when that command runs: `serve` stays lean."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attr = self.lazy[name].split(":")
            cmd = getattr(importlib.import_module(module), attr)
            assert isinstance(cmd, click.Command)
            return cmd
        return super().get_command(ctx, name)


COMMANDS = {
    "models": "agent.cli.models:models",
    "device": "agent.cli.device:device",
    "policy": "agent.cli.policy:policy",
    "tokens": "agent.cli.tokens:tokens",
    "audit": "agent.cli.audit:audit",
    "bench": "agent.cli.bench:bench",
    "serve": "agent.cli.serve:serve",
    "run": "agent.cli.serve:run",
    "chat": "agent.cli.serve:chat",
    "ps": "agent.cli.serve:ps",
}


@click.group(cls=LazyGroup, lazy=COMMANDS)
@click.version_option(__version__, prog_name="edge-agent")
@click.option(
    "--config",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Settings file (TOML). Default: $EDGE_AGENT_CONFIG, then /etc/edge-agent/agent.toml.",
)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, debug: bool) -> None:
    """edge-agent: run small language models on this device, managed from a fleet."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, stream=sys.stderr)
    ctx.obj = Context(config, debug)

