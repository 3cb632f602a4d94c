"""Shared fixtures: the real model files (from their PyPI packages), built once."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest_models import assemble_gemma3_gguf, smollm2_gguf_path
from fleet_env import broker, controller, pki, root  # noqa: F401  (module-scoped fleet fixtures)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def gemma3_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return assemble_gemma3_gguf(tmp_path_factory.mktemp("gemma3"))
