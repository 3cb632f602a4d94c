"""One memory budget for selection and residency; only installed backends are offered."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest_models import make_tiny_gguf, make_tiny_onnx

from agent.errors import ModelLoadFailed
from agent.runtime.backend import BACKENDS, BackendSpec, available_formats, load_backend
from agent.runtime.resolver import ModelResolver, effective_policy
from agent.runtime.types import ResolvedModel
from agent.settings import RuntimeSettings, load_settings
from registry.errors import NoVariantFits
from registry.selection import SelectionPolicy, estimate_memory
from registry.service import open_registry
from registry.types import Task

HW = Path(__file__).parent / "fixtures" / "hw"
GB = 1_000_000_000


@pytest.mark.parametrize(
    ("setting", "policy", "fraction", "cap"),
    [
        ({}, {}, 0.75, None),  # the defaults agree
        ({"memory_fraction": 0.5}, {"fraction": 0.75}, 0.5, None),  # setting rules
        ({"memory_fraction": 0.9}, {"fraction": 0.6}, 0.6, None),  # the file may lower it
        ({"memory_fraction": 0.5}, {"fraction": 1.0}, 0.5, None),  # ...never raise it
        ({"memory_budget_bytes": GB}, {"max_bytes": 2 * GB}, 0.75, GB),
        ({"memory_budget_bytes": GB}, {"max_bytes": GB // 2}, 0.75, GB // 2),
        ({}, {"max_bytes": GB}, 0.75, GB),
    ],
)
def test_the_policy_file_may_lower_the_budget_never_raise_it(
    setting: dict[str, float], policy: dict[str, float], fraction: float, cap: int | None
) -> None:
    base = SelectionPolicy()
    pol = base.model_copy(update={"memory": base.memory.model_copy(update=policy)})
    eff = effective_policy(pol, RuntimeSettings(**setting))
    assert eff.memory.fraction == fraction and eff.memory.max_bytes == cap


@pytest.mark.parametrize("tree", ["raspberry-pi-5", "jetson-orin-nano-super-jp6",
                                  "ryzen-ai-max-395-framework-desktop"])
@pytest.mark.parametrize("setting", [{}, {"EDGE_AGENT_RUNTIME__MEMORY_FRACTION": "0.3"},
                                     {"EDGE_AGENT_RUNTIME__MEMORY_BUDGET_BYTES": "600000000"}])
def test_selection_and_residency_use_the_same_budget(
    tmp_path: Path, tree: str, setting: dict[str, str]
) -> None:
    settings = load_settings(environ={"EDGE_AGENT_HOME": str(tmp_path), **setting})
    reg = open_registry(settings.state)
    try:
        reg.import_file(make_tiny_gguf(tmp_path / "tiny.gguf"), alias="tiny", task="completion")
        resolver = ModelResolver(settings, reg, root=HW / tree)
        profile = resolver.profile()
        assert profile.memory.total_bytes > 0
        chosen = resolver.selection("tiny").chosen_candidate
        assert chosen.device == "cpu"
        # What selection judged the variant by is what residency will refuse beyond.
        assert chosen.budget == resolver.memory_budget(profile.memory.total_bytes)
    finally:
        reg.close()


def test_both_backends_are_installed_here() -> None:
    assert available_formats() == ("gguf", "onnx")


def test_only_installed_backends_are_offered_and_explained(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # An installation without onnxruntime: its backend's module cannot be found.
    monkeypatch.setitem(BACKENDS, "onnx", BackendSpec(
        "onnx", "onnxruntime", "agent.runtime.onnx:open_backend", ("no_such_runtime_module",)))
    assert available_formats() == ("gguf",)
    settings = load_settings(environ={"EDGE_AGENT_HOME": str(tmp_path)})
    reg = open_registry(settings.state)
    try:
        reg.import_file(make_tiny_onnx(tmp_path / "m.onnx"), alias="emb", task="embedding")
        resolver = ModelResolver(settings, reg)  # the live device: backends are probed
        assert resolver.profile().runtimes.backends == ("gguf",)
        with pytest.raises(NoVariantFits) as err:
            resolver.resolve("emb")
        reasons = [r for c in err.value.candidates for r in c.reasons]
        assert "no onnx backend in this agent (available: gguf)" in reasons
        assert "no onnx backend in this agent" in str(err.value)
    finally:
        reg.close()


def test_a_backend_that_is_not_installed_is_refused_by_name(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    spec = BackendSpec("onnx", "onnxruntime", "agent.runtime.onnx:open_backend",
                       ("no_such_runtime_module",))
    assert not spec.installed()
    monkeypatch.setitem(BACKENDS, "onnx", spec)
    assert available_formats() == ("gguf",)
    resolved = ResolvedModel(alias="emb", variant="onnx-int8-cpu", format="onnx",
                             quantization="int8", target="cpu", sha256="0" * 64,
                             path=str(tmp_path / "m.onnx"), task="embedding", estimated_memory=1)
    with pytest.raises(ModelLoadFailed, match="needs onnxruntime, which is not installed"):
        load_backend(resolved, RuntimeSettings())
    monkeypatch.delitem(BACKENDS, "onnx")
    with pytest.raises(ModelLoadFailed, match="this agent has backends for: gguf"):
        load_backend(resolved, RuntimeSettings())


# A GGUF whose file is under 1 MB but whose KV window is 512 MiB (32 layers, 8 KV heads of
# 128, f16, 4096 tokens): the windows decide whether it fits, not the weights.
WINDOW = 2 * 32 * 8 * 128 * 2 * 4096


@pytest.mark.parametrize(("parallel", "task", "windows"),
                         [(4, "completion", 4), (1, "completion", 1), (4, "embedding", 1)])
def test_selection_counts_the_kv_windows_loading_allocates(
    tmp_path: Path, parallel: int, task: Task, windows: int
) -> None:
    """A generating GGUF model gets `runtime.parallel` KV windows at load; selection judges
    it with all of them, so a variant that fits with one window but not with four is refused
    by selection (saying why), not chosen and then refused by the memory budget at load. The
    figure selection and `models select --explain` show is the one residency counts."""
    budget = 1_500_000_000  # one window fits (0.7 GB), four (2.3 GB) do not
    settings = load_settings(environ={
        "EDGE_AGENT_HOME": str(tmp_path), "EDGE_AGENT_RUNTIME__PARALLEL": str(parallel),
        "EDGE_AGENT_RUNTIME__MEMORY_BUDGET_BYTES": str(budget)})
    reg = open_registry(settings.state)
    try:
        wide = make_tiny_gguf(tmp_path / "wide.gguf", context_length=4096, block_count=32,
                              embedding_length=4096, head_count=32, head_count_kv=8,
                              vocab_size=8)
        reg.import_file(wide, alias="wide", task=task)
        resolver = ModelResolver(settings, reg, root=HW / "raspberry-pi-5")
        policy = resolver.policy_for(task)
        assert policy.kv_windows == windows
        spec = reg.variant_specs("wide")[0]
        one = estimate_memory(spec, resolver.policy())
        est = estimate_memory(spec, policy)
        assert one is not None and est is not None and one.kv_cache == WINDOW
        assert est.kv_cache == windows * WINDOW and est.weights == one.weights
        assert one.total <= budget < one.total + 3 * WINDOW
        if windows == 4:
            with pytest.raises(NoVariantFits) as err:
                resolver.resolve("wide")
            assert str(err.value) == (
                "no variant of wide fits: smallest needs 2.3 GB (KV cache 2.1 GB: 4 windows "
                "of 4096 tokens), budget is 1.5 GB")
            (cand,) = err.value.candidates
            assert cand.estimated_memory == est.total
            assert cand.reasons == ("2.3 GB estimated (KV cache 2.1 GB: 4 windows of 4096 "
                                    "tokens) > 1.5 GB budget",)
            return
        resolved = resolver.resolve("wide")
        chosen = resolver.selection("wide").chosen_candidate
        # what residency counts is what selection compared with the budget, to the byte
        assert resolved.estimated_memory == chosen.estimated_memory == est.total
        assert "window" not in "; ".join(chosen.reasons)
    finally:
        reg.close()


def test_an_onnx_variant_holds_one_window_whatever_the_parallel_setting(tmp_path: Path) -> None:
    """The agent's ONNX runtimes decode one sequence at a time: with runtime.parallel 4, a
    generating model whose GGUF variants no longer fit still gets its ONNX one."""
    settings = load_settings(environ={"EDGE_AGENT_HOME": str(tmp_path),
                                      "EDGE_AGENT_RUNTIME__MEMORY_BUDGET_BYTES": "4000000000"})
    reg = open_registry(settings.state)
    try:
        resolver = ModelResolver(settings, reg, root=HW / "raspberry-pi-5")
        from registry.catalog import load_catalog
        from registry.selection import select

        entry = load_catalog().find("phi4-mini")
        assert entry is not None and entry.task == "chat"
        specs = list(entry.specs())
        # judged with one window, Q4_K_M fits (3.4 GB of 4.0); with four (5.0 GB) it does not
        assert select(specs, resolver.profile(), resolver.policy()).chosen.name == (
            "gguf-q4_k_m-cpu")
        sel = select(specs, resolver.profile(), resolver.policy_for("chat"))
        assert sel.chosen.name == "onnx-int4-cpu"
        by_name = {c.variant.name: c for c in sel.candidates}
        assert by_name["gguf-q4_k_m-cpu"].explanation == (
            "rejected: 5.0 GB estimated (KV cache 2.1 GB: 4 windows of 4096 tokens) > 4.0 GB "
            "budget")
        assert "window" not in by_name["onnx-int4-cpu"].explanation
    finally:
        reg.close()
