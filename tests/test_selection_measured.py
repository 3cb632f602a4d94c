"""Selection from measurements: benchmark results on this hardware rank variants under the
policy's goals, and the explanation names the figures that decided. Pure: tables of specs."""

from __future__ import annotations

import pytest

from registry.profile import CpuInfo, HardwareProfile, MemoryInfo
from registry.selection import SelectionPolicy, select
from registry.selection_policy import MeasuredPolicy
from registry.types import GB, Measured, VariantSpec

PROFILE = HardwareProfile(cpu=CpuInfo(arch="x86_64", cores_physical=2, cores_logical=2),
                          memory=MemoryInfo(total_bytes=8 * GB, available_bytes=6 * GB))


def spec(quant: str, *, tps: float | None = None, ppl: float | None = None,
         rss: int = 300_000_000, agreement: float | None = None,
         eps: float | None = None) -> VariantSpec:
    measured = None
    if tps is not None or eps is not None:
        measured = Measured(load_seconds=0.5, peak_rss=rss, generation_tps=tps,
                            perplexity=ppl, embeddings_per_second=eps, agreement=agreement)
    return VariantSpec(model_alias="m", name=f"gguf-{quant.lower()}-cpu", format="gguf",
                       quantization=quant, file_size=100_000_000, parameter_count=135_000_000,
                       installed=True, measured=measured)


def policy(**measured: object) -> SelectionPolicy:
    return SelectionPolicy(measured=MeasuredPolicy.model_validate(measured))


LM = [spec("Q8_0", tps=20, ppl=10.0), spec("Q4_0", tps=60, ppl=10.4),
      spec("Q4_1", tps=50, ppl=10.2), spec("Q2_K", tps=90, ppl=14.0)]


@pytest.mark.parametrize(("pol", "winner"), [
    (policy(goal="quality", min_tokens_per_second=15), "gguf-q8_0-cpu"),
    (policy(goal="quality", min_tokens_per_second=30), "gguf-q4_1-cpu"),
    (policy(goal="speed", tolerance=0.05), "gguf-q4_0-cpu"),   # 10.4 <= 10.5; Q2_K is not
    (policy(goal="speed", tolerance=0.5), "gguf-q2_k-cpu"),
    (policy(goal="speed", tolerance=0.01), "gguf-q8_0-cpu"),
    (SelectionPolicy(prefer="speed", min_quality=None, measured=MeasuredPolicy(use=False)),
     "gguf-q2_k-cpu"),  # measurements off: the static preference decides
])
def test_goals_choose_by_the_measurements(pol: SelectionPolicy, winner: str) -> None:
    assert select(LM, PROFILE, pol).chosen.name == winner


def test_memory_share_is_a_floor_on_measured_peak() -> None:
    variants = [spec("Q8_0", tps=20, ppl=10.0, rss=6 * GB), spec("Q4_0", tps=60, ppl=10.4)]
    sel = select(variants, PROFILE, policy(max_memory_fraction=0.6))
    assert sel.chosen.name == "gguf-q4_0-cpu"
    loser = next(c for c in sel.candidates if c.variant.name == "gguf-q8_0-cpu")
    assert "of RAM" in loser.reasons[0] and "measured peak 6.0 GB" in loser.reasons[0]


def test_measured_variants_rank_before_unmeasured_ones_and_explain_why() -> None:
    variants = [spec("Q8_0"), spec("Q4_0", tps=60, ppl=10.4)]
    sel = select(variants, PROFILE, policy())
    assert sel.chosen.name == "gguf-q4_0-cpu"  # static ranking alone would take Q8_0
    reasons = sel.chosen_candidate.reasons
    assert reasons[0].startswith("lowest perplexity measured among variants with >= 10 tok/s")
    assert reasons[1] == "measured on this device: 60.0 tok/s, perplexity 10.40, peak 300 MB"
    other = sel.candidates[1]
    assert other.reasons[0] == "not benchmarked on this device; measured variants rank first"


def test_a_variant_missing_the_speed_floor_ranks_after_unmeasured_ones() -> None:
    variants = [spec("Q8_0", tps=4, ppl=9.0), spec("Q4_0")]
    sel = select(variants, PROFILE, policy(min_tokens_per_second=10))
    assert sel.chosen.name == "gguf-q4_0-cpu"
    slow = sel.candidates[1]
    assert slow.reasons[0] == "measured 4.0 tok/s < 10 required"
    # with nothing else, the slow one is still chosen, and it says so
    alone = select([variants[0]], PROFILE, policy(min_tokens_per_second=10))
    assert "misses the policy's floors" in alone.chosen_candidate.reasons[1]


def test_embedding_models_rank_by_agreement_and_throughput() -> None:
    variants = [spec("F32", eps=100, agreement=1.0), spec("Q8_0", eps=300, agreement=0.995),
                spec("Q4_0", eps=400, agreement=0.93)]
    assert select(variants, PROFILE, policy(goal="quality")).chosen.name == "gguf-f32-cpu"
    assert select(variants, PROFILE, policy(goal="speed", tolerance=0.01)).chosen.name == \
        "gguf-q8_0-cpu"
    assert select(variants, PROFILE, policy(goal="speed", tolerance=0.1)).chosen.name == \
        "gguf-q4_0-cpu"
    assert select(variants, PROFILE, policy(goal="quality", min_embeddings_per_second=200)
                  ).chosen.name == "gguf-q8_0-cpu"


def test_measurements_never_override_the_memory_budget() -> None:
    huge = spec("Q8_0", tps=99, ppl=1.0).model_copy(update={"file_size": 100 * GB})
    sel = select([huge, spec("Q4_0", tps=10, ppl=20.0)], PROFILE, policy())
    assert sel.chosen.name == "gguf-q4_0-cpu"
    rejected = next(c for c in sel.candidates if c.verdict == "rejected")
    assert rejected.variant.name == "gguf-q8_0-cpu"
