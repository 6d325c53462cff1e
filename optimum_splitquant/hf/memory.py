"""Letting the float checkpoint go after quantizing at load time (OS memory handling, kept out of the quantizer).

transformers reads a safetensors checkpoint as tensors that are views into a private memory map of
the file: a page of it costs resident memory once read, and stays resident while mapped. Quantizing
a weight reads every page of it, so without help the process ends up holding the whole float file
(plus the quantized copy) though a float load of the same model touches almost none of it.
:func:`release_file_pages` hands back the pages of each float weight once it is quantized (Linux),
and :func:`return_freed_heap` the quantizer's freed temporaries (at load through a
:class:`HeapReturner`, once the resident memory has grown by :data:`RETURN_HEAP_ABOVE`);
:func:`own_float_tensors` then copies the float parameters that stay (embeddings, norms), handing back
each one's pages as it goes, so that the map can go and the float file can be overwritten or deleted.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import logging
import mmap
import sys

import torch

from ..nn.compact import SplitQuantModule

__all__ = [
    "RETURN_HEAP_ABOVE",
    "HeapReturner",
    "own_float_tensors",
    "release_file_pages",
    "resident_bytes",
    "return_freed_heap",
]

logger = logging.getLogger(__name__)

_MADV_DONTNEED = 4
# /proc/self/pagemap: one little-endian 64-bit entry per virtual page (Documentation/admin-guide/mm/pagemap.rst).
_PAGE_PRESENT, _PAGE_SWAPPED, _PAGE_FILE = 1 << 63, 1 << 62, 1 << 61


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.madvise.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):  # not glibc (musl): nothing to do
        logger.debug("madvise / malloc_trim are not available")
        return None
    return libc


def release_file_pages(tensor: torch.Tensor) -> bool:
    """Drop the resident pages of ``tensor``, a consumed view into a file map; whether it did.

    Only the pages lying wholly inside the tensor's bytes, and only if each of them is either not
    resident or a clean page of a file (``/proc/self/pagemap``): ``MADV_DONTNEED`` then loses
    nothing, and reading the tensor again reads the file. Anything else (a tensor in the heap, on a
    GPU, non-contiguous, a page written since it was mapped, no ``/proc``, not Linux) is left
    alone and gives False; a tensor smaller than a page gives True (nothing to release).
    """
    libc = _libc()
    if libc is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    size = mmap.PAGESIZE
    start = tensor.data_ptr()
    first, end = -(-start // size) * size, (start + tensor.numel() * tensor.element_size()) // size * size
    if end <= first:
        return True
    pages = (end - first) // size
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(first // size * 8)
            entries = f.read(pages * 8)
    except OSError:
        return False
    if len(entries) != pages * 8:
        return False
    flags = memoryview(entries).cast("Q")
    if any(e & _PAGE_SWAPPED or (e & _PAGE_PRESENT and not e & _PAGE_FILE) for e in flags):
        return False
    return libc.madvise(first, end - first, _MADV_DONTNEED) == 0


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
                release_file_pages(param)  # the copy stands for it: one float tensor's pages at a time
            module._parameters[name] = copies[id(param)]
        if isinstance(module, SplitQuantModule):
            continue
        for name, buf in list(module._buffers.items()):
            if buf is None or buf.device.type != "cpu":
                continue
            if id(buf) not in copies:
                copies[id(buf)] = buf.clone()
                release_file_pages(buf)
            module._buffers[name] = copies[id(buf)]
    copies.clear()
    gc.collect()
    return_freed_heap()


def return_freed_heap() -> None:
    """Hand memory freed on the heap back to the OS (glibc keeps it otherwise): the temporaries of quantizing."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


RETURN_HEAP_ABOVE = 32 << 20
"""Bytes by which quantizing at load lets the process's resident memory grow past where the last return of the
freed heap left it: in between, the next layers' temporaries reuse the freed heap. Returning it after every
layer cost a ``malloc_trim`` and the page faults of the next layer's temporaries, a fifth of SmolLM2's load at
4 bits (docs/benchmarks.md, "Quantizing speed, against HQQ"). A layer whose temporaries alone exceed it still
returns them at once."""


def resident_bytes() -> int | None:
    """The process's resident memory (``/proc/self/statm``), or ``None`` where it cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * mmap.PAGESIZE
    except (OSError, ValueError, IndexError):
        return None


class HeapReturner:
    """After each layer quantized at load, returns the freed heap once the resident memory has grown by more
    than ``above`` bytes since the last return (after every layer where it cannot be read)."""

    def __init__(self, above: int = RETURN_HEAP_ABOVE) -> None:
        self.above = above
        self.mark = resident_bytes()

    def layer_done(self) -> None:
        """A layer is quantized: return the freed heap if the resident memory grew by more than ``above``."""
        now = resident_bytes()
        if now is None or self.mark is None or now - self.mark > self.above:
            return_freed_heap()
            self.mark = resident_bytes()
