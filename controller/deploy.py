"""Deployments from the controller: the artifact catalog, device groups, one signed
desired-state document per targeted device, and where each device is.

`deploy create` resolves a selector (`--group`, `--device`, `--all`) to approved devices,
gives each the next version of its own counter (a document is never reused across
devices or versions, so a device can reject replays and rollbacks by version alone),
signs each with the fleet's deployment key and publishes it retained on
`<prefix>/<fleet>/<device>/desired`: a device that is offline gets it when it connects.
Every variant of each model goes into the document; the device picks with its own
selection engine, so the controller never needs to know a device's hardware.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import Engine, delete, func, insert, select, update

from controller.pki import FleetKeys
from controller.settings import ControllerSettings
from controller.tables import (
    Artifact,
    Deployment,
    DeploymentTarget,
    DeployStep,
    Device,
    DeviceGroup,
)
from fleet import deploy as d
from fleet.topics import NAME, Topics

log = logging.getLogger(__name__)
# Quantizations read from a file name when --quantization is not given.
_QUANT = re.compile(r"(?i)(?:^|[._-])(IQ\d_[A-Z]+|Q\d_K_[SML]|Q\d_K|Q\d_[01]|F16|BF16|F32|"
                    r"int4|int8|fp16|fp32|TQ\d_0)(?=[._-]|$)")
FINAL_STEPS = frozenset({"active", "failed", "rolled-back", "rejected"})


class DeployError(ValueError):
    """The operator's request cannot be carried out (the message says what to change)."""


def guess_quantization(file_name: str) -> str | None:
    m = _QUANT.search(Path(file_name).stem)
    return m.group(1).upper() if m else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class Published:
    device: str
    version: int
    topic: str
    payload: bytes


class Deployer:
    """The controller's deployment side, over its database and keys."""

    def __init__(self, settings: ControllerSettings, engine: Engine) -> None:
        self.settings = settings
        self.engine = engine
        self.keys = FleetKeys(settings.home)

    @property
    def artifact_dir(self) -> Path:
        return self.settings.artifact_dir or self.settings.home / "artifacts"

    # -- artifacts --------------------------------------------------------------------

    def add_artifact(self, path: Path, *, alias: str, name: str | None, task: str,
                     quantization: str | None, target: str, fmt: str | None) -> dict[str, Any]:
        """Copy `path` into the artifact directory (0640) and record it as a variant."""
        if not path.is_file():
            raise DeployError(f"{path} is not a regular file")
        fmt = fmt or ("onnx" if path.suffix == ".onnx" else "gguf")
        quantization = quantization or guess_quantization(path.name)
        if quantization is None:
            raise DeployError(f"cannot tell the quantization of {path.name}; give "
                              "--quantization")
        name = name or f"{fmt}-{quantization.lower()}-{target}"
        for label, value in (("alias", alias), ("variant name", name)):
            if not NAME.fullmatch(value):
                raise DeployError(f"invalid {label} {value!r}")
        sha = file_sha256(path)
        size = path.stat().st_size
        file = (f"{sha[:16]}-{path.name}"[:64] if NAME.fullmatch(path.name)
                else f"{sha[:32]}.{fmt}")
        d.VariantDoc(name=name, format=fmt, quantization=quantization,
                     target=target, size=size, sha256=sha, file=file,
                     source=d.Source(mqtt=True))  # the same checks the device applies
        self.artifact_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        dest = self.artifact_dir / file
        if not dest.exists():
            tmp = dest.with_name(f".{file}.tmp")
            shutil.copyfile(path, tmp)
            tmp.chmod(0o640)
            tmp.replace(dest)
        row = {"alias": alias, "name": name, "task": task, "format": fmt,
               "quantization": quantization, "target": target, "file": file, "size": size,
               "sha256": sha, "added": time.time()}
        with self.engine.begin() as conn:
            conn.execute(delete(Artifact).where((Artifact.alias == alias)
                                                & (Artifact.name == name)))
            conn.execute(insert(Artifact), [row])
        return row

    def artifacts(self, alias: str | None = None) -> list[dict[str, Any]]:
        q = select(Artifact).order_by(Artifact.alias, Artifact.name)
        if alias is not None:
            q = q.where(Artifact.alias == alias)
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(
                q.with_only_columns(*Artifact.__table__.c))]

    def artifact(self, ref: str) -> dict[str, Any]:
        """By sha256 (or a unique prefix of at least 8), or ALIAS/NAME."""
        rows = self.artifacts()
        alias, _, name = ref.partition("/")
        found = [r for r in rows if (name and r["alias"] == alias and r["name"] == name)
                 or (len(ref) >= 8 and r["sha256"].startswith(ref.lower()))]
        if len({r["sha256"] for r in found}) != 1:
            raise DeployError(f"no single artifact matches {ref!r}")
        return found[0]

    def mark_published(self, sha256: str, chunk_size: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(Artifact).where(Artifact.sha256 == sha256)
                         .values(published_chunk_size=chunk_size))

    # -- groups -----------------------------------------------------------------------

    def set_groups(self, device: str, groups: list[str], *, replace: bool = False) -> list[str]:
        for g in groups:
            if not NAME.fullmatch(g):
                raise DeployError(f"invalid group name {g!r}")
        with self.engine.begin() as conn:
            if conn.execute(select(Device.device_id).where(Device.device_id == device)
                            ).first() is None:
                raise DeployError(f"no approved device {device!r}")
            if replace:
                conn.execute(delete(DeviceGroup).where(DeviceGroup.device_id == device))
            have = set(conn.scalars(select(DeviceGroup.group).where(
                DeviceGroup.device_id == device)))
            new = [{"device_id": device, "group_name": g} for g in dict.fromkeys(groups)
                   if g not in have]
            if new:
                conn.execute(insert(DeviceGroup), new)
            return sorted(have | set(groups))

    def groups(self) -> dict[str, list[str]]:
        with self.engine.connect() as conn:
            out: dict[str, list[str]] = {}
            for dev, g in conn.execute(select(DeviceGroup.device_id, DeviceGroup.group)
                                       .order_by(DeviceGroup.group, DeviceGroup.device_id)):
                out.setdefault(g, []).append(dev)
            return out

    def targets(self, *, group: str | None, device: str | None,
                everyone: bool) -> list[tuple[str, str]]:
        """(device, fleet) of the approved devices a selector names."""
        if sum((group is not None, device is not None, everyone)) != 1:
            raise DeployError("give exactly one of --group, --device, --all")
        q = select(Device.device_id, Device.fleet).order_by(Device.device_id)
        if group is not None:
            q = q.join(DeviceGroup, DeviceGroup.device_id == Device.device_id).where(
                DeviceGroup.group == group)
        elif device is not None:
            q = q.where(Device.device_id == device)
        with self.engine.connect() as conn:
            rows = [(r[0], r[1]) for r in conn.execute(q)]
        if not rows:
            raise DeployError("no approved device matches "
                              + (f"group {group!r}" if group else f"device {device!r}"
                                 if device else "--all"))
        return rows

    # -- deployments ------------------------------------------------------------------

    def model_doc(self, alias: str, *, mqtt: bool, pin: list[str], smoke_prompt: str | None,
                  smoke_seconds: float | None) -> d.ModelDoc:
        rows = self.artifacts(alias)
        if not rows:
            raise DeployError(f"no artifacts for model {alias!r}: add them with "
                              "`artifacts add FILE --model ALIAS`")
        base = self.settings.artifact_url
        if not mqtt and base is None:
            raise DeployError("no artifact server URL: set EDGE_CONTROLLER_ARTIFACT_URL "
                              "(where `artifacts serve` listens) or use --mqtt")
        variants = []
        for r in rows:
            if mqtt and r["published_chunk_size"] is None:
                raise DeployError(f"{alias}/{r['name']} is not on the broker: run "
                                  f"`artifacts publish {r['sha256'][:12]}` first")
            source = (d.Source(mqtt=True) if mqtt
                      else d.Source(https=f"{str(base).rstrip('/')}/{r['file']}"))
            variants.append(d.VariantDoc(
                name=r["name"], format=r["format"], quantization=r["quantization"],
                target=r["target"], size=r["size"], sha256=r["sha256"], file=r["file"],
                source=source))
        unknown = set(pin) - {v.name for v in variants}
        if unknown:
            raise DeployError(f"--pin names no variant of {alias}: {', '.join(sorted(unknown))}")
        extra: dict[str, Any] = {}
        if smoke_prompt is not None:
            extra["smoke_prompt"] = smoke_prompt
        if smoke_seconds is not None:
            extra["smoke_max_seconds"] = smoke_seconds
        return d.ModelDoc(alias=alias, task=rows[0]["task"], variants=variants, pin=pin,
                          **extra)

    def create(self, *, models: list[d.ModelDoc], policies: dict[str, str],
               settings: dict[str, Any], windows: list[d.Window], limits: d.Limits,
               group: str | None = None, device: str | None = None,
               everyone: bool = False) -> tuple[str, list[Published]]:
        """Sign one document per targeted device and record it; returns what to publish."""
        if not models and not policies and not settings:
            raise DeployError("nothing to deploy: give --model, --policy or --set")
        targets = self.targets(group=group, device=device, everyone=everyone)
        name = f"d{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"
        selector = f"group:{group}" if group else f"device:{device}" if device else "all"
        key = self.keys.signing_key()
        key_id = d.public_key_id(key.public_key())
        now = time.time()
        out: list[Published] = []
        with self.engine.begin() as conn:
            conn.execute(insert(Deployment), [{
                "id": name, "created": now, "selector": selector,
                "spec": {"models": [m.model_dump(mode="json") for m in models],
                         "policies": sorted(policies), "settings": settings,
                         "windows": [w.model_dump() for w in windows],
                         "limits": limits.model_dump()}}])
            for dev, fleet in targets:
                version = int(conn.scalar(select(func.max(DeploymentTarget.version)).where(
                    DeploymentTarget.device_id == dev)) or 0) + 1
                state = d.DesiredState(
                    fleet=fleet, device=dev, version=version, deployment=name, created=now,
                    models=models, policies=policies,
                    settings=settings, windows=windows, limits=limits)
                payload = d.sign(state, key, key_id)
                conn.execute(insert(DeploymentTarget), [{
                    "deployment": name, "device_id": dev, "version": version,
                    "document": payload.decode("utf-8"), "published": None}])
                topic = Topics(self.settings.topic_prefix, fleet, dev)("desired")
                out.append(Published(dev, version, topic, payload))
        return name, out

    def published(self, deployment: str, devices: list[str]) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(DeploymentTarget).where(
                (DeploymentTarget.deployment == deployment)
                & DeploymentTarget.device_id.in_(devices)).values(published=time.time()))

    def status(self, deployment: str) -> dict[str, Any]:
        """Per device: the version it was sent, each model's latest step, every step."""
        with self.engine.connect() as conn:
            dep = conn.execute(select(Deployment).where(Deployment.id == deployment)).first()
            if dep is None:
                raise DeployError(f"no deployment {deployment!r}")
            targets = conn.execute(select(DeploymentTarget).where(
                DeploymentTarget.deployment == deployment).order_by(
                DeploymentTarget.device_id)).all()
            steps = conn.execute(select(DeployStep).where(
                DeployStep.deployment == deployment).order_by(
                DeployStep.device_id, DeployStep.record_id)).all()
        devices: dict[str, dict[str, Any]] = {}
        for t in targets:
            devices[t.device_id] = {"device": t.device_id, "version": t.version,
                                    "published": t.published, "state": "sent",
                                    "models": {}, "policies": [], "steps": []}
        for s in steps:
            entry = devices.get(s.device_id)
            if entry is None or s.version != entry["version"]:
                continue
            step = {"step": s.step, "model": s.model, "variant": s.variant,
                    "percent": s.percent, "reason": s.reason, "bytes_moved": s.bytes_moved,
                    "time": s.time}
            entry["steps"].append(step)
            if s.model is not None:
                entry["models"][s.model] = step
            elif s.step != "queued":
                entry["policies"].append(step)
        for entry in devices.values():
            entry["state"] = _overall(entry)
        return {"deployment": dep.id, "created": dep.created,
                "selector": dep.selector, "spec": dep.spec,
                "devices": list(devices.values())}

    def latest(self) -> dict[str, dict[str, Any]]:
        """Each device's newest deployment and where it is (for `fleet status`)."""
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            newest = conn.execute(select(DeploymentTarget.device_id, DeploymentTarget.deployment,
                                         func.max(DeploymentTarget.version)).group_by(
                DeploymentTarget.device_id, DeploymentTarget.deployment)).all()
        best: dict[str, tuple[int, str]] = {}
        for dev, dep, ver in newest:
            if dev not in best or ver > best[dev][0]:
                best[dev] = (ver, dep)
        cache: dict[str, dict[str, Any]] = {}
        for dev, (_ver, dep) in best.items():
            if dep not in cache:
                cache[dep] = {e["device"]: e for e in self.status(dep)["devices"]}
            entry = cache[dep].get(dev)
            if entry is not None:
                out[dev] = {"deployment": dep, "version": entry["version"],
                            "state": entry["state"],
                            "models": {k: f"{v['variant'] or '-'} {v['step']}"
                                       for k, v in entry["models"].items()}}
        return out


def _overall(entry: dict[str, Any]) -> str:
    """One word for a device's progress: sent, rejected, in progress, active, failed, ..."""
    steps = entry["steps"]
    if not steps:
        return "sent" if entry["published"] else "not sent"
    if any(s["step"] == "rejected" for s in steps):
        return "rejected"
    latest = [m["step"] for m in entry["models"].values()] + [p["step"]
                                                               for p in entry["policies"]]
    if latest and all(s in FINAL_STEPS for s in latest):
        for word in ("failed", "rolled-back"):
            if word in latest:
                return word
        return "active"
    return steps[-1]["step"] if steps[-1]["step"] not in FINAL_STEPS else "in progress"


def read_policy(spec: str) -> tuple[str, str]:
    """`--policy [KIND=]FILE` → (kind, text); KIND from the name when not given."""
    kind, sep, file = spec.partition("=")
    if not sep:
        file = spec
        stem = Path(spec).name.lower()
        kind = "rbac" if "rbac" in stem else "selection" if "selection" in stem else ""
    if kind not in ("rbac", "selection"):
        raise DeployError(f"cannot tell what policy {spec} is: write rbac=FILE or "
                          "selection=FILE")
    text = Path(file).read_text(encoding="utf-8")
    try:
        if not isinstance(yaml.safe_load(text), dict):
            raise DeployError(f"{file} is not a YAML mapping")
    except yaml.YAMLError as exc:
        raise DeployError(f"{file} is not valid YAML: {exc}") from exc
    return kind, text


# -- publishing ---------------------------------------------------------------------------


class Publisher:
    """A short-lived MQTT 5 client with the controller's certificate, for retained
    documents and artifact chunks; `publish` returns once the broker has each message."""

    def __init__(self, settings: ControllerSettings, client_id: str | None = None) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        from controller.ingest import tls_context

        self.settings = settings
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5,
                                  client_id=client_id or f"controller-pub-{os.getpid()}")
        self.client.tls_set_context(tls_context(settings))
        self.client.max_inflight_messages_set(32)
        self._ready = threading.Event()
        self._refused: str | None = None
        self.client.on_connect = self._on_connect

    def _on_connect(self, _c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)
        self._ready.set()

    def __enter__(self) -> Publisher:
        self.client.connect(self.settings.broker_host, self.settings.broker_port, keepalive=30)
        self.client.loop_start()
        if not self._ready.wait(30) or self._refused:
            self.close()
            raise DeployError(f"the broker {self.settings.broker_host}:"
                              f"{self.settings.broker_port} refused or did not answer: "
                              f"{self._refused or 'timeout'}")
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(self, items: list[tuple[str, bytes]], *, retain: bool = True,
                window: int = 16) -> None:
        pending: list[Any] = []
        for topic, payload in items:
            pending.append(self.client.publish(topic, payload, qos=1, retain=retain))
            if len(pending) >= window:
                pending.pop(0).wait_for_publish(60)
        for info in pending:
            info.wait_for_publish(60)
        for info in pending:
            if not info.is_published():
                raise DeployError("the broker did not confirm a publish")


def publish_artifact(pub: Publisher, prefix: str, fleet: str, path: Path,
                     chunk_size: int) -> d.ArtifactManifest:
    """Numbered chunks of `path`, retained, then the manifest naming each chunk's sha256
    (last, so a device that sees the manifest finds every chunk). Streams the file twice:
    never more than a window of chunks in memory."""
    hashes, whole, size = [], hashlib.sha256(), 0
    with path.open("rb") as f:
        while block := f.read(chunk_size):
            hashes.append(hashlib.sha256(block).hexdigest())
            whole.update(block)
            size += len(block)
    manifest = d.ArtifactManifest(sha256=whole.hexdigest(), size=size, chunk_size=chunk_size,
                                  chunks=hashes)
    with path.open("rb") as f:
        n = 0
        while True:
            batch: list[tuple[str, bytes]] = []
            while len(batch) < 16 and (block := f.read(chunk_size)):
                batch.append((d.artifact_topic(prefix, fleet, manifest.sha256, n), block))
                n += 1
            if not batch:
                break
            pub.publish(batch)
    pub.publish([(d.artifact_topic(prefix, fleet, manifest.sha256, "manifest"),
                  manifest.model_dump_json().encode())])
    return manifest
