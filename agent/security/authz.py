"""The RBAC policy: roles, bindings, loading/validation, hot reload, and `authorize`.

Deny by default: a subject no binding matches may call only PUBLIC routes. A binding
names one subject (uid, `uid: self` for the daemon's own uid, user, group, or token name)
and a role; it may be scoped to model aliases, in which case it grants model-scoped
permissions (inference, per-model reads and loads) only for those models. `authorize` is
a pure function over lookup maps built once when the policy is loaded.

Errors: an invalid file raises `agent.errors.PolicyError` naming the file and line.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    model_validator,
)

from agent.errors import PolicyError
from agent.security.identity import Subject
from agent.settings import Settings
from policies import packaged
from registry.yamlfile import line_of, read_yaml

__all__ = [
    "DEFAULT_RBAC_PATH",
    "PERMISSIONS",
    "RBAC_SCHEMA_PATH",
    "Binding",
    "Decision",
    "Held",
    "PolicyError",
    "PolicyProblem",
    "PolicyStore",
    "RbacPolicy",
    "Role",
    "authorize",
    "check_policy",
    "configured_policy_path",
    "daemon_uid",
    "enforced_policy",
    "expand_grants",
    "held_bindings",
    "load_policy",
    "rbac_schema_json",
]

log = logging.getLogger(__name__)

DEFAULT_RBAC_PATH = packaged("rbac.yaml")
RBAC_SCHEMA_PATH = packaged("schemas/rbac.schema.json")

Permission = Literal[
    "inference:invoke",
    "models:read",
    "models:write",
    "models:load",
    "device:read",
    "device:manage",
    "audit:read",
    "audit:manage",
    "metrics:read",
    "policy:write",
    "tokens:manage",
]
PERMISSIONS: tuple[str, ...] = get_args(Permission)
Wildcard = Literal[
    "*", "inference:*", "models:*", "device:*", "audit:*", "metrics:*", "policy:*", "tokens:*"
]
Grant = Permission | Wildcard

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.@-]*$")]
RoleName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_-]*$")]
ModelAlias = Annotated[str, Field(min_length=1, max_length=64)]


def expand_grants(grants: Sequence[str]) -> frozenset[str]:
    """The permissions a role's grants stand for ('*' = all, 'models:*' = every models:...)."""
    out: set[str] = set()
    for g in grants:
        if g == "*":
            out.update(PERMISSIONS)
        elif g.endswith(":*"):
            prefix = g[:-1]
            out.update(p for p in PERMISSIONS if p.startswith(prefix))
        else:
            out.add(g)
    return frozenset(out)


class Role(BaseModel):
    """A named set of permissions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(default="", description="What the role is for (documentation).")
    permissions: list[Grant] = Field(
        description="Permissions granted; '*' grants all, 'models:*' every models:… permission."
    )


class Binding(BaseModel):
    """Grants one subject a role, optionally only for some models."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    uid: Annotated[int, Field(ge=0)] | Literal["self"] | None = Field(
        default=None, description="Numeric uid; 'self' is the uid the daemon runs as."
    )
    user: Name | None = Field(default=None, description="User name (from the user database).")
    group: Name | None = Field(
        default=None, description="Group name; matches primary and supplementary membership."
    )
    token: Name | None = Field(default=None, description="Name of an API token.")
    role: RoleName = Field(description="The role granted; must be defined under `roles`.")
    models: list[ModelAlias] | None = Field(
        default=None,
        min_length=1,
        description="Model aliases the model-scoped permissions are limited to; null: all.",
    )
    description: str = Field(default="", description="Why this binding exists (documentation).")

    @model_validator(mode="after")
    def _one_subject(self) -> Binding:
        named = [k for k in ("uid", "user", "group", "token") if getattr(self, k) is not None]
        if len(named) != 1:
            raise ValueError(
                "a binding names exactly one of uid, user, group, token "
                f"(got {', '.join(named) or 'none'})"
            )
        return self

    @property
    def label(self) -> str:
        """'uid:0', 'uid:self', 'user:alice', 'group:edge-agent-clients', 'token:kiosk'."""
        for k in ("uid", "user", "group", "token"):
            v = getattr(self, k)
            if v is not None:
                return f"{k}:{v}"
        raise AssertionError("validated binding names a subject")


def _default_roles() -> dict[str, Role]:
    return {
        "admin": Role(description="Everything.", permissions=["*"]),
        "operator": Role(
            description="Runs the device: models, device info, audit, metrics, inference.",
            permissions=["models:*", "device:read", "audit:read", "metrics:read",
                         "inference:invoke"],
        ),
        "app": Role(description="An application: inference and the model list.",
                    permissions=["inference:invoke", "models:read"]),
        "viewer": Role(description="Read-only monitoring.",
                       permissions=["models:read", "device:read", "metrics:read"]),
    }


class RbacPolicy(BaseModel):
    """Roles and the bindings of subjects to roles; anything not granted is denied."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: Literal[1] = Field(default=1, description="Policy format version.")
    roles: dict[RoleName, Role] = Field(
        default_factory=_default_roles,
        description="Role name → permissions. Omitted: admin, operator, app, viewer.",
    )
    bindings: list[Binding] = Field(
        default_factory=list, description="Subject → role grants; no binding, no access."
    )

    _index: _Index = PrivateAttr()

    @model_validator(mode="after")
    def _references(self, info: ValidationInfo) -> RbacPolicy:
        # load_policy checks references itself, to report each with its line.
        if not (info.context or {}).get("defer_references"):
            issues = reference_issues(self)
            if issues:
                raise ValueError("; ".join(f"{_dotted(loc)}: {msg}" for loc, msg in issues))
        return self

    def model_post_init(self, context: Any, /) -> None:
        self._index = _Index.build(self, os.geteuid())

    def bind_self(self, uid: int) -> RbacPolicy:
        """This policy with `uid: self` meaning `uid` (e.g. the daemon's, for explain)."""
        copy = self.model_copy()
        copy._index = _Index.build(self, uid)
        return copy

    @property
    def self_uid(self) -> int:
        return self._index.self_uid


def reference_issues(policy: RbacPolicy) -> list[tuple[tuple[int | str, ...], str]]:
    """Bindings naming undefined roles, as (location, message)."""
    defined = sorted(policy.roles)
    return [
        (("bindings", i, "role"), _not_one_of(b.role, defined, "the roles defined"))
        for i, b in enumerate(policy.bindings)
        if b.role not in policy.roles
    ]


def _not_one_of(value: object, allowed: Sequence[str], what: str = "") -> str:
    """'VALUE' is not one of [what: ]a, b, c; did you mean 'b'? (the one-line answer to a
    typo: the bad value, what would do, and the nearest when one is close)."""
    listed = f"{what}: " if what else ""
    msg = f"{_show(value)} is not one of {listed}{', '.join(allowed)}"
    near = difflib.get_close_matches(str(value), list(allowed), n=1, cutoff=0.6)
    return msg + (f"; did you mean {near[0]!r}?" if near else "")


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str | int | float | bool | None) else \
        type(value).__name__


# ---------------------------------------------------------------------------- lookups


@dataclass(frozen=True, slots=True)
class _Grant:
    label: str
    role: str
    permissions: frozenset[str]
    models: frozenset[str] | None
    order: int


@dataclass(frozen=True, slots=True)
class _Index:
    self_uid: int
    role_permissions: dict[str, frozenset[str]]
    by_uid: dict[int, tuple[_Grant, ...]]
    by_user: dict[str, tuple[_Grant, ...]]
    by_group: dict[str, tuple[_Grant, ...]]
    by_token: dict[str, tuple[_Grant, ...]]

    @staticmethod
    def build(policy: RbacPolicy, self_uid: int) -> _Index:
        perms = {name: expand_grants(r.permissions) for name, r in policy.roles.items()}
        maps: dict[str, dict[Any, list[_Grant]]] = {k: {} for k in ("uid", "user", "group",
                                                                    "token")}
        for i, b in enumerate(policy.bindings):
            grant = _Grant(
                label=b.label, role=b.role, permissions=perms.get(b.role, frozenset()),
                models=frozenset(b.models) if b.models is not None else None, order=i,
            )
            kind = b.label.split(":", 1)[0]
            key: Any = getattr(b, kind)
            if kind == "uid" and key == "self":
                key = self_uid
            maps[kind].setdefault(key, []).append(grant)
        freeze = {k: {key: tuple(v) for key, v in m.items()} for k, m in maps.items()}
        return _Index(self_uid, perms, freeze["uid"], freeze["user"], freeze["group"],
                      freeze["token"])


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of `authorize`; `reason` is the one line shown to people and audited."""

    allowed: bool
    reason: str
    binding: str | None = None  # label of the deciding binding, e.g. "group:edge-agent-clients"
    role: str | None = None
    models: frozenset[str] | None = None  # the deciding binding's model scope, if any


def _scope(models: frozenset[str]) -> str:
    return ", ".join(sorted(models))


def _allow(g: _Grant) -> Decision:
    reason = f"allowed by binding {g.label} → role {g.role}"
    if g.models is not None:
        reason += f" (models: {_scope(g.models)})"
    return Decision(True, reason, g.label, g.role, g.models)


def _candidates(idx: _Index, subject: Subject) -> list[_Grant]:
    if subject.kind == "token":
        name = subject.token or ""
        own: list[_Grant] = []
        if subject.role is not None and subject.role in idx.role_permissions:
            own.append(_Grant(f"token:{name}", subject.role,
                              idx.role_permissions[subject.role], None, -1))
        return own + list(idx.by_token.get(name, ()))
    found: list[_Grant] = []
    if subject.uid is not None:
        found.extend(idx.by_uid.get(subject.uid, ()))
    if subject.user is not None:
        found.extend(idx.by_user.get(subject.user, ()))
    for g in subject.groups:
        found.extend(idx.by_group.get(g, ()))
    if len(found) > 1:
        found.sort(key=lambda g: g.order)
    return found


@dataclass(frozen=True, slots=True)
class Held:
    """A binding of the policy that applies to a subject: what `whoami` reports."""

    binding: str  # its label, e.g. "group:edge-agent-clients"; "token:NAME" for a token's role
    role: str
    models: frozenset[str] | None  # the binding's model scope; None: every model


def held_bindings(policy: RbacPolicy, subject: Subject) -> list[Held]:
    """The bindings `authorize` weighs for `subject`, in the order it tries them.

    Built from the same candidates as `authorize`, so what a caller is told it holds is
    what the policy grants it: for a token its own role (if the policy defines it) and
    any `token:` binding, never the uid's."""
    return [Held(g.label, g.role, g.models) for g in _candidates(policy._index, subject)]


def authorize(
    policy: RbacPolicy, subject: Subject, permission: str, model: str | None = None
) -> Decision:
    """May `subject` use `permission` (on `model`, for model-scoped routes)?

    `model` None means the check is not about a model: model-scoped bindings then grant
    as usual. A model-scoped check whose request names no model passes `model=""`, which
    no scope contains.
    """
    cands = _candidates(policy._index, subject)
    if not cands:
        if subject.kind == "token" and subject.role not in policy._index.role_permissions:
            return Decision(False, f"denied: {subject.display} has role {subject.role!r}, "
                                   "which the policy does not define")
        return Decision(False, f"denied: no binding for {subject.display}")
    scoped_ok: _Grant | None = None
    scoped_miss: _Grant | None = None
    for g in cands:
        if permission not in g.permissions:
            continue
        if g.models is None or (model is not None and model in g.models):
            return _allow(g)
        if model is None:
            scoped_ok = scoped_ok or g
        else:
            scoped_miss = scoped_miss or g
    if scoped_ok is not None:
        return _allow(scoped_ok)
    if scoped_miss is not None:
        asked = f"model {model}" if model else "a request that names no model"
        return Decision(
            False,
            f"denied: binding {scoped_miss.label} → role {scoped_miss.role} allows "
            f"{permission} only for models {_scope(scoped_miss.models or frozenset())}, "
            f"not {asked}",
            scoped_miss.label, scoped_miss.role, scoped_miss.models,
        )
    held = ", ".join(f"{g.label} → role {g.role}" for g in cands)
    return Decision(False, f"denied: {subject.display} lacks {permission} (has {held})")


# ---------------------------------------------------------------------------- loading


def _dotted(loc: Sequence[int | str]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


@dataclass(frozen=True, slots=True)
class PolicyProblem:
    """One thing wrong in a policy file, located for the person fixing it."""

    line: int
    field: str  # dotted path, e.g. roles.app.permissions.1
    message: str

    def render(self, path: Path) -> str:
        """'<file>:<line>: <field>: <message>', the form editors and CI jump to."""
        return f"{path}:{self.line}: {self.field}: {self.message}"


_Loc = tuple[int | str, ...]
# Words pydantic puts in an error's location for the member of a union that failed (the
# value itself is not a container, so they are never keys of the file).
_TAG_WORDS = frozenset({"int", "str", "float", "bool", "none", "constrained-int",
                        "constrained-str", "list", "dict"})
_GRANTS: tuple[str, ...] = (*PERMISSIONS, *get_args(Wildcard))


def _field_loc(data: Any, loc: Sequence[int | str]) -> _Loc:
    """The part of a pydantic location that names something in the file: union member tags
    ("literal['*', …]", "constrained-int") are dropped, so the errors each member of a
    union raised about one value meet at that value."""
    out: list[int | str] = []
    node = data
    for part in loc:
        if isinstance(node, dict):
            if part not in node and isinstance(part, str) and ("[" in part or part in _TAG_WORDS):
                continue
            out.append(part)
            node = node.get(part)
        elif isinstance(node, list) and isinstance(part, int):
            out.append(part)
            node = node[part] if 0 <= part < len(node) else None
        elif node is None and isinstance(part, str) and "[" not in part \
                and part not in _TAG_WORDS:
            out.append(part)  # a required key under a missing one
        else:
            break  # a scalar: what follows are tags of the union's members
    return tuple(out)


def _allowed_keys(loc: _Loc) -> list[str]:
    """The keys the mapping at `loc` may have (for an unknown key's message)."""
    model: type[BaseModel] | None = None
    if len(loc) == 0:
        model = RbacPolicy
    elif loc[0] == "roles" and len(loc) == 2:
        model = Role
    elif loc[0] == "bindings" and len(loc) == 2:
        model = Binding
    return sorted(model.model_fields) if model is not None else []


def _describe(errors: list[Any]) -> str:
    """One message for every error pydantic raised about one value."""
    first = errors[0]
    value = first.get("input")
    if first["type"] == "extra_forbidden":
        key = first["loc"][-1]
        loc = tuple(first["loc"][:-1])
        allowed = _allowed_keys(loc)
        msg = f"unknown key {key!r}"
        if allowed:
            msg += f"; allowed here: {', '.join(allowed)}"
            near = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
            msg += f"; did you mean {near[0]!r}?" if near else ""
        return msg
    literal: list[str] = []
    other: list[str] = []
    for err in errors:
        if err["type"] == "literal_error":
            expected = str((err.get("ctx") or {}).get("expected", ""))
            literal.extend(re.findall(r"'([^']*)'", expected) or [expected])
        else:
            msg = str(err["msg"]).removeprefix("Value error, ")
            other.append(msg.removeprefix("Input should be ").split(",")[0]
                         if literal or err["type"].endswith("_parsing") else msg)
    if literal:
        allowed = list(dict.fromkeys(literal))
        what = "the allowed values"
        if set(allowed) <= set(_GRANTS):  # a role's grants: offer every one
            allowed, what = list(_GRANTS), "the permissions and wildcards"
        if other:
            what += f" (or {' or '.join(other)})"
        return _not_one_of(value, allowed, what)
    msg = "; ".join(other)
    if first["loc"] and first["loc"][-1] == "[key]":
        return f"the name {_show(value)}: {msg}"
    if first["type"] == "missing":
        return "required key missing"
    if isinstance(value, str | int | float | bool) and _show(value) not in msg:
        msg += f" (got {_show(value)})"
    return msg


def _raw_reference_issues(data: Any) -> list[tuple[_Loc, str]]:
    """Bindings naming roles the file does not define, found in the parsed YAML itself so
    they are reported together with any validation error (not after it is fixed)."""
    if not isinstance(data, dict):
        return []
    if "roles" not in data:
        defined, what = sorted(_default_roles()), "the default roles (no roles section)"
    elif isinstance(data["roles"], dict):
        defined, what = sorted(str(k) for k in data["roles"]), "the roles defined"
    else:
        return []  # the roles section itself is reported
    bindings = data.get("bindings")
    if not isinstance(bindings, list):
        return []
    return [
        (("bindings", i, "role"), _not_one_of(b["role"], defined, what))
        for i, b in enumerate(bindings)
        if isinstance(b, dict) and isinstance(b.get("role"), str) and b["role"] not in defined
    ]


def _duplicate_keys(node: yaml.Node | None, loc: _Loc = ()) -> list[tuple[int, _Loc, str]]:
    """Keys given twice in one mapping: YAML keeps the last silently, so a role or a
    binding's field written twice would lose the first without a word."""
    found: list[tuple[int, _Loc, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k)
            line = k.start_mark.line + 1
            if key in seen:
                found.append((line, (*loc, key),
                              f"key given twice (first at line {seen[key]}); only the last "
                              "counts"))
            else:
                seen[key] = line
            found.extend(_duplicate_keys(v, (*loc, key)))
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            found.extend(_duplicate_keys(item, (*loc, i)))
    return found


def check_policy(path: Path) -> tuple[RbacPolicy | None, list[PolicyProblem]]:
    """Every problem of the policy file at `path` at once, by line, with the policy when
    there is none.

    Validation errors (one per value, however many union members refused it), bindings
    naming undefined roles and duplicate keys are all reported in one pass, so fixing
    one never just reveals the next. An unreadable file or invalid YAML raises
    `PolicyError`."""
    text, data = read_yaml(path, PolicyError)
    issues: list[tuple[_Loc, str]] = []
    policy: RbacPolicy | None = None
    try:
        policy = RbacPolicy.model_validate(data, context={"defer_references": True})
    except ValidationError as e:
        grouped: dict[_Loc, list[Any]] = {}
        for err in e.errors():
            grouped.setdefault(_field_loc(data, err["loc"]), []).append(err)
        issues = [(loc, _describe(errs)) for loc, errs in grouped.items()]
    seen = {loc for loc, _ in issues}
    issues += [(loc, msg) for loc, msg in _raw_reference_issues(data) if loc not in seen]
    root = yaml.compose(text)
    problems = [PolicyProblem(line_of(root, loc), _dotted(loc), msg) for loc, msg in issues]
    problems += [PolicyProblem(line, _dotted(loc), msg)
                 for line, loc, msg in _duplicate_keys(root)]
    problems.sort(key=lambda p: p.line)
    return (None if problems else policy), problems


def load_policy(path: Path, *, self_uid: int | None = None) -> RbacPolicy:
    """Read and validate the RBAC policy at `path`.

    Raises `PolicyError` whose message is '<file>:<line>: <field>: <why>' per problem
    (joined by '; ': the daemon and the API report it as one line; `policy check` prints
    `check_policy`'s problems one per line).
    """
    policy, problems = check_policy(path)
    if problems or policy is None:
        raise PolicyError("; ".join(p.render(path) for p in problems))
    return policy if self_uid is None else policy.bind_self(self_uid)


def configured_policy_path(settings: Settings) -> Path:
    """The RBAC file the daemon enforces: `security.rbac_file` if set, else one a deployment
    installed (`<home>/policies/rbac.yaml`), else the packaged one."""
    configured = settings.security.rbac_file
    if configured is not None:
        return Path(configured)
    deployed = settings.state.policies / "rbac.yaml"
    return deployed if deployed.is_file() else DEFAULT_RBAC_PATH


def daemon_uid(home: Path) -> int:
    """What `uid: self` means, everywhere: the daemon's account, i.e. the owner of its
    state directory (the daemon refuses a home it does not own, so the two agree). Before
    the home exists, the caller's own euid: whoever starts the daemon creates it."""
    try:
        return home.stat().st_uid
    except OSError:
        return os.geteuid()


def enforced_policy(settings: Settings) -> RbacPolicy:
    """The policy the daemon with these settings enforces, with `uid: self` bound as it is
    there; what the CLI guard and `policy explain` evaluate."""
    return load_policy(configured_policy_path(settings), self_uid=daemon_uid(settings.home))


def rbac_schema_json() -> str:
    """The JSON Schema of `RbacPolicy`, as committed in policies/schemas/rbac.schema.json."""
    return json.dumps(RbacPolicy.model_json_schema(), indent=2, sort_keys=True) + "\n"


class PolicyStore:
    """The policy in force. A reload that fails validation leaves the old one in force."""

    def __init__(self, path: Path, *, self_uid: int | None = None) -> None:
        self.path = path
        self._self_uid = self_uid
        self._lock = threading.Lock()
        # An invalid policy at start-up is fatal: the daemon must not serve without one.
        self._policy = load_policy(path, self_uid=self_uid)
        self.digest = _digest(path)
        self.loaded_at = time.time()

    @property
    def policy(self) -> RbacPolicy:
        return self._policy

    def reload(self, path: Path | None = None) -> tuple[bool, str]:
        """Re-read the file (or switch to `path`); (True, summary) if it took effect, else
        (False, why) with the old policy and path still in force."""
        with self._lock:
            target = path or self.path
            try:
                new = load_policy(target, self_uid=self._self_uid)
                digest = _digest(target)
            except (PolicyError, OSError) as e:
                log.error("policy reload rejected; the previous policy stays in force: %s", e)
                return False, f"rejected, previous policy stays in force: {e}"
            self._policy = new
            self.path = target
            self.digest = digest
            self.loaded_at = time.time()
        message = (f"loaded {self.path} ({len(new.roles)} roles, {len(new.bindings)} "
                   f"bindings, sha256 {digest[:12]})")
        log.info("policy %s", message)
        return True, message


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
