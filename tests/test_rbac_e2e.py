"""RBAC end to end: the real daemon (`python -m agent serve`) on its Unix socket, called by
children that drop to throwaway users; tokens; policy reload that never fails open."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from daemon import Daemon, prepare_home
from test_identity import http_request, run_as

from agent.api.schema import WhoAmI
from agent.security.tokens import TokenStore
from localdb import open_database

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("useradd") is None,
                       reason="creates users and drops privileges: needs root and useradd"),
]

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
CHAT = [{"role": "user", "content": "hi"}]


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    groups: list[int]


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, User]]:
    tag = f"eatest{os.getpid()}e"
    group = f"{tag}c"
    names = {"member": f"{tag}m", "viewer": f"{tag}v", "nobody": f"{tag}n"}
    made: list[str] = []
    try:
        subprocess.run(["groupadd", group], check=True)
        for key, name in names.items():
            extra = ["-G", group] if key == "member" else []
            subprocess.run(["useradd", "-M", "-U", "-s", "/usr/sbin/nologin", *extra, name],
                           check=True)
            made.append(name)
        out = {}
        for key, name in names.items():
            pw = pwd.getpwnam(name)
            supp = [grp.getgrnam(group).gr_gid] if key == "member" else []
            out[key] = User(name, pw.pw_uid, pw.pw_gid, supp)
        out["group"] = User(group, -1, grp.getgrnam(group).gr_gid, [])
        yield out
    finally:
        for name in made:
            subprocess.run(["userdel", name], check=False)
            subprocess.run(["groupdel", name], check=False)  # -U made a group per user
        subprocess.run(["groupdel", group], check=False)


def policy_text(users: dict[str, User], viewer: bool = True) -> str:
    lines = ["bindings:", "  - uid: 0", "    role: admin",
             f"  - group: {users['group'].name}", "    role: app", f"    models: [{SMOL}]"]
    if viewer:
        lines += [f"  - user: {users['viewer'].name}", "    role: viewer"]
    return "\n".join(lines) + "\n"


@dataclass
class Agent:
    daemon: Daemon
    policy: Path
    home: Path

    def as_user(self, u: User, method: str, target: str, body: Any = None,
                headers: dict[str, str] | None = None) -> tuple[int, Any]:
        _, raw = run_as(u.uid, u.gid, u.groups,
                        lambda: http_request(self.daemon.socket, method, target, body, headers))
        head, _, payload = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload.decode(errors="replace")

    def root(self) -> httpx.Client:
        return self.daemon.client(timeout=30)


@pytest.fixture(scope="module")
def agent(
    users: dict[str, User], tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> Iterator[Agent]:
    home = prepare_home(tmp_path_factory.mktemp("home"), {SMOL: smollm2_gguf})
    home.chmod(0o755)
    policy = home / "rbac.yaml"
    policy.write_text(policy_text(users))
    d = Daemon(home, {
        "EDGE_AGENT_SERVER__SOCKET_MODE": str(0o666),  # let the dropped-uid children in
        "EDGE_AGENT_SECURITY__RBAC_FILE": str(policy),
    })
    d.sockdir.chmod(0o755)
    d.start()
    try:
        yield Agent(d, policy, home)
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def forbidden(status: int, body: Any) -> bool:
    return status == 403 and body["error"]["type"] == "permission_error"


def test_unbound_user_gets_only_public_routes(agent: Agent, users: dict[str, User]) -> None:
    nobody = users["nobody"]
    assert agent.as_user(nobody, "GET", "/healthz")[0] == 200
    status, body = agent.as_user(nobody, "GET", "/agent/v1/whoami")
    assert status == 200 and body["uid"] == nobody.uid
    status, body = agent.as_user(nobody, "GET", "/agent/v1/device")
    assert forbidden(status, body)
    assert body["error"]["message"] == f"denied: no binding for uid:{nobody.uid}({nobody.name})"
    assert forbidden(*agent.as_user(nobody, "GET", "/v1/models"))
    assert forbidden(*agent.as_user(nobody, "POST", "/v1/chat/completions",
                                    {"model": SMOL, "messages": CHAT}))
    # Every denial is in the audit log, with the kernel-verified uid and pid.
    with agent.root() as c:
        records = c.get("/agent/v1/audit", params={"n": 50}).json()["records"]
    denials = [r for r in records if r["uid"] == nobody.uid and r["decision"] == "deny"]
    assert {(r["action"], r["outcome"]) for r in denials} >= {
        ("device:read", "403"), ("models:read", "403"), ("inference:invoke", "403")}
    assert all(r["subject"] == f"uid:{nobody.uid}({nobody.name})" and r["pid"] for r in denials)


def test_group_member_may_invoke_only_its_models(agent: Agent, users: dict[str, User]) -> None:
    m = users["member"]  # in the clients group through a supplementary group
    assert agent.as_user(m, "GET", "/v1/models")[0] == 200
    status, body = agent.as_user(m, "POST", "/v1/chat/completions",
                                 {"model": GEMMA, "messages": CHAT})
    assert forbidden(status, body) and f"not model {GEMMA}" in body["error"]["message"]
    # In scope: served.
    status, body = agent.as_user(m, "POST", "/v1/chat/completions",
                                 {"model": SMOL, "messages": CHAT, "max_tokens": 1})
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant", body
    assert forbidden(*agent.as_user(m, "POST", f"/agent/v1/models/{SMOL}/load", {}))
    assert forbidden(*agent.as_user(m, "GET", "/agent/v1/device"))


def test_viewer_reads_but_cannot_act(agent: Agent, users: dict[str, User]) -> None:
    v = users["viewer"]
    assert agent.as_user(v, "GET", "/agent/v1/device")[0] == 200
    assert agent.as_user(v, "GET", "/metrics")[0] == 200
    assert forbidden(*agent.as_user(v, "POST", "/v1/chat/completions",
                                    {"model": SMOL, "messages": CHAT}))
    assert forbidden(*agent.as_user(v, "POST", "/agent/v1/policy/reload"))


def test_root_is_admin(agent: Agent) -> None:
    with agent.root() as c:
        assert c.get("/agent/v1/device").status_code == 200
        assert c.get("/agent/v1/loaded").status_code == 200


def test_token_replaces_the_uid_and_revocation_is_immediate(
    agent: Agent, users: dict[str, User]
) -> None:
    db = open_database(agent.home / "registry.db")
    store = TokenStore(db)
    try:
        token, _ = store.create("e2e-viewer", "viewer")
        nobody = users["nobody"]
        auth = {"Authorization": f"Bearer {token}"}
        assert agent.as_user(nobody, "GET", "/agent/v1/device", headers=auth)[0] == 200
        store.revoke("e2e-viewer")
        status, body = agent.as_user(nobody, "GET", "/agent/v1/device", headers=auth)
        assert status == 401 and body["error"]["code"] == "token_revoked"
        status, body = agent.as_user(nobody, "GET", "/agent/v1/device",
                                     headers={"Authorization": "Bearer ea_nope"})
        assert status == 401 and body["error"]["code"] == "invalid_token"
        # An expired token: its expiry set in the past, as time would have done.
        old, _ = store.create("e2e-old", "viewer", timedelta(days=1))
        with sqlite3.connect(agent.home / "registry.db") as raw:
            raw.execute("UPDATE api_tokens SET expires_at = '2020-01-01 00:00:00.000000' "
                        "WHERE name = 'e2e-old'")
        status, body = agent.as_user(nobody, "GET", "/agent/v1/device",
                                     headers={"Authorization": f"Bearer {old}"})
        assert status == 401 and body["error"]["code"] == "token_expired"
    finally:
        store.close()
        db.close()


def test_whoami_reports_the_identity_the_policy_uses(
    agent: Agent, users: dict[str, User]
) -> None:
    # Issue 15: with a valid bearer token whoami reported the uid, not the token subject
    # the policy actually authorizes.
    m, nobody = users["member"], users["nobody"]
    status, body = agent.as_user(m, "GET", "/agent/v1/whoami")
    assert status == 200, body
    assert body["authentication"] == "peer_credentials" and body["uid"] == m.uid
    assert body["subject"] == f"uid:{m.uid}({m.name})" and body["roles"] == ["app"]
    assert body["bindings"] == [{"binding": f"group:{users['group'].name}", "role": "app",
                                 "models": [SMOL]}]
    db = open_database(agent.home / "registry.db")
    store = TokenStore(db)
    try:
        token, _ = store.create("e2e-whoami", "viewer")
        auth = {"Authorization": f"Bearer {token}"}
        status, body = agent.as_user(m, "GET", "/agent/v1/whoami", headers=auth)
        assert status == 200, body
        assert body["authentication"] == "token" and body["subject"] == "token:e2e-whoami"
        assert body["token"] == "e2e-whoami" and body["roles"] == ["viewer"]
        assert body["bindings"] == [{"binding": "token:e2e-whoami", "role": "viewer",
                                     "models": None}]
        assert "groups" not in body and body["uid"] == m.uid  # the peer, for the audit only
        WhoAmI.model_validate(body)  # as docs/openapi.json documents it
        store.revoke("e2e-whoami")
        status, body = agent.as_user(nobody, "GET", "/agent/v1/whoami", headers=auth)
        assert status == 401 and body["error"]["code"] == "token_revoked"
    finally:
        store.close()
        db.close()


def test_reload_rejects_invalid_and_applies_valid(agent: Agent, users: dict[str, User]) -> None:
    v = users["viewer"]
    good = agent.policy.read_text()
    try:
        agent.policy.write_text(good + "  - user: x\n    role: nope\n")
        with agent.root() as c:
            r = c.post("/agent/v1/policy/reload")
        assert r.status_code == 400 and "previous policy stays in force" in r.text
        assert agent.as_user(v, "GET", "/agent/v1/device")[0] == 200  # old policy in force

        agent.policy.write_text(policy_text(users, viewer=False))
        with agent.root() as c:
            assert c.post("/agent/v1/policy/reload").status_code == 200
        assert forbidden(*agent.as_user(v, "GET", "/agent/v1/device"))
    finally:
        agent.policy.write_text(good)
        with agent.root() as c:
            assert c.post("/agent/v1/policy/reload").status_code == 200


# One route per permission that has one, to ask the daemon itself.
PROBES = {
    "device:read": ("GET", "/agent/v1/device"),
    "metrics:read": ("GET", "/metrics"),
    "models:read": ("GET", "/v1/models"),
    "audit:read": ("GET", "/agent/v1/audit"),
    "policy:write": ("POST", "/agent/v1/policy/reload"),
}


def test_policy_explain_and_the_daemon_agree_on_self_and_others(
    users: dict[str, User], tmp_path_factory: pytest.TempPathFactory, smollm2_gguf: Path
) -> None:
    from click.testing import CliRunner

    from agent.cli import main

    home = prepare_home(tmp_path_factory.mktemp("self"), {SMOL: smollm2_gguf})
    home.chmod(0o755)
    policy = home / "rbac.yaml"
    # No `uid: 0` binding: root is allowed only as `self`, the daemon's own account.
    policy.write_text("bindings:\n  - uid: self\n    role: operator\n"
                      f"  - user: {users['viewer'].name}\n    role: viewer\n"
                      f"  - group: {users['group'].name}\n    role: app\n")
    env = {"EDGE_AGENT_SECURITY__RBAC_FILE": str(policy), "EDGE_AGENT_HOME": str(home)}
    d = Daemon(home, {"EDGE_AGENT_SERVER__SOCKET_MODE": str(0o666), **env})
    d.sockdir.chmod(0o755)
    d.start()
    try:
        me = User("root", os.geteuid(), os.getegid(), [])
        assert home.stat().st_uid == me.uid  # the daemon's account owns its home
        agent = Agent(d, policy, home)
        subjects = {"self": me, "viewer": users["viewer"], "member": users["member"],
                    "nobody": users["nobody"]}
        for label, u in subjects.items():
            out = CliRunner().invoke(main, ["policy", "explain", "--uid", str(u.uid), "--json"],
                                     env=env)
            assert out.exit_code == 0, out.output
            explained = {x["action"]: x for x in json.loads(out.stdout)["decisions"]}
            for permission, (method, target) in PROBES.items():
                status, body = agent.as_user(u, method, target)
                assert status in (200, 403), (label, permission, status, body)
                said = explained[permission]
                assert said["allowed"] == (status == 200), (label, permission, said, body)
                if status == 403:
                    assert body["error"]["message"] == said["reason"], (label, permission)
            if label == "self":
                assert explained["device:read"]["binding"] == "uid:self"
                assert not explained["policy:write"]["allowed"]  # operator: no policy:write
    finally:
        d.stop()
