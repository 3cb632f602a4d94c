"""What this device runs for an alias, and why: hardware profile × selection policy × the
registry's variants, plus the one memory budget that selection and residency share.

The selection policy the device applies is the policy file with the agent's own memory
setting folded in (`effective_policy`): the file may lower the budget, never raise it. A
model's variants are judged under `task_policy`: a generating model's GGUF variants with
the `runtime.parallel` KV windows loading gives them, so what selection estimates is what
the memory budget counts at load. The hardware profile is detected once; the runtime probe
(which imports llama.cpp and ONNX Runtime) is deferred to the first selection, so an idle
daemon never pays for it.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from agent.runtime.types import ResolvedModel
from agent.settings import RuntimeSettings, Settings
from registry.service import ModelInfo, Registry

if TYPE_CHECKING:  # selection's models cost ~3 MB: the daemon loads them on first use
    from registry.profile import HardwareProfile
    from registry.selection import Selection, SelectionPolicy
    from registry.selection_index import VariantIndex
    from registry.types import VariantSpec

log = logging.getLogger(__name__)


def effective_policy(policy: SelectionPolicy, runtime: RuntimeSettings) -> SelectionPolicy:
    """`policy` with the agent's memory setting and context window applied.

    The budget is `runtime.memory_fraction` of RAM (or `runtime.memory_budget_bytes`); the
    policy's `memory.fraction` and `memory.max_bytes` can only lower it. The context is
    what the runtime sizes the KV cache for."""
    mem = policy.memory
    fraction = min(mem.fraction, runtime.memory_fraction)
    cap = runtime.memory_budget_bytes
    if mem.max_bytes is not None:
        cap = mem.max_bytes if cap is None else min(cap, mem.max_bytes)
    memory = mem.model_copy(update={"fraction": fraction, "max_bytes": cap})
    return policy.model_copy(
        update={"memory": memory, "context_length": runtime.context_length}
    )


def task_policy(policy: SelectionPolicy, runtime: RuntimeSettings, task: str) -> SelectionPolicy:
    """`policy` for a model of `task`: a generating model's GGUF variants hold
    `runtime.parallel` KV windows of the whole context (agent.runtime.llama `_sequences`),
    an embedding model's one (it is loaded without sequences of its own). Selection then
    judges a variant by what loading it allocates, and a variant that would fit with one
    window but not with all of them is not chosen only to be refused at load."""
    windows = 1 if task == "embedding" else runtime.parallel
    if policy.kv_windows == windows:
        return policy
    return policy.model_copy(update={"kv_windows": windows})


def selection_policy_path(settings: Settings) -> Path | None:
    """The selection policy file: `selection.policy_file` if set, else one a deployment
    installed (`<home>/policies/selection.yaml`), else None (the packaged one)."""
    if settings.selection.policy_file is not None:
        return settings.selection.policy_file
    deployed = settings.state.policies / "selection.yaml"
    return deployed if deployed.is_file() else None


def load_selection_policy(settings: Settings) -> SelectionPolicy:
    """The selection policy this device applies (see `selection_policy_path`)."""
    from registry.selection import load_policy

    return effective_policy(load_policy(selection_policy_path(settings)), settings.runtime)


class ModelResolver:
    """Answers "which file do I load for this alias, and why" on this device (or on the
    hardware captured under `root`)."""

    def __init__(self, settings: Settings, registry: Registry, root: Path | None = None) -> None:
        self.settings = settings
        self.registry = registry
        self.root = root or settings.selection.hardware_root
        self._profile: HardwareProfile | None = None
        self._policy: SelectionPolicy | None = None
        self._lock = threading.Lock()
        # alias -> (the variants it was built from, their prepared index)
        self._indexes: dict[str, tuple[tuple[VariantSpec, ...], VariantIndex]] = {}

    def profile(self) -> HardwareProfile:
        """The hardware profile, with the runtimes and the formats this agent can run."""
        with self._lock:
            if self._profile is None:
                from agent.hardware import detect
                from agent.runtime.backend import available_formats

                started = time.perf_counter()
                live = self.root is None
                profile = detect(self.root or Path("/"))  # a tree: its captured runtimes
                if live:  # a captured tree says nothing about this agent's backends
                    runtimes = profile.runtimes.model_copy(
                        update={"backends": available_formats()}
                    )
                    profile = profile.model_copy(update={"runtimes": runtimes})
                self._profile = profile
                # Once per process, at start (agent.app warms it before READY=1): a
                # second line, or one after "serving on", is a probe a request paid for.
                log.info("hardware probed in %.0f ms: %s, %d cores, %d MiB RAM, backends %s",
                         (time.perf_counter() - started) * 1000, profile.cpu.arch,
                         profile.cpu.cores_logical, (profile.memory.total_bytes or 0) >> 20,
                         ", ".join(profile.runtimes.backends or ()) or "none")
            return self._profile

    def reload_policy(self) -> None:
        """Read the selection policy again on next use (a deployment installed one)."""
        with self._lock:
            self._policy = None
            self._indexes.clear()

    def policy(self) -> SelectionPolicy:
        """The device's policy (budget, context); variants of a model are judged under
        `policy_for(task)`."""
        with self._lock:
            if self._policy is None:
                self._policy = load_selection_policy(self.settings)
            return self._policy

    def policy_for(self, task: str) -> SelectionPolicy:
        """The policy a model of `task` is selected under (`task_policy`): its estimates
        count the KV windows loading it allocates."""
        return task_policy(self.policy(), self.settings.runtime, task)

    def memory_budget(self, total_memory: int) -> int:
        """Bytes loaded models may use in total: the same budget selection judges by
        (system RAM, CPU target), computed from `total_memory` without a hardware probe."""
        from registry.profile import CpuInfo, HardwareProfile, MemoryInfo
        from registry.selection import memory_budget

        ram_only = HardwareProfile(
            cpu=CpuInfo(arch="unknown", cores_physical=0, cores_logical=0),
            memory=MemoryInfo(total_bytes=total_memory, available_bytes=0),
        )
        return memory_budget(ram_only, self.policy(), "cpu")

    def selection(self, alias: str) -> Selection:
        """Selection among this device's installed variants plus the catalog's."""
        from registry.catalog import load_catalog

        info, specs, _ = self.registry.installed(alias)
        installed = self.measured(alias, specs)
        names = {v.name for v in installed}
        entry = load_catalog().find(alias)
        extra = [s for s in entry.specs() if s.name not in names] if entry else []
        return self._index(alias, [*installed, *extra]).select(
            self.profile(), self.policy_for(info.task), model_alias=alias
        )

    def fingerprint(self) -> str:
        """The hardware fingerprint benchmark results are stored under on this device."""
        from registry.bench import fingerprint

        return fingerprint(self.profile())

    def measured(self, alias: str, specs: list[VariantSpec]) -> list[VariantSpec]:
        """`specs` with the benchmark results this hardware has for them."""
        from registry.bench import results, with_measurements

        rows = results(self.registry, alias, self.fingerprint())
        return with_measurements(specs, rows) if rows else specs

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
        info, installed, templates = self.registry.installed(alias)
        pinned = [v for v in installed if v.name == info.active_variant]
        if pinned:  # a deployment switched the model to this variant (until rolled back)
            installed = pinned
        installed = self.measured(alias, installed)
        sel = self._index(f"installed:{alias}", installed).select(
            self.profile(), self.policy_for(info.task), model_alias=alias
        )
        chosen = sel.chosen
        assert chosen.sha256 is not None  # installed variants always have their blob
        return self.resolved(info, chosen, templates.get(chosen.name), sel.estimated_memory)

    def resolve_variant(self, alias: str, variant: str) -> ResolvedModel:
        """A named installed variant of `alias`, whatever selection or the pin says (a
        deployment's smoke test of a candidate)."""
        info, installed, templates = self.registry.installed(alias)
        spec = next((v for v in installed if v.name == variant), None)
        if spec is None or spec.sha256 is None:
            from registry.errors import ModelNotFound

            raise ModelNotFound(f"{alias} has no installed variant {variant!r}")
        sel = self._index(f"variant:{alias}:{variant}", [spec]).select(
            self.profile(), self.policy_for(info.task), model_alias=alias)
        return self.resolved(info, spec, templates.get(variant), sel.estimated_memory)

    def resolved(
        self, info: ModelInfo, chosen: VariantSpec, chat_template: str | None,
        estimated_memory: int,
    ) -> ResolvedModel:
        """What loading `chosen` needs (its files side by side when it has side files).
        `estimated_memory` is what the memory budget counts for it: selection's estimate
        under `policy_for(info.task)`, which counts its KV windows already."""
        alias = info.alias
        assert chosen.sha256 is not None
        vinfo = next((v for v in info.variants if v.name == chosen.name), None)
        if vinfo is not None and vinfo.files:
            path = self.registry.materialize(alias, chosen.name)
        else:
            path = self.registry.store.path(chosen.sha256)
        return ResolvedModel(
            alias=alias,
            variant=chosen.name,
            format=chosen.format,
            quantization=chosen.quantization,
            target=chosen.target,
            sha256=chosen.sha256,
            path=str(path),
            task=info.task,
            architecture=info.architecture,
            chat_template=chat_template,
            context_length=info.context_length,
            estimated_memory=estimated_memory,
            runtime_requirement=chosen.runtime_requirement,
        )
