"""Letting the float checkpoint go after quantizing at load time (OS memory handling, kept out of the quantizer)."""

from __future__ import annotations

import ctypes
import gc
import logging
import sys

import torch

from ..nn.compact import SplitQuantModule

__all__ = ["own_float_tensors"]

logger = logging.getLogger(__name__)


def own_float_tensors(model: torch.nn.Module) -> None:
    """Give the float parameters and buffers left on the CPU their own memory.

    Loaded from safetensors they are views into the memory-mapped float checkpoint, which keeps the
    whole mapping alive, and quantizing at load has read every page of it: the process would go on
    holding the full float file in its resident memory. A copy of what stays float (embeddings,
    norms, the head) lets the mapping go. Tied parameters stay tied (one copy per tensor).
    """
    copies: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, SplitQuantModule):
            params = {n: p for n, p in module._parameters.items() if n == "bias"}
        else:
            params = module._parameters
        for name, param in list(params.items()):
            if param is None or param.device.type != "cpu":
                continue
            if id(param) not in copies:
                copies[id(param)] = torch.nn.Parameter(param.detach().clone(), requires_grad=param.requires_grad)
            module._parameters[name] = copies[id(param)]
        if isinstance(module, SplitQuantModule):
            continue
        for name, buf in list(module._buffers.items()):
            if buf is None or buf.device.type != "cpu":
                continue
            if id(buf) not in copies:
                copies[id(buf)] = buf.clone()
            module._buffers[name] = copies[id(buf)]
    copies.clear()
    gc.collect()
    _return_freed_heap()


def _return_freed_heap() -> None:
    """Hand the float copies freed while quantizing back to the OS (glibc keeps them otherwise)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl): nothing to do
        logger.debug("malloc_trim is not available")
