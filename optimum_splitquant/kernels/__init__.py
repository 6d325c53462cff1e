"""Optional compiled CPU kernels, with the pure-torch path as fallback.

Torch ops, built from six sources at first use into one library (see :mod:`._build`):

* ``splitquant_cpu.cpp``: ``torch.ops.optimum_splitquant.dequantize``: packed rows -> fp32 weight,
  bit-identical to :func:`optimum_splitquant.core.dequantize_weight`; used before a GEMM for large
  batches. ``torch.ops.optimum_splitquant.linear``: ``x @ W.T + b`` for fp32 ``x`` of a few tokens,
  reading the packed bytes directly (per 16 weights: unpack, one table lookup per lane, one FMA per
  token); the same weights as the plain path, summed in another order (fp32, relative error
  ~1e-6). ``best_isa``: the instruction set the kernels use on this CPU. The forward passes reach
  these two through :mod:`optimum_splitquant.nn.compute`, which chooses them once per layer.
* ``check_cpu.cpp``: ``torch.ops.optimum_splitquant.check_stored``: one pass over several layers'
  stored ranges and packed bytes, the verdicts of :mod:`optimum_splitquant.nn.validation`
  (:func:`check_stored`).
* ``fit_cpu.cpp``: ``fit_mse_starts``, ``start_ranges`` and ``nearest_levels``: the least-squares
  range fit of ``fit="mse"`` (:func:`fit_mse_starts`, :func:`start_ranges`, :func:`nearest_levels`),
  the same bits as the pure-torch search. ``line_errors``: each line's squared error on every candidate
  coded range (:func:`line_errors`, the one-cluster search of ``core.fit.fit_coded``).
* ``ranges_cpu.cpp``: ``torch.ops.optimum_splitquant.decode_ranges``: a layer's coded ranges (formats
  2 to 4) from their packed codes and steps in one pass (:func:`decode_ranges`), the same bits as
  :func:`optimum_splitquant.core.ranges.decode_layer_ranges`' pure-torch unpack and decode, which
  uses it on every forward pass of a layer that holds only its stored bits.
* ``kmeans_cpu.cpp``: ``torch.ops.optimum_splitquant.kmeans_binned``: the exact 1-D k-means search
  of one float32 row (:func:`optimum_splitquant.core.kmeans_1d`'s binned path, ``2 <= k <= 9``);
  the same cuts and the same bits as the pure-torch search, in plain loops instead of ~1,500 small
  torch ops.
* ``kmeans_dp_cpu.cpp``: ``torch.ops.optimum_splitquant.kmeans_dp``: the layers of the k-means
  dynamic programme over sorted rows (:func:`optimum_splitquant.core.kmeans_1d` with many
  clusters): the same cuts as the pure-torch layers, in plain loops (one row per thread).

This package is a leaf: it depends on torch alone and takes plain integers (``bits``, the symbol
``width``), so the pure-torch core may call it without an import cycle.

``OPTIMUM_SPLITQUANT_KERNELS`` selects the behaviour: ``auto`` (default: build or load the cached
library; on failure log a warning once and use pure torch), ``off`` (``0``/``false``/``torch``:
pure torch only, nothing is compiled) or ``require`` (``1``/``on``: raise if the kernels cannot
be built). The switch is read on every call of :func:`available`; a quantized layer reads it when
it chooses its path (:meth:`optimum_splitquant.nn.SplitQuantModule.select_compute_`). ``dequantize``
and ``linear`` have fake (meta) implementations, so ``torch.compile`` traces through them.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass

import torch

from ._build import CACHE_ENV, KernelBuildError, build_library, cache_dir, cache_root, discard

__all__ = [
    "CACHE_ENV",
    "ENV_VAR",
    "ISA_NAMES",
    "KernelStatus",
    "available",
    "cache_dir",
    "cache_root",
    "check_stored",
    "decode_ranges",
    "dequantize",
    "fit_mse_starts",
    "kmeans_binned",
    "kmeans_dp",
    "line_errors",
    "linear",
    "mode",
    "nearest_levels",
    "start_ranges",
    "status",
    "switch_mode",
]

logger = logging.getLogger(__name__)

ENV_VAR = "OPTIMUM_SPLITQUANT_KERNELS"
ISA_NAMES = ("scalar", "avx2", "avx512")
_OFF = ("0", "off", "false", "no", "torch")
_REQUIRE = ("1", "on", "true", "yes", "require")
_LOCK = threading.Lock()


@dataclass(frozen=True)
class KernelStatus:
    """Whether the compiled kernels are in use, and why not when they are not.

    Attributes:
        mode: ``"auto"``, ``"off"`` or ``"require"`` (from ``OPTIMUM_SPLITQUANT_KERNELS``).
        loaded: the library is built and its ops are registered.
        isa: best instruction set the kernels use on this CPU (``"avx512"``, ``"avx2"``, ``"scalar"``).
        path: the compiled library, if any.
        reason: why the kernels are not used (empty when they are).
    """

    mode: str
    loaded: bool
    isa: str = ""
    path: str = ""
    reason: str = ""

    @property
    def active(self) -> bool:
        """The forward pass uses the kernels."""
        return self.loaded and self.mode != "off"


def switch_mode(env_var: str) -> str:
    """``"off"``, ``"require"`` or ``"auto"``: the mode an environment switch such as ``ENV_VAR`` asks for."""
    value = os.environ.get(env_var, "auto").strip().lower()
    if value in _OFF:
        return "off"
    if value in _REQUIRE:
        return "require"
    return "auto"


def mode() -> str:
    """The mode requested by ``OPTIMUM_SPLITQUANT_KERNELS`` (read on every call)."""
    return switch_mode(ENV_VAR)


@functools.cache
def _load() -> KernelStatus:
    """Build (or find) and load the library once per process; never raises."""
    with _LOCK:
        try:
            path = build_library()
            try:
                torch.ops.load_library(str(path))
            except OSError as exc:  # intact bytes that still do not load (not a library): rebuild once
                logger.warning("SplitQuant: the cached kernel library %s cannot be loaded: %s", path, exc)
                discard(path)
                path = build_library()
                torch.ops.load_library(str(path))
            _register_fakes()
            isa = ISA_NAMES[int(torch.ops.optimum_splitquant.best_isa())]
        except (KernelBuildError, OSError, RuntimeError) as exc:
            logger.warning(
                "SplitQuant: compiled CPU kernels unavailable, using the pure-torch path (slower decoding): %s", exc
            )
            return KernelStatus(mode="auto", loaded=False, reason=str(exc))
        logger.info("SplitQuant: CPU kernels loaded (%s) from %s", isa, path)
        return KernelStatus(mode="auto", loaded=True, isa=isa, path=str(path))


def status(load: bool = True) -> KernelStatus:
    """The kernels' state; ``load=False`` reports without building anything."""
    m = mode()
    if m == "off":
        return KernelStatus(mode=m, loaded=False, reason=f"disabled by {ENV_VAR}")
    if not load and _load.cache_info().currsize == 0:
        return KernelStatus(mode=m, loaded=False, reason="not loaded yet")
    st = _load()
    if m == "require" and not st.loaded:
        raise RuntimeError(f"{ENV_VAR}=require but the SplitQuant CPU kernels cannot be built: {st.reason}")
    return KernelStatus(mode=m, loaded=st.loaded, isa=st.isa, path=st.path, reason=st.reason)


@torch.compiler.assume_constant_result
def available() -> bool:
    """True when the compiled kernels are enabled and loaded (builds them on first call).

    Cheap after the first call (quantized layers call it when they choose their path). Under ``torch.compile`` it is evaluated
    once while tracing (a constant of the compiled graph).
    """
    value = os.environ.get(ENV_VAR)
    if value is not None and value.strip().lower() in _OFF:
        return False
    loaded = _load().loaded
    if not loaded and value is not None and value.strip().lower() in _REQUIRE:
        status()  # raises with the reason
    return loaded


def dequantize(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    in_features: int,
    bits: int,
    width: int,
    isa: int = -1,
) -> torch.Tensor:
    """fp32 ``(out, in_features)`` weight, bit-identical to ``core.dequantize_weight``; needs :func:`available`.

    ``bits`` is the code width and ``width`` the packed symbol width (code and cluster id).
    ``isa`` caps the instruction set (0 scalar, 1 AVX2, 2 AVX-512; -1 = best), for tests.
    """
    _require_loaded()
    return torch.ops.optimum_splitquant.dequantize.default(packed, scale, offset, in_features, bits, width, isa)


def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    bias: torch.Tensor | None,
    in_features: int,
    bits: int,
    width: int,
    isa: int = -1,
) -> torch.Tensor:
    """``x @ W.T + bias`` for fp32 ``x`` of shape ``(tokens, in_features)``, straight from the packed rows."""
    _require_loaded()
    return torch.ops.optimum_splitquant.linear.default(x, packed, scale, offset, bias, in_features, bits, width, isa)


def kmeans_binned(x: torch.Tensor, k: int) -> torch.Tensor | None:
    """Compiled exact k-means of a 1-D float32 row, or None (kernels off or unavailable, or the search gave up).

    Returns float64 ``[sum, counts before each cut, prefix sums at them, first value after each cut,
    last value before each cut]`` (``1 + 4 (k - 1)`` values); ``core.kmeans`` turns it into centres.
    """
    if torch.compiler.is_compiling() or not available():
        return None
    out = torch.ops.optimum_splitquant.kmeans_binned.default(x, k)
    return out if out.numel() else None


def kmeans_dp(ps: torch.Tensor, pq: torch.Tensor, k: int) -> torch.Tensor | None:
    """Compiled k-means dynamic programme over sorted rows, or None (kernels off or unavailable).

    ``ps`` and ``pq``: float64 ``(G, n + 1)`` prefix sums of each sorted (centred) row and of its
    squares. Returns int64 ``(G, k - 1)``: the count of values before each optimal cut, the same as
    ``core.kmeans``' torch layers (ties to the leftmost cut).
    """
    if torch.compiler.is_compiling() or not available():
        return None
    return torch.ops.optimum_splitquant.kmeans_dp.default(ps, pq, k)


def fit_mse_starts(
    w: torch.Tensor,
    ids: torch.Tensor,
    offsets: torch.Tensor,
    scales: torch.Tensor,
    bits: int,
    trial: int,
    iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Compiled least-squares range fitting from several starting ranges per line, or None (kernels unavailable).

    ``w``: float32 ``(lines, g)`` weights; ``ids``: their int64 cluster ids; ``offsets`` / ``scales``:
    ``(starts, lines, k)`` in the storage dtype. Every start gets nearest codes in each weight's own
    cluster and ``trial`` rounds; each line keeps its start with the least squared error (double,
    summed over ``core.quantize.SUM_LANES`` lanes, the first on ties), refitted for ``iters - trial``
    more rounds. Returns ``(ids, codes, offset, scale)``, the same bits as ``core.quantize``'s
    pure-torch search; with one cluster (``k = 1``) the ids are not read and come back as an expanded
    (read-only) 0. Raises ``RuntimeError`` if a range overflows the storage dtype.
    """
    if torch.compiler.is_compiling() or not available():
        return None
    return torch.ops.optimum_splitquant.fit_mse_starts.default(w, ids, offsets, scales, bits, trial, iters)


def nearest_levels(
    w: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Compiled ``(ids, codes)`` of the level nearest to each weight among its line's clusters, or None.

    ``w``: float32 ``(lines, g)``; ``offset`` / ``scale``: float32 ``(lines, k)``. The same bits as
    ``core.quantize``'s torch search (lowest cluster on ties); with ``k = 1`` the ids are an expanded 0.
    """
    if torch.compiler.is_compiling() or not available():
        return None
    return torch.ops.optimum_splitquant.nearest_levels.default(w, offset, scale, bits)


def line_errors(w: torch.Tensor, offsets: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor | None:
    """Compiled squared error of each line on the nearest levels of every candidate range, or None.

    ``w``: float32 ``(lines, g)``; ``offsets`` / ``scales``: float32 ``(candidates, lines)``, one range per
    line. Returns float64 ``(lines, candidates)``: per weight the float32 error ``(w - offset) - code * scale``,
    squared and summed in double over ``core.fit.SUM_LANES`` lanes, the same bits as ``core.fit``'s torch path.
    """
    if torch.compiler.is_compiling() or not available():
        return None
    return torch.ops.optimum_splitquant.line_errors.default(w, offsets, scales, bits)


def start_ranges(
    lo: torch.Tensor, hi: torch.Tensor, kept: list[float], spare: list[int], bits: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Compiled starting ranges of :func:`fit_mse_starts`, or None (kernels unavailable).

    ``lo`` / ``hi``: float32 ``(lines, k)`` member minimum and maximum of every slot. Returns
    ``(offsets, scales)`` ``(starts, lines, k)`` in ``dtype``, the same bits as ``core.quantize``'s
    torch starts; raises ``RuntimeError`` if a range is not finite in ``dtype``.
    """
    if torch.compiler.is_compiling() or not available():
        return None
    return torch.ops.optimum_splitquant.start_ranges.default(lo, hi, kept, spare, bits, dtype)


def check_stored(
    packed: list[torch.Tensor],
    scale: list[torch.Tensor],
    offset: list[torch.Tensor],
    bits: list[int],
    width: list[int],
    num_clusters: list[int],
    dtype: torch.dtype,
) -> list[int] | None:
    """Compiled check of several layers' stored CPU tensors (one entry per layer), or None (kernels unavailable).

    One verdict per layer. 0: valid; 1: a range is bad (a scale or offset not finite, a negative
    scale, or an extreme ``offset + (2**bits - 1) * scale`` not finite in float32 or ``dtype``); 2: a
    symbol, row padding included, holds a cluster id ``>= num_clusters``. The verdicts of
    ``validate()``'s torch path.
    """
    if torch.compiler.is_compiling() or not available():
        return None
    return torch.ops.optimum_splitquant.check_stored.default(packed, scale, offset, bits, width, num_clusters, dtype)


def decode_ranges(
    codes: torch.Tensor,
    steps: torch.Tensor,
    lines: int,
    range_bits: int,
    range_block: int,
    signed_offsets: bool,
    scale_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` ``(lines, k)`` in ``scale_dtype`` of packed CPU range codes; needs :func:`available`.

    ``codes``: the ``uint8`` stream of ``2 * lines * k`` codes of ``range_bits`` bits (all scale codes,
    then all offset codes); ``steps``: ``(blocks, 2, k)`` per block of ``range_block`` lines, any
    float dtype. Each product in float32, rounded to ``scale_dtype``; offset codes count from
    ``2**(range_bits - 1)`` with ``signed_offsets`` (format 3), from 0 otherwise.
    """
    _require_loaded()
    return torch.ops.optimum_splitquant.decode_ranges.default(
        codes, steps, lines, range_bits, range_block, signed_offsets, scale_dtype
    )


def _require_loaded() -> None:
    if torch.compiler.is_compiling():
        return  # the caller checked available() (a traced constant); loading is not traceable
    st = _load()
    if not st.loaded:
        raise RuntimeError(f"the SplitQuant CPU kernels are not available: {st.reason}")


@functools.cache
def _register_fakes() -> None:
    """Shape-only implementations so ``torch.compile`` (and meta tensors) can trace the ops."""

    @torch.library.register_fake("optimum_splitquant::dequantize")
    def _dequantize_fake(packed, scale, offset, in_features, bits, width, isa=-1):  # type: ignore[no-untyped-def]
        return packed.new_empty((packed.shape[0], in_features), dtype=torch.float32)

    @torch.library.register_fake("optimum_splitquant::linear")
    def _linear_fake(x, packed, scale, offset, bias, in_features, bits, width, isa=-1):  # type: ignore[no-untyped-def]
        return x.new_empty((x.shape[0], packed.shape[0]))

    @torch.library.register_fake("optimum_splitquant::decode_ranges")
    def _decode_ranges_fake(codes, steps, lines, range_bits, range_block, signed_offsets, scale_dtype):  # type: ignore[no-untyped-def]
        shape = (lines, steps.shape[2])
        return steps.new_empty(shape, dtype=scale_dtype), steps.new_empty(shape, dtype=scale_dtype)
