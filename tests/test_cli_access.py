"""CLI commands go through the same RBAC and audit as the API, declared per command."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

import click

from agent.authz import PERMISSIONS
from agent.cli import main
from agent.cli_access import PERMISSION_ATTR

# Commands that need no permission of their own, and why.
UNGUARDED = {
    "serve": "is the daemon; its API enforces the policy on every request",
    "run": "talks to the daemon over the socket, which enforces the policy",
    "chat": "talks to the daemon over the socket, which enforces the policy",
    "ps": "talks to the daemon over the socket, which enforces the policy",
    "models load": "talks to the daemon over the socket, which enforces the policy",
    "models unload": "talks to the daemon over the socket, which enforces the policy",
    "policy reload": "talks to the daemon over the socket (policy:write enforced there)",
    "models list": "reads the registry file, which only its owner group can open",
    "models show": "reads the registry file, which only its owner group can open",
    "models select": "reads the registry file, which only its owner group can open",
    "device info": "reads public hardware facts",
    "policy check": "validates a file the caller names",
    "policy explain": "evaluates a policy file the caller can read",
    "audit public-key": "prints the public half of the device key",
}


def _commands(group: click.Group, prefix: str = "") -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        assert cmd is not None
        path = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            out.update(_commands(cmd, path + " "))
        else:
            out[path] = cmd
    return out


def test_every_cli_command_declares_a_permission_or_why_not() -> None:
    missing, unknown = [], []
    for path, cmd in _commands(main).items():
        perm = getattr(cmd.callback, PERMISSION_ATTR, None)
        if perm is None and path not in UNGUARDED:
            missing.append(path)
        if perm is not None and perm not in PERMISSIONS:
            unknown.append((path, perm))
    assert missing == [] and unknown == []
    assert set(UNGUARDED) <= set(_commands(main)), "stale entries in UNGUARDED"


def _run_as(uid: int, home: Path, *args: str) -> tuple[int, str]:
    """Run the CLI in a forked child that has dropped to `uid` (a real process and uid;
    no exec, since the interpreter under /root is not reachable by other uids)."""
    from click.testing import CliRunner

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result = CliRunner().invoke(main, list(args), env={"EDGE_AGENT_HOME": str(home)})
            code = result.exit_code
            os.write(write_fd, f"{code}\n{result.stderr}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        out = f.read()
    os.waitpid(pid, 0)
    code_s, _, err = out.partition("\n")
    return int(code_s), err


def test_unbound_uid_is_refused_by_the_cli_and_the_denial_is_audited(
    smollm2_gguf: Path,
) -> None:
    # Under /tmp directly: pytest's own temp root is 0700, closed to other uids.
    tmp_path = Path(tempfile.mkdtemp(prefix="ea-cli-", dir="/tmp"))
    try:
        _refused(tmp_path, smollm2_gguf)
    finally:
        shutil.rmtree(tmp_path)


def _refused(tmp_path: Path, smollm2_gguf: Path) -> None:
    home = tmp_path / "home"
    root = subprocess.run([sys.executable, "-m", "agent", "models", "import", str(smollm2_gguf),
                           "--alias", "smol"], env={**os.environ, "EDGE_AGENT_HOME": str(home)},
                          capture_output=True, text=True, check=False)
    assert root.returncode == 0, root.stderr
    # Let uid 65534 reach the files (and own the signing key), so only the policy stops it.
    keys = home / "keys"
    for p in [tmp_path, home, *home.rglob("*")]:
        if not p.is_relative_to(keys):
            p.chmod(0o777 if p.is_dir() else 0o666)
    for p in [keys, *keys.iterdir()]:
        os.chown(p, 65534, 65534)
    code, stderr = _run_as(65534, home, "models", "rm", "smol")
    assert code == 1
    assert "permission denied" in stderr and "uid:65534" in stderr
    with sqlite3.connect(home / "registry.db") as db:
        assert db.execute("SELECT alias FROM models").fetchall() == [("smol",)]
        rows = db.execute("SELECT subject, action, resource, decision, outcome FROM "
                          "audit_records ORDER BY seq").fetchall()
    assert rows[0][1:] == ("models:write", "model:smol", "allow", "ok")  # root's import
    assert rows[-1][0].startswith("uid:65534")
    assert rows[-1][1:] == ("models:write", "model:smol", "deny", "denied")
