"""The CLI as a new user meets it (issue 15): it finds the daemon `make run` started, reading
creates no state, usage errors exit 2 wherever the option sits, a missing model says what to
install, and `serve --try-it` prints its banner only once it serves.

One daemon for the module (an empty home, started with `serve --try-it`); CLI-only points
run in-process through click's runner.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from conftest_models import make_tiny_gguf
from daemon import Daemon

from agent.cli import main

REPO = Path(__file__).resolve().parent.parent
ENV_KEYS = ("EDGE_AGENT_HOME", "EDGE_AGENT_SOCKET", "EDGE_AGENT_CONFIG")


class TryItDaemon(Daemon):
    """The test daemon started as `make run` starts it: `serve --try-it smollm2-135m`,
    its stdout (the banner) kept in a file."""

    def start(self) -> TryItDaemon:
        self.banner = self.sockdir / "stdout"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "serve", "--try-it", "smollm2-135m"],
            env=self.env, stdout=self.banner.open("w"), stderr=self.log.open("w"), text=True)
        self.wait_for("READY=1")  # the banner is written before READY=1
        return self


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TryItDaemon]:
    d = TryItDaemon(tmp_path_factory.mktemp("ux-home")).start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture
def bare(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A shell with none of the Makefile's environment and no host settings file, in a
    fresh directory (a checkout-like tree: tmp_path/work/sub)."""
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    monkeypatch.setenv("EDGE_AGENT_CONFIG", str(empty))  # sets neither home nor socket
    sub = tmp_path / "work" / "sub"
    sub.mkdir(parents=True)
    monkeypatch.chdir(sub)
    return tmp_path / "work"


def cli(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env)


def mark(checkout: Path, home: Path, socket: Path) -> Path:
    """What `make run` writes: var/edge-agent-dev.toml naming its home and socket."""
    var = checkout / "var"
    var.mkdir(mode=0o750, exist_ok=True)
    marker = var / "edge-agent-dev.toml"
    marker.write_text(f'home = "{home}"\nsocket = "{socket}"\n')
    marker.chmod(0o644)
    return marker


# -- 1. the CLI finds the daemon a user just started ----------------------------------


def test_cli_in_the_checkout_finds_the_daemon_make_run_marked(
    daemon: TryItDaemon, bare: Path
) -> None:
    mark(bare, daemon.home, daemon.socket)
    out = cli("ps")  # from work/sub, with no EDGE_AGENT_* at all
    assert out.exit_code == 0, out.output
    assert out.stdout.strip() == "no models loaded"


@pytest.mark.parametrize("unsafe", ["writable by others", "another user's"])
def test_a_marker_others_control_is_ignored_and_the_hint_names_the_socket_tried(
    bare: Path, unsafe: str, caplog: pytest.LogCaptureFixture
) -> None:
    marker = mark(bare, bare / "var", bare / "var" / "agent.sock")
    if unsafe == "writable by others":
        marker.chmod(0o666)
    else:
        os.chown(marker, 65534, 65534)  # tests run as root: root must not follow it
    out = cli("ps")
    assert out.exit_code == 1
    assert f"ignoring {marker}" in caplog.text
    assert ("no edge-agent is running on /run/edge-agent/agent.sock (default); start one with "
            "`edge-agent serve`") in out.stderr
    assert "choose another socket with --socket PATH or EDGE_AGENT_SOCKET" in out.stderr


def test_socket_flag_after_the_subcommand_and_env_beat_the_marker(
    daemon: TryItDaemon, bare: Path
) -> None:
    mark(bare, bare / "var", bare / "var" / "nothing.sock")
    assert cli("ps", "--socket", str(daemon.socket)).exit_code == 0
    out = cli("ps", env={"EDGE_AGENT_SOCKET": str(daemon.socket)})
    assert out.exit_code == 0, out.output


# -- 2. reading creates no state; installing says where ----------------------------------


def test_read_only_commands_create_no_home_and_installs_say_where(tmp_path: Path) -> None:
    home = tmp_path / "nowhere"
    env = {"EDGE_AGENT_HOME": str(home)}
    listed = cli("models", "list", env=env)
    assert listed.exit_code == 0 and "no models installed" in listed.stdout
    assert cli("models", "show", "smollm2-135m", env=env).exit_code == 1
    tokens = cli("tokens", "list", env=env)
    assert tokens.exit_code == 0 and "no tokens" in tokens.stdout, tokens.output
    assert not home.exists()
    tiny = make_tiny_gguf(tmp_path / "tiny.gguf")
    out = cli("models", "import", str(tiny), "--alias", "tiny", "--task", "completion", env=env)
    assert out.exit_code == 0, out.output
    assert f"edge-agent: installing into {home} (EDGE_AGENT_HOME)" in out.stderr
    assert "tiny" in cli("models", "list", env=env).stdout


# -- 3. global options after the subcommand; usage errors exit 2 ------------------------


def test_debug_and_config_work_after_the_subcommand(tmp_path: Path) -> None:
    out = cli("ps", "--socket", str(tmp_path / "none.sock"), "--debug")
    assert out.exit_code == 1 and "Traceback" in out.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("[runtime]\nthreads = 'many'\n")
    out = cli("models", "list", "--config", str(bad))
    assert out.exit_code == 2 and f"config file {bad}" in out.stderr


def test_usage_errors_exit_2_from_click_and_from_the_daemon(
    daemon: TryItDaemon, tmp_path: Path
) -> None:
    out = cli("models", "import", str(tmp_path / "missing.gguf"),
              env={"EDGE_AGENT_HOME": str(tmp_path / "home")})
    assert out.exit_code == 2 and "does not exist" in out.stderr
    out = cli("models", "load", "smollm2-135m", "--keep-alive", "forever",
              env={"EDGE_AGENT_SOCKET": str(daemon.socket)})
    assert out.exit_code == 2 and "keep_alive" in out.stderr


# -- 4. a model that is not installed says what to install ------------------------------


def test_chat_before_anything_is_installed_says_what_to_pull(daemon: TryItDaemon) -> None:
    env = {"EDGE_AGENT_SOCKET": str(daemon.socket)}
    out = cli("chat", "smollm2-135m", "Hello!", env=env)
    assert out.exit_code == 1
    assert "no models are installed" in out.stderr
    assert "run `edge-agent models pull smollm2-135m`" in out.stderr
    out = cli("chat", "my-model", "Hello!", env=env)
    assert "`edge-agent models import FILE --alias my-model`" in out.stderr
    assert "run `edge-agent models pull smollm2-135m` (the catalog's default)" in out.stderr


# -- 5. the banner: after the socket is bound, paste-able ------------------------------


def test_banner_is_printed_once_serving_and_every_line_pastes_into_bash(
    daemon: TryItDaemon,
) -> None:
    text = daemon.banner.read_text()
    assert text.startswith(f"edge-agent: serving on {daemon.socket}")
    commands = text.split("try: ", 1)[1]
    curl, _, cli_line = commands.partition("\n  or: ")
    for line in (curl, cli_line):
        syntax = subprocess.run(["bash", "-n"], input=line, text=True, capture_output=True)
        assert syntax.returncode == 0, (line, syntax.stderr)
    # Pasted as printed, the CLI line reaches this daemon (which has nothing installed).
    ran = subprocess.run(["bash", "-c", cli_line], capture_output=True, text=True, timeout=60)
    assert "no models are installed" in ran.stderr, ran.stderr
    # `make run` prints nothing of its own about serving: `serve --try-it` does.
    recipe = re.search(r"^run:.*?(?=^\S)", (REPO / "Makefile").read_text(), re.M | re.S)
    assert recipe is not None and "serving on" not in recipe.group(0)
    assert "serve --try-it smollm2-135m" in recipe.group(0)


def test_second_serve_fails_before_printing_a_banner(daemon: TryItDaemon) -> None:
    second = subprocess.run(
        [sys.executable, "-m", "agent", "serve", "--try-it", "smollm2-135m"],
        env=daemon.env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 1
    assert f"another edge-agent is already serving on {daemon.socket}" in second.stderr
    assert second.stdout == ""
