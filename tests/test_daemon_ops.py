"""Daemon operations: SIGHUP policy reload (notify-reload), watchdog, CLI clients, privacy."""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from daemon import Daemon, prepare_home, running

from agent.security.authz import DEFAULT_RBAC_PATH

SMOL = "smollm2-135m"


def _cli(d: Daemon, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], env=d.env, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def test_sighup_reloads_policy_keeps_old_when_invalid_and_audits(tmp_path: Path) -> None:
    rbac = tmp_path / "rbac.yaml"
    shutil.copy(DEFAULT_RBAC_PATH, rbac)
    home = tmp_path / "home"
    with running(home, {"EDGE_AGENT_SECURITY__RBAC_FILE": str(rbac)}) as d:
        rbac.write_text("roles: [this is not a mapping\n")
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        d.wait_for("RELOADING=1")
        d.wait_for("READY=1", count=2)
        with d.client() as c:  # root is still admin under the old policy
            assert c.get("/agent/v1/models").status_code == 200
        shutil.copy(DEFAULT_RBAC_PATH, rbac)
        d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
        d.wait_for("READY=1", count=3)
    with sqlite3.connect(home / "registry.db") as db:
        rows = db.execute("SELECT subject, action, outcome FROM audit_records "
                          "WHERE subject = 'signal:SIGHUP' ORDER BY seq").fetchall()
    assert rows == [("signal:SIGHUP", "policy:write", "rejected"),
                    ("signal:SIGHUP", "policy:write", "ok")]


@pytest.mark.timeout(30)
def test_a_notify_socket_nobody_reads_never_blocks_the_agent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The notify socket's queue holds ~10 datagrams; sd_notify sent with a blocking socket
    # froze the event loop once a receiver stopped reading (seen in the unit test under load).
    import socket

    from agent.systemd import notify

    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as rx:
        rx.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        sent = [notify("WATCHDOG=1") for _ in range(200)]
        assert sent[0] and not sent[-1], "the first pings are sent, those past a full queue dropped"
        assert rx.recv(64) == b"WATCHDOG=1"
        assert notify("WATCHDOG=1"), "room again: pings go out again"


def test_watchdog_pings_when_systemd_asks(tmp_path: Path) -> None:
    with running(tmp_path, {"WATCHDOG_USEC": "200000"}) as d:
        d.wait_for("WATCHDOG=1", count=2)


def test_cli_chat_ps_and_run_talk_to_the_daemon(tmp_path: Path, smollm2_gguf: Path) -> None:
    home = prepare_home(tmp_path / "home", {SMOL: smollm2_gguf})
    with running(home) as d:
        chat = _cli(d, "chat", SMOL, "Say hello.", "--max-tokens", "8", "--seed", "1")
        assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr
        ps = _cli(d, "ps")
        assert ps.returncode == 0 and SMOL in ps.stdout and "gguf-q4_1-cpu" in ps.stdout
        run = _cli(d, "run", SMOL, stdin="Hi there\n/bye\n")
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(">>> ") and run.stdout.count(">>> ") == 2
        assert len(run.stdout.split(">>> ")[1].strip()) > 0  # the model's reply
        unload = _cli(d, "models", "unload", SMOL)
        assert unload.returncode == 0 and f"unloaded {SMOL}" in unload.stdout


def test_cli_says_clearly_when_no_daemon_runs(tmp_path: Path) -> None:
    d = Daemon(tmp_path)  # never started: nothing listens on its socket
    try:
        proc = _cli(d, "ps")
    finally:
        d.notify.close()
        shutil.rmtree(d.sockdir, ignore_errors=True)
    assert proc.returncode == 1
    assert "no edge-agent is running on" in proc.stderr and "Traceback" not in proc.stderr


def test_prompts_are_not_logged_unless_content_logging_is_on(
    tmp_path: Path, smollm2_gguf: Path
) -> None:
    secret = "zebra-quartz-4711"
    home = prepare_home(tmp_path / "home", {SMOL: smollm2_gguf})
    for content, expect in (("false", False), ("true", True)):
        d = Daemon(home, {"EDGE_AGENT_LOGGING__LEVEL": "debug",
                          "EDGE_AGENT_LOGGING__LOG_CONTENT": content}).start()
        with d.client() as c:
            r = c.post("/v1/chat/completions", json={"model": SMOL, "max_tokens": 2,
                       "messages": [{"role": "user", "content": f"Repeat {secret}"}]})
            assert r.status_code == 200
        assert d.stop() == 0
        assert (secret in d.stderr()) is expect
    with sqlite3.connect(home / "registry.db") as db:  # nor is it in the audit log
        assert not [r for r in db.execute("SELECT details FROM audit_records")
                    if secret in r[0]]
    assert os.stat(home / "registry.db").st_mode & 0o777 == 0o640
