"""The selection engine: a variant list as columns, judged, estimated and ranked with numpy.

`VariantIndex(variants)` reads each variant once (O(n) Python): the (format, target,
runtime requirement) triple, the quantization and the model alias become small integer
codes, and each row gets its quality rank, its bits per weight as the ranking compares them
and the policy-independent parts of its memory estimate (`registry.selection_estimate`).
`VariantIndex.select(profile, policy)` then judges each distinct device and each (policy
rule, quantization) pair once, computes every estimate, budget check and ranking-key
component as column arithmetic, and returns a `Selection` whose candidates (with reasons)
are built only when read. `registry.selection.select(variants, ...)` is
`VariantIndex(variants).select(...)`: there is no other implementation.

The rules are in docs/selection.md. The index keeps its own tuple of the variants; rebuild
it when they change.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable, Iterable, Sequence
from fnmatch import fnmatchcase
from functools import cached_property
from typing import Any, Literal, TypeVar

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, computed_field

from registry import errors
from registry.profile import HardwareProfile
from registry.selection_devices import DeviceVerdict, judge_device, system_budget
from registry.selection_estimate import (
    EstimateInputs,
    estimate_facts,
    estimate_inputs,
    estimate_parts,
    float_column,
    to_float,
)
from registry.selection_policy import (
    DeviceClass,
    Preference,
    QuantizationPolicy,
    SelectionPolicy,
)
from registry.types import BITS_PER_WEIGHT, QUALITY_RANK, VariantSpec, quality_rank

__all__ = ["Candidate", "NoVariantFits", "Selection", "VariantIndex"]

Verdict = Literal["chosen", "ranked", "rejected"]
Rows = NDArray[np.intp]
_T = TypeVar("_T", bound=Hashable)


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


# ----------------------------------------------------------------------------- the index


def _codes(values: Iterable[_T]) -> tuple[tuple[_T, ...], Rows]:
    """The distinct values, in first-seen order, and each value's index among them."""
    seen: dict[_T, int] = {}
    codes = np.array([seen.setdefault(v, len(seen)) for v in values], dtype=np.intp)
    return tuple(seen), codes


def _ordered_codes(values: Iterable[str]) -> tuple[tuple[str, ...], Rows]:
    """The distinct values, sorted, and each value's index among them (so codes order like
    the values)."""
    uniques, codes = _codes(values)
    order = sorted(range(len(uniques)), key=lambda k: uniques[k])
    rank = np.empty(len(order), dtype=np.intp)
    rank[order] = np.arange(len(order), dtype=np.intp)
    return tuple(uniques[k] for k in order), rank[codes]


# The VariantSpec fields that the device and quantization judgments depend on: fetched in one
# C call per variant and factorized, so each distinct combination is judged once.
_KIND = operator.itemgetter("format", "target", "runtime_requirement", "quantization", "native")


class VariantIndex:
    """Variants as columns, one entry per variant in input order; `select` chooses among them.

    * `dev`: code of (format, target, runtime requirement) in `dev_keys`;
    * `quant`: code of the quantization in `quants`;
    * `alias`: code of the model alias in `aliases`, which is sorted, so the code orders like
      the alias (`name_rank()` is the same for the variant name, computed on first use);
    * `quality`: quality rank (`native` folded in); `bpw_key`: bits per weight as the ranking
      compares them (the estimate's, else 99); `not_installed`;
    * `inputs`: the policy-independent parts of each estimate.
    """

    __slots__ = (
        "_name_rank", "alias", "aliases", "bpw_key", "dev", "dev_keys", "inputs", "m_agreement",
        "m_perplexity", "m_rss", "m_speed", "names", "not_installed", "quality", "quant",
        "quants", "variants",
    )

    variants: tuple[VariantSpec, ...]
    dev_keys: tuple[tuple[str, str, str | None], ...]
    quants: tuple[str, ...]
    aliases: tuple[str, ...]
    names: tuple[str, ...]
    dev: Rows
    quant: Rows
    alias: Rows
    quality: NDArray[np.int64]
    bpw_key: NDArray[np.float64]
    not_installed: NDArray[np.bool_]
    inputs: EstimateInputs
    m_speed: NDArray[np.float64]  # measured speed (tokens or embeddings /s); NaN: unmeasured
    m_perplexity: NDArray[np.float64]
    m_agreement: NDArray[np.float64]
    m_rss: NDArray[np.float64]
    _name_rank: Rows | None

    def __init__(self, variants: Sequence[VariantSpec]) -> None:
        self.variants = tuple(variants)
        rows = [v.__dict__ for v in self.variants]  # a pydantic model keeps its fields there
        kinds, kind = _codes(map(_KIND, rows))  # (format, target, req, quantization, native)
        self.dev_keys, dev = _codes(k[:3] for k in kinds)
        self.quants, quant = _codes(k[3] for k in kinds)
        self.dev, self.quant = dev[kind], quant[kind]
        self.quality = np.array([quality_rank(k[3], native=k[4]) for k in kinds],
                                dtype=np.int64)[kind]
        table_bpw = float_column([BITS_PER_WEIGHT.get(k[3]) for k in kinds])[kind]
        self.aliases, self.alias = _ordered_codes([r["model_alias"] for r in rows])
        self.names = tuple([r["name"] for r in rows])
        self._name_rank = None
        self.not_installed = ~np.array([r["installed"] for r in rows], dtype=np.bool_)
        gguf = np.array([k[0] == "gguf" for k in kinds], dtype=np.bool_)[kind]
        self.inputs = estimate_inputs(estimate_facts(self.variants, table_bpw, gguf))
        bpw = self.inputs.bits_per_weight
        self.bpw_key = np.where(np.isnan(bpw), 99.0, bpw)
        measured = [r["measured"] for r in rows]
        self.m_speed, self.m_perplexity, self.m_agreement, self.m_rss = (
            float_column([getattr(m, f) if m is not None else None for m in measured])
            for f in ("speed", "perplexity", "agreement", "peak_rss")
        )
        for col in (self.dev, self.quant, self.alias, self.quality, self.not_installed,
                    self.bpw_key, *self.inputs, self.m_speed, self.m_perplexity,
                    self.m_agreement, self.m_rss):
            col.flags.writeable = False  # shared by every select(); never changed after build

    def __len__(self) -> int:
        return len(self.variants)

    def name_rank(self) -> Rows:
        """Each variant's name as a code that orders like the name."""
        if self._name_rank is None:
            self._name_rank = _ordered_codes(self.names)[1]
        return self._name_rank

    def select(
        self,
        profile: HardwareProfile,
        policy: SelectionPolicy,
        *,
        model_alias: str | None = None,
    ) -> Selection:
        """Choose the variant to run; raise `NoVariantFits` when none can.

        Ranking of the variants that fit: device (policy.device_order), then at-or-above
        `min_quality` first, then the preference, then installed first, smaller estimate,
        model alias and variant name; a complete tie goes to the first in input order, so
        the result never depends on the order of the variants otherwise. `model_alias`
        names the model in messages (default: the variants' common alias).
        """
        j = _Judgment(self, profile, policy)
        best = j.best()
        if best is None:
            aliases = self.aliases
            name = model_alias or (aliases[0] if len(aliases) == 1 else "the model")
            smallest = j.smallest()
            raise NoVariantFits(
                j.no_fit_message(name, smallest),
                smallest=smallest[0] if smallest else None,
                budget=smallest[1] if smallest else None,
                build=j.candidates,
            )
        chosen = self.variants[best]
        sel = Selection(
            model_alias=model_alias or chosen.model_alias,
            chosen=chosen,
            prefer=policy.prefer,
            estimated_memory=int(j.est[best]),
            budget=j.device(best).budget,
        )
        sel._build = j.candidates
        return sel


# ----------------------------------------------------------------------------- judgment


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
            if any(c in key for c in "*?["):
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


_NO_ESTIMATE = "cannot estimate memory: no file size and no parameter count"
_NOT_FINITE = "cannot estimate memory: its figures are beyond float64's range"


class _Judgment:
    """One `VariantIndex.select` call: every row judged, estimated and keyed (all columns).

    A row is viable when no rule rejects it (`ok`), its estimate is known and within its
    device's budget. The ranking key (docs/selection.md §4) is `key`: eight components, each
    a function of rows: (device rank, below min_quality, preference a, preference b, not
    installed, estimate, alias, name); smaller sorts first, input order breaks full ties.
    `best()` and `ranking()` both order by it.
    """

    def __init__(
        self, index: VariantIndex, profile: HardwareProfile, policy: SelectionPolicy
    ) -> None:
        self.index, self.policy = index, policy
        budget = system_budget(profile, policy)
        self.devices = [judge_device(*k, profile, policy, budget) for k in index.dev_keys]
        self.rules = rules = _QuantRules(policy.quantizations)
        alias_rule = [rules.index(a) for a in index.aliases] if policy.quantizations.models else []
        if alias_rule:
            self.rule = np.array(alias_rule, dtype=np.intp)[index.alias]
        else:  # every alias follows the default rule
            self.rule = np.zeros(len(index), dtype=np.intp)
        allowed = np.zeros((len(rules.rules), len(index.quants)), dtype=np.bool_)
        for r in set(alias_rule) or {0}:
            allowed[r] = [rules.reason(r, q) is None for q in index.quants]
        dev = index.dev
        dev_ok = np.array([d.reason is None for d in self.devices], dtype=np.bool_)
        self.ok = dev_ok[dev] & allowed[self.rule, index.quant]

        weights, kv, overhead = estimate_parts(index.inputs, policy)
        self.kv = kv
        self.est = est = weights + kv + overhead
        self.known = np.isfinite(est)
        dev_budget = np.array([to_float(d.budget) for d in self.devices], dtype=np.float64)
        self.fits = est <= dev_budget[dev]  # False where unknown
        self.viable_mask = self.ok & self.known & self.fits
        self.viable = np.flatnonzero(self.viable_mask)

        dev_rank = np.array([d.rank for d in self.devices], dtype=np.int64)
        quality, bpw = index.quality, index.bpw_key
        floor = QUALITY_RANK[policy.min_quality] if policy.min_quality else -1
        self.floor_exists = bool((quality >= floor).any())
        a: Callable[[Rows], NDArray[Any]]
        b: Callable[[Rows], NDArray[Any]]
        if policy.prefer == "balanced":  # comfortable (0, -quality) before (1, estimate)
            share = policy.balanced_fraction
            comfy = dev_budget * share

            def a(r: Rows) -> NDArray[Any]:
                return np.where(est[r] <= comfy[dev[r]], 0.0, 1.0)

            def b(r: Rows) -> NDArray[Any]:
                return np.where(est[r] <= comfy[dev[r]], -quality[r], est[r])
        elif policy.prefer == "quality":
            def a(r: Rows) -> NDArray[Any]:
                return -quality[r]

            def b(r: Rows) -> NDArray[Any]:
                return bpw[r]
        else:
            def a(r: Rows) -> NDArray[Any]:
                return bpw[r]

            def b(r: Rows) -> NDArray[Any]:
                return -quality[r]
        self.measured = _Measured(index, profile, policy, self.viable)
        self.key: list[Callable[[Rows], NDArray[Any]]] = [
            lambda r: dev_rank[dev[r]],
            *self.measured.key(),
            lambda r: quality[r] < floor,
            a,
            b,
            lambda r: index.not_installed[r],
            lambda r: est[r],
            lambda r: index.alias[r],
            lambda r: index.name_rank()[r],
        ]

    def device(self, i: int) -> DeviceVerdict:
        return self.devices[int(self.index.dev[i])]

    def best(self) -> int | None:
        """The row the ranking puts first (the first row of `ranking()`), or None."""
        rows = self.viable
        for component in self.key:  # narrow to the rows still tied, one component at a time
            if rows.size <= 1:
                break
            values = component(rows)
            rows = rows[values == values.min()]
        return int(rows[0]) if rows.size else None

    def ranking(self) -> tuple[list[int], list[tuple[Any, ...]]]:
        """The viable rows in rank order, with their keys."""
        columns = [component(self.viable) for component in self.key]
        order = np.lexsort(columns[::-1]) if self.viable.size else self.viable
        keys = list(zip(*(c[order].tolist() for c in columns), strict=True))
        return self.viable[order].tolist(), keys

    def rejection(self, i: int) -> str:
        """Why row `i` is not viable: the first rule that rejects it, else its estimate."""
        v, d = self.index.variants[i], self.device(i)
        if not self.ok[i]:
            reason = self.rules.reason(int(self.rule[i]), v.quantization) or d.reason
            assert reason is not None
            return reason
        if not self.known[i]:
            return _NO_ESTIMATE if self.unknown()[i] else _NOT_FINITE
        return (f"{_size(float(self.est[i]))} estimated{self.windows_note(i)} > "
                f"{_size(d.budget)} {d.budget_label}")

    def windows_note(self, i: int) -> str:
        """' (KV cache 1.5 GB: 4 windows of 4096 tokens)' when row `i`'s estimate counts more
        than one KV window, else '': the reader learns why a variant that would fit with one
        does not (and what fewer concurrent sequences would save)."""
        n = self.policy.kv_windows
        if n == 1 or not self.index.inputs.windowed[i] or not self.kv[i] > 0:
            return ""
        own = float(self.index.inputs.context[i])
        ctx = self.policy.context_length
        ctx = int(own) if 0 < own < ctx else ctx
        return f" (KV cache {_size(float(self.kv[i]))}: {n} windows of {ctx} tokens)"

    def unknown(self) -> NDArray[np.bool_]:
        """Rows without the facts for an estimate (others may be beyond float64's range)."""
        inputs = self.index.inputs
        return np.isnan(inputs.weights) & np.isnan(inputs.given)

    def smallest_row(self) -> int | None:
        """The row with the smallest estimate rejected only for size (the first of equal
        estimates), or None."""
        over = np.flatnonzero(self.ok & self.known & ~self.fits)
        if not over.size:
            return None
        return int(over[np.argmin(self.est[over])])

    def smallest(self) -> tuple[int, int] | None:
        """(estimate, budget) of `smallest_row()`."""
        i = self.smallest_row()
        return None if i is None else (int(self.est[i]), self.device(i).budget)

    def no_fit_message(self, name: str, smallest: tuple[int, int] | None) -> str:
        if not len(self.index):
            return f"no variant of {name} to choose from"
        i = self.smallest_row()
        if smallest is not None and i is not None:
            return (
                f"no variant of {name} fits: smallest needs {_size(smallest[0])}"
                f"{self.windows_note(i)}, budget is {_size(smallest[1])}"
            )
        # one row per distinct (rule, quantization, device) and unknown-estimate kind
        index = self.index
        kind = ((self.rule * len(index.quants) + index.quant) * len(index.dev_keys) + index.dev)
        kind = np.where(self.ok, -1 - self.unknown(), kind)
        _, first = np.unique(kind, return_index=True)
        reasons = sorted({self.rejection(int(i)) for i in first})
        shown = "; ".join(reasons[:3]) + ("; …" if len(reasons) > 3 else "")
        return f"no variant of {name} fits: every variant was rejected ({shown})"

    def candidates(self) -> list[Candidate]:
        """Every variant with verdict and reasons: chosen, ranked by key, rejected by name."""
        variants, policy = self.index.variants, self.policy
        mk = Candidate.model_construct
        out: list[Candidate] = []
        rows, keys = self.ranking()
        m = self.measured
        mkeys = [k[1:1 + m.width] for k in keys]
        keys = [k[:1] + k[1 + m.width:] for k in keys]  # the static key, as without measurements
        if rows:
            ci, ckey = rows[0], keys[0]
            chosen, cdev = variants[ci], self.device(ci)
            passed = np.flatnonzero(
                ~self.viable_mask
                & (np.array([d.rank < cdev.rank and d.present for d in self.devices],
                            dtype=np.bool_)[self.index.dev])
            ).tolist()
            out.append(mk(
                variant=chosen, verdict="chosen", rank=1, device=cdev.cls,
                estimated_memory=int(ckey[5]), budget=cdev.budget,
                reasons=_chosen_reasons(
                    chosen, ckey, cdev, sorted((variants[i].name, self.rejection(i))
                                               for i in passed),
                    policy, any_at_floor=not all(k[1] for k in keys),
                    floor_exists=self.floor_exists, alone=len(variants) == 1,
                    measured=m.chosen_reasons(ci, mkeys[0]),
                    windows=self.windows_note(ci),
                ),
            ))
            for n, (i, key) in enumerate(zip(rows[1:], keys[1:], strict=True), start=2):
                v, dev = variants[i], self.device(i)
                mreason = m.ranked_reason(i, mkeys[n - 1], ci, mkeys[0])
                static = _ranked_reasons(v, key, dev, chosen, ckey, cdev, policy)
                out.append(mk(
                    variant=v, verdict="ranked", rank=n, device=dev.cls,
                    estimated_memory=int(key[5]), budget=dev.budget,
                    reasons=(*mreason, *static) if mreason else static,
                ))

        def by_name(i: int) -> tuple[str, str, str, str, str]:
            v = variants[i]
            return (v.model_alias, v.name, v.format, v.target, v.quantization)

        for i in sorted(np.flatnonzero(~self.viable_mask).tolist(), key=by_name):
            dev = self.device(i)
            out.append(mk(
                variant=variants[i], verdict="rejected", rank=None, device=dev.cls,
                estimated_memory=int(self.est[i]) if self.known[i] else None,
                budget=dev.budget, reasons=(self.rejection(i),),
            ))
        return out


class _Measured:
    """The measured part of one judgment: benchmark results on this hardware, when a
    viable variant has any and the policy uses them (docs/selection.md §5).

    Its key components, between device and the static ones: tier (0 measured and meeting
    the policy's floors, 1 not measured, 2 measured and missing a floor), then by goal
    (quality: error, -speed; speed: outside tolerance, -speed). Error is the perplexity,
    else 1 - agreement. `width` is 0 when measurements play no part.
    """

    def __init__(
        self, index: VariantIndex, profile: HardwareProfile, policy: SelectionPolicy,
        viable: Rows,
    ) -> None:
        self.index, self.mp = index, policy.measured
        speed = index.m_speed
        self.active = self.mp.use and bool(np.isfinite(speed[viable]).any())
        self.width = 3 if self.active else 0
        if not self.active:
            return
        mp = self.mp
        measured = np.isfinite(speed)
        ppl, agr = index.m_perplexity, index.m_agreement
        self.is_lm = np.isfinite(ppl) | ~np.isfinite(agr)
        floor_speed = np.where(self.is_lm, to_float(mp.min_tokens_per_second),
                               to_float(mp.min_embeddings_per_second))
        self.floor_speed = floor_speed
        # NaN when the RAM size is unknown: then no measured variant counts as too big
        self.max_rss = (to_float(mp.max_memory_fraction) * to_float(profile.memory.total_bytes)
                        if mp.max_memory_fraction is not None else np.inf)
        with np.errstate(invalid="ignore"):
            slow = speed < floor_speed  # False where no floor (NaN)
            big = index.m_rss > self.max_rss
        self.slow, self.big = slow, big
        self.tier = np.where(measured, np.where(slow | big, 2, 0), 1)
        err = np.where(np.isfinite(ppl), ppl, np.where(np.isfinite(agr), 1 - agr, np.inf))
        self.err = err
        pool = viable[(self.tier[viable] == 0)]
        if not pool.size:
            pool = viable[measured[viable]]
        self.best = float(err[pool].min()) if pool.size else np.inf
        tol = mp.tolerance
        limit = np.where(self.is_lm, self.best * (1 + tol), self.best + tol)
        with np.errstate(invalid="ignore"):
            self.outside = ~(err <= limit)

    def key(self) -> list[Callable[[Rows], NDArray[Any]]]:
        if not self.active:
            return []
        tier, err, outside, speed = self.tier, self.err, self.outside, self.index.m_speed
        fast = np.where(np.isfinite(speed), -speed, 0.0)
        measured_err = np.where(tier == 1, 0.0, err)
        if self.mp.goal == "quality":
            return [lambda r: tier[r], lambda r: measured_err[r], lambda r: fast[r]]
        in_tol = np.where(tier == 1, 0.0, outside.astype(np.float64))
        return [lambda r: tier[r], lambda r: in_tol[r], lambda r: fast[r]]

    def figures(self, i: int) -> str:
        """e.g. '61.2 tok/s, perplexity 14.31, peak 212 MB'."""
        ix = self.index
        speed, ppl, agr, rss = (ix.m_speed[i], ix.m_perplexity[i], ix.m_agreement[i],
                                ix.m_rss[i])
        parts = [f"{speed:.1f} {'tok' if self.is_lm[i] else 'emb'}/s"]
        if np.isfinite(ppl):
            parts.append(f"perplexity {ppl:.2f}")
        if np.isfinite(agr):
            parts.append(f"agreement {agr:.4f}")
        parts.append(f"peak {_size(float(rss))}")
        return ", ".join(parts)

    def _quality_word(self, i: int) -> str:
        return "perplexity" if np.isfinite(self.index.m_perplexity[i]) else "agreement"

    def _tol_text(self, i: int) -> str:
        tol = self.mp.tolerance
        if self.is_lm[i]:
            return f"within {tol:.0%} of the best perplexity ({self.best:.2f})"
        return f"within {tol:g} of the best agreement ({1 - self.best:.4f})"

    def _floors(self, i: int) -> str:
        unit = "tok/s" if self.is_lm[i] else "emb/s"
        parts = []
        if np.isfinite(self.floor_speed[i]):
            parts.append(f">= {self.floor_speed[i]:g} {unit}")
        if self.mp.max_memory_fraction is not None:
            parts.append(f"peak <= {self.mp.max_memory_fraction:.0%} of RAM")
        return " and ".join(parts) or "no floors"

    def _miss(self, i: int) -> str:
        unit = "tok/s" if self.is_lm[i] else "emb/s"
        misses = []
        if self.slow[i]:
            misses.append(f"measured {self.index.m_speed[i]:.1f} {unit} < "
                          f"{self.floor_speed[i]:g} required")
        if self.big[i]:
            misses.append(f"measured peak {_size(float(self.index.m_rss[i]))} > "
                          f"{self.mp.max_memory_fraction:.0%} of RAM")
        return "; ".join(misses)

    def chosen_reasons(self, i: int, mkey: tuple[Any, ...]) -> tuple[str, ...] | None:
        """What the measurements say about the winner; None when they did not decide."""
        if not self.active or mkey[0] == 1:
            return None
        head = f"measured on this device: {self.figures(i)}"
        if mkey[0] == 2:
            return (head, f"misses the policy's floors ({self._miss(i)}), but every measured "
                          "variant does and none is unmeasured")
        word = self._quality_word(i)
        if self.mp.goal == "quality":
            best = "lowest perplexity" if word == "perplexity" else "highest agreement"
            why = f"{best} measured among variants with {self._floors(i)}"
        else:
            why = f"fastest measured {self._tol_text(i)}, with {self._floors(i)}"
        return (f"{why} (policy measured.goal={self.mp.goal})", head)

    def ranked_reason(
        self, i: int, mkey: tuple[Any, ...], ci: int, ckey: tuple[Any, ...]
    ) -> tuple[str, ...]:
        """Why the measurements put `i` below the winner `ci`; () when they tie."""
        if not self.active:
            return ()
        j = next((n for n, (a, b) in enumerate(zip(mkey, ckey, strict=True)) if a != b), None)
        if j is None:
            return (f"measured: {self.figures(i)}",) if mkey[0] != 1 else ()
        if j == 0:
            if mkey[0] == 1:
                return ("not benchmarked on this device; measured variants rank first",)
            return (f"{self._miss(i)}", f"measured: {self.figures(i)}")
        if j == 1 and self.mp.goal == "quality":
            word = self._quality_word(i)
            return (f"worse measured {word} than {self.index.variants[ci].name}",
                    f"measured: {self.figures(i)}")
        if j == 1:
            return (f"measured {self._quality_word(i)} not {self._tol_text(i)}",
                    f"measured: {self.figures(i)}")
        return (f"slower measured than {self.index.variants[ci].name}",
                f"measured: {self.figures(i)}")


def _quality_text(v: VariantSpec) -> str:
    return f"{v.quantization} (native)" if v.native else v.quantization


def _chosen_reasons(
    v: VariantSpec,
    key: tuple[Any, ...],
    dev: DeviceVerdict,
    passed: list[tuple[str, str]],
    policy: SelectionPolicy,
    *,
    any_at_floor: bool,
    floor_exists: bool = True,
    alone: bool = False,
    measured: tuple[str, ...] | None = None,
    windows: str = "",
) -> tuple[str, ...]:
    """Why `v` won; `passed`: (name, reason) of the variants rejected on preferred devices;
    `measured`: what benchmark results said, replacing the static preference; `windows`:
    what of the estimate is KV windows, when it counts more than one.
    `any_at_floor`: a variant at or above min_quality fits (then on a later device);
    `floor_exists`: some variant is at or above it at all; `alone`: `v` is the only one."""
    q = _quality_text(v)
    pct = f"{policy.balanced_fraction:.0%}"
    # "at or above" only of a winner that is: "highest quality at or above Q4_K_M (int4)" was
    # printed for an int4 that won on device order.
    floor = f" at or above {policy.min_quality}" if policy.min_quality and not key[1] else ""
    reasons: list[str] = []
    if measured is not None:
        reasons.extend(measured)
    elif key[1]:
        below = f"{v.quantization} is below the preferred quality ({policy.min_quality})"
        if alone:  # "nothing at or above it fits" read as if others had been tried
            reasons.append(f"{below}; it is the only variant")
        elif not floor_exists:
            reasons.append(f"{below}; no variant is at or above it")
        elif any_at_floor:
            reasons.append(f"{below}, but nothing at or above it runs on {dev.cls}")
        else:
            reasons.append(f"{below}, but nothing at or above it fits")
    if measured is not None:
        pass
    elif policy.prefer == "quality":
        reasons.append(f"highest quality that fits ({q})")
    elif policy.prefer == "speed":
        reasons.append(f"fewest bits per weight{floor} ({key[2]:g}, {q})")
    elif key[2] == 0:
        reasons.append(f"highest quality{floor} within {pct} of the {dev.budget_label} ({q})")
    else:
        reasons.append(
            f"smallest estimate{floor}; none fits within {pct} of the {dev.budget_label}"
        )
    reasons.append(f"{_size(key[5])} estimated{windows} of {_size(dev.budget)} "
                   f"{dev.budget_label}")
    if dev.cls != "cpu":
        reasons.append(f"runs on {v.target}; {dev.cls} comes first in device order")
    if passed:
        first = "; ".join(f"{n} rejected: {r}" for n, r in passed[:2])
        more = f" (and {len(passed) - 2} more)" if len(passed) > 2 else ""
        reasons.append(f"falls back to {dev.cls}: {first}{more}")
    if v.installed:
        reasons.append("installed")
    return tuple(reasons)


def _ranked_reasons(
    v: VariantSpec,
    key: tuple[Any, ...],
    dev: DeviceVerdict,
    chosen: VariantSpec,
    ckey: tuple[Any, ...],
    cdev: DeviceVerdict,
    policy: SelectionPolicy,
) -> tuple[str, ...]:
    """Why `v` ranks below `chosen`: the first key component in which it loses."""
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
