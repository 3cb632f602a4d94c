"""RBAC: authorize() tables, policy loading with file:line errors, hot reload that never
fails open, the schema, route coverage, and the access middleware on a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from argon2 import PasswordHasher
from click.testing import CliRunner

from agent.api.access import MODEL, SUBJECT, USAGE, install_access
from agent.api.errors import error_middleware
from agent.api.routes import PUBLIC, ROUTE_TABLE, RouteSpec, add_routes
from agent.cli import Context
from agent.cli.policy import policy as policy_cli
from agent.errors import PolicyError
from agent.security.authz import (
    DEFAULT_RBAC_PATH,
    PERMISSIONS,
    RBAC_SCHEMA_PATH,
    PolicyStore,
    RbacPolicy,
    authorize,
    expand_grants,
    load_policy,
    rbac_schema_json,
)
from agent.security.identity import Subject
from agent.security.service import Security
from agent.security.tokens import TokenStore
from localdb import open_database

SELF = 4242


def uid_subject(uid: int, user: str | None = None, *groups: str) -> Subject:
    return Subject(kind="uid", uid=uid, gid=uid, pid=1, user=user, groups=frozenset(groups))


def token(name: str, role: str) -> Subject:
    return Subject(kind="token", token=name, role=role, uid=1000, pid=1)


@pytest.fixture(scope="module")
def default() -> RbacPolicy:
    return load_policy(DEFAULT_RBAC_PATH, self_uid=SELF)


KIOSK = """
bindings:
  - user: kiosk
    role: app
    models: [smollm2-135m]
  - group: ops
    role: operator
  - group: watchers
    role: viewer
  - token: ci
    role: app
    models: [smollm2-135m]
"""


@pytest.fixture(scope="module")
def kiosk(tmp_path_factory: pytest.TempPathFactory) -> RbacPolicy:
    path = tmp_path_factory.mktemp("rbac") / "rbac.yaml"
    path.write_text(KIOSK)
    return load_policy(path)


# ---------------------------------------------------------------------------- authorize


@pytest.mark.parametrize("perm", PERMISSIONS)
def test_root_and_self_are_admin(default: RbacPolicy, perm: str) -> None:
    assert authorize(default, uid_subject(0, "root", "root"), perm).allowed
    d = authorize(default, uid_subject(SELF, "edge-agent"), perm, "any-model")
    assert d.allowed and d.binding == "uid:self" and d.role == "admin"


@pytest.mark.parametrize(("perm", "allowed"), [
    ("inference:invoke", True), ("models:read", True), ("models:write", False),
    ("models:load", False), ("device:read", False), ("audit:read", False),
    ("policy:write", False), ("tokens:manage", False), ("metrics:read", False),
])
def test_clients_group_is_app(default: RbacPolicy, perm: str, allowed: bool) -> None:
    # Membership through a supplementary group counts like the primary one.
    alice = uid_subject(1000, "alice", "alice", "edge-agent-clients")
    d = authorize(default, alice, perm, "gemma3-270m")
    assert d.allowed is allowed
    if allowed:
        assert d.reason == "allowed by binding group:edge-agent-clients → role app"
    else:
        assert d.reason == ("denied: uid:1000(alice) lacks "
                            f"{perm} (has group:edge-agent-clients → role app)")


def test_unbound_subject_is_denied_everything(default: RbacPolicy) -> None:
    bob = uid_subject(1234, "bob", "bob", "users")
    for perm in PERMISSIONS:
        d = authorize(default, bob, perm)
        assert not d.allowed and d.binding is None
        assert d.reason == "denied: no binding for uid:1234(bob)"
    assert authorize(default, uid_subject(5555), "models:read").reason == (
        "denied: no binding for uid:5555")


def test_model_scoped_binding(kiosk: RbacPolicy) -> None:
    k = uid_subject(2000, "kiosk", "kiosk")
    ok = authorize(kiosk, k, "inference:invoke", "smollm2-135m")
    assert ok.allowed
    assert ok.reason == "allowed by binding user:kiosk → role app (models: smollm2-135m)"
    no = authorize(kiosk, k, "inference:invoke", "gemma3-270m")
    assert not no.allowed
    assert no.reason == ("denied: binding user:kiosk → role app allows inference:invoke only "
                         "for models smollm2-135m, not model gemma3-270m")
    # A request that names no model is not in any scope.
    assert not authorize(kiosk, k, "inference:invoke", "").allowed
    # Not about a model (e.g. GET /v1/models): the scoped binding grants as usual.
    assert authorize(kiosk, k, "models:read").allowed
    assert not authorize(kiosk, k, "models:load", "smollm2-135m").allowed


def test_unscoped_binding_wins_over_scoped(kiosk: RbacPolicy) -> None:
    both = uid_subject(2001, "kiosk", "kiosk", "ops")
    d = authorize(kiosk, both, "inference:invoke", "gemma3-270m")
    assert d.allowed and d.binding == "group:ops" and d.models is None
    # With no model given, the unscoped grant is reported even though the scoped one is first.
    assert authorize(kiosk, both, "inference:invoke").models is None


def test_roles_from_several_groups_add_up(kiosk: RbacPolicy) -> None:
    s = uid_subject(3000, "carol", "watchers", "ops")
    assert authorize(kiosk, s, "device:read").binding == "group:ops"
    assert authorize(kiosk, s, "models:load", "x").allowed
    assert not authorize(kiosk, s, "policy:write").allowed


def test_token_subjects(kiosk: RbacPolicy) -> None:
    # The token's own role is unscoped; a binding on its name can add a (scoped) role.
    v = authorize(kiosk, token("dash", "viewer"), "device:read")
    assert v.allowed and v.reason == "allowed by binding token:dash → role viewer"
    assert not authorize(kiosk, token("dash", "viewer"), "inference:invoke", "m").allowed
    ci = token("ci", "viewer")
    assert authorize(kiosk, ci, "inference:invoke", "smollm2-135m").allowed
    assert not authorize(kiosk, ci, "inference:invoke", "gemma3-270m").allowed
    bad = authorize(kiosk, token("old", "superuser"), "models:read")
    assert not bad.allowed and "role 'superuser'" in bad.reason
    # A token never inherits the bindings of the uid it arrived from.
    assert not authorize(kiosk, Subject(kind="token", token="x", role="viewer", uid=0),
                         "policy:write").allowed


def test_wildcards_expand() -> None:
    assert expand_grants(["*"]) == frozenset(PERMISSIONS)
    assert expand_grants(["models:*"]) == {"models:read", "models:write", "models:load"}


# ---------------------------------------------------------------------------- loading


def _load(tmp_path: Path, text: str) -> RbacPolicy:
    path = tmp_path / "rbac.yaml"
    path.write_text(text)
    return load_policy(path)


@pytest.mark.parametrize(("text", "line", "needle"), [
    ("bindings:\n  - uid: 0\n    role: admin\n    colour: red\n", 4,
     "bindings.0.colour: unknown key 'colour'; allowed here: description, group, models, "),
    ("bindings:\n  - uid: 0\n    role: admin\n  - group: x\n    role: ap\n", 5,
     "bindings.1.role: 'ap' is not one of the default roles (no roles section): admin, app, "
     "operator, viewer; did you mean 'app'?"),
    ("bindings:\n  - uid: 0\n    role: admin\n  - uid: 1\n    user: bob\n    role: app\n", 4,
     "exactly one of uid, user, group, token (got uid, user)"),
    ("roles:\n  r:\n    permissions:\n      - models:read\n      - models:fly\n", 5,
     "roles.r.permissions.1"),
    ("bindings:\n  - uid: -3\n    role: admin\n", 2, "bindings.0.uid"),
    ("bindings:\n  - uid: 0\n    role: admin\n    models: []\n", 4, "bindings.0.models"),
    ("bindings:\n  - uid: 0\n  role: [\n", 3, "invalid YAML"),
    ("version: 2\n", 1, "version"),
])
def test_invalid_policy_names_file_and_line(
    tmp_path: Path, text: str, line: int, needle: str
) -> None:
    with pytest.raises(PolicyError) as e:
        _load(tmp_path, text)
    assert str(e.value).startswith(f"{tmp_path / 'rbac.yaml'}:{line}: "), str(e.value)
    assert needle in str(e.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "absent.yaml")


def test_empty_file_has_default_roles_and_no_bindings(tmp_path: Path) -> None:
    p = _load(tmp_path, "")
    assert set(p.roles) == {"admin", "operator", "app", "viewer"} and p.bindings == []
    assert not authorize(p, uid_subject(0, "root"), "models:read").allowed


def test_packaged_policy_roles_match_builtin_defaults(default: RbacPolicy) -> None:
    assert default.roles == RbacPolicy().roles
    assert [b.label for b in default.bindings] == ["uid:0", "uid:self", "group:edge-agent-clients"]


def test_policy_built_in_code_is_validated_too() -> None:
    with pytest.raises(ValueError, match="'nope' is not one of the roles defined"):
        RbacPolicy.model_validate({"bindings": [{"uid": 1, "role": "nope"}]})


def test_schema_is_in_sync() -> None:
    assert RBAC_SCHEMA_PATH.read_text(encoding="utf-8") == rbac_schema_json(), (
        "regenerate: .venv/bin/python -c 'from agent.security.authz import *; "
        "RBAC_SCHEMA_PATH.write_text(rbac_schema_json())'"
    )


# ---------------------------------------------------------------------------- reload


def test_reload_applies_a_valid_policy_and_keeps_the_old_on_error(tmp_path: Path) -> None:
    path = tmp_path / "rbac.yaml"
    path.write_text("bindings:\n  - uid: 1000\n    role: viewer\n")
    store = PolicyStore(path)
    alice = uid_subject(1000, "alice")
    assert authorize(store.policy, alice, "device:read").allowed
    first = store.digest

    path.write_text("bindings:\n  - uid: 1000\n    role: viewer\n  - uid: 1001\n    role: nope\n")
    ok, msg = store.reload()
    assert not ok and "previous policy stays in force" in msg and f"{path}:5:" in msg
    assert authorize(store.policy, alice, "device:read").allowed
    assert store.digest == first

    path.unlink()
    ok, msg = store.reload()
    assert not ok and "cannot read" in msg
    assert authorize(store.policy, alice, "device:read").allowed

    path.write_text("bindings:\n  - uid: 1000\n    role: app\n")
    ok, msg = store.reload()
    assert ok and "1 bindings" in msg and store.digest != first
    assert not authorize(store.policy, alice, "device:read").allowed
    assert authorize(store.policy, alice, "inference:invoke", "m").allowed


def test_invalid_policy_at_start_is_fatal(tmp_path: Path) -> None:
    path = tmp_path / "rbac.yaml"
    path.write_text("roles: 3\n")
    with pytest.raises(PolicyError):
        PolicyStore(path)


# ---------------------------------------------------------------------------- routes


def test_every_route_of_the_real_app_declares_a_permission(tmp_path: Path) -> None:
    # [hardening] finding 6: this test once checked an app it built itself, not the one
    # the daemon serves (it missed /v1/responses and /v1/embeddings).
    from agent.app import create_app
    from agent.settings import load_settings

    home = tmp_path / "home"
    home.mkdir(mode=0o750)
    app = create_app(load_settings(environ={"EDGE_AGENT_HOME": str(home)}))
    specs: list[RouteSpec] = list(app[ROUTE_TABLE].values())
    registered = {f"{r.method} {r.resource.canonical}" for r in app.router.routes()
                  if r.resource is not None}
    assert registered == {f"{s.method} {s.path}" for s in specs}
    assert {"POST /v1/responses", "POST /v1/embeddings", "POST /v1/chat/completions"} \
        <= registered
    problems = [f"{s.method} {s.path}: {s.permission!r}" for s in specs
                if s.permission != PUBLIC and s.permission not in PERMISSIONS]
    assert not problems, f"routes with an unknown or missing permission: {problems}"
    public = {s.path for s in specs if s.permission == PUBLIC}
    assert public == {"/healthz", "/readyz", "/agent/v1/whoami"}
    # A model-scoped route must be able to name its model: path alias or JSON body.
    for s in specs:
        if s.model_scoped:
            assert "{alias}" in s.path or s.method == "POST", s


# ---------------------------------------------------------------------------- middleware


@dataclass
class Served:
    socket: Path
    port: int
    audit: list[dict[str, Any]] = field(default_factory=list)
    seen: list[dict[str, Any]] = field(default_factory=list)

    def unix(self, **kw: Any) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket)),
                            base_url="http://edge-agent", **kw)

    def tcp(self, **kw: Any) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.port}", **kw)


def _app(store: PolicyStore, tokens: TokenStore | None, served: Served) -> web.Application:
    async def ok(request: web.Request) -> web.Response:
        subject = request[SUBJECT]
        return web.json_response({"subject": subject.display})

    async def chat(request: web.Request) -> web.Response:
        body = json.loads(await request.read())  # the middleware already read it once
        served.seen.append(body)
        request[MODEL] = body["model"]
        request[USAGE] = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
        return web.json_response({"choices": [{"text": "a secret answer"}]})

    async def load(request: web.Request) -> web.Response:
        return web.json_response({"loaded": request.match_info["alias"]})

    async def whoami(request: web.Request) -> web.Response:
        s = request.get(SUBJECT)
        return web.json_response({"subject": s.display if s else None})

    app = web.Application(middlewares=[error_middleware])
    add_routes(app, [
        RouteSpec("GET", "/healthz", whoami, PUBLIC),
        RouteSpec("GET", "/agent/v1/device", ok, "device:read"),
        RouteSpec("GET", "/v1/models", ok, "models:read"),
        RouteSpec("GET", "/agent/v1/audit", ok, "audit:read"),
        RouteSpec("POST", "/v1/chat/completions", chat, "inference:invoke", model_scoped=True),
        RouteSpec("POST", "/agent/v1/models/{alias}/load", load, "models:load",
                  model_scoped=True),
    ])

    def audit(subject: Subject | None, action: str, resource: str, decision: str,
              outcome: str, details: dict[str, Any]) -> None:
        served.audit.append({"subject": subject.display if subject else None, "action": action,
                             "resource": resource, "decision": decision, "outcome": outcome,
                             "details": details})

    install_access(app, Security(store, tokens, audit))
    app.router.add_get("/agent/v1/forgotten", ok)  # added without a RouteSpec
    return app


@contextmanager
def serve(store: PolicyStore, tokens: TokenStore | None = None) -> Iterator[Served]:
    """The app on a real Unix socket and TCP port, in a thread with its own loop."""
    sockdir = Path(tempfile.mkdtemp(prefix="ea-", dir="/tmp"))
    served = Served(sockdir / "s.sock", 0)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop = asyncio.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        runner = web.AppRunner(_app(store, tokens, served))
        await runner.setup()
        try:
            await web.UnixSite(runner, str(served.socket)).start()
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind(("127.0.0.1", 0))
            served.port = tcp.getsockname()[1]
            await web.SockSite(runner, tcp).start()
        except BaseException as exc:
            failure.append(exc)
            raise
        finally:
            ready.set()
        await stop.wait()
        await runner.cleanup()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), name="authz-app")
    thread.start()
    ready.wait()
    try:
        if failure:
            raise failure[0]
        yield served
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join()
        loop.close()
        for p in sockdir.iterdir():
            p.unlink()
        sockdir.rmdir()


def _store(tmp_path: Path, text: str) -> PolicyStore:
    path = tmp_path / "rbac.yaml"
    path.write_text(text)
    return PolicyStore(path)


ROOT_KIOSK = "bindings:\n  - uid: 0\n    role: app\n    models: [smollm2-135m]\n"
CHAT = {"messages": [{"role": "user", "content": "the private prompt"}]}


def test_middleware_enforces_scopes_and_audits(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the test process is root: uid 0 is the socket peer"
    with serve(_store(tmp_path, ROOT_KIOSK)) as srv, srv.unix() as c:
        # PUBLIC: open, and the subject is still known to the handler.
        assert c.get("/healthz").json() == {"subject": "uid:0(root)"}
        # Not granted: 403 in OpenAI's error shape, audited.
        r = c.get("/agent/v1/device")
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["type"] == "permission_error" and err["code"] == "forbidden"
        assert err["message"] == "denied: uid:0(root) lacks device:read (has uid:0 → role app)"
        assert srv.audit[-1]["decision"] == "deny" and srv.audit[-1]["outcome"] == "denied"
        # Allowed read: not audited.
        n = len(srv.audit)
        assert c.get("/v1/models").status_code == 200
        assert len(srv.audit) == n
        # In-scope inference: the handler reads the body the middleware read first.
        r = c.post("/v1/chat/completions", json={"model": "smollm2-135m", **CHAT})
        assert r.status_code == 200 and srv.seen[-1]["model"] == "smollm2-135m"
        entry = srv.audit[-1]
        assert entry["decision"] == "allow" and entry["outcome"] == "ok"
        assert entry["resource"] == "model:smollm2-135m"
        assert entry["details"]["usage"]["total_tokens"] == 5
        assert entry["details"]["latency_ms"] >= 0
        assert "private prompt" not in json.dumps(srv.audit)
        assert "secret answer" not in json.dumps(srv.audit)
        # Out of scope, by body and by path.
        r = c.post("/v1/chat/completions", json={"model": "gemma3-270m", **CHAT})
        assert r.status_code == 403 and "not model gemma3-270m" in r.json()["error"]["message"]
        assert srv.audit[-1]["resource"] == "model:gemma3-270m"
        assert c.post("/v1/chat/completions", content=b"{not json").status_code == 403
        assert c.post("/agent/v1/models/smollm2-135m/load").status_code == 403
        # Unmatched routes reach the error handler untouched.
        assert c.get("/nowhere").status_code == 404
        assert c.get("/v1/chat/completions").status_code == 405
        # An alias with a newline and ESC (finding 4) or 900 KB long (finding 1) is refused
        # before anything is recorded; a long path is recorded cut, escaped.
        n = len(srv.audit)
        for alias in ("evil%0A%20%201%20allow%1B[8m", "a" * 70):
            r = c.post(f"/agent/v1/models/{alias}/load")
            assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text
        r = c.post("/v1/chat/completions", json={"model": "x\n" + "y" * 900_000, **CHAT})
        assert r.status_code in (400, 413), r.text
        assert len(srv.audit) == n
        assert all(len(json.dumps(a)) < 2000 for a in srv.audit)
        # A route registered without a permission entry is denied, not open (finding 6).
        r = c.get("/agent/v1/forgotten")
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"


def test_unscoped_grant_does_not_depend_on_the_body(tmp_path: Path) -> None:
    text = "bindings:\n  - uid: 0\n    role: operator\n"
    with serve(_store(tmp_path, text)) as srv, srv.unix() as c:
        r = c.post("/agent/v1/models/gemma3-270m/load")
        assert r.status_code == 200
        assert srv.audit[-1]["resource"] == "model:gemma3-270m"
        assert srv.audit[-1]["details"]["binding"] == "uid:0"
        assert c.get("/agent/v1/audit").status_code == 200
        assert srv.audit[-1]["action"] == "audit:read"  # audit reads are audited


@pytest.fixture
def tokens(tmp_path: Path) -> Iterator[TokenStore]:
    db = open_database(tmp_path / "registry.db")
    store = TokenStore(db, hasher=PasswordHasher(time_cost=1, memory_cost=1024, parallelism=1))
    yield store
    store.close()
    db.close()


def test_tokens_over_tcp_and_unix(tmp_path: Path, tokens: TokenStore) -> None:
    viewer, _ = tokens.create("dash", "viewer")
    revoked, _ = tokens.create("gone", "viewer")
    tokens.revoke("gone")
    past = TokenStore(tokens.db, hasher=tokens.hasher,
                      now=lambda: datetime.now(UTC) - timedelta(days=2))
    expired, _ = past.create("old", "viewer", timedelta(days=1))
    with serve(_store(tmp_path, ROOT_KIOSK), tokens) as srv:
        with srv.tcp() as c:
            r = c.get("/agent/v1/device")
            assert r.status_code == 401 and r.json()["error"]["code"] == "missing_token"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.json()["error"]["type"] == "authentication_error"
            assert c.get("/healthz").status_code == 200
            bad = {"Authorization": f"Bearer {viewer[:-2]}xx"}
            r = c.get("/agent/v1/device", headers=bad)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_token"
            assert srv.audit[-1]["outcome"] == "unauthenticated"
            assert srv.audit[-1]["subject"] is None
            r = c.get("/agent/v1/device", headers={"Authorization": "Basic abc"})
            assert r.status_code == 401
            r = c.get("/agent/v1/device", headers={"Authorization": f"Bearer {viewer}"})
            assert r.status_code == 200 and r.json() == {"subject": "token:dash"}
            r = c.get("/agent/v1/device", headers={"Authorization": f"Bearer {revoked}"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "token_revoked"
            r = c.get("/agent/v1/device", headers={"Authorization": f"Bearer {expired}"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "token_expired"
            assert "expired at" in r.json()["error"]["message"]
        with srv.unix(headers={"Authorization": f"Bearer {viewer}"}) as c:
            # Over the socket the token replaces the uid: root's app grant does not apply.
            assert c.get("/agent/v1/device").json() == {"subject": "token:dash"}
            r = c.post("/v1/chat/completions", json={"model": "smollm2-135m", **CHAT})
            assert r.status_code == 403
            assert srv.audit[-1]["subject"] == "token:dash"


def test_reload_endpoint_and_cli(tmp_path: Path) -> None:
    store = _store(tmp_path, "bindings:\n  - uid: 0\n    role: admin\n")
    runner = CliRunner()
    with serve(store) as srv, srv.unix() as c:
        env = {"EDGE_AGENT_SOCKET": str(srv.socket), "EDGE_AGENT_HOME": str(tmp_path)}
        store.path.write_text("bindings:\n  - uid: 0\n    role: admin\n    extra: 1\n")
        r = c.post("/agent/v1/policy/reload")
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_policy"
        assert f"{store.path}:4:" in r.json()["error"]["message"]
        res = runner.invoke(policy_cli, ["reload"], obj=Context(None, False), env=env)
        assert res.exit_code == 1 and "previous policy stays in force" in res.output
        assert c.get("/agent/v1/device").status_code == 200  # the old policy is in force

        store.path.write_text("bindings:\n  - uid: 0\n    role: viewer\n")
        res = runner.invoke(policy_cli, ["reload"], obj=Context(None, False), env=env)
        assert res.exit_code == 0, res.output
        assert res.output.startswith("policy reloaded: loaded ")
        assert srv.audit[-1]["action"] == "policy:write" and srv.audit[-1]["outcome"] == "ok"
        # viewer: device:read yes, policy:write no.
        assert c.get("/agent/v1/device").status_code == 200
        assert c.post("/agent/v1/policy/reload").status_code == 403


# ---------------------------------------------------------------------------- CLI


def test_policy_check_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(policy_cli, ["check", str(DEFAULT_RBAC_PATH)])
    assert res.exit_code == 0 and "ok (4 roles, 3 bindings)" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("bindings:\n  - group: x\n    role: nobody\n")
    res = runner.invoke(policy_cli, ["check", str(bad)])
    assert res.exit_code == 2
    assert f"{bad}:3: bindings.0.role: 'nobody' is not one of the default roles" in res.output


def test_policy_check_reports_every_problem_one_line_each(tmp_path: Path) -> None:
    # Issue 15: a misspelt permission printed two pydantic union dumps without the bad
    # value, and the undefined role in the same file was not reported at all.
    bad = tmp_path / "rbac.yaml"
    bad.write_text(
        "roles:\n"
        "  app:\n"
        "    permissions: [inference:invoke, models:raed]\n"
        "bindings:\n"
        "  - group: clients\n"
        "    role: opertor\n"
        "  - uid: selff\n"
        "    role: app\n"
        "    colour: red\n"
        "  - user: bob\n"
        "    role: app\n"
        "    role: app\n"
    )
    res = CliRunner().invoke(policy_cli, ["check", str(bad)])
    assert res.exit_code == 2
    lines = res.stderr.splitlines()
    assert lines == [
        f"{bad}:3: roles.app.permissions.1: 'models:raed' is not one of the permissions and "
        f"wildcards: {', '.join(PERMISSIONS)}, *, inference:*, models:*, device:*, audit:*, "
        "metrics:*, policy:*, tokens:*; did you mean 'models:read'?",
        f"{bad}:6: bindings.0.role: 'opertor' is not one of the roles defined: app",
        f"{bad}:7: bindings.1.uid: 'selff' is not one of the allowed values (or a valid "
        "integer): self; did you mean 'self'?",
        f"{bad}:9: bindings.1.colour: unknown key 'colour'; allowed here: description, group, "
        "models, role, token, uid, user",
        f"{bad}:12: bindings.2.role: key given twice (first at line 11); only the last counts",
        f"edge-agent: error: {bad}: 5 problems",
    ], res.stderr
    res = CliRunner().invoke(policy_cli, ["check", "--json", str(bad)])
    report = json.loads(res.stdout)
    assert res.exit_code == 2 and report["ok"] is False
    assert [(p["line"], p["field"]) for p in report["problems"]] == [
        (3, "roles.app.permissions.1"), (6, "bindings.0.role"), (7, "bindings.1.uid"),
        (9, "bindings.1.colour"), (12, "bindings.2.role")]


def test_policy_explain_cli(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"EDGE_AGENT_HOME": str(tmp_path), "EDGE_AGENT_SOCKET": str(tmp_path / "none.sock")}
    f = ["--file", str(DEFAULT_RBAC_PATH)]
    res = runner.invoke(policy_cli, ["explain", "--uid", "0", "--action", "policy:write", *f],
                        obj=Context(None, False), env=env)
    assert res.exit_code == 0 and res.output == "allowed by binding uid:0 → role admin\n"
    res = runner.invoke(policy_cli, ["explain", "--uid", "54321", *f],
                        obj=Context(None, False), env=env)
    assert res.exit_code == 0
    assert "inference:invoke  denied: no binding for uid:54321" in res.output
    kiosk = tmp_path / "kiosk.yaml"
    kiosk.write_text("bindings:\n  - uid: 54321\n    role: app\n    models: [smollm2-135m]\n")
    res = runner.invoke(policy_cli, ["explain", "--uid", "54321", "--action", "inference:invoke",
                                     "--model", "gemma3-270m", "--file", str(kiosk), "--json"],
                        obj=Context(None, False), env=env)
    data = json.loads(res.output)
    assert data["subject"] == "uid:54321" and data["decisions"][0]["allowed"] is False
    assert data["decisions"][0]["binding"] == "uid:54321"
