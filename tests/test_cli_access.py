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

from agent.cli import main
from agent.cli.guard import PERMISSION_ATTR
from agent.security.authz import PERMISSIONS

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
    "device id": "prints the device id (a public key's id)",
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


def _run_as(uid: int, home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    """Run the CLI in a forked child that has dropped to `uid` (a real process and uid;
    no exec, since the interpreter and the checkout may be closed to other uids: a clone
    in a 0700 directory). The child can import nothing new, so the caller first runs the
    same command path once in this process (`_warm`)."""
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
            result = CliRunner().invoke(main, list(args),
                                        env={"EDGE_AGENT_HOME": str(home), **(env or {})})
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


def _warm(tmp_path: Path, *args: str) -> None:
    """Run `args` once here, denied by a policy that binds nobody, against a scratch home:
    every module the command's refusal path imports is then loaded before a fork."""
    from click.testing import CliRunner

    scratch = tmp_path / "warm"
    (scratch / "home").mkdir(parents=True)
    nobody = scratch / "nobody.yaml"
    nobody.write_text("bindings: []\n")
    subprocess.run([sys.executable, "-m", "agent", "tokens", "create", "--name", "warm",
                    "--role", "app"], check=False,
                   env={**os.environ, "EDGE_AGENT_HOME": str(scratch / "home")},
                   capture_output=True)  # creates the scratch database and key
    result = CliRunner().invoke(main, list(args), env={
        "EDGE_AGENT_HOME": str(scratch / "home"), "EDGE_AGENT_SECURITY__RBAC_FILE": str(nobody)})
    assert result.exit_code == 1 and "permission denied" in result.stderr, result.stderr


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
    # What uid 65534 reads is staged where it can reach it: the packaged policy lives in
    # the checkout, which may be closed to other uids.
    from agent.security.authz import DEFAULT_RBAC_PATH

    policy = tmp_path / "rbac.yaml"
    shutil.copy(DEFAULT_RBAC_PATH, policy)
    env = {"EDGE_AGENT_SECURITY__RBAC_FILE": str(policy)}
    _warm(tmp_path, "models", "rm", "smol")
    # Let uid 65534 reach the files (and own the signing key), so only the policy stops it.
    keys = home / "keys"
    for p in [tmp_path, home, *home.rglob("*")]:
        if not p.is_relative_to(keys):
            p.chmod(0o777 if p.is_dir() else 0o666)
    for p in [keys, *keys.iterdir()]:
        os.chown(p, 65534, 65534)
    code, stderr = _run_as(65534, home, "models", "rm", "smol", env=env)
    assert code == 1
    assert "permission denied" in stderr and "uid:65534" in stderr
    with sqlite3.connect(home / "registry.db") as db:
        assert db.execute("SELECT alias FROM models").fetchall() == [("smol",)]
        rows = db.execute("SELECT subject, action, resource, decision, outcome FROM "
                          "audit_records ORDER BY seq").fetchall()
    assert rows[0][1:] == ("models:write", "model:smol", "allow", "ok")  # root's import
    assert rows[-1][0].startswith("uid:65534")
    assert rows[-1][1:] == ("models:write", "model:smol", "deny", "denied")


def test_cli_guard_is_advisory_a_caller_policy_passes_it(smollm2_gguf: Path) -> None:
    # [hardening] finding 7: the guard evaluates the policy file the caller's own
    # environment names, so a caller's policy that makes them admin passes it; only file
    # permissions stop them. docs/security.md must say so, naming what the guard reads.
    doc = (Path(__file__).parents[1] / "docs" / "security.md").read_text()
    section = doc.split("### The CLI guard is advisory", 1)[1].split("\n## ", 1)[0]
    for name in ("not a security boundary", "EDGE_AGENT_SECURITY__RBAC_FILE", "--config",
                 "EDGE_AGENT_CONFIG", "EDGE_AGENT_HOME", "uid: self", "file permissions"):
        assert name in section, f"docs/security.md's advisory section does not name {name}"
    tmp_path = Path(tempfile.mkdtemp(prefix="ea-cli-", dir="/tmp"))
    try:
        _advisory(tmp_path, smollm2_gguf)
    finally:
        shutil.rmtree(tmp_path)


def _advisory(tmp_path: Path, smollm2_gguf: Path) -> None:
    from click.testing import CliRunner

    homes = [tmp_path / "warm", tmp_path / "home"]
    for home in homes:
        done = subprocess.run([sys.executable, "-m", "agent", "models", "import",
                               str(smollm2_gguf), "--alias", "smol"],
                              env={**os.environ, "EDGE_AGENT_HOME": str(home)},
                              capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
    # Load the allowed path's modules before the fork (the child may not read the checkout).
    warm = CliRunner().invoke(main, ["models", "rm", "smol"],
                              env={"EDGE_AGENT_HOME": str(homes[0])})
    assert warm.exit_code == 0, warm.output
    home = homes[1]
    own = tmp_path / "mine.yaml"
    own.write_text("bindings:\n  - uid: 65534\n    role: admin\n")
    keys = home / "keys"
    for p in [tmp_path, home, *home.rglob("*")]:
        if not p.is_relative_to(keys):
            p.chmod(0o777 if p.is_dir() else 0o666)
    for p in [keys, *keys.iterdir()]:
        os.chown(p, 65534, 65534)
    code, stderr = _run_as(65534, home, "models", "rm", "smol",
                           env={"EDGE_AGENT_SECURITY__RBAC_FILE": str(own)})
    assert code == 0, stderr  # the guard let it through: its policy was the caller's
    with sqlite3.connect(home / "registry.db") as db:
        assert db.execute("SELECT alias FROM models").fetchall() == []
        last = db.execute("SELECT subject, action, decision FROM audit_records "
                          "ORDER BY seq DESC LIMIT 1").fetchone()
    assert last[0].startswith("uid:65534") and last[1:] == ("models:write", "allow")
