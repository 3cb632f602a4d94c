"""Deployments on the device: check the signed desired state, fetch only what this
device's selection wants, prove it works, switch with no gap, roll back by itself.

A document is verified with the controller's key pinned at enrollment before anything in
it is read; it must name this device and fleet and carry a version above every one this
device accepted. Then, per model: selection over the document's variants for this
device's hardware (the same engine and policy as for installed models) picks what to
install (plus the pins); each file is fetched over HTTPS (Range-resumable) or in
numbered chunks from the broker (each chunk checked against the manifest; resumable),
its size bounded by the declared one and by the free disk minus the reserve, its sha256
checked before the registry takes it. The new variant is loaded beside the one serving
and smoke-tested (a short generation or an embedding, within a time bound); only then is
it pinned and promoted, and the previous one stays installed. Failures of the new variant
during its probation roll it back. Policies are validated with the agent's own loaders
and applied through the one reload path, reverted when they do not take. Every step is
reported on the deploy status topic (outbox class `deploy`, never dropped) and the key
ones are audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import logging
import os
import shutil
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from agent.sync import enroll
from agent.sync.background import Background, check
from agent.sync.outbox import Outbox
from agent.sync.tables import Deployment
from fleet.deploy import (
    ArtifactManifest,
    DesiredState,
    ModelDoc,
    SignatureError,
    Step,
    VariantDoc,
    artifact_topic,
    verify,
)
from localdb import Database, StateDir

if TYPE_CHECKING:
    from agent.runtime.resolver import ModelResolver
    from agent.runtime.scheduler import Scheduler
    from agent.security.service import Security
    from agent.settings import Settings
    from registry.service import Registry

log = logging.getLogger(__name__)
Audit = Callable[[str, str, str, str, dict[str, Any]], None]
CHUNK_WINDOW = 8  # chunk topics subscribed at once on the MQTT path
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class Rejected(ValueError):
    """The document is not to be applied; the reason is reported and audited."""


class SmokeFailed(RuntimeError):
    """The new variant did not pass its smoke test."""


class ArtifactRejected(RuntimeError):
    """The bytes fetched are not what the signed document names (digest, size): the
    download is deleted and the step reported as rejected, as a bad document is."""


@dataclass
class _Probation:
    deployment: str
    version: int
    variant: str
    previous: str | None
    until: float
    failures: int = 0
    limit: int = 3


@dataclass
class Link:
    """What the manager needs of the MQTT link (the sync service hands it over)."""

    topics_prefix: str
    fleet: str
    subscribe: Callable[[str], bool]
    unsubscribe: Callable[[str], None]
    wake: Callable[[], None]
    changed: Callable[[], None] = lambda: None  # models or policies changed: report again


@dataclass
class _Chunks:
    manifest: ArtifactManifest | None = None
    got: dict[int, bytes] = field(default_factory=dict)
    event: asyncio.Event = field(default_factory=asyncio.Event)


class DeployManager:
    """Receives desired-state documents and carries them out, one at a time."""

    def __init__(self, settings: Settings, db: Database, registry: Registry,
                 resolver: ModelResolver, scheduler: Scheduler, security: Security,
                 outbox: Outbox, audit: Audit) -> None:
        self.settings = settings
        self.state = StateDir(settings.home)
        self.db = db
        self.registry = registry
        self.resolver = resolver
        self.scheduler = scheduler
        self.security = security
        self.outbox = outbox
        self.audit = audit
        self.link: Link | None = None
        self._task: asyncio.Task[None] | None = None
        self._queue: asyncio.Queue[bytes] = asyncio.Queue()
        self._probation: dict[str, _Probation] = {}
        self._chunks: dict[str, _Chunks] = {}
        self.bytes_moved = 0  # over the agent's life (all downloads)
        self._moved: dict[str, int] = {}  # per artifact (sha256), this attempt
        self._started: dict[str, float] = {}
        self.background = Background(settings.sync.background_nice)
        scheduler.failures.append(self._on_failure)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="deploy")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.background.close()

    def received(self, raw: bytes) -> None:
        """A document arrived on `<device>/desired` (on the loop)."""
        self._queue.put_nowait(raw)

    def chunk(self, topic: str, payload: bytes) -> None:
        """A message on the artifact topics (manifest or chunk), routed by the link."""
        parts = topic.rsplit("/", 2)
        if len(parts) != 3:
            return
        sha, part = parts[1], parts[2]
        box = self._chunks.get(sha)
        if box is None:
            return
        if part == "manifest":
            with contextlib.suppress(ValueError):
                box.manifest = ArtifactManifest.model_validate_json(payload)
        elif part.isdigit():
            box.got[int(part)] = payload
        box.event.set()

    async def _run(self) -> None:
        await self._resume()
        while True:
            raw = await self._queue.get()
            try:
                await self.apply(raw)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("deployment failed unexpectedly")

    async def _resume(self) -> None:
        """Carry on with what a restart interrupted (downloads resume where they stopped)."""
        with self.db.read() as s:
            pending = s.scalars(select(Deployment).where(Deployment.state == "accepted")
                                .order_by(Deployment.version)).all()
            docs = [(d.id, d.document) for d in pending]
        for row_id, document in docs:
            state = DesiredState.model_validate_json(json.loads(document)["state"])
            log.info("resuming deployment %s v%s", state.deployment, state.version)
            await self._carry_out(row_id, state)

    # -- checking ---------------------------------------------------------------------

    def check(self, raw: bytes) -> DesiredState:
        """The document, if it is for this device, signed by the pinned key and newer than
        anything accepted; else Rejected with the reason."""
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519

        e = enroll.status(self.settings.home)
        if e.state != "enrolled" or e.signing_key_id is None:
            raise Rejected("this device is not enrolled: no pinned deployment key")
        try:
            pub = serialization.load_pem_public_key(enroll.paths(self.settings.home)["signing"]
                                                    .read_bytes())
        except (OSError, ValueError) as exc:
            raise Rejected(f"the pinned deployment key cannot be read: {exc}") from exc
        assert isinstance(pub, ed25519.Ed25519PublicKey)
        try:
            state = verify(raw, pub, e.signing_key_id)
        except SignatureError as exc:
            raise Rejected(str(exc)) from exc
        except ValueError as exc:
            raise Rejected(f"invalid document: {str(exc)[:300]}") from exc
        if state.device != e.device_id or state.fleet != e.fleet:
            raise Rejected(f"the document is for {state.fleet}/{state.device}, not "
                           f"{e.fleet}/{e.device_id}")
        applied = self.applied_version()
        if state.version <= applied:
            raise Rejected(f"version {state.version} is not newer than {applied} (replayed or "
                           "older document)")
        free = shutil.disk_usage(self.settings.home).free
        for m in state.models:
            for v in m.variants:
                if v.size > free - state.limits.disk_reserve_bytes:
                    raise Rejected(f"{m.alias}/{v.name} needs {v.size} bytes; {free} free with "
                                   f"{state.limits.disk_reserve_bytes} kept in reserve")
        return state

    def applied_version(self) -> int:
        with self.db.read() as s:
            return int(s.scalar(select(func.max(Deployment.version)).where(
                Deployment.state != "rejected")) or 0)

    async def apply(self, raw: bytes) -> None:
        """Check one received document and carry it out. The same bytes as the last one
        accepted (the retained document, delivered again on every reconnect) or as one
        already rejected are a no-op; the bytes of an older accepted document are a replay
        and are rejected by `check`."""
        if await asyncio.to_thread(self._seen, raw):
            return
        try:
            state = await asyncio.to_thread(self.check, raw)
        except Rejected as exc:
            name, version = _peek(raw)
            await asyncio.to_thread(self._record, raw, name, version, "rejected", str(exc))
            self.report(name, version, "rejected", reason=str(exc))
            self.audit("deploy:apply", f"deployment:{name}", "deny", "rejected",
                       {"version": version, "reason": str(exc)})
            log.warning("deployment %s v%s rejected: %s", name, version, exc)
            return
        row_id = await asyncio.to_thread(self._record, raw, state.deployment, state.version,
                                         "accepted", None, state)
        self.audit("deploy:apply", f"deployment:{state.deployment}", "allow", "accepted",
                   {"version": state.version, "models": [m.alias for m in state.models]})
        await self._carry_out(row_id, state)

    def _seen(self, raw: bytes) -> bool:
        _, version = _peek(raw)
        text = raw.decode("utf-8", "replace")
        applied = self.applied_version()
        with self.db.read() as s:
            rows = s.execute(select(Deployment.state, Deployment.version, Deployment.document)
                             .where(Deployment.version == version)).all()
        return any(json.loads(doc).get("received") == text
                   and (state == "rejected" or v == applied) for state, v, doc in rows)

    def _record(self, raw: bytes, name: str, version: int, state: str, reason: str | None,
                desired: DesiredState | None = None) -> int:
        """Store the document and its first status in one transaction."""
        now = time.time()
        with self.db.write() as s:
            row = Deployment(name=name[:64], version=version, document=_envelope(raw, desired),
                             state=state, reason=reason, models={}, received=now, updated=now)
            s.add(row)
            s.flush()
            self.outbox.append(s.connection(), "deploy", _status(
                name, version, "queued" if state == "accepted" else "rejected", reason=reason))
            return int(row.id)

    # -- carrying out -----------------------------------------------------------------

    async def _carry_out(self, row_id: int, state: DesiredState) -> None:
        failed: list[str] = []
        for model in state.models:
            try:
                await self._deploy_model(state, model)
            except asyncio.CancelledError:
                raise
            except SmokeFailed as exc:  # reported and audited where it happened
                failed.append(f"{model.alias}: {exc}")
            except ArtifactRejected as exc:
                failed.append(f"{model.alias}: {exc}")
                self.report(state.deployment, state.version, "rejected", model.alias,
                            reason=str(exc)[:1000])
                self.audit("deploy:model", f"model:{model.alias}", "deny", "rejected",
                           {"version": state.version, "reason": str(exc)[:300]})
                log.warning("deployment %s: %s rejected: %s", state.deployment, model.alias,
                            exc)
            except Exception as exc:
                failed.append(f"{model.alias}: {exc}")
                self.report(state.deployment, state.version, "failed", model.alias,
                            reason=str(exc)[:1000])
                self.audit("deploy:model", f"model:{model.alias}", "deny", "failed",
                           {"version": state.version, "reason": str(exc)[:300]})
                log.warning("deployment %s: %s failed: %s", state.deployment, model.alias, exc)
        for kind, text in state.policies.items():
            try:
                await self._deploy_policy(state, kind, text)
            except Exception as exc:
                failed.append(f"{kind} policy: {exc}")
                self.audit("deploy:policy", f"policy:{kind}", "deny", "failed",
                           {"version": state.version, "reason": str(exc)[:300]})
        if state.settings:
            self._deploy_settings(state)
        final = "failed" if failed else "done"
        if self.link is not None:
            self.link.changed()
        await asyncio.to_thread(self._finish, row_id, final, "; ".join(failed) or None)

    def _finish(self, row_id: int, final: str, reason: str | None) -> None:
        with self.db.write() as s:
            row = s.get(Deployment, row_id)
            if row is not None:
                row.state, row.reason, row.updated = final, reason, time.time()

    async def _deploy_model(self, state: DesiredState, model: ModelDoc) -> None:
        chosen, why = await asyncio.to_thread(self.choose, model)
        wanted = [chosen, *(v for v in model.variants if v.name in model.pin
                            and v.name != chosen.name)]
        self.report(state.deployment, state.version, "queued", model.alias, chosen.name,
                    reason=f"selected for this device: {why}")
        for v in wanted:
            if not self._installed(model.alias, v):
                path = await self._fetch(state, model, v)
                self.report(state.deployment, state.version, "verifying", model.alias, v.name)
                # Imported from the download itself, which the registry deletes only once
                # the variant is recorded: a crash on the way leaves it to resume from.
                await self.background.run(self._import, path, model, v)
                self.report(state.deployment, state.version, "installed", model.alias, v.name,
                            bytes_moved=self._moved.pop(v.sha256, 0))
            else:
                await asyncio.to_thread(self._drop_download, v)
        await self._switch(state, model, chosen)

    def _import(self, stop: threading.Event, path: Path, model: ModelDoc,
                v: VariantDoc) -> None:
        """The registry takes the download (deployment thread: it hashes the file again)."""
        self.registry.import_file(path, alias=model.alias, move=True, expected_sha256=v.sha256,
                                  task=model.task, source="deploy",
                                  variant=(v.name, v.target), file_name=v.file)

    def _drop_download(self, v: VariantDoc) -> None:
        """An installed variant's download, if a crash came between its record and its
        deletion (or an older agent left it under the file's name): not needed any more."""
        for name in (f"{v.sha256}.part", v.file):
            path = self.state.downloads / name
            if path.is_file():
                log.info("removing %s: %s is installed", path, v.name)
                path.unlink(missing_ok=True)

    def choose(self, model: ModelDoc) -> tuple[VariantDoc, str]:
        """Selection over the document's variants for this device: the one, and why."""
        from registry.selection_index import VariantIndex
        from registry.types import VariantSpec

        specs = [VariantSpec(model_alias=model.alias, name=v.name, format=v.format,
                             quantization=v.quantization, target=v.target, file_size=v.size,
                             sha256=v.sha256, installed=self._installed(model.alias, v))
                 for v in model.variants]
        # judged with the KV windows loading allocates, as the resolver judges it afterwards
        sel = VariantIndex(specs).select(self.resolver.profile(),
                                         self.resolver.policy_for(model.task),
                                         model_alias=model.alias)
        chosen = next(v for v in model.variants if v.name == sel.chosen.name)
        return chosen, "; ".join(sel.chosen_candidate.reasons)

    def _installed(self, alias: str, v: VariantDoc) -> bool:
        try:
            info = self.registry.get(alias)
        except Exception:
            return False
        return any(x.name == v.name and x.sha256 == v.sha256 for x in info.variants)

    # -- fetching ---------------------------------------------------------------------

    async def _fetch(self, state: DesiredState, model: ModelDoc, v: VariantDoc) -> Path:
        await self._wait_for_window(state, model, v)
        free = shutil.disk_usage(self.settings.home).free
        if v.size > free - state.limits.disk_reserve_bytes:
            raise RuntimeError(f"not enough disk: {v.size} needed, {free} free, "
                               f"{state.limits.disk_reserve_bytes} reserved")
        self.state.downloads.mkdir(mode=0o750, parents=True, exist_ok=True)
        part = self.state.downloads / f"{v.sha256}.part"
        self.report(state.deployment, state.version, "downloading", model.alias, v.name,
                    percent=0.0)
        self._moved[v.sha256] = 0
        try:
            if v.source.https is not None:
                await self._https(state, model, v, part)
            else:
                await self._mqtt(state, model, v, part)
            digest = await self.background.run(_sha256_of, part)
            if digest != v.sha256:
                raise ArtifactRejected(f"sha256 mismatch: got {digest}, the document says "
                                       f"{v.sha256}")
        except ArtifactRejected:
            part.unlink(missing_ok=True)  # never resumed from, never imported
            raise
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            # The disk filled during the download (something else wrote, or the reserve was
            # too small): the partial file goes, so that the agent's own audit and database
            # have room again; the deployment fails for this model and says why.
            got = part.stat().st_size if part.exists() else 0
            part.unlink(missing_ok=True)
            raise RuntimeError(f"not enough disk: it filled during the download of {v.name} "
                               f"({got} of {v.size} bytes); the partial download was "
                               "removed") from exc
        # Verified, and kept under its digest's name until the registry has it: a restart
        # finds it complete and imports it without fetching a byte (it was renamed to
        # `v.file` here once, which the resume did not look for: downloaded again).
        return part

    async def _wait_for_window(self, state: DesiredState, model: ModelDoc, v: VariantDoc) -> None:
        if not state.windows or v.size <= state.limits.large_download_bytes:
            return
        reported = False
        while not _in_window(state, datetime.now()):
            if not reported:
                self.report(state.deployment, state.version, "waiting", model.alias, v.name,
                            reason="large download: waiting for the sync window "
                            + ", ".join(f"{w.start}-{w.end}" for w in state.windows))
                reported = True
            await asyncio.sleep(30)  # wall-clock wait for the window, not synchronisation

    def _tls(self) -> ssl.SSLContext:
        from agent.security.keys import tls_key_path

        p = enroll.paths(self.settings.home)
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(p["ca"]))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(str(p["cert"]), str(tls_key_path(self.settings.home)))
        return ctx

    async def _https(self, state: DesiredState, model: ModelDoc, v: VariantDoc,
                     part: Path) -> None:
        """GET with Range from where the last attempt stopped; retried with backoff. Each
        attempt runs on the low-priority deployment thread (`agent.sync.background`)."""
        import httpx

        assert v.source.https is not None
        delay = 1.0
        ctx = await asyncio.to_thread(self._tls)
        while True:
            try:
                await self.background.run(self._get, v.source.https, ctx, state, model, v, part,
                                          asyncio.get_running_loop())
                return
            except (httpx.TransportError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
                    raise  # not a network problem: retrying would keep the disk full
                log.warning("download of %s interrupted (%s); resuming in %.0fs", v.name, exc,
                            delay)
                await asyncio.sleep(delay)  # backoff before the retry, not synchronisation
                delay = min(60.0, delay * 2)

    def _get(self, stop: threading.Event, url: str, ctx: ssl.SSLContext, state: DesiredState,
             model: ModelDoc, v: VariantDoc, part: Path, loop: asyncio.AbstractEventLoop) -> None:
        """One attempt (deployment thread): append to `part` from where it ends, bounded by
        the declared size and the bandwidth cap; progress goes to the loop."""
        import httpx

        have = part.stat().st_size if part.exists() else 0
        if have == v.size:
            return
        if have > v.size:
            part.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        with httpx.Client(verify=ctx, timeout=30) as client, \
                client.stream("GET", url, headers=headers) as resp:
            if resp.status_code == 200 and have:
                have = 0  # the server ignored the Range: start over
                part.unlink(missing_ok=True)
            elif resp.status_code not in (200, 206):
                raise RuntimeError(f"artifact server answered {resp.status_code}")
            limit = state.limits.bandwidth_bytes_per_s
            t0, sent0 = time.monotonic(), have
            next_report = (int(have * 10 / v.size) + 1) * 10
            with part.open("ab" if have else "wb") as f:
                for data in resp.iter_bytes():
                    check(stop)
                    if have + len(data) > v.size:
                        raise ArtifactRejected(f"the artifact is larger than the declared "
                                               f"{v.size} bytes")
                    f.write(data)
                    have += len(data)
                    loop.call_soon_threadsafe(self._count, v, len(data))
                    pct = have * 100 / v.size
                    if pct >= next_report:
                        next_report += 10
                        loop.call_soon_threadsafe(functools.partial(
                            self.report, state.deployment, state.version, "downloading",
                            model.alias, v.name, percent=round(pct, 1)))
                    if limit:  # the bandwidth cap: never ahead of `limit` bytes per second
                        ahead = (have - sent0) / limit - (time.monotonic() - t0)
                        if ahead > 0 and stop.wait(ahead):
                            check(stop)
                f.flush()
                os.fsync(f.fileno())

    def _count(self, v: VariantDoc, n: int) -> None:
        self.bytes_moved += n
        self._moved[v.sha256] = self._moved.get(v.sha256, 0) + n

    async def _pace(self, state: DesiredState, v: VariantDoc) -> None:
        """The bandwidth cap on the chunk path: never ahead of the limit since this
        attempt started (the HTTPS path paces per read in `_write_stream`)."""
        limit = state.limits.bandwidth_bytes_per_s
        if not limit:
            return
        start = self._started.setdefault(v.sha256, time.monotonic())
        ahead = self._moved.get(v.sha256, 0) / limit - (time.monotonic() - start)
        if ahead > 0:
            await asyncio.sleep(ahead)  # the rate limit itself, not synchronisation

    async def _mqtt(self, state: DesiredState, model: ModelDoc, v: VariantDoc,
                    part: Path) -> None:
        """Numbered chunks retained on the broker, checked one by one; chunks already in the
        partial file (and matching the manifest) are kept."""
        link = self.link
        if link is None:
            raise RuntimeError("no link to the broker for the MQTT artifact path")
        box = self._chunks[v.sha256] = _Chunks()
        manifest_topic = artifact_topic(link.topics_prefix, link.fleet, v.sha256, "manifest")
        try:
            while box.manifest is None:
                box.event.clear()
                link.subscribe(manifest_topic)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(10):
                        await box.event.wait()
            link.unsubscribe(manifest_topic)
            m = box.manifest
            if m.sha256 != v.sha256 or m.size != v.size:
                raise RuntimeError("the artifact manifest does not match the document")
            done = await self.background.run(_chunks_present, part, m)
            todo = [i for i in range(len(m.chunks)) if i not in done]
            with part.open("r+b" if part.exists() else "w+b") as f:
                f.truncate(m.size)
                while todo:
                    window, todo = todo[:CHUNK_WINDOW], todo[CHUNK_WINDOW:]
                    await self._fetch_chunks(state, model, v, m, window, f, len(done))
                    done.update(window)
                f.flush()
                os.fsync(f.fileno())
        finally:
            self._chunks.pop(v.sha256, None)
            self._started.pop(v.sha256, None)

    async def _fetch_chunks(self, state: DesiredState, model: ModelDoc, v: VariantDoc,
                            m: ArtifactManifest, window: list[int], f: Any, have: int) -> None:
        link = self.link
        assert link is not None
        box = self._chunks[v.sha256]
        topics = {i: artifact_topic(link.topics_prefix, link.fleet, v.sha256, i) for i in window}
        pending = set(window)
        while pending:
            for i in pending:
                link.subscribe(topics[i])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(15):
                    while pending - set(box.got):
                        box.event.clear()
                        await box.event.wait()
            arrived = {i: box.got.pop(i) for i in sorted(pending & set(box.got))}
            for i in arrived:
                link.unsubscribe(topics[i])
            written = await self.background.run(_write_chunks, f, m, arrived)
            for i, data in arrived.items():
                if i not in written:
                    log.warning("chunk %d of %s failed its check; asking again", i, v.name)
                    continue
                pending.discard(i)
                self._count(v, len(data))
                await self._pace(state, v)
        pct = (have + len(window)) * 100 / len(m.chunks)
        self.report(state.deployment, state.version, "downloading", model.alias, v.name,
                    percent=round(min(100.0, pct), 1))

    # -- smoke test, switch, rollback ---------------------------------------------------

    async def _switch(self, state: DesiredState, model: ModelDoc, chosen: VariantDoc) -> None:
        info = await asyncio.to_thread(self.registry.get, model.alias)
        previous = info.active_variant or next(
            (m.variant for m in self.scheduler.loaded() if m.alias == model.alias), None)
        if previous == chosen.name and info.active_variant == chosen.name:
            self.report(state.deployment, state.version, "active", model.alias, chosen.name,
                        reason="already serving")
            return
        key = f"{model.alias}#deploy"
        self.report(state.deployment, state.version, "smoke-testing", model.alias, chosen.name)
        try:
            seconds = await self._smoke(key, model, chosen)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await self.scheduler.unload(key)
            keep = {previous, info.active_variant} - {None}
            if chosen.name not in keep:
                await asyncio.to_thread(self.registry.remove_variant, model.alias, chosen.name)
            # Rolled back when the alias keeps something to serve: the variant serving or
            # pinned, or any other installed one selection picks on the next request.
            others = [x.name for x in info.variants if x.name != chosen.name]
            keeps = previous or (others[0] if others else None)
            step: Step = "rolled-back" if keeps else "failed"
            why = f"smoke test failed: {exc}" + (f"; {keeps} keeps serving" if keeps else "")
            self.report(state.deployment, state.version, step, model.alias, chosen.name,
                        reason=why)
            self.audit("deploy:switch", f"model:{model.alias}", "deny", step,
                       {"variant": chosen.name, "reason": str(exc)[:300]})
            raise SmokeFailed(why) from exc
        await asyncio.to_thread(self.registry.set_active, model.alias, chosen.name)
        await self.scheduler.promote(key, model.alias)
        limits = state.limits
        self._probation[model.alias] = _Probation(
            state.deployment, state.version, chosen.name, previous,
            time.monotonic() + limits.probation_seconds, limit=limits.probation_failures)
        self.report(state.deployment, state.version, "active", model.alias, chosen.name,
                    reason=f"smoke test passed in {seconds:.2f}s; previous: {previous or 'none'}")
        self.audit("deploy:switch", f"model:{model.alias}", "allow", "active",
                   {"variant": chosen.name, "previous": previous})

    async def _smoke(self, key: str, model: ModelDoc, v: VariantDoc) -> float:
        from agent.runtime.types import GenerationRequest, Sampling

        resolved = await asyncio.to_thread(self.resolver.resolve_variant, model.alias, v.name)
        t0 = time.monotonic()
        async with asyncio.timeout(model.smoke_max_seconds):
            await self.scheduler.load_candidate(key, resolved)
            if model.task == "embedding":
                out = await self.scheduler.run(key, lambda b: b.embed([model.smoke_prompt]))
                vectors = getattr(out, "vectors", out)
                if not vectors or not vectors[0]:
                    raise SmokeFailed("the embedding came back empty")
            else:
                req = GenerationRequest(model=key, prompt=model.smoke_prompt,
                                        sampling=Sampling(max_tokens=8, temperature=0))
                text, n = "", 0
                async for chunk in self.scheduler.generate(req):
                    text += chunk.text
                    n = chunk.completion_tokens or n
                if n == 0 and not text:
                    raise SmokeFailed("the model generated nothing")
        return time.monotonic() - t0

    def _on_failure(self, alias: str, exc: BaseException) -> None:
        p = self._probation.get(alias)
        if p is None:
            return
        if time.monotonic() > p.until:
            del self._probation[alias]
            return
        p.failures += 1
        if p.failures >= p.limit:
            del self._probation[alias]
            asyncio.get_running_loop().create_task(self._rollback(alias, p, exc),
                                                   name="deploy-rollback")

    async def _rollback(self, alias: str, p: _Probation, exc: BaseException) -> None:
        await asyncio.to_thread(self.registry.set_active, alias, p.previous)
        await self.scheduler.unload(alias)  # the next request loads the previous variant
        why = (f"{p.failures} failures in probation (last: {str(exc)[:200]}); "
               f"back to {p.previous or 'selection'}")
        self.report(p.deployment, p.version, "rolled-back", alias, p.variant, reason=why)
        self.audit("deploy:rollback", f"model:{alias}", "allow", "rolled-back",
                   {"variant": p.variant, "previous": p.previous})
        log.warning("deployment %s: rolled %s back: %s", p.deployment, alias, why)

    # -- policies and settings ----------------------------------------------------------

    async def _deploy_policy(self, state: DesiredState, kind: str, text: str) -> None:
        """Validate with the agent's own loader, install, apply through the one reload;
        put the previous file back if it does not take."""
        folder = self.state.policies
        folder.mkdir(mode=0o750, parents=True, exist_ok=True)
        target = folder / f"{kind}.yaml"
        new = folder / f".{kind}.yaml.new"
        new.write_text(text, encoding="utf-8")
        new.chmod(0o640)
        try:
            if kind == "rbac":
                from agent.security.authz import load_policy

                if self.settings.security.rbac_file is not None:
                    raise RuntimeError("this device pins security.rbac_file; not replaced")
                load_policy(new)
            else:
                from registry.selection import load_policy as load_selection

                if self.settings.selection.policy_file is not None:
                    raise RuntimeError("this device pins selection.policy_file; not replaced")
                load_selection(new)
        except Exception as exc:
            new.unlink(missing_ok=True)
            self.report(state.deployment, state.version, "failed", reason=f"{kind} policy "
                        f"rejected: {str(exc)[:400]}")
            raise
        backup = folder / f".{kind}.yaml.previous"
        if target.exists():
            shutil.copy2(target, backup)
        new.replace(target)
        if kind == "rbac":
            ok, message = await asyncio.to_thread(
                self.security.reload_policy, f"deploy:{state.deployment}", target)
        else:
            self.resolver.reload_policy()
            ok, message = True, f"selection policy {target}"
        if not ok:
            if backup.exists():
                backup.replace(target)
            else:
                target.unlink(missing_ok=True)
            self.report(state.deployment, state.version, "rolled-back",
                        reason=f"{kind} policy did not take: {message}")
            raise RuntimeError(message)
        self.report(state.deployment, state.version, "active", reason=f"{kind} policy: "
                    f"{message}")

    def _deploy_settings(self, state: DesiredState) -> None:
        """The allow-listed settings, for the next start (written atomically)."""
        target = self.state.home / "deployed-settings.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(state.settings, indent=1, sort_keys=True), encoding="utf-8")
        tmp.chmod(0o640)
        tmp.replace(target)
        self.report(state.deployment, state.version, "installed",
                    reason=f"settings {', '.join(sorted(state.settings))}: apply at next start")

    # -- reporting --------------------------------------------------------------------

    def report(self, deployment: str, version: int, step: Step, model: str | None = None,
               variant: str | None = None, *, percent: float | None = None,
               reason: str | None = None, bytes_moved: int | None = None) -> None:
        """One step on the deploy status topic (never dropped), in the log."""
        self.outbox.add("deploy", _status(deployment, version, step, model, variant, percent,
                                          reason, bytes_moved))
        if self.link is not None:
            self.link.wake()
        log.info("deployment %s v%s: %s %s %s%s", deployment, version, model or "-",
                 variant or "", step, f" ({reason})" if reason else "")


def _status(deployment: str, version: int, step: str, model: str | None = None,
            variant: str | None = None, percent: float | None = None,
            reason: str | None = None, bytes_moved: int | None = None) -> dict[str, Any]:
    return {"status": {"deployment": deployment[:64] or "unknown", "version": version,
                       "step": step, "model": model, "variant": variant, "percent": percent,
                       "reason": reason[:1024] if reason else None, "bytes_moved": bytes_moved,
                       "time": time.time()}}


def _envelope(raw: bytes, state: DesiredState | None = None) -> str:
    """What is stored: the received bytes (evidence) and, once verified, the document."""
    body: dict[str, Any] = {"received": raw.decode("utf-8", "replace")}
    if state is not None:
        body["state"] = state.model_dump_json()
    return json.dumps(body, sort_keys=True)


def _peek(raw: bytes) -> tuple[str, int]:
    """Name and version of a document that failed its checks, for the report only."""
    import base64
    import re

    try:
        payload = json.loads(base64.b64decode(json.loads(raw)["payload"]))
        name = str(payload.get("deployment", "unknown"))
        version = int(payload.get("version", 0))
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return "unknown", 0
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name):
        name = "unknown"
    return name, version


def _in_window(state: DesiredState, now: datetime) -> bool:
    minute = now.hour * 60 + now.minute
    for w in state.windows:
        start = int(w.start[:2]) * 60 + int(w.start[3:])
        end = int(w.end[:2]) * 60 + int(w.end[3:])
        inside = start <= minute < end if start <= end else minute >= start or minute < end
        if inside:
            return True
    return False


def _sha256_of(stop: threading.Event, path: Path) -> str:
    """The file's digest (deployment thread; stops when the deployment is cancelled)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            check(stop)
            h.update(data)
    return h.hexdigest()


def _write_chunks(stop: threading.Event, f: Any, m: ArtifactManifest,
                  arrived: dict[int, bytes]) -> set[int]:
    """Check each arrived chunk against the manifest and write the good ones in place
    (deployment thread); the numbers written."""
    written = set()
    for i, data in arrived.items():
        check(stop)
        if hashlib.sha256(data).hexdigest() == m.chunks[i]:
            f.seek(i * m.chunk_size)
            f.write(data)
            written.add(i)
    return written


def _chunks_present(stop: threading.Event, part: Path, m: ArtifactManifest) -> set[int]:
    """Chunks already in the partial file that match the manifest (a resumed download)."""
    if not part.exists():
        return set()
    done = set()
    with part.open("rb") as f:
        for i, expected in enumerate(m.chunks):
            check(stop)
            f.seek(i * m.chunk_size)
            data = f.read(m.chunk_size)
            if data and hashlib.sha256(data).hexdigest() == expected:
                done.add(i)
    return done
