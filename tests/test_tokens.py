"""API tokens: create/verify/revoke/expire, what is stored, the Argon2 cache, and the CLI."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from click.testing import CliRunner

from agent.cli import Context
from agent.cli.tokens import tokens as tokens_cli
from agent.security.tokens import (
    FAILURE_WINDOW,
    FAILURES_ALLOWED,
    ExpiredToken,
    InvalidToken,
    RevokedToken,
    TokenAttemptsExceeded,
    TokenError,
    TokenExists,
    TokenNotFound,
    TokenStore,
    parse_duration,
)
from localdb import Database, open_database

FAST = {"time_cost": 1, "memory_cost": 1024, "parallelism": 1}


class CountingHasher(PasswordHasher):
    def __init__(self) -> None:
        super().__init__(**FAST)
        self.verifies = 0

    def verify(self, hash: str | bytes, password: str | bytes) -> bool:
        self.verifies += 1
        return super().verify(hash, password)  # type: ignore[no-any-return]


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    d = open_database(tmp_path / "registry.db")
    yield d
    d.close()


@pytest.fixture
def store(db: Database) -> Iterator[TokenStore]:
    s = TokenStore(db, hasher=CountingHasher())
    yield s
    s.close()


def test_create_and_verify(store: TokenStore) -> None:
    token, info = store.create("kiosk", "app")
    assert token.startswith(f"ea_{info.token_id}_") and len(token) > 50
    got = store.verify(token)
    assert (got.name, got.role, got.expires_at, got.revoked_at) == ("kiosk", "app", None, None)
    assert got.created_at.tzinfo is not None
    assert asyncio.run(store.averify(token)).name == "kiosk"


def test_only_an_argon2_hash_is_stored(tmp_path: Path) -> None:
    d = open_database(tmp_path / "registry.db")
    s = TokenStore(d)  # the production hasher
    try:
        token, _ = s.create("ci", "viewer")
        secret = token.split("_", 2)[2]
        s.verify(token)
    finally:
        s.close()
        d.close()
    with sqlite3.connect(tmp_path / "registry.db") as raw:
        (stored,) = raw.execute("SELECT secret_hash FROM api_tokens").fetchone()
    assert stored.startswith("$argon2id$") and secret not in stored
    for f in tmp_path.glob("registry.db*"):  # the DB, its WAL and shared memory
        assert secret.encode() not in f.read_bytes()


def test_wrong_unknown_and_malformed_tokens_are_invalid(store: TokenStore) -> None:
    token, info = store.create("kiosk", "app")
    other = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(InvalidToken, match=r"^invalid API token$"):
        store.verify(other)
    # [hardening] finding 11: an unknown id got its own message (and no hashing): an oracle
    # for which ids exist. Now the same message after the same Argon2 work.
    hasher = store.hasher
    assert isinstance(hasher, CountingHasher)
    before = hasher.verifies
    with pytest.raises(InvalidToken, match=r"^invalid API token$"):
        store.verify(token.replace(info.token_id, "0123456789abcdef"))
    assert hasher.verifies == before + 1
    for bad in ("", "Bearer x", "ea_short_x", token + " ", "ea_" + info.token_id):
        with pytest.raises(InvalidToken, match=r"^malformed API token"):
            store.verify(bad)


def test_failed_attempts_are_limited_per_peer_without_hashing(db: Database) -> None:
    # [hardening] finding 11: a peer with no binding who knew a token id kept both Argon2
    # slots busy; a legitimate first use waited 1.67 s instead of 0.10 s.
    now = [1000.0]
    hasher = CountingHasher()
    store = TokenStore(db, hasher=hasher, clock=lambda: now[0])
    token, info = store.create("kiosk", "app")
    wrong = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for _ in range(FAILURES_ALLOWED):
        with pytest.raises(InvalidToken):
            asyncio.run(store.averify(wrong, "uid:1234"))
    assert hasher.verifies == FAILURES_ALLOWED
    with pytest.raises(TokenAttemptsExceeded) as err:  # even the right token, for a while
        asyncio.run(store.averify(token, "uid:1234"))
    assert hasher.verifies == FAILURES_ALLOWED and 1 <= err.value.retry_after <= FAILURE_WINDOW + 1
    # Another peer is not held up, and the first is let in once the window has passed.
    assert asyncio.run(store.averify(token, "uid:1000")).name == "kiosk"
    now[0] += FAILURE_WINDOW + 1
    assert asyncio.run(store.averify(token, "uid:1234")).name == "kiosk"
    assert info.name == "kiosk"


def test_revoked_token_fails_at_once_even_in_another_process(
    db: Database, store: TokenStore
) -> None:
    token, _ = store.create("kiosk", "app")
    store.verify(token)  # now cached
    other = TokenStore(db, hasher=store.hasher)  # e.g. the CLI in another process
    other.revoke("kiosk")
    with pytest.raises(RevokedToken, match="'kiosk' was revoked"):
        store.verify(token)
    with pytest.raises(RevokedToken):
        asyncio.run(store.averify(token))
    first = other.revoke("kiosk").revoked_at  # idempotent
    assert other.revoke("kiosk").revoked_at == first
    other.close()


def test_expired_token_has_its_own_error(db: Database, store: TokenStore) -> None:
    past = TokenStore(db, hasher=store.hasher, now=lambda: datetime.now(UTC) - timedelta(hours=2))
    token, info = past.create("old", "viewer", timedelta(hours=1))
    assert info.expires_at is not None
    with pytest.raises(ExpiredToken) as e:
        store.verify(token)
    assert str(e.value) == (f"API token 'old' expired at "
                            f"{info.expires_at.isoformat(timespec='seconds')}")
    assert not isinstance(e.value, InvalidToken)
    # A wrong secret for an expired token is still just invalid: nothing is revealed.
    with pytest.raises(InvalidToken):
        store.verify(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB"))
    past.close()


def test_argon2_result_is_cached_for_the_ttl(db: Database) -> None:
    now = [0.0]
    hasher = CountingHasher()
    s = TokenStore(db, hasher=hasher, cache_ttl=60, clock=lambda: now[0])
    token, _ = s.create("kiosk", "app")
    for _ in range(5):
        s.verify(token)
    assert hasher.verifies == 1
    now[0] = 61
    s.verify(token)
    assert hasher.verifies == 2
    s.invalidate()
    s.verify(token)
    assert hasher.verifies == 3
    # Failures are never cached.
    bad = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    for _ in range(2):
        with pytest.raises(InvalidToken):
            s.verify(bad)
    assert hasher.verifies == 5
    s.close()


def test_names_are_unique_and_checked(store: TokenStore) -> None:
    store.create("kiosk", "app")
    with pytest.raises(TokenExists):
        store.create("kiosk", "viewer")
    with pytest.raises(TokenError, match="invalid token name"):
        store.create("-bad name", "app")
    with pytest.raises(TokenNotFound):
        store.revoke("nobody")


def test_list_shows_no_secrets(store: TokenStore) -> None:
    token, _ = store.create("a", "app")
    store.create("b", "viewer", timedelta(days=1))
    store.revoke("a")
    now = datetime.now(UTC)
    rows = [r.as_json(now) for r in store.list_tokens()]
    assert [(r["name"], r["status"]) for r in rows] == [("a", "revoked"), ("b", "active")]
    text = json.dumps(rows)
    assert "argon2" not in text and token.split("_", 2)[2] not in text
    assert set(rows[0]) == {"name", "token_id", "role", "status", "created_at", "expires_at",
                            "revoked_at"}


@pytest.mark.parametrize(("text", "seconds"), [
    ("30d", 30 * 86400), ("12h", 43200), ("90m", 5400), ("3600s", 3600), ("2w", 1209600),
])
def test_parse_duration(text: str, seconds: int) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["", "0d", "5", "1y", "-1d", "1.5h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_cli_create_list_revoke(tmp_path: Path) -> None:
    runner = CliRunner()
    env = {"EDGE_AGENT_HOME": str(tmp_path), "EDGE_AGENT_CONFIG": ""}

    def cli(*args: str) -> tuple[int, str, str]:
        res = runner.invoke(tokens_cli, list(args), obj=Context(None, False), env=env)
        return res.exit_code, res.stdout, res.stderr

    code, out, err = cli("create", "--role", "app", "--name", "kiosk", "--expires", "30d")
    assert code == 0, err
    token = out.strip()
    assert token.startswith("ea_") and "\n" not in token
    assert "shown only once" in err and "role app" in err

    d = open_database(tmp_path / "registry.db")
    s = TokenStore(d)
    assert s.verify(token).name == "kiosk"

    code, out, _ = cli("list", "--json")
    rows = json.loads(out)
    assert code == 0 and rows[0]["name"] == "kiosk" and rows[0]["status"] == "active"
    assert rows[0]["expires_at"] is not None and token.split("_", 2)[2] not in out
    code, out, _ = cli("list")
    assert "kiosk" in out and "active" in out

    assert cli("create", "--role", "app", "--name", "kiosk")[0] == 1
    code, _, err = cli("create", "--role", "wizard", "--name", "w")
    assert code == 2 and "unknown role 'wizard'" in err
    assert cli("create", "--role", "app", "--name", "w", "--expires", "soon")[0] == 2

    code, out, _ = cli("revoke", "kiosk")
    assert code == 0 and out.startswith("revoked token kiosk at ")
    with pytest.raises(RevokedToken):
        s.verify(token)
    code, _, err = cli("revoke", "nobody")
    assert code == 1 and "no token named 'nobody'" in err
    s.close()
    d.close()


def test_cli_a_revoked_name_is_free_again_in_a_database_from_before(tmp_path: Path) -> None:
    # Issue 15: `tokens create --name X` after `tokens revoke X` was refused ("a token named
    # 'X' exists") for ever. The home is one the 0002 release wrote (its table had a UNIQUE
    # name): migration 0006 must free revoked names there too, keeping the revoked rows.
    import shutil

    from agent.cli import main

    home = tmp_path / "home"
    shutil.copytree(Path(__file__).parent / "fixtures" / "db" / "home-0002", home)
    runner = CliRunner()
    env = {"EDGE_AGENT_HOME": str(home), "EDGE_AGENT_CONFIG": ""}

    def cli(*args: str) -> tuple[int, str, str]:
        res = runner.invoke(main, ["tokens", *args], env=env)
        return res.exit_code, res.stdout, res.stderr

    code, _, err = cli("create", "--role", "app", "--name", "legacy-app")
    assert code == 1 and "a token named 'legacy-app' exists (active); revoke it" in err
    assert cli("revoke", "legacy-app")[0] == 0
    code, out, err = cli("create", "--role", "viewer", "--name", "legacy-app")
    assert code == 0, err
    token = out.strip()
    code, out, _ = cli("list", "--json")
    rows = [(r["name"], r["role"], r["status"]) for r in json.loads(out)]
    assert rows == [("legacy-app", "app", "revoked"), ("legacy-app", "viewer", "active")]
    # Revoking by name takes the active one; again, it changes nothing.
    assert cli("revoke", "legacy-app")[0] == 0
    assert cli("revoke", "legacy-app")[0] == 0
    d = open_database(home / "registry.db")
    try:
        with pytest.raises(RevokedToken):
            TokenStore(d).verify(token)
        assert [t.status(datetime.now(UTC)) for t in TokenStore(d).list_tokens()] == \
            ["revoked", "revoked"]
    finally:
        d.close()
