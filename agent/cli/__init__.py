"""The `edge-agent` command line: one module per command group (models, device, policy,
tokens, audit; serve/run/chat/ps in `serve`), loaded only when its command runs.

Exit codes (mapped once, in `agent.cli.common.exit_code`): 0 ok, 1 the operation failed,
2 usage or configuration error (`SettingsError`, click's usage errors, a request the daemon
refused for one of its parameters). Errors are one line a person can act on; `--debug`
adds the traceback. The global options (`--debug`, `--config`, `--home`, `--socket`) work
before or after the subcommand; which home and socket are used is `agent.cli.discovery`'s
to say.

May import anything in `agent` and `registry`; nothing imports `agent.cli`.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any

import click

from agent import __version__
from agent.cli.common import AgentGroup, Context, context_of, with_global_options

__all__ = ["Context", "main"]  # Context: what tests hand to a group invoked on its own


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
            return with_global_options(cmd)
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
@click.pass_context
def main(ctx: click.Context) -> None:
    """edge-agent: run small language models on this device, managed from a fleet.

    \b
    The home and the daemon's socket come from, first found:
      --home / --socket, before or after the subcommand;
      EDGE_AGENT_HOME / EDGE_AGENT_SOCKET;
      the settings file (--config, EDGE_AGENT_CONFIG, /etc/edge-agent/agent.toml);
      the state dir `make run` marks (var/edge-agent-dev.toml here or in a folder
        above, if yours or root's and writable by no one else);
      /var/lib/edge-agent and /run/edge-agent/agent.sock.
    """
    obj = context_of(ctx)  # the global options' callbacks may have made it already
    logging.basicConfig(level=logging.DEBUG if obj.debug else logging.WARNING, stream=sys.stderr)


with_global_options(main)
