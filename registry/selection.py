"""Variant selection: which variant of a model runs best on this device, and why.

`select(variants, profile, policy)` is a pure function of its arguments. It estimates
each variant's memory, rejects what the device, its runtimes or the policy rule out,
ranks the rest (device order, quality floor, preference, tie-break) and returns the
winner with a verdict and reasons for every candidate. The rules are in docs/selection.md.

The hot path is O(n) with per-candidate work limited to a few attribute reads and dict
look-ups; the ranking of the losers and the `Candidate` objects are built only when
`Selection.candidates` is read. For repeated selection over the same variants,
`registry.selection_index.VariantIndex` prepares them once as columns and returns the
same `Selection` an order of magnitude faster; it reuses this module's private helpers.

Exceptions (part of the `registry.errors` tree):

* RegistryError
  + NoVariantFits   - nothing fits; this module's subclass carries the candidates
  + PolicyError     - the policy YAML is invalid (file:line, field, why)
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Literal, NamedTuple

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    computed_field,
)

from registry import errors
from registry.errors import PolicyError
from registry.profile import GpuInfo, HardwareProfile
from registry.selection_policy import (
    DEFAULT_POLICY_PATH,
    POLICY_SCHEMA_PATH,
    DeviceClass,
    MemoryPolicy,
    Preference,
    QuantizationPolicy,
    QuantizationRule,
    SelectionPolicy,
    load_policy,
    policy_schema_json,
)
from registry.types import BITS_PER_WEIGHT, QUALITY_RANK, VariantSpec, quality_rank

__all__ = [
    "DEFAULT_POLICY_PATH",
    "POLICY_SCHEMA_PATH",
    "Candidate",
    "DeviceClass",
    "MemoryEstimate",
    "MemoryPolicy",
    "NoVariantFits",
    "PolicyError",
    "Preference",
    "QuantizationPolicy",
    "QuantizationRule",
    "Selection",
    "SelectionPolicy",
    "device_class",
    "estimate_memory",
    "load_policy",
    "memory_budget",
    "policy_schema_json",
    "select",
]

Verdict = Literal["chosen", "ranked", "rejected"]

# Bytes per cached K or V element (llama.cpp's --cache-type-k/-v; q8_0/q4_0 include scales).
KV_BYTES_PER_ELEMENT: dict[str, float] = {"f32": 4.0, "f16": 2.0, "q8_0": 1.0625, "q4_0": 0.5625}
# Unknown architecture: f16 K+V bytes per token ≈ this × sqrt(parameter_count). Fitted on
# the catalog (0.5×-2.2× of the exact figure from 135M to 8B parameters), docs/selection.md.
KV_FALLBACK_PER_SQRT_PARAM = 2.5
# Neither architecture nor parameter count known: assume a Llama-3-8B-sized cache.
KV_FALLBACK_PER_TOKEN = 131_072

_GPU_TARGETS: dict[str, tuple[str, tuple[str, ...]]] = {
    # target: (label in messages, GPU vendors that can run it; () = any GPU)
    "cuda": ("CUDA", ("nvidia",)),
    "rocm": ("ROCm", ("amd",)),
    "sycl": ("SYCL", ("intel",)),
    "vulkan": ("Vulkan", ()),
    "metal": ("Metal", ("other",)),
    "dml": ("DirectML", ()),
}
_DEFAULT_EP: dict[str, str] = {
    "cuda": "CUDAExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "dml": "DmlExecutionProvider",
    "npu-qualcomm-hexagon": "QNNExecutionProvider",
    "npu-intel-npu": "OpenVINOExecutionProvider",
    "npu-amd-xdna": "VitisAIExecutionProvider",
    "npu-rockchip-rknpu": "RknpuExecutionProvider",
}


# ----------------------------------------------------------------------------- estimates


class MemoryEstimate(NamedTuple):
    """Bytes a variant needs once loaded: weights + KV cache + runtime overhead."""

    weights: int
    kv_cache: int
    overhead: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.overhead


def _kv_elements_per_token(
    layers: int | None,
    embd: int | None,
    heads: int | None,
    kv_heads: int | None,
    head_dim: int | None,
    params: float | None,
    size: float | None,
    bpw: float | None,
) -> float:
    """K and V elements cached per token; × context × bytes per element gives the KV cache."""
    if head_dim is None and embd and heads:
        head_dim = embd // heads
    kv_heads = kv_heads or heads
    if layers and head_dim and kv_heads:
        return 2 * layers * kv_heads * head_dim
    if layers and embd:  # no head counts: assume full multi-head attention
        return 2 * layers * embd
    if params is None and size is not None and bpw:
        params = size * 8 / bpw
    per_token_f16 = (
        KV_FALLBACK_PER_SQRT_PARAM * math.sqrt(params) if params else KV_FALLBACK_PER_TOKEN
    )
    return per_token_f16 / 2


def estimate_memory(v: VariantSpec, policy: SelectionPolicy) -> MemoryEstimate | None:
    """The estimate selection uses for `v`, broken down; None when it cannot be estimated.

    A variant with `estimated_memory` set is taken at its word (all of it as weights).
    """
    if v.estimated_memory is not None:
        return MemoryEstimate(v.estimated_memory, 0, 0)
    bpw = v.bits_per_weight or BITS_PER_WEIGHT.get(v.quantization)
    size: float | None = v.file_size
    if size is None and v.parameter_count is not None and bpw:
        size = v.parameter_count * bpw / 8
    if size is None:
        return None
    ctx = v.context_length
    if not ctx or ctx > policy.context_length:
        ctx = policy.context_length
    per_token = _kv_elements_per_token(
        v.n_layers, v.n_embd, v.n_head, v.n_head_kv, v.head_dim, v.parameter_count, size, bpw
    )
    kv = per_token * ctx * KV_BYTES_PER_ELEMENT[policy.kv_cache_type]
    mem = policy.memory
    overhead = mem.overhead_bytes + mem.overhead_fraction * size
    return MemoryEstimate(int(size), int(kv), int(overhead))


def device_class(target: str) -> DeviceClass:
    if target == "cpu":
        return "cpu"
    return "npu" if target.startswith("npu-") else "gpu"


def _system_budget(profile: HardwareProfile, policy: SelectionPolicy) -> int:
    mem = policy.memory
    budget = mem.fraction * profile.memory.total_bytes
    if mem.max_bytes is not None:
        budget = min(budget, mem.max_bytes)
    return max(0, int(budget - mem.headroom_bytes))


def _gpu_for(profile: HardwareProfile, vendors: tuple[str, ...]) -> GpuInfo | None:
    gpus = [g for g in profile.gpus if not vendors or g.vendor in vendors]
    # prefer the discrete GPU with the most memory; shared-memory GPUs last
    gpus.sort(key=lambda g: (g.integrated or g.memory_bytes is None, -(g.memory_bytes or 0)))
    return gpus[0] if gpus else None


def memory_budget(profile: HardwareProfile, policy: SelectionPolicy, target: str = "cpu") -> int:
    """Bytes a variant for `target` may use: GPU memory for a discrete GPU, else system RAM."""
    if device_class(target) == "gpu" and target in _GPU_TARGETS:
        gpu = _gpu_for(profile, _GPU_TARGETS[target][1])
        if gpu is not None and not gpu.integrated and gpu.memory_bytes is not None:
            return max(0, gpu.memory_bytes - policy.memory.gpu_headroom_bytes)
    return _system_budget(profile, policy)


# ----------------------------------------------------------------------------- results


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


class Candidate(BaseModel):
    """One variant as selection judged it."""

    model_config = ConfigDict(frozen=True)

    variant: VariantSpec
    verdict: Verdict
    rank: int | None = Field(
        description="1 for the chosen variant, 2.. for the others that fit; null if rejected."
    )
    device: DeviceClass
    estimated_memory: int | None = Field(description="Bytes; null when it cannot be estimated.")
    budget: int = Field(description="Bytes this variant's device may use.")
    reasons: tuple[str, ...]

    @computed_field  # type: ignore[prop-decorator]
    @property
    def label(self) -> str:
        """'chosen', 'ranked N' or 'rejected'."""
        return f"ranked {self.rank}" if self.verdict == "ranked" else self.verdict

    @computed_field  # type: ignore[prop-decorator]
    @property
    def explanation(self) -> str:
        """e.g. 'rejected: needs CUDA, none detected'."""
        return f"{self.label}: {'; '.join(self.reasons)}"


class Selection(BaseModel):
    """The chosen variant, and (computed on first access) every candidate with its verdict."""

    model_config = ConfigDict(frozen=True)

    model_alias: str | None
    chosen: VariantSpec
    prefer: Preference
    estimated_memory: int = Field(description="Bytes the chosen variant is estimated to need.")
    budget: int = Field(description="Bytes the chosen variant's device may use.")
    _build: Callable[[], list[Candidate]] | None = PrivateAttr(default=None)

    @computed_field  # type: ignore[prop-decorator]
    @cached_property
    def candidates(self) -> list[Candidate]:
        """Chosen first, then the others that fit by rank, then the rejected by name."""
        return self._build() if self._build is not None else []

    @property
    def chosen_candidate(self) -> Candidate:
        return self.candidates[0]

    def explain(self) -> str:
        """One line per candidate: name and explanation."""
        width = max((len(c.variant.name) for c in self.candidates), default=0)
        return "\n".join(f"{c.variant.name:<{width}}  {c.explanation}" for c in self.candidates)


class NoVariantFits(errors.NoVariantFits):
    """No variant fits; the message names the smallest requirement, `candidates` says why."""

    def __init__(
        self,
        message: str,
        *,
        smallest: int | None = None,
        budget: int | None = None,
        build: Callable[[], list[Candidate]] | None = None,
    ) -> None:
        super().__init__(message)
        self.smallest = smallest
        self.budget = budget
        self._build = build

    @cached_property
    def candidates(self) -> list[Candidate]:
        """Every candidate, all rejected, with reasons."""
        return self._build() if self._build is not None else []


# ----------------------------------------------------------------------------- selection


class _Device(NamedTuple):
    """What selection knows about one (format, target, runtime requirement) combination."""

    reason: str | None  # why it cannot run here; None when it can
    cls: DeviceClass
    rank: int
    budget: int
    budget_label: str
    present: bool  # the device exists here (so a rejection is about runtime, state or size)


def _requirement_reason(req: str, profile: HardwareProfile) -> str | None:
    rt = profile.runtimes
    runtime, _, feature = req.partition(":")
    if runtime == "llama.cpp":
        if not feature or feature == "cpu":
            return None
        if not rt.llama_gpu_offload:
            return f"needs {req}, llama.cpp was built without GPU offload"
        if feature.lower() not in {b.lower() for b in rt.llama_backends}:
            have = ", ".join(rt.llama_backends) or "none"
            return f"needs {req}, llama.cpp backends are: {have}"
        return None
    if runtime == "onnxruntime":
        if not feature or feature == "CPUExecutionProvider" or feature in rt.onnx_providers:
            return None
        return f"needs {req}, not available"
    return f"needs {req}, not available"


def _judge_device(
    fmt: str, target: str, req: str | None, profile: HardwareProfile, policy: SelectionPolicy,
    system_budget: int,
) -> _Device:
    cls = device_class(target)
    order = policy.device_order
    rank = order.index(cls) if cls in order else len(order)
    budget, label = system_budget, "budget"
    present = cls == "cpu"

    def out(reason: str | None) -> _Device:
        return _Device(reason, cls, rank, budget, label, present)

    if cls not in order:
        return out(f"device {cls} excluded by policy (device_order: {', '.join(order)})")
    if cls == "gpu":
        if target not in _GPU_TARGETS:
            return out(f"unknown target {target!r}")
        name, vendors = _GPU_TARGETS[target]
        gpu = _gpu_for(profile, vendors)
        if gpu is None:
            return out(f"needs {name}, none detected")
        present = True
        if not gpu.integrated and gpu.memory_bytes is not None:
            budget, label = memory_budget(profile, policy, target), "GPU budget"
        if fmt == "gguf":
            rt = profile.runtimes
            if not rt.llama_gpu_offload:
                return out(f"needs {name}, llama.cpp was built without GPU offload")
            if target not in {b.lower() for b in rt.llama_backends}:
                have = ", ".join(rt.llama_backends) or "none"
                return out(f"needs {name}, llama.cpp backends are: {have}")
    elif cls == "npu":
        kind = target.removeprefix("npu-")
        npus = [n for n in profile.npus if n.kind == kind]
        if not npus:
            return out(f"needs {kind} NPU, none detected")
        present = True
        if not any(n.online for n in npus):
            detail = next((n.detail for n in npus if n.detail), None)
            why = f" ({detail})" if detail else ""
            return out(f"needs {kind} NPU, present but offline{why}")
        if fmt == "gguf" and req is None:
            return out(f"llama.cpp cannot run on the {kind} NPU")
    if req is None and fmt == "onnx" and cls != "cpu":
        ep = _DEFAULT_EP.get(target)
        req = f"onnxruntime:{ep}" if ep else None
        if req is None:
            return out(f"no onnxruntime execution provider known for {target!r}")
    return out(_requirement_reason(req, profile) if req else None)


# (device rank, below min_quality, preference a, preference b, not installed, estimate,
#  model alias, variant name): smaller sorts first
_Key = tuple[int, bool, float, float, bool, int, str, str]
# (index, estimate if computed, reason (None: over budget), device)
_Rejection = tuple[int, int | None, str | None, _Device]


# What the hot loop needs per (format, target, requirement, quantization, native, policy
# rule): (rejection, device, device rank, budget, comfortable bytes, quality, below floor,
# bits per weight from the table)
_Combo = tuple[str | None, _Device, int, int, float, int, bool, float | None]


def _combo(
    key: tuple[str, str, str | None, str, bool, int],
    devices: dict[tuple[str, str, str | None], _Device],
    judge: Callable[[str, str, str | None], _Device],
    rules: _QuantRules,
    floor: int,
    share: float,
) -> _Combo:
    fmt, target, req, quant, native, rule = key
    dev = devices.get((fmt, target, req))
    if dev is None:
        dev = devices[(fmt, target, req)] = judge(fmt, target, req)
    quality = quality_rank(quant, native=native)
    reason = rules.reason(rule, quant) or dev.reason
    bpw = BITS_PER_WEIGHT.get(quant)
    return (reason, dev, dev.rank, dev.budget, share * dev.budget, quality, quality < floor, bpw)


def _rank_key(
    prefer: Preference, c: _Combo, est: int, bpw: float | None, installed: bool, alias: str,
    name: str,
) -> _Key:
    """The sort key of a variant that fits (docs/selection.md §4); smaller wins."""
    quality = c[5]
    a: float
    b: float
    if prefer == "balanced":
        a, b = (0, -quality) if est <= c[4] else (1, est)
    elif prefer == "quality":
        a, b = -quality, bpw or 99.0
    else:
        a, b = bpw or 99.0, -quality
    return (c[2], c[6], a, b, not installed, est, alias, name)


class _QuantRules:
    """Policy quantization rules: each alias resolves to one rule, identified by an index."""

    def __init__(self, policy: QuantizationPolicy) -> None:
        d_allow = policy.default.allow if policy.default.allow is not None else ("*",)
        d_forbid = policy.default.forbid or ()
        self._exact: dict[str, int] = {}
        self._globs: list[tuple[str, int]] = []
        self.rules: list[tuple[tuple[str, ...], tuple[str, ...]]] = [(d_allow, d_forbid)]
        # longest (most specific) glob first; ties by text so YAML order never matters
        for key in sorted(policy.models, key=lambda k: (-len(k), k)):
            r = policy.models[key]
            allow = r.allow if r.allow is not None else d_allow
            forbid = r.forbid if r.forbid is not None else d_forbid
            self.rules.append((allow, forbid))
            if _is_glob(key):
                self._globs.append((key, len(self.rules) - 1))
            else:
                self._exact[key] = len(self.rules) - 1

    def index(self, alias: str) -> int:
        """The rule `alias` follows: an exact key, else the longest matching glob, else 0."""
        if alias in self._exact:
            return self._exact[alias]
        return next((i for pattern, i in self._globs if fnmatchcase(alias, pattern)), 0)

    def reason(self, rule: int, quantization: str) -> str | None:
        allow, forbid = self.rules[rule]
        q = quantization.upper()
        if any(fnmatchcase(q, p.upper()) for p in forbid):
            return f"quantization {quantization} forbidden by policy"
        if not any(fnmatchcase(q, p.upper()) for p in allow):
            allowed = ", ".join(allow) or "none"
            return f"quantization {quantization} not allowed by policy (allowed: {allowed})"
        return None


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


_NO_ESTIMATE = "cannot estimate memory: no file size and no parameter count"


def _model_name(model_alias: str | None, aliases: set[str]) -> str:
    """How NoVariantFits names the model: the caller's alias, the variants' common one, else
    'the model'."""
    return model_alias or (next(iter(aliases)) if len(aliases) == 1 else "the model")


# Every VariantSpec field the hot loop reads, fetched in one C call from the model's __dict__.
_HOT_FIELDS = operator.itemgetter(
    "format", "target", "runtime_requirement", "model_alias", "quantization", "native",
    "estimated_memory", "file_size", "bits_per_weight", "parameter_count", "context_length",
    "n_layers", "n_embd", "n_head", "n_head_kv", "head_dim", "installed", "name",
)


def select(
    variants: Sequence[VariantSpec],
    profile: HardwareProfile,
    policy: SelectionPolicy,
    *,
    model_alias: str | None = None,
) -> Selection:
    """Choose the variant to run; raise `NoVariantFits` when none can.

    Ranking of the variants that fit: device (policy.device_order), then at-or-above
    `min_quality` first, then the preference, then installed first, smaller estimate,
    model alias and variant name. The result never depends on the order of `variants`.
    `model_alias` names the model in messages (default: the variants' common alias).
    """
    system_budget = _system_budget(profile, policy)
    devices: dict[tuple[str, str, str | None], _Device] = {}
    combos: dict[tuple[str, str, str | None, str, bool, int], _Combo] = {}
    rules = _QuantRules(policy.quantizations)
    per_alias = bool(policy.quantizations.models)  # else every alias has the default rule
    alias_rules: dict[str, int] = {}

    def judge(fmt: str, target: str, req: str | None) -> _Device:
        return _judge_device(fmt, target, req, profile, policy, system_budget)

    floor = QUALITY_RANK[policy.min_quality] if policy.min_quality else -1
    prefer = policy.prefer
    share = policy.balanced_fraction
    context = policy.context_length
    kv_bytes = KV_BYTES_PER_ELEMENT[policy.kv_cache_type]
    overhead_fixed = policy.memory.overhead_bytes
    overhead_share = 1.0 + policy.memory.overhead_fraction
    no_estimate = _NO_ESTIMATE
    fields = _HOT_FIELDS

    viable: list[int] = []  # indices; plain ints keep the loop allocation-light
    viable_est: list[int] = []
    best_key: _Key | None = None
    best_i = -1
    best_rank, best_below = len(policy.device_order) + 1, True
    rejected: list[_Rejection] = []
    smallest: tuple[int, int] | None = None  # (estimate, budget) of memory-only rejections

    for i, v in enumerate(variants):
        (fmt, target, req, alias, quant, native, est, size, bpw, params, vctx,
         layers, embd, heads, kv_heads, head_dim, installed, vname) = fields(v.__dict__)
        rule = alias_rules.get(alias) if per_alias else 0
        if rule is None:
            rule = alias_rules[alias] = rules.index(alias)
        ckey = (fmt, target, req, quant, native, rule)
        c = combos.get(ckey)
        if c is None:
            c = combos[ckey] = _combo(ckey, devices, judge, rules, floor, share)
        reason, dev, rank, budget, _, _, below, table_bpw = c
        if reason is not None:  # its estimate is only for the explanation: computed there
            rejected.append((i, None, reason, dev))
            continue
        if not bpw:
            bpw = table_bpw
        if est is None:
            if size is None and params is not None and bpw:
                size = params * bpw / 8
            if size is None:
                est = -1
            else:
                width = head_dim or (embd // heads if embd and heads else 0)
                kvh = kv_heads or heads
                if layers and width and kvh:  # the common case of _kv_elements_per_token
                    per_token = 2 * layers * kvh * width
                else:
                    per_token = _kv_elements_per_token(
                        layers, embd, heads, kv_heads, head_dim, params, size, bpw
                    )
                ctx = vctx if vctx and vctx < context else context
                est = int(size * overhead_share + overhead_fixed + per_token * ctx * kv_bytes)
        if est < 0:
            rejected.append((i, None, no_estimate, dev))
            continue
        if est > budget:
            rejected.append((i, est, None, dev))
            if smallest is None or est < smallest[0]:
                smallest = (est, budget)
            continue
        viable.append(i)
        viable_est.append(est)
        # the full key only for candidates that can still win on device and quality floor
        if rank < best_rank or (rank == best_rank and below <= best_below):
            key = _rank_key(prefer, c, est, bpw, installed, alias, vname)
            if best_key is None or key < best_key:
                best_key, best_i, best_rank, best_below = key, i, rank, below

    def build() -> list[Candidate]:
        return _explain(variants, viable, viable_est, rejected, combo_of, devices, policy)

    def combo_of(v: VariantSpec) -> _Combo:
        rule = alias_rules[v.model_alias] if per_alias else 0
        return combos[(v.format, v.target, v.runtime_requirement, v.quantization, v.native, rule)]

    if best_key is None:
        name = _model_name(model_alias, {v.model_alias for v in variants})
        raise NoVariantFits(
            _no_fit_message(name, variants, rejected, smallest),
            smallest=smallest[0] if smallest else None,
            budget=smallest[1] if smallest else None,
            build=build,
        )
    chosen = variants[best_i]
    sel = Selection(
        model_alias=model_alias or chosen.model_alias,
        chosen=chosen,
        prefer=prefer,
        estimated_memory=best_key[5],
        budget=devices[(chosen.format, chosen.target, chosen.runtime_requirement)].budget,
    )
    sel._build = build
    return sel


def _no_fit_message(
    name: str,
    variants: Sequence[VariantSpec],
    rejected: list[_Rejection],
    smallest: tuple[int, int] | None,
) -> str:
    if not variants:
        return f"no variant of {name} to choose from"
    if smallest is not None:
        return (
            f"no variant of {name} fits: smallest needs {_size(smallest[0])}, "
            f"budget is {_size(smallest[1])}"
        )
    reasons = sorted({r for _, _, r, _ in rejected if r is not None})
    shown = "; ".join(reasons[:3]) + ("; …" if len(reasons) > 3 else "")
    return f"no variant of {name} fits: every variant was rejected ({shown})"


def _device_for(
    v: VariantSpec, devices: dict[tuple[str, str, str | None], _Device]
) -> _Device:
    return devices[(v.format, v.target, v.runtime_requirement)]


def _explain(
    variants: Sequence[VariantSpec],
    viable: list[int],
    viable_est: list[int],
    rejected: list[_Rejection],
    combo_of: Callable[[VariantSpec], _Combo],
    devices: dict[tuple[str, str, str | None], _Device],
    policy: SelectionPolicy,
) -> list[Candidate]:
    """Every candidate with verdict and reasons: chosen, ranked by key, rejected by name."""
    ranked: list[tuple[_Key, int]] = []
    for i, est in zip(viable, viable_est, strict=True):
        v = variants[i]
        c = combo_of(v)
        ranked.append((_rank_key(policy.prefer, c, est, v.bits_per_weight or c[7],
                                 v.installed, v.model_alias, v.name), i))
    ranked.sort()
    out: list[Candidate] = []
    mk = Candidate.model_construct
    if ranked:
        ckey, ci = ranked[0]
        chosen = variants[ci]
        cdev = _device_for(chosen, devices)
        any_at_floor = any(not k[1] for k, _ in ranked)
        out.append(mk(
            variant=chosen, verdict="chosen", rank=1, device=cdev.cls,
            estimated_memory=ckey[5], budget=cdev.budget,
            reasons=_chosen_reasons(chosen, ckey, cdev, variants, rejected, policy, any_at_floor),
        ))
        for n, (key, i) in enumerate(ranked[1:], start=2):
            v = variants[i]
            dev = _device_for(v, devices)
            out.append(mk(
                variant=v, verdict="ranked", rank=n, device=dev.cls, estimated_memory=key[5],
                budget=dev.budget, reasons=_ranked_reasons(v, key, dev, chosen, ckey, cdev, policy),
            ))
    def by_name(r: _Rejection) -> tuple[str, str, str, str, str]:
        v = variants[r[0]]
        return (v.model_alias, v.name, v.format, v.target, v.quantization)

    for i, r_est, reason, dev in sorted(rejected, key=by_name):
        v = variants[i]
        if r_est is None:
            estimate = estimate_memory(v, policy)
            r_est = estimate.total if estimate is not None else None
        if reason is None:
            reason = f"{_size(r_est or 0)} estimated > {_size(dev.budget)} {dev.budget_label}"
        out.append(mk(
            variant=v, verdict="rejected", rank=None, device=dev.cls,
            estimated_memory=r_est, budget=dev.budget, reasons=(reason,),
        ))
    return out


def _quality_text(v: VariantSpec) -> str:
    return f"{v.quantization} (native)" if v.native else v.quantization


def _chosen_reasons(
    v: VariantSpec,
    key: _Key,
    dev: _Device,
    variants: Sequence[VariantSpec],
    rejected: list[_Rejection],
    policy: SelectionPolicy,
    any_at_floor: bool,
) -> tuple[str, ...]:
    q = _quality_text(v)
    pct = f"{policy.balanced_fraction:.0%}"
    floor = f" at or above {policy.min_quality}" if policy.min_quality and any_at_floor else ""
    reasons: list[str] = []
    if key[1]:
        reasons.append(
            f"{v.quantization} is below the preferred quality ({policy.min_quality}), "
            "but nothing at or above it fits"
        )
    if policy.prefer == "quality":
        reasons.append(f"highest quality that fits ({q})")
    elif policy.prefer == "speed":
        reasons.append(f"fewest bits per weight{floor} ({key[2]:g}, {q})")
    elif key[2] == 0:
        reasons.append(f"highest quality{floor} within {pct} of the {dev.budget_label} ({q})")
    else:
        reasons.append(
            f"smallest estimate{floor}; none fits within {pct} of the {dev.budget_label}"
        )
    reasons.append(f"{_size(key[5])} estimated of {_size(dev.budget)} {dev.budget_label}")
    if dev.cls != "cpu":
        reasons.append(f"runs on {v.target}; {dev.cls} comes first in device order")
    passed = sorted(
        (variants[i].name, r or f"{_size(est or 0)} estimated > {_size(d.budget)} {d.budget_label}")
        for i, est, r, d in rejected
        if d.rank < dev.rank and d.present
    )
    if passed:
        first = "; ".join(f"{n} rejected: {r}" for n, r in passed[:2])
        more = f" (and {len(passed) - 2} more)" if len(passed) > 2 else ""
        reasons.append(f"falls back to {dev.cls}: {first}{more}")
    if v.installed:
        reasons.append("installed")
    return tuple(reasons)


def _ranked_reasons(
    v: VariantSpec,
    key: _Key,
    dev: _Device,
    chosen: VariantSpec,
    ckey: _Key,
    cdev: _Device,
    policy: SelectionPolicy,
) -> tuple[str, ...]:
    j = next((n for n, (a, b) in enumerate(zip(key, ckey, strict=True)) if a != b), 7)
    floor_note = f"{v.quantization} is below the preferred quality ({policy.min_quality})"
    cq = _quality_text(chosen)
    if j == 0:
        reason = f"runs on {dev.cls}; {cdev.cls} comes first in device order"
    elif j == 1:
        reason = floor_note
    elif j in (2, 3) and policy.prefer == "quality":
        reason = (
            f"lower quality than {cq}" if j == 2
            else f"same quality as {cq}, more bits per weight ({key[3]:g} > {ckey[3]:g})"
        )
    elif j in (2, 3) and policy.prefer == "speed":
        reason = (
            f"more bits per weight than {cq} ({key[2]:g} > {ckey[2]:g})" if j == 2
            else f"same bits per weight as {cq}, lower quality"
        )
    elif j == 2:
        pct = f"{policy.balanced_fraction:.0%}"
        reason = (
            f"uses more than {pct} of the {dev.budget_label} "
            f"({_size(key[5])} of {_size(dev.budget)})"
        )
    elif j == 3:
        reason = (
            f"lower quality than {cq}" if key[2] == 0
            else f"larger estimate than {cq} ({_size(key[5])} > {_size(ckey[5])})"
        )
    elif j == 4:
        reason = f"not installed; {chosen.name} is"
    elif j == 5:
        reason = f"larger estimate than {chosen.name} ({_size(key[5])} > {_size(ckey[5])})"
    else:
        reason = f"ties with {chosen.name}; ordered by name"
    reasons = [reason]
    if key[1] and j != 1:
        reasons.append(floor_note)
    return tuple(reasons)
