"""Shared set-up of tests/vllm: a vLLM config context and a faked tensor parallel group.

These tests need vLLM (``.venv-vllm``, made by ``scripts/install_vllm.sh``); each module skips itself
with that reason when vLLM is not importable, so the main suite in ``.venv`` passes without it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from unittest import mock

import pytest

VLLM_MISSING = "vLLM is not installed: tests/vllm run in .venv-vllm (bash scripts/install_vllm.sh)"


@contextlib.contextmanager
def tensor_parallel(size: int, rank: int) -> Iterator[None]:
    """vLLM's layers and parameters see a tensor parallel group of ``size`` in which this process is ``rank``."""
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    with contextlib.ExitStack() as stack:
        for module in (linear, parameter):
            stack.enter_context(mock.patch.object(module, "get_tensor_model_parallel_world_size", return_value=size))
            stack.enter_context(mock.patch.object(module, "get_tensor_model_parallel_rank", return_value=rank))
        yield


@pytest.fixture(scope="module")
def vllm_context() -> Iterator[None]:
    """vLLM layers are built inside a current ``VllmConfig`` (a default one: no engine)."""
    from vllm.config import VllmConfig, set_current_vllm_config

    from optimum_splitquant.vllm import register

    register()
    with set_current_vllm_config(VllmConfig()):
        yield
