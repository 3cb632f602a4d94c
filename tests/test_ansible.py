"""The Ansible role and playbooks (ansible/): lint (production profile) and syntax checks, and
a real converge of the edge_agent role against this machine as a throwaway target: a local
connection with every path variable under a temporary root (ansible/README.md), accounts
with unique names removed afterwards, enrollment against a controller home made here. Then
a second run must change nothing, check mode must report a change without making it, the
venv's `edge-agent` must run, the rendered config must pass the agent's own validation and
a bad setting must be refused before it replaces the good one.

Needs root (accounts, ownership), as in CI. The wheelhouse comes from
scripts/build-wheelhouse.sh, cached under var/wheelhouse/ and ~/.cache/edge-agent/ by the
lock's hash: the first build on a machine downloads the wheels (~20 s) and takes
llama-cpp-python from pip's wheel cache (or compiles it, ~11 min, once per machine); a fresh
clone then copies them (~5 s).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ANSIBLE = ROOT / "ansible"
BIN = Path(sys.executable).parent
PLAYBOOKS = ["playbooks/provision.yml", "playbooks/controller.yml", "playbooks/wheelhouse.yml"]
pytestmark = pytest.mark.timeout(600)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "EDGE_"))}
    env["PATH"] = f"{BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env["ANSIBLE_CONFIG"] = str(ANSIBLE / "ansible.cfg")
    env["ANSIBLE_NOCOLOR"] = "1"
    env["ANSIBLE_FORCE_COLOR"] = "0"
    return env


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ANSIBLE, env=_env(), capture_output=True, text=True,
                          check=False)


def test_ansible_lint_production_profile_passes() -> None:
    out = _run([str(BIN / "ansible-lint"), "--profile", "production", "--offline", *PLAYBOOKS])
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("playbook", PLAYBOOKS)
def test_playbook_syntax_check_passes(playbook: str) -> None:
    out = _run([str(BIN / "ansible-playbook"), "--syntax-check", playbook])
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_role_variable_is_documented() -> None:
    for role in ("edge_agent", "edge_agent_controller"):
        path = ANSIBLE / "roles" / role
        defaults = yaml.safe_load((path / "defaults/main.yml").read_text())
        spec = yaml.safe_load((path / "meta/argument_specs.yml").read_text())
        options = spec["argument_specs"]["main"]["options"]
        assert set(defaults) == set(options), (role, set(defaults) ^ set(options))
        assert all(o.get("description") for o in options.values())


def test_the_runtime_lock_is_current_and_has_no_dev_tools() -> None:
    out = subprocess.run([sys.executable, str(ROOT / "scripts/runtime_lock.py"), "--check"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    names = {line.split("==")[0].lower() for line in
             (ROOT / "requirements-runtime.lock").read_text().splitlines()
             if line and not line.startswith("#")}
    assert "llama_cpp_python" in names and "onnxruntime" in names
    dev = {"pytest", "pytest-timeout", "mypy", "ruff", "import-linter", "ansible-core",
           "ansible-lint", "black", "yamllint", "openai"}
    assert not names & dev


# -- the converge ---------------------------------------------------------------------------


def recap(output: str) -> dict[str, int]:
    """The PLAY RECAP counters of the one host."""
    match = re.search(r"^localhost\s+:\s+(.*)$", output, re.M)
    assert match, output[-3000:]
    return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}


@dataclass
class Target:
    base: Path
    user: str
    clients: str
    controller_home: Path
    vars_file: Path
    inventory: Path
    first: subprocess.CompletedProcess[str]
    bare: dict[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> Path:
        return self.base / "opt/edge-agent"

    @property
    def config(self) -> Path:
        return self.base / "etc/edge-agent"

    @property
    def state(self) -> Path:
        return self.base / "var/lib/edge-agent"

    @property
    def units(self) -> Path:
        return self.base / "etc/systemd/system"

    @property
    def agent(self) -> Path:
        return self.prefix / "venv/bin/edge-agent"

    def play(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return _run([str(BIN / "ansible-playbook"), "-i", str(self.inventory),
                     "-e", f"@{self.vars_file}", "-e", "edge_agent_hosts=all", *extra,
                     "playbooks/provision.yml"])


def _variables(base: Path, user: str, clients: str, controller_home: Path) -> dict[str, object]:
    return {
        "edge_agent_install_os_packages": False,
        "edge_agent_user": user,
        "edge_agent_group": user,
        "edge_agent_clients_group": clients,
        "edge_agent_prefix": str(base / "opt/edge-agent"),
        "edge_agent_config_dir": str(base / "etc/edge-agent"),
        "edge_agent_state_dir": str(base / "var/lib/edge-agent"),
        "edge_agent_runtime_dir": str(base / "run/edge-agent"),
        "edge_agent_unit_dir": str(base / "etc/systemd/system"),
        "edge_agent_enrollment_dir": str(base / "control/enrollment"),
        "edge_agent_settings": {"runtime": {"threads": 2, "memory_fraction": 0.5},
                                "logging": {"level": "warning"},
                                "sync": {"broker_host": "mqtt.invalid"}},
        "edge_agent_rbac_policy": {
            "version": 1,
            "roles": {"admin": {"permissions": ["*"]},
                      "app": {"permissions": ["inference:invoke", "models:read"]}},
            "bindings": [{"uid": 0, "role": "admin"}, {"uid": "self", "role": "admin"},
                         {"group": clients, "role": "app"}],
        },
        "edge_agent_accelerators": ["dri"],
        "edge_agent_enroll": True,
        "edge_agent_fleet": "testfleet",
        "edge_agent_groups": ["kiosks"],
        "edge_agent_controller_host": "localhost",
        "edge_agent_controller_command": str(BIN / "edge-agent-controller"),
        "edge_agent_controller_home": str(controller_home),
        "edge_agent_controller_environment": {"EDGE_CONTROLLER_HOME": str(controller_home)},
        "edge_agent_controller_spool": str(base / "controller-spool"),
    }


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    if os.geteuid() != 0:
        pytest.skip("the converge creates accounts and sets owners: run the tests as root")
    if Path("/run/systemd/system").is_dir():
        pytest.skip("systemd is PID 1 here: the role would start the real units; run the "
                    "converge in a container (as CI does)")
    if shutil.which("runuser") is None:
        pytest.skip("runuser (util-linux) is missing")
    built = subprocess.run([str(ROOT / "scripts/build-wheelhouse.sh")], capture_output=True,
                           text=True, check=False, env={**os.environ, "PYTHON": sys.executable})
    assert built.returncode == 0, built.stderr[-3000:]
    tag = secrets.token_hex(3)
    user, clients = f"ea-test-{tag}", f"ea-test-{tag}-cl"
    base = Path(tempfile.mkdtemp(prefix="ea-ansible-", dir="/tmp"))
    base.chmod(0o755)
    try:
        # What a real root file system has: the role creates only its own directories.
        for d in ("opt", "etc", "var/lib", "run", "control"):
            (base / d).mkdir(parents=True, mode=0o755)
        controller_home = base / "controller"
        init = subprocess.run([str(BIN / "edge-agent-controller"), "keys", "init", "--fleet",
                               "testfleet"], capture_output=True, text=True, check=False,
                              env={**_env(), "EDGE_CONTROLLER_HOME": str(controller_home)})
        assert init.returncode == 0, init.stderr
        vars_file = base / "control/vars.yml"
        vars_file.write_text(json.dumps(_variables(base, user, clients, controller_home)))
        inventory = base / "control/inventory.yml"
        inventory.write_text(json.dumps({"all": {"hosts": {"localhost": {
            "ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3"}}}}))
        t = Target(base, user, clients, controller_home, vars_file, inventory,
                   subprocess.CompletedProcess([], 0))
        # The bare-target check-mode play touches nothing of this target: it runs while the
        # converge does (two plays, two cores), and its test reads what it found.
        with ThreadPoolExecutor(1) as pool:
            bare = pool.submit(_bare_check_mode, t)
            t.first = t.play()
            t.bare = bare.result()
        yield t
    finally:
        subprocess.run(["userdel", user], capture_output=True, check=False)
        for group in (user, clients):
            subprocess.run(["groupdel", group], capture_output=True, check=False)
        # A converged target holds a venv and a wheelhouse (~1 GB): rm goes on in the
        # background (disk time, not CPU) instead of holding the next test for seconds.
        subprocess.run(["sh", "-c", 'rm -rf -- "$1" &', "sh", str(base)], check=True)


def test_the_role_converges_and_a_second_run_changes_nothing(
    target: Target, side_plays: SidePlays
) -> None:
    first = target.first
    assert first.returncode == 0, first.stdout[-5000:]
    counts = recap(first.stdout)
    assert counts["failed"] == 0 and counts["changed"] > 0
    # PID 1 is not systemd here, found at run time: the units are installed, not started.
    assert "systemd is not PID 1 on this machine" in first.stdout
    second = side_plays.second
    assert second.returncode == 0, second.stdout[-5000:]
    assert recap(second.stdout)["changed"] == 0, second.stdout[-5000:]


def test_accounts_files_and_modes(target: Target) -> None:
    import grp
    import pwd

    assert target.first.returncode == 0
    account = pwd.getpwnam(target.user)
    assert account.pw_shell == "/usr/sbin/nologin"
    assert grp.getgrnam(target.clients)
    uid, gid = account.pw_uid, grp.getgrnam(target.user).gr_gid

    def owner_mode(p: Path) -> tuple[int, int, int]:
        st = p.stat()
        return st.st_uid, st.st_gid, st.st_mode & 0o7777

    assert owner_mode(target.config) == (0, gid, 0o750)
    assert owner_mode(target.config / "agent.toml") == (0, gid, 0o640)
    assert owner_mode(target.config / "rbac.yaml") == (0, gid, 0o640)
    assert owner_mode(target.state) == (uid, gid, 0o750)
    assert owner_mode(target.prefix / "venv/bin/python")[0] == 0
    for unit in ("edge-agent.service", "edge-agent.socket", "edge-agent.service.d/50-site.conf",
                 "edge-agent.socket.d/50-site.conf", "edge-agent.service.d/60-dri.conf"):
        assert owner_mode(target.units / unit) == (0, 0, 0o644), unit
    assert (target.units / "edge-agent.service").read_bytes() == \
        (ROOT / "systemd/edge-agent.service").read_bytes()
    site = (target.units / "edge-agent.service.d/50-site.conf").read_text()
    assert f"User={target.user}" in site and f"ExecStart={target.agent} --config" in site
    assert re.search(r"^MemoryHigh=\d+%$", site, re.M)
    assert re.search(r"^MemoryMax=\d+%$", site, re.M)
    sock = (target.units / "edge-agent.socket.d/50-site.conf").read_text()
    assert f"SocketGroup={target.clients}" in sock
    # Only the device's TLS key stays private; the wheelhouse left no archive behind.
    assert (target.state / "keys/device-cert.pem").is_file()
    assert not (target.state / "enrollment.csr").exists()
    assert not list(target.prefix.glob("*.tar"))


def test_the_installed_units_verify_with_their_drop_ins(target: Target) -> None:
    assert target.first.returncode == 0
    out = subprocess.run(["systemd-analyze", "verify", "--man=no",
                          str(target.units / "edge-agent.socket"),
                          str(target.units / "edge-agent.service")],
                         env={**os.environ, "SYSTEMD_UNIT_PATH": f"{target.units}:"},
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


def test_the_venv_runs_the_agent_and_the_config_validates(target: Target) -> None:
    assert target.first.returncode == 0
    version = subprocess.run([str(target.agent), "--version"], capture_output=True, text=True,
                             check=True).stdout
    assert version.startswith("edge-agent, version ")
    # The agent's own validation: settings (exit 2 on any bad key or value) and the RBAC
    # policy they name.
    config = target.config / "agent.toml"
    explain = subprocess.run([str(target.agent), "--config", str(config), "policy", "explain",
                              "--uid", "0", "--json"], capture_output=True, text=True,
                             check=False, env={"PATH": "/usr/bin:/bin"})
    assert explain.returncode == 0, explain.stderr
    decision = json.loads(explain.stdout)
    assert decision["policy"] == str(target.config / "rbac.yaml")
    assert all(d["allowed"] for d in decision["decisions"])
    check = subprocess.run([str(target.agent), "policy", "check",
                            str(target.config / "rbac.yaml")],
                           capture_output=True, text=True, check=False,
                           env={"PATH": "/usr/bin:/bin"})
    assert check.returncode == 0, check.stderr
    # Enrolled through the controller, as the agent itself reports it. (Only the rendered
    # config speaks: `make test` exports EDGE_AGENT_HOME for its own daemon.)
    info = subprocess.run(["runuser", "-u", target.user, "--", str(target.agent), "--config",
                           str(config), "device", "info", "--json"],
                          capture_output=True, text=True, check=False,
                          env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    assert info.returncode == 0, info.stderr
    assert '"enrolled"' in info.stdout and "testfleet" in info.stdout


@dataclass
class SidePlays:
    """Three plays on the converged target that must leave it as it was, run at once (none
    writes: the second converge finds nothing to change, one is check mode, the third fails
    validating its config): their output, and the config's bytes and mtime before and
    after all three."""

    second: subprocess.CompletedProcess[str]
    check: subprocess.CompletedProcess[str]
    rejected: subprocess.CompletedProcess[str]
    before: tuple[bytes, int]
    after: tuple[bytes, int]


@pytest.fixture(scope="module")
def side_plays(target: Target) -> SidePlays:
    assert target.first.returncode == 0
    config = target.config / "agent.toml"
    before = config.read_bytes(), config.stat().st_mtime_ns
    with ThreadPoolExecutor(3) as pool:
        second = pool.submit(target.play)
        check = pool.submit(target.play, "--check", "--diff", "-e",
                            '{"edge_agent_settings": {"logging": {"level": "debug"}}}')
        rejected = pool.submit(target.play, "-e",
                               '{"edge_agent_settings": {"runtime": {"threads": 0}}}')
        plays = second.result(), check.result(), rejected.result()
    return SidePlays(*plays, before, (config.read_bytes(), config.stat().st_mtime_ns))


def test_check_mode_reports_a_change_without_making_it(side_plays: SidePlays) -> None:
    out = side_plays.check
    assert out.returncode == 0, out.stdout[-5000:]
    assert recap(out.stdout)["changed"] >= 1
    assert '+level = "debug"' in out.stdout
    assert side_plays.after == side_plays.before


def test_a_setting_the_agent_rejects_fails_the_play_and_keeps_the_config(
    side_plays: SidePlays,
) -> None:
    out = side_plays.rejected
    assert out.returncode != 0
    assert recap(out.stdout)["failed"] == 1
    assert "runtime.threads" in out.stdout
    assert side_plays.after[0] == side_plays.before[0]


def _bare_check_mode(target: Target) -> dict[str, Any]:
    """Check mode before anything is installed, on a second, empty root: what the play
    printed, and what that root and the account database hold afterwards."""
    bare = target.base / "bare"
    for d in ("opt", "etc", "var/lib", "run"):
        (bare / d).mkdir(parents=True)
    tag = secrets.token_hex(3)
    variables = _variables(bare, f"ea-test-{tag}", f"ea-test-{tag}-cl", target.controller_home)
    vars_file = target.base / "control/bare.yml"
    vars_file.write_text(json.dumps(variables))
    out = _run([str(BIN / "ansible-playbook"), "-i", str(target.inventory), "-e",
                f"@{vars_file}", "-e", "edge_agent_hosts=all", "--check",
                "playbooks/provision.yml"])
    left = sorted(p.relative_to(bare).as_posix() for p in bare.rglob("*"))
    account = subprocess.run(["getent", "passwd", f"ea-test-{tag}"], capture_output=True,
                             check=False)
    return {"out": out, "left": left, "account_rc": account.returncode}


def test_check_mode_on_a_bare_target_reports_everything_and_creates_nothing(
    target: Target,
) -> None:
    """Check mode before anything is installed: the play completes, reports the changes a
    real run would make, and leaves no account, directory or file behind (run beside the
    converge, in the fixture)."""
    out = target.bare["out"]
    assert out.returncode == 0, out.stdout[-5000:]
    counts = recap(out.stdout)
    assert counts["failed"] == 0 and counts["changed"] >= 10
    assert "would enroll localhost" in out.stdout
    assert target.bare["left"] == ["etc", "opt", "run", "var", "var/lib"]
    assert target.bare["account_rc"] == 2
