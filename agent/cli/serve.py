"""`edge-agent serve | run | chat | ps` and `models load/unload`: the daemon and its clients."""

from __future__ import annotations

import json
import shlex
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import click

from agent.cli.common import Context, call, human_bytes, json_option, print_rows

pass_ctx = click.make_pass_decorator(Context)


@click.command()
@click.option("--try-it", "try_it", metavar="MODEL", default=None,
              help="Once serving, print the socket and ready-to-paste requests for MODEL "
                   "(what `make run` shows).")
@pass_ctx
def serve(ctx: Context, try_it: str | None) -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    from agent.daemon import serve as run_daemon

    on_ready = None
    if try_it is not None:
        # Worked out before the daemon starts its threads; printed only once the socket
        # is bound and the daemon ready, so a second `make run` fails ("another
        # edge-agent is already serving") without first claiming to serve.
        text = try_it_text(ctx.settings.socket, try_it, _cli_for(ctx.settings.socket))

        def on_ready() -> None:
            click.echo(text)

    sys.exit(run_daemon(ctx.settings, on_ready=on_ready))


def try_it_text(socket: Path, model: str, cli: str) -> str:
    """Where the daemon serves and two requests to paste into bash: curl, and the CLI."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Hello!"}]})
    sock = shlex.quote(str(socket))
    return "\n".join([
        f"edge-agent: serving on {socket}  (Ctrl-C stops it)",
        f"try: curl --unix-socket {sock} http://localhost/v1/chat/completions \\",
        "       -H 'Content-Type: application/json' \\",
        f"       -d {shlex.quote(body)}",
        f"  or: {cli} chat {shlex.quote(model)} 'Hello!'",
    ])


def _cli_for(socket: Path) -> str:
    """This `edge-agent` as a person in this directory would type it, with `--socket`
    only if the CLI would not find `socket` by itself from here (with no environment)."""
    from agent.cli.discovery import locate

    argv0 = Path(sys.argv[0])
    if argv0.name == "__main__.py" or not argv0.name:
        cli = f"{shlex.quote(sys.executable)} -m agent"
    elif shutil.which(argv0.name) == str(argv0.absolute()) or str(argv0) == argv0.name:
        cli = argv0.name
    else:
        try:
            cli = shlex.quote(str(argv0.absolute().relative_to(Path.cwd())))
        except ValueError:
            cli = shlex.quote(str(argv0.absolute()))
    try:
        found = locate(None, environ={}).settings.socket
    except Exception:  # only decides whether to spell --socket out
        found = None
    if found is None or found.absolute() != socket.absolute():
        cli += f" --socket {shlex.quote(str(socket))}"
    return cli


@click.command()
@click.argument("alias")
@click.argument("prompt")
@click.option("--max-tokens", type=int, default=None, help="Stop after this many tokens.")
@click.option("--seed", type=int, default=None, help="Sampling seed, for repeatable output.")
@pass_ctx
def chat(ctx: Context, alias: str, prompt: str, max_tokens: int | None, seed: int | None) -> None:
    """Ask a model one question; the answer streams to stdout."""
    params: dict[str, Any] = {}
    if max_tokens:
        params["max_tokens"] = max_tokens
    if seed is not None:
        params["seed"] = seed
    with ctx.client() as client:
        for text in client.stream_chat(alias, [{"role": "user", "content": prompt}], **params):
            click.echo(text, nl=False)
    click.echo()


@click.command()
@click.argument("alias")
@click.option("--system", default=None, help="System prompt for the conversation.")
@pass_ctx
def run(ctx: Context, alias: str, system: str | None) -> None:
    """Chat with a model interactively; /bye or Ctrl-D ends it."""
    history: list[dict[str, str]] = []
    if system:
        history.append({"role": "system", "content": system})
    with ctx.client() as client:
        client.request("POST", f"/agent/v1/models/{alias}/load", {})
        click.echo(f"chatting with {alias}; /bye or Ctrl-D to end", err=True)
        while True:
            try:
                line = input(">>> ")
            except EOFError:
                click.echo()
                break
            if line.strip() in ("/bye", "/exit", "/quit"):
                break
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            parts: list[str] = []
            try:
                for text in client.stream_chat(alias, history):
                    parts.append(text)
                    click.echo(text, nl=False)
            except KeyboardInterrupt:
                click.echo(" [interrupted]", err=True)
            click.echo()
            history.append({"role": "assistant", "content": "".join(parts)})


@click.command()
@json_option
@pass_ctx
def ps(ctx: Context, as_json: bool) -> None:
    """List the models the running agent has loaded."""
    data = call(ctx, "GET", "/agent/v1/loaded")
    now = time.time()

    def line(m: dict[str, Any]) -> str:
        until = "forever" if m["expires_at"] is None else _until(m["expires_at"], now)
        return (f"{m['alias']:<24} {m['variant']:<24} {human_bytes(m['memory_bytes']):>9} "
                f"{m['queue_depth']:>5}  {until}")

    print_rows(data, as_json, data["models"], line, empty="no models loaded",
               header=f"{'MODEL':<24} {'VARIANT':<24} {'MEMORY':>9} {'QUEUE':>5}  UNTIL")


def _until(expires_at: float, now: float) -> str:
    # The agent reports expiry on its monotonic clock plus wall offset (seconds from now).
    left = max(0, int(expires_at - now))
    return f"{left // 60}m{left % 60:02d}s"
