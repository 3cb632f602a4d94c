"""Variant selection: which variant of a model runs best on this device, and why.

`select(variants, profile, policy)` is a pure function of its arguments. It estimates
each variant's memory, rejects what the device, its runtimes, the agent's backends or the
policy rule out, ranks the rest (device order, quality floor, preference, tie-break) and
returns the winner with a verdict and reasons for every candidate. The rules are in
docs/selection.md.

This module is the public face of selection; the work is done once, in these modules:

* `registry.selection_policy`   - the policy file (`SelectionPolicy`, `load_policy`);
* `registry.selection_estimate` - the memory estimate (`estimate_memory`), for one variant
  or a column of them;
* `registry.selection_devices`  - devices, runtimes and budgets (`memory_budget`);
* `registry.selection_index`    - the engine: `VariantIndex(variants).select(profile,
  policy)`. `select` is exactly that; keep a `VariantIndex` to select repeatedly from the
  same variants without reading them again.

Exceptions (part of the `registry.errors` tree):

* RegistryError
  + NoVariantFits   - nothing fits; this module's subclass carries the candidates
  + PolicyError     - the policy YAML is invalid (file:line, field, why)
"""

from __future__ import annotations

from collections.abc import Sequence

from registry.errors import PolicyError
from registry.profile import HardwareProfile
from registry.selection_devices import device_class, memory_budget
from registry.selection_estimate import MemoryEstimate, estimate_memory
from registry.selection_index import Candidate, NoVariantFits, Selection, VariantIndex
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
from registry.types import VariantSpec

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


def select(
    variants: Sequence[VariantSpec],
    profile: HardwareProfile,
    policy: SelectionPolicy,
    *,
    model_alias: str | None = None,
) -> Selection:
    """Choose the variant to run; raise `NoVariantFits` when none can.

    `VariantIndex(variants).select(profile, policy, model_alias=model_alias)`: ranking of
    the variants that fit: device (policy.device_order), then at-or-above `min_quality`
    first, then the preference, then installed first, smaller estimate, model alias and
    variant name. The result never depends on the order of `variants` (a complete tie goes
    to the first). `model_alias` names the model in messages (default: the variants'
    common alias).
    """
    return VariantIndex(variants).select(profile, policy, model_alias=model_alias)
