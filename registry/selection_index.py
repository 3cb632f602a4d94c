"""A prepared, columnar view of a variant list, for repeated selection over the same variants.

`VariantIndex(variants)` does the per-variant Python work of `registry.selection.select`
once (O(n)): it factorizes what the device and policy judgments depend on into small
integer codes and precomputes the policy-independent parts of each memory estimate (bytes
of weights, KV elements per token, the model's context). `VariantIndex.select(profile,
policy)` then judges each distinct device and quantization once, as `select` does, and
does the per-variant work (estimate, budget check, ranking key) as numpy column arithmetic.

It returns exactly what `select(variants, profile, policy)` returns: the same chosen
variant, estimate and budget, the same lazily built candidates and reasons (through the
same `_explain`), and the same `NoVariantFits` message and attributes. Numbers the columns
cannot carry exactly (an integer beyond 2**53, a NaN bits-per-weight, an estimate that
overflows) make that call delegate to `select` itself, so equality holds for every input.

Rebuild the index when the variants change; it keeps its own tuple of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from registry.profile import HardwareProfile
from registry.selection import (
    _HOT_FIELDS,
    _NO_ESTIMATE,
    KV_BYTES_PER_ELEMENT,
    Candidate,
    NoVariantFits,
    Selection,
    SelectionPolicy,
    _Combo,
    _combo,
    _Device,
    _explain,
    _judge_device,
    _kv_elements_per_token,
    _model_name,
    _no_fit_message,
    _QuantRules,
    _Rejection,
    _system_budget,
    select,
)
from registry.types import BITS_PER_WEIGHT, QUALITY_RANK, VariantSpec, quality_rank

__all__ = ["VariantIndex"]

# Integers below this convert to float64 exactly, so float64 arithmetic on them is exact.
_EXACT = 2**53

_DevKey = tuple[str, str, str | None]
_ComboKey = tuple[str, str, str | None, str, bool, int]


def _codes(values: list[int]) -> NDArray[np.intp]:
    return np.array(values, dtype=np.intp)


class VariantIndex:
    """Variants as columns; `select` equals `registry.selection.select` on the same variants.

    Columns (one entry per variant, in input order):

    * `dev`: code of (format, target, runtime requirement) in `dev_keys`;
    * `quant`: code of the quantization in `quants`;
    * `alias`: code of the model alias in `aliases`, which is sorted, so the code orders
      like the alias; `name_rank`: the same for the variant name;
    * `quality`: quality rank (`native` folded in); `bpw_key`: bits per weight as the
      ranking compares it (the variant's, else the table's, else 99);
    * `not_installed`;
    * the estimate: `fixed_est` (a given `estimated_memory`, -1 when it cannot be estimated,
      NaN when it is computed), `compute` (computed rows), `size` (bytes of weights, from
      the file size or parameters × bits per weight), `per_token` (KV elements per token,
      with the fallbacks of `_kv_elements_per_token`), `ctx` (the model's context, 0 when
      unknown);
    * `unsafe`: rows the columns cannot represent exactly; a selection that would use one
      is delegated to `select`.
    """

    __slots__ = (
        "alias", "aliases", "bpw_key", "compute", "ctx", "dev", "dev_keys", "fixed_est",
        "name_rank", "not_installed", "per_token", "quality", "quant", "quants", "size",
        "unsafe", "variants",
    )

    variants: tuple[VariantSpec, ...]
    dev_keys: tuple[_DevKey, ...]
    quants: tuple[str, ...]
    aliases: tuple[str, ...]
    dev: NDArray[np.intp]
    quant: NDArray[np.intp]
    alias: NDArray[np.intp]
    name_rank: NDArray[np.intp]
    quality: NDArray[np.int64]
    bpw_key: NDArray[np.float64]
    not_installed: NDArray[np.bool_]
    fixed_est: NDArray[np.float64]
    compute: NDArray[np.bool_]
    size: NDArray[np.float64]
    per_token: NDArray[np.float64]
    ctx: NDArray[np.float64]
    unsafe: NDArray[np.bool_] | None  # None: no row is unsafe

    def __init__(self, variants: Sequence[VariantSpec]) -> None:
        self.variants = tuple(variants)
        dev_codes: dict[_DevKey, int] = {}
        quant_codes: dict[str, int] = {}
        qualities: dict[tuple[str, bool], int] = {}
        dev: list[int] = []
        quant: list[int] = []
        aliases: list[str] = []
        names: list[str] = []
        quality: list[int] = []
        bpw_key: list[float] = []
        not_installed: list[bool] = []
        fixed_est: list[float] = []
        size_col: list[float] = []
        per_token_col: list[float] = []
        ctx_col: list[float] = []
        unsafe: list[int] = []
        nan = float("nan")
        fields = _HOT_FIELDS

        for i, v in enumerate(self.variants):
            (fmt, target, req, alias, q, native, est, size, bpw, params, vctx,
             layers, embd, heads, kv_heads, head_dim, installed, vname) = fields(v.__dict__)
            dkey = (fmt, target, req)
            code = dev_codes.get(dkey)
            if code is None:
                code = dev_codes[dkey] = len(dev_codes)
            dev.append(code)
            code = quant_codes.get(q)
            if code is None:
                code = quant_codes[q] = len(quant_codes)
            quant.append(code)
            aliases.append(alias)
            names.append(vname)
            rank = qualities.get((q, native))
            if rank is None:
                rank = qualities[(q, native)] = quality_rank(q, native=native)
            quality.append(rank)
            not_installed.append(not installed)
            # from here on, exactly the arithmetic of select()'s loop
            if not bpw:
                bpw = BITS_PER_WEIGHT.get(q)
            key_bpw = bpw or 99.0
            bpw_key.append(key_bpw)
            if key_bpw != key_bpw:  # NaN: tuple comparison is not an order any more
                unsafe.append(i)
            s, p, c = nan, nan, 0.0
            if est is not None:
                fixed = float(est) if est < _EXACT else nan
                if fixed != fixed:
                    unsafe.append(i)
            else:
                fixed = nan
                try:
                    if size is None and params is not None and bpw:
                        size = params * bpw / 8
                    if size is None:
                        fixed = -1.0
                    else:
                        width = head_dim or (embd // heads if embd and heads else 0)
                        kvh = kv_heads or heads
                        per_token: float
                        if layers and width and kvh:
                            per_token = 2 * layers * kvh * width
                        else:
                            per_token = _kv_elements_per_token(
                                layers, embd, heads, kv_heads, head_dim, params, size, bpw
                            )
                        if isinstance(per_token, int) and abs(per_token) >= _EXACT:
                            raise OverflowError(per_token)
                        s, p = float(size), float(per_token)
                        if vctx:
                            if -_EXACT < vctx < _EXACT:
                                c = float(vctx)
                            elif vctx >= _EXACT:  # never below a context that is exact
                                c = float(_EXACT)
                            else:
                                raise OverflowError(vctx)
                except (ArithmeticError, ValueError):
                    unsafe.append(i)  # select() raises, or computes what floats cannot
            fixed_est.append(fixed)
            size_col.append(s)
            per_token_col.append(p)
            ctx_col.append(c)

        self.dev_keys = tuple(dev_codes)
        self.quants = tuple(quant_codes)
        self.aliases = tuple(sorted(set(aliases)))
        alias_code = {a: n for n, a in enumerate(self.aliases)}
        name_code = {a: n for n, a in enumerate(sorted(set(names)))}
        self.dev = _codes(dev)
        self.quant = _codes(quant)
        self.alias = _codes([alias_code[a] for a in aliases])
        self.name_rank = _codes([name_code[a] for a in names])
        self.quality = np.array(quality, dtype=np.int64)
        self.bpw_key = np.array(bpw_key, dtype=np.float64)
        self.not_installed = np.array(not_installed, dtype=np.bool_)
        self.fixed_est = np.array(fixed_est, dtype=np.float64)
        self.compute = np.isnan(self.fixed_est)
        self.size = np.array(size_col, dtype=np.float64)
        self.per_token = np.array(per_token_col, dtype=np.float64)
        self.ctx = np.array(ctx_col, dtype=np.float64)
        if unsafe:
            self.unsafe = np.zeros(len(self.variants), dtype=np.bool_)
            self.unsafe[unsafe] = True
            self.compute &= ~self.unsafe
            self.unsafe.flags.writeable = False
        else:
            self.unsafe = None
        for col in (self.dev, self.quant, self.alias, self.name_rank, self.quality, self.bpw_key,
                    self.not_installed, self.fixed_est, self.compute, self.size, self.per_token,
                    self.ctx):
            col.flags.writeable = False  # shared by every select(); never changed after build

    def __len__(self) -> int:
        return len(self.variants)

    def select(
        self,
        profile: HardwareProfile,
        policy: SelectionPolicy,
        *,
        model_alias: str | None = None,
    ) -> Selection:
        """`registry.selection.select(self.variants, profile, policy, model_alias=...)`."""
        variants = self.variants
        system_budget = _system_budget(profile, policy)
        devices = {
            k: _judge_device(k[0], k[1], k[2], profile, policy, system_budget)
            for k in self.dev_keys
        }
        dev_list = list(devices.values())
        context = policy.context_length
        if context >= _EXACT or any(d.budget >= _EXACT for d in dev_list):
            return select(variants, profile, policy, model_alias=model_alias)
        try:
            overhead_fixed = float(policy.memory.overhead_bytes)
        except OverflowError:
            return select(variants, profile, policy, model_alias=model_alias)

        rules = _QuantRules(policy.quantizations)
        per_alias = bool(policy.quantizations.models)  # else every alias has the default rule
        alias_rules: list[int] = []
        if per_alias:
            alias_rules = [rules.index(a) for a in self.aliases]
            table = np.zeros((len(rules.rules), len(self.quants)), dtype=np.bool_)
            for r in set(alias_rules):
                table[r] = [rules.reason(r, q) is None for q in self.quants]
            quant_ok = table[_codes(alias_rules)[self.alias], self.quant]
        else:
            qok = np.array([rules.reason(0, q) is None for q in self.quants], dtype=np.bool_)
            quant_ok = qok[self.quant]
        dev = self.dev
        dev_ok = np.array([d.reason is None for d in dev_list], dtype=np.bool_)
        ok = dev_ok[dev] & quant_ok
        if self.unsafe is not None and bool((ok & self.unsafe).any()):
            return select(variants, profile, policy, model_alias=model_alias)

        # the estimate: int(size × (1 + overhead share) + fixed overhead + KV bytes)
        share = policy.balanced_fraction
        kv_bytes = KV_BYTES_PER_ELEMENT[policy.kv_cache_type]
        overhead_share = 1.0 + policy.memory.overhead_fraction
        fctx = float(context)
        vctx = self.ctx
        with np.errstate(all="ignore"):
            ctx = np.where((vctx != 0) & (vctx < fctx), vctx, fctx)
            x = self.size * overhead_share + overhead_fixed + self.per_token * ctx * kv_bytes
            if not bool(np.isfinite(x[ok & self.compute]).all()):  # select() raises
                return select(variants, profile, policy, model_alias=model_alias)
            est = np.where(self.compute, np.trunc(x), self.fixed_est)
        dev_budget = np.array([float(d.budget) for d in dev_list], dtype=np.float64)
        known = ok & (est >= 0)
        fits = est <= dev_budget[dev]
        viable_mask = known & fits
        viable = np.flatnonzero(viable_mask)

        floor = QUALITY_RANK[policy.min_quality] if policy.min_quality else -1
        prefer = policy.prefer
        combos: dict[_ComboKey, _Combo] = {}
        rule_of = dict(zip(self.aliases, alias_rules, strict=True)) if per_alias else {}

        def judge(fmt: str, target: str, req: str | None) -> _Device:
            return _judge_device(fmt, target, req, profile, policy, system_budget)

        def combo_of(v: VariantSpec) -> _Combo:
            rule = rule_of[v.model_alias] if per_alias else 0
            key = (v.format, v.target, v.runtime_requirement, v.quantization, v.native, rule)
            c = combos.get(key)
            if c is None:
                c = combos[key] = _combo(key, devices, judge, rules, floor, share)
            return c

        rejected_memo: list[list[_Rejection]] = []

        def rejections() -> list[_Rejection]:
            """What select()'s loop appends to `rejected`, in the same (input) order."""
            if rejected_memo:
                return rejected_memo[0]
            out: list[_Rejection] = []
            ok_l, known_l, dev_l = ok.tolist(), known.tolist(), dev.tolist()
            for i in np.flatnonzero(~viable_mask).tolist():
                if not ok_l[i]:
                    c = combo_of(variants[i])
                    out.append((i, None, c[0], c[1]))
                else:
                    d = dev_list[dev_l[i]]
                    if known_l[i]:
                        out.append((i, int(est[i]), None, d))
                    else:
                        out.append((i, None, _NO_ESTIMATE, d))
            rejected_memo.append(out)
            return out

        def build() -> list[Candidate]:
            viable_est = [int(e) for e in est[viable].tolist()]
            return _explain(
                variants, viable.tolist(), viable_est, rejections(), combo_of, devices, policy
            )

        if viable.size == 0:
            over = np.flatnonzero(known & ~fits)
            smallest: tuple[int, int] | None = None
            if over.size:
                j = int(over[np.argmin(est[over])])  # the first of equal estimates
                smallest = (int(est[j]), dev_list[dev[j]].budget)
            raise NoVariantFits(
                _no_fit_message(
                    _model_name(model_alias, set(self.aliases)), variants, rejections(),
                    smallest,
                ),
                smallest=smallest[0] if smallest else None,
                budget=smallest[1] if smallest else None,
                build=build,
            )

        # The ranking key of select(), one component at a time over the rows still tied;
        # the first row (input order) of those left wins, as in select()'s strict `<`.
        idx = viable
        dev_rank = np.array([d.rank for d in dev_list], dtype=np.int64)
        comps: list[Callable[[NDArray[np.intp]], NDArray[np.generic]]] = [
            lambda r: dev_rank[dev[r]],
            lambda r: self.quality[r] < floor,
        ]
        if prefer == "balanced":
            comfy = np.array([share * d.budget for d in dev_list], dtype=np.float64)
            comps += [
                lambda r: est[r] > comfy[dev[r]],
                lambda r: np.where(est[r] <= comfy[dev[r]], -self.quality[r], est[r]),
            ]
        elif prefer == "quality":
            comps += [lambda r: -self.quality[r], lambda r: self.bpw_key[r]]
        else:
            comps += [lambda r: self.bpw_key[r], lambda r: -self.quality[r]]
        comps += [
            lambda r: self.not_installed[r],
            lambda r: est[r],
            lambda r: self.alias[r],
            lambda r: self.name_rank[r],
        ]
        for comp in comps:
            if idx.size == 1:
                break
            vals = comp(idx)
            idx = idx[vals == vals.min()]
        best = int(idx[0])
        chosen = variants[best]
        sel = Selection(
            model_alias=model_alias or chosen.model_alias,
            chosen=chosen,
            prefer=prefer,
            estimated_memory=int(est[best]),
            budget=dev_list[dev[best]].budget,
        )
        sel._build = build
        return sel
