"""The quantization methods compared by the quality benchmark, and honest size accounting for each.

Every method quantizes the same layers: the eligible Linear layers minus what SplitQuant's default
head policy keeps in float (task head, tied output embeddings). Effective bits per weight count
every stored tensor of the quantized layers (codes, cluster ids, scales, offsets / shifts / zeros)
over the number of original weights.

Method sets (``--methods`` of ``bench_quality.py`` takes set names, method names or glob patterns):
``default`` (:func:`all_methods`), ``extra`` (:func:`extra_methods`), ``frontier``
(:func:`frontier_methods`: an HQQ grid, a pruned SplitQuant grid with ``fit="minmax"`` and ``fit="mse"``,
quanto qint4), ``frontier-full`` (the SplitQuant product unpruned), ``anchors`` (:func:`anchor_methods`: SINQ and
bitsandbytes NF4, calibration-free anchors from optional libraries), ``frontier-anchors``
(:func:`frontier_anchor_methods`: ``SplitQuantConfig.for_budget`` against HQQ, SINQ and NF4) and ``quick``
(:func:`quick_methods`).

SINQ and bitsandbytes are imported only when one of their methods runs (``pip install -e ".[anchors]"``, see
``scripts/install_anchors.sh``); without them those methods are reported n/a. The SINQ wheel installs a
``sitecustomize.py`` that patches transformers at every interpreter start unless ``SINQ_AUTO_PATCH=0``
(``bench_quality.py`` restarts itself with it set; :func:`apply_method` refuses to run SINQ in a patched process).
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import torch
from torch import nn

from optimum_splitquant import SplitQuantConfig, quantize_model, size_report
from optimum_splitquant.layers import eligible_layers, resolve_modules_to_not_convert

__all__ = [
    "FRONTIER_SPLITQUANT",
    "METHOD_SETS",
    "Applied",
    "DequantizingLinear",
    "Method",
    "all_methods",
    "anchor_methods",
    "apply_method",
    "expected_bits",
    "extra_methods",
    "for_budget_methods",
    "for_budget_names",
    "frontier_anchor_methods",
    "frontier_methods",
    "hqq_methods",
    "nf4_expected_bits",
    "nf4_methods",
    "quick_methods",
    "safetensors_bytes",
    "select_methods",
    "sinq_expected_bits",
    "sinq_methods",
    "splitquant_grid",
    "splitquant_method",
    "unsupported",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One quantization setting. ``family`` is the line it belongs to in the plot and the budget table."""

    name: str
    family: str
    kind: str  # "fp32" | "splitquant" | "quanto" | "split+quanto" | "hqq" | "sinq" | "nf4"
    bits: int | None = None
    num_clusters: int = 3
    group_size: int | None = None
    fit: str = "minmax"  # SplitQuantConfig.fit (SplitQuant kinds only)
    clustering: str = "tensor"  # SplitQuantConfig.clustering (SplitQuant kinds only)
    range_bits: int | None = None  # SplitQuantConfig.range_bits (SplitQuant kinds only)
    range_block: int = 8  # SplitQuantConfig.range_block (with range_bits)
    column_scales: bool = False  # SplitQuantConfig.column_scales (SplitQuant kinds only)

    @property
    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name.lower()).strip("-")


def all_methods() -> list[Method]:
    """FP32; plain min-max (k = 1) 2/3/4/8; quanto qint2/4/8; split + quanto 2/4/8; SplitQuant 2/3/4/8 and k = 4 at 2."""
    methods = [Method("FP32", "FP32", "fp32")]
    methods += [Method(f"plain INT{b} (k=1)", "plain min-max (k=1)", "splitquant", b, 1) for b in (2, 3, 4, 8)]
    methods += [Method(f"quanto qint{b}", "optimum-quanto", "quanto", b) for b in (2, 4, 8)]
    methods += [Method(f"split + quanto qint{b}", "paper: split + quanto", "split+quanto", b) for b in (2, 4, 8)]
    methods += [Method(f"SplitQuant INT{b} (k=3)", "SplitQuant (k=3)", "splitquant", b, 3) for b in (2, 3, 4, 8)]
    methods.append(Method("SplitQuant INT2 (k=4)", "SplitQuant (k=4)", "splitquant", 2, 4))
    return methods


def extra_methods() -> list[Method]:
    """Opt-in (``--methods``): SplitQuant and plain min-max with groups of 128 columns, quanto's granularity,
    and SplitQuant INT2 with groups of 64 (128 does not divide SmolLM2-135M's width of 576; 64 does)."""
    return (
        [Method(f"plain INT{b} g128 (k=1)", "plain min-max g128 (k=1)", "splitquant", b, 1, 128) for b in (2, 3, 4)]
        + [Method(f"SplitQuant INT{b} g128 (k=3)", "SplitQuant g128 (k=3)", "splitquant", b, 3, 128) for b in (2, 3)]
        + [Method("SplitQuant INT2 g64 (k=3)", "SplitQuant g64 (k=3)", "splitquant", 2, 3, 64)]
    )


# ---- the frontier set: edit these to change the grid ----------------------------------------------
#: Expected effective bits per weight a frontier config must land in, on every width of FRONTIER_WIDTHS.
FRONTIER_RANGE = (3.0, 6.5)
#: Hidden widths of the benchmark's models: SmolLM2-135M (576) and all-MiniLM-L6-v2 (384).
FRONTIER_WIDTHS = (576, 384)
HQQ_BITS = (2, 3, 4)
HQQ_GROUPS = (16, 32, 64, 128)
#: The SplitQuant product that ``frontier-full`` runs (filtered by FRONTIER_RANGE).
SPLITQUANT_BITS = (2, 3, 4, 5)
SPLITQUANT_CLUSTERS = (1, 2, 3, 4)
SPLITQUANT_GROUPS = (None, 32, 64, 128, 192)
SPLITQUANT_FITS = ("minmax", "mse")
#: The pruned SplitQuant grid that ``frontier`` runs: (bits, num_clusters, group_size), each with every
#: fit of SPLITQUANT_FITS (23 x 2 = 46 configs). Comments: expected bits on 576 / 384-wide layers. The
#: full product in range has 43 triples; this keeps a few candidates just under each budget of
#: output.BUDGETS and drops near-duplicates (k=3 with groups, g32 with k>=2, g192 where g128/None is close).
#: g128 does not divide SmolLM2's 576: those rows are n/a there (g64 and g192 do divide it).
FRONTIER_SPLITQUANT: tuple[tuple[int, int, int | None], ...] = (
    (2, 1, 32),  # 3.00
    (3, 1, None),  # 3.06 / 3.08
    (2, 2, None),  # 3.11 / 3.17
    (3, 1, 128),  # 3.25 (MiniLM only)
    (3, 1, 64),  # 3.50
    (3, 1, 32),  # 4.00
    (2, 2, 64),  # 4.00
    (4, 1, None),  # 4.06 / 4.08
    (3, 2, None),  # 4.11 / 4.17
    (2, 3, None),  # 4.17 / 4.25
    (2, 4, None),  # 4.22 / 4.33
    (4, 1, 192),  # 4.17
    (4, 1, 128),  # 4.25 (MiniLM only)
    (3, 2, 192),  # 4.33
    (4, 1, 64),  # 4.50
    (2, 3, 192),  # 4.50
    (4, 1, 32),  # 5.00
    (3, 2, 64),  # 5.00
    (4, 2, None),  # 5.11 / 5.17
    (3, 4, None),  # 5.22 / 5.33
    (5, 1, 64),  # 5.50
    (4, 2, 64),  # 6.00
    (5, 1, 32),  # 6.00
)


#: Triples also run with one k-means per output row (``clustering="channel"``, fit="mse" only).
FRONTIER_PER_ROW: tuple[tuple[int, int, int | None], ...] = (
    (2, 4, None),  # 4.22 / 4.33
    (2, 3, 192),  # 4.50
)


#: Triples also run with coded ranges (``range_bits=CODED_RANGE_BITS``, fit="mse" only); comments: bits/weight.
FRONTIER_CODED: tuple[tuple[int, int, int | None], ...] = (
    (3, 1, 32),  # 3.50
    (2, 2, 64),  # 3.50
    (3, 1, 16),  # 4.00
    (4, 1, 64),  # 4.25
    (3, 2, 128),  # 4.25
    (2, 4, 192),  # 4.33
    (4, 1, 32),  # 4.50
    (3, 2, 64),  # 4.50
    (4, 1, 16),  # 5.00
    (3, 2, 32),  # 5.00
    (5, 1, 16),  # 6.00
    (4, 2, 32),  # 6.00
)
CODED_RANGE_BITS = 6


def expected_bits(
    bits: int, num_clusters: int, group_size: int | None, width: int, range_bits: int | None = None
) -> float:
    """SplitQuant's stored bits per weight on a layer ``width`` inputs wide: codes, cluster ids, and a float16
    scale and offset per (row or group, cluster), or with ``range_bits`` two codes per (row or group, cluster)
    and two float16 steps per 8 of them."""
    per_range = 16 if range_bits is None else range_bits + 16 / 8
    return bits + math.ceil(math.log2(num_clusters)) + 2 * num_clusters * per_range / (group_size or width)


def hqq_expected_bits(nbits: int, group_size: int) -> float:
    """HQQ's nominal bits per weight: ``nbits`` codes and a float16 scale and zero per group."""
    return nbits + 32 / group_size


def _in_range(values: list[float], bounds: tuple[float, float] = FRONTIER_RANGE) -> bool:
    return all(bounds[0] - 1e-9 <= v <= bounds[1] + 1e-9 for v in values)


def splitquant_grid(
    bits: tuple[int, ...] = SPLITQUANT_BITS,
    clusters: tuple[int, ...] = SPLITQUANT_CLUSTERS,
    groups: tuple[int | None, ...] = SPLITQUANT_GROUPS,
) -> list[tuple[int, int, int | None]]:
    """Every (bits, num_clusters, group_size) whose expected bits are in FRONTIER_RANGE on every FRONTIER_WIDTHS."""
    return [
        (b, k, g)
        for b, k, g in product(bits, clusters, groups)
        if _in_range([expected_bits(b, k, g, w) for w in FRONTIER_WIDTHS])
    ]


def splitquant_method(
    bits: int,
    num_clusters: int,
    group_size: int | None,
    fit: str,
    clustering: str = "tensor",
    range_bits: int | None = None,
    range_block: int = 8,
    column_scales: bool = False,
) -> Method:
    """A frontier SplitQuant method: ``plain INT4 k=1 g64 mse``, ``SplitQuant INT2 k=4 minmax``,
    ``SplitQuant INT2 k=4 mse per-row`` (``clustering="channel"``: one k-means per output row),
    ``plain INT4 k=1 g64 mse r6`` (``range_bits=6``: coded ranges), ``plain INT4 k=1 g64 mse r6b16 cs``
    (16 lines per coded block, column scales), ..."""
    plain = num_clusters == 1
    name = f"{'plain' if plain else 'SplitQuant'} INT{bits} k={num_clusters}{f' g{group_size}' if group_size else ''} {fit}"
    family = f"plain {fit} (k=1)" if plain else f"SplitQuant {fit} (k>=2)"
    if clustering == "channel":
        name, family = f"{name} per-row", f"SplitQuant {fit} per-row clusters (k>=2)"
    if range_bits is not None:
        name, family = f"{name} r{range_bits}", family.replace(f"{fit} ", f"{fit} coded ranges ")
        if range_block != 8:
            name += f"b{range_block}"
    if column_scales:
        name, family = f"{name} cs", family.replace(f"{fit} ", f"{fit} column scales ")
    return Method(
        name, family, "splitquant", bits, num_clusters, group_size, fit, clustering, range_bits, range_block,
        column_scales,
    )  # fmt: skip


def config_method(c: SplitQuantConfig) -> Method:
    """The benchmark method of a SplitQuant configuration."""
    return splitquant_method(
        c.bits, c.num_clusters, c.group_size, c.fit, c.clustering, c.range_bits, c.range_block, c.column_scales
    )


def for_budget_names(budgets: tuple[float, ...] | list[float]) -> dict[str, str]:
    """The method name of ``SplitQuantConfig.for_budget(b)`` per budget (key ``f"{b:g}"``); budgets below the
    smallest configuration are left out."""
    names = {}
    for budget in budgets:
        try:
            c = SplitQuantConfig.for_budget(budget)
        except ValueError:
            continue
        names[f"{budget:g}"] = config_method(c).name
    return names


def hqq_methods() -> list[Method]:
    """HQQ (calibration-free, half-quadratic zero/scale fit) for HQQ_BITS x HQQ_GROUPS within FRONTIER_RANGE."""
    configs = [(b, g) for b, g in product(HQQ_BITS, HQQ_GROUPS) if _in_range([hqq_expected_bits(b, g)])]
    configs.sort(key=lambda c: (hqq_expected_bits(*c), c[0]))
    return [Method(f"HQQ {b}-bit g{g}", "HQQ", "hqq", b, 1, g) for b, g in configs]


def frontier_methods(full: bool = False) -> list[Method]:
    """FP32, quanto qint4, the HQQ grid and the SplitQuant grid (FRONTIER_SPLITQUANT, or with ``full`` every
    triple of :func:`splitquant_grid`), each SplitQuant triple with every fit, ordered by expected bits."""
    triples = splitquant_grid() if full else list(FRONTIER_SPLITQUANT)
    triples.sort(key=lambda t: (expected_bits(*t, FRONTIER_WIDTHS[0]), t))
    methods = [Method("FP32", "FP32", "fp32"), Method("quanto qint4", "optimum-quanto", "quanto", 4)]
    methods += hqq_methods()
    methods += [splitquant_method(*t, fit) for t in triples for fit in SPLITQUANT_FITS]
    methods += [splitquant_method(*t, "mse", "channel") for t in FRONTIER_PER_ROW]
    methods += [splitquant_method(*t, "mse", range_bits=CODED_RANGE_BITS) for t in FRONTIER_CODED]
    return methods


# ---- calibration-free anchors beyond HQQ: SINQ and bitsandbytes NF4 (optional libraries) -----------
#: SINQ code bits and group sizes (configs kept where :func:`sinq_expected_bits` is in FRONTIER_RANGE).
SINQ_BITS = (3, 4, 5, 6)
SINQ_GROUPS = (32, 64, 128)
#: bitsandbytes NF4 block sizes (weights per absmax).
NF4_BLOCKS = (32, 64, 128)
#: The library each anchor kind imports, and the ``pip install`` that brings it.
ANCHOR_LIBRARIES = {"sinq": ("sinq", "sinq==0.2.0"), "nf4": ("bitsandbytes", "bitsandbytes>=0.50")}
# SINQ packs codes along the group axis: weights per packed word and the word's bits (3, 5, 6 bits: int32).
_SINQ_PACK = {2: (4, 8), 3: (10, 32), 4: (2, 8), 5: (6, 32), 6: (5, 32), 8: (1, 8)}


def sinq_expected_bits(nbits: int, group_size: int, rows: int, cols: int) -> float:
    """SINQ's (``method="sinq"``) stored bits per weight on a ``rows x cols`` weight whose groups of
    ``group_size`` consecutive weights fit in rows: packed codes (3, 5 and 6 bits in int32 words, the group count
    padded to whole words), an 8-bit scale code and an 8-bit zero code per group, a float16 minimum and step per
    32 scale codes and one pair for all zero codes (its ``rtn8``), and one float16 scale per input column."""
    groups = rows * cols // group_size
    per_word, word_bits = _SINQ_PACK[nbits]
    codes = word_bits * group_size * math.ceil(groups / per_word)
    side = 8 * groups + 2 * 16 * math.ceil(groups / 32) + 8 * groups + 2 * 16 + 16 * cols
    return (codes + side) / (rows * cols)


def nf4_expected_bits(blocksize: int) -> float:
    """bitsandbytes NF4 with double quantization: 4-bit codes, an 8-bit absmax code per block, a float32 absmax
    per 256 blocks (the per-layer float32 offset and the fixed code tables are left out)."""
    return 4 + 8 / blocksize + 32 / (blocksize * 256)


def sinq_methods() -> list[Method]:
    """SINQ (Sinkhorn-normalized row and column scales, 8-bit auxiliary scales) for SINQ_BITS x SINQ_GROUPS whose
    bits on FRONTIER_WIDTHS-square layers are in FRONTIER_RANGE."""
    configs = [
        (b, g)
        for b, g in product(SINQ_BITS, SINQ_GROUPS)
        if _in_range([sinq_expected_bits(b, g, w, w) for w in FRONTIER_WIDTHS])
    ]
    configs.sort(key=lambda c: (sinq_expected_bits(*c, 384, 384), c[0]))
    return [Method(f"SINQ {b}-bit g{g}", "SINQ", "sinq", b, 1, g) for b, g in configs]


def nf4_methods() -> list[Method]:
    """bitsandbytes NF4 (normal-quantile 4-bit table, double-quantized absmax) for each of NF4_BLOCKS."""
    return [Method(f"NF4 b{b}", "bitsandbytes NF4", "nf4", 4, 1, b) for b in sorted(NF4_BLOCKS, reverse=True)]


#: The (bits, group_size, range_bits, range_block) candidates measured for SplitQuantConfig.for_budget's table
#: (one cluster, fit="mse", column scales; benchmarks/results/budget_table.md); comments: bits on layers of 512.
BUDGET_CANDIDATES: tuple[tuple[int, int, int, int], ...] = (
    (3, 32, 6, 16),  # 3.47
    (3, 32, 7, 32),  # 3.50
    (3, 16, 6, 16),  # 3.91
    (3, 16, 7, 32),  # 3.97
    (4, 64, 6, 16),  # 4.25
    (4, 64, 6, 32),  # 4.23
    (4, 32, 6, 16),  # 4.47
    (4, 32, 7, 32),  # 4.50
    (4, 32, 7, 16),  # 4.53
    (4, 32, 8, 16),  # 4.59
    (4, 16, 6, 32),  # 4.84
    (4, 16, 6, 16),  # 4.91
    (4, 16, 7, 32),  # 4.97
    (5, 64, 6, 16),  # 5.25
    (5, 32, 6, 16),  # 5.47
    (5, 32, 7, 16),  # 5.53
    (5, 32, 8, 16),  # 5.59
    (5, 16, 6, 32),  # 5.84
    (5, 16, 6, 16),  # 5.91
    (5, 16, 7, 32),  # 5.97
)


def budget_candidate_methods() -> list[Method]:
    """The configurations weighed for ``for_budget``'s table (:data:`BUDGET_CANDIDATES`)."""
    return [
        splitquant_method(b, 1, g, "mse", range_bits=r, range_block=block, column_scales=True)
        for b, g, r, block in BUDGET_CANDIDATES
    ]


def anchor_methods() -> list[Method]:
    """The anchors that need optional libraries: SINQ and bitsandbytes NF4, ordered by bits."""
    return sinq_methods() + nf4_methods()


def for_budget_methods(budgets: tuple[float, ...] | list[float] | None = None) -> list[Method]:
    """``SplitQuantConfig.for_budget(b)``'s configuration for every budget (default: output.BUDGETS), once each."""
    from benchmarks.output import BUDGETS

    chosen: dict[str, Method] = {}
    for budget in budgets or BUDGETS:
        try:
            c = SplitQuantConfig.for_budget(budget)
        except ValueError:
            continue
        m = config_method(c)
        chosen.setdefault(m.name, m)
    return list(chosen.values())


def frontier_anchor_methods() -> list[Method]:
    """FP32, ``for_budget``'s configurations, and every calibration-free anchor: HQQ, SINQ, bitsandbytes NF4."""
    return [Method("FP32", "FP32", "fp32"), *for_budget_methods(), *hqq_methods(), *anchor_methods()]


def quick_methods() -> list[Method]:
    """One method of each kind, for tests."""
    wanted = {
        "FP32",
        "plain INT2 (k=1)",
        "quanto qint4",
        "split + quanto qint4",
        "SplitQuant INT2 (k=3)",
        "HQQ 4-bit g64",
    }
    return [m for m in all_methods() + hqq_methods() if m.name in wanted]


METHOD_SETS: dict[str, Callable[[], list[Method]]] = {
    "default": all_methods,
    "extra": extra_methods,
    "frontier": frontier_methods,
    "frontier-full": lambda: frontier_methods(full=True),
    "anchors": anchor_methods,
    "frontier-anchors": frontier_anchor_methods,
    "budget-candidates": budget_candidate_methods,
    "quick": quick_methods,
}


def _universe() -> dict[str, Method]:
    out: dict[str, Method] = {}
    for make in METHOD_SETS.values():
        for m in make():
            if out.setdefault(m.name, m) != m:
                raise AssertionError(f"two different methods named {m.name!r}")
    return out


def select_methods(spec: str) -> list[Method]:
    """Methods named by ``spec``: comma-separated set names (METHOD_SETS), method names or glob patterns
    (``"FP32,HQQ*,*g64 mse"``), in order, without duplicates. Raises ValueError on a name matching nothing."""
    universe = _universe()
    chosen: dict[str, Method] = {}
    unknown = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item in METHOD_SETS:
            found = METHOD_SETS[item]()
        elif item in universe:
            found = [universe[item]]
        else:
            found = [m for name, m in universe.items() if any(c in item for c in "*?[") and fnmatch.fnmatch(name, item)]
        if not found:
            unknown.append(item)
        for m in found:
            chosen.setdefault(m.name, m)
    if unknown:
        raise ValueError(
            f"unknown method(s) {unknown}; choose set names {list(METHOD_SETS)}, glob patterns or names from "
            f"{list(universe)}"
        )
    return list(chosen.values())


@dataclass
class Applied:
    """A quantized model and what it cost."""

    model: nn.Module
    effective_bits: float
    quantize_s: float
    size_bytes: int
    size_kind: str  # "safetensors" or "in memory"
    nominal_bits: float | None = None  # what the method's formula says, where it differs from storage (HQQ)


def _kept(model: nn.Module) -> list[str]:
    return resolve_modules_to_not_convert(model, None)


def _quantized_layers(model: nn.Module) -> dict[str, nn.Module]:
    kept = set(_kept(model))
    return {n: m for n, m in eligible_layers(model).items() if n not in kept}


# HQQ packs its codes along the group axis: 2-bit four groups to a byte, 4-bit two (3-bit pads to 10 per int32).
_HQQ_PACK = {2: 4, 4: 2}


def unsupported(method: Method, model: nn.Module) -> str | None:
    """Why ``method`` cannot quantize ``model``'s quantized layers (reported n/a for the task), else None.

    SplitQuant needs ``group_size`` to divide every input width (it raises ValueError otherwise). HQQ
    groups consecutive weights of the row-major flattened matrix (``axis=1``), so it only needs the group
    size to be a multiple of 8 dividing ``out * in`` with a group count its bit packing can split; a group
    then may straddle two rows when it does not divide the width. HQQLinear only replaces ``nn.Linear``.
    SINQ and NF4 also replace only ``nn.Linear`` and need their library installed; SINQ needs whole groups of 32
    scale codes per layer (its 8-bit scale coding), NF4 blocks run over the flattened weight.
    """
    if method.kind not in ("splitquant", "hqq", *ANCHOR_LIBRARIES):
        return None
    missing = _missing_library(method.kind)
    if missing:
        return missing
    for name, layer in _quantized_layers(model).items():
        if method.kind != "splitquant" and type(layer) is not nn.Linear:
            return f"{method.kind} only quantizes nn.Linear here; {name} is a {type(layer).__name__}"
        if method.group_size is None or method.kind == "nf4":  # NF4 blocks run over the flattened weight
            continue
        if method.kind == "sinq":
            if layer.weight.numel() % (32 * method.group_size):
                return f"SINQ group_size={method.group_size} does not split {name} into groups of 32 scales"
            continue
        g = method.group_size
        if method.kind == "splitquant":
            width = getattr(layer, "in_features", None)  # Linear; other kinds are left to SplitQuant's own check
            if width is not None and width % g:
                return f"group_size={g} does not divide the input width {width} of {name}"
        else:
            numel = layer.weight.numel()
            if g % 8 or numel % g or (numel // g) % _HQQ_PACK.get(method.bits, 1):
                return f"HQQ group_size={g} does not split {name} ({tuple(layer.weight.shape)}) into packable groups"
    return None


def _tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores; quanto's quantized tensors are counted through their inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def _model_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += _tensor_bytes(t)
    return total


def _quanto_bits(model: nn.Module, weights: int) -> float:
    from optimum.quanto import QModuleMixin

    stored = sum(_tensor_bytes(m.weight) for m in model.modules() if isinstance(m, QModuleMixin))
    return 8 * stored / weights


def safetensors_bytes(model: nn.Module, workdir: Path, slug: str) -> int:
    """Size of ``model.save_pretrained`` output (saved to a scratch folder, then removed)."""
    folder = workdir / slug
    model.save_pretrained(folder)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    shutil.rmtree(folder, ignore_errors=True)
    return size


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """HQQ prints its (deprecation) notices with ``print``; keep them out of the benchmark's log."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _hqq_group_bytes(layer: nn.Module) -> int:
    """The scale and zero of every group of an HQQLinear (kept in ``layer.meta``, not registered tensors)."""
    meta = layer.meta
    if "scale" not in meta or "zero" not in meta or meta.get("quant_scale") or meta.get("quant_zero"):
        raise RuntimeError(f"unexpected HQQ meta layout {sorted(meta)}: cannot count its stored bytes")
    return _tensor_bytes(meta["scale"]) + _tensor_bytes(meta["zero"])


def _hqq_bias_bytes(layer: nn.Module) -> int:
    """HQQLinear keeps the bias as a plain tensor attribute (not a registered parameter)."""
    bias = layer.bias
    return _tensor_bytes(bias) if isinstance(bias, torch.Tensor) and not isinstance(bias, nn.Parameter) else 0


def _apply_hqq(method: Method, model: nn.Module) -> tuple[float, float, int]:
    """Replace every quantized ``nn.Linear`` by HQQ's ``HQQLinear``; returns (seconds, bits/weight, model bytes).

    HQQ is calibration-free. Its defaults (``BaseQuantizeConfig``: axis=1, proximal zero-point
    optimization) are kept; the compute dtype is float32 on CPU, so HQQ would keep the scale and zero of
    each group in float32: they are cast to float16 right after quantizing, which is how HQQ stores them
    in its usual float16 setting, and the model is measured with those float16 values (``forward``
    computes ``(W_q - zero) * scale`` in float32 from them). ``HQQLinear.forward`` (PyTorch backend)
    works on CPU with float32 ``(batch, seq, in)`` inputs: it dequantizes the layer on every call, so its
    forward time is that of HQQ's reference path, not of a fused kernel.

    Bits per weight are counted from what the layers store (not from the formula): the packed codes
    ``W_q`` plus the float16 scale and zero of every group. For 2 and 4 bits that is exactly
    ``nbits + 32 / group_size``; HQQ packs 3-bit codes ten to an int32 (3.2 bits each) and pads the
    group count to a multiple of 10, so 3-bit rows cost a little more than the nominal formula.
    """
    with _quiet():
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        config = BaseQuantizeConfig(nbits=method.bits, group_size=method.group_size)
        targets = list(_quantized_layers(model).items())
        weights = sum(m.weight.numel() for _, m in targets)
        start = time.perf_counter()
        layers = []
        for name, linear in targets:
            layer = HQQLinear(linear, config, compute_dtype=torch.float32, device="cpu")
            for key in ("scale", "zero"):
                layer.meta[key] = layer.meta[key].to(torch.float16)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, layer)
            layers.append(layer)
        seconds = time.perf_counter() - start
    code_bytes = sum(_tensor_bytes(layer.W_q) for layer in layers)
    group_bytes = sum(_hqq_group_bytes(layer) for layer in layers)
    bits = 8 * (code_bytes + group_bytes) / weights
    # In memory: the registered parameters and buffers (W_q included) plus each layer's scales, zeros and bias.
    return seconds, bits, _model_bytes(model) + group_bytes + sum(_hqq_bias_bytes(layer) for layer in layers)


class DequantizingLinear(nn.Module):
    """A Linear whose weight is kept as another library's stored tensors and dequantized on every forward
    (the reference path of SINQ's and bitsandbytes' own PyTorch fallbacks): ``stored`` holds those tensors,
    ``dequantize`` rebuilds the float weight from them."""

    def __init__(
        self, stored: dict[str, torch.Tensor], dequantize: Callable[[], torch.Tensor], bias: torch.Tensor | None
    ) -> None:
        super().__init__()
        for name, tensor in stored.items():
            self.register_buffer(name, tensor)
        self._dequantize = dequantize
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self._dequantize().to(x.dtype), self.bias)


def _replace(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, layer)


def _sinq_quantize(weight: torch.Tensor, nbits: int, group_size: int) -> tuple[dict[str, torch.Tensor], Callable]:
    """SINQ-quantize one weight (``method="sinq"``: 8-bit auxiliary scales and zeros, a column scale); its float
    side tensors are rounded to float16 (how SINQ stores them for float16 models) before anything is counted or
    dequantized. Returns the stored tensors and a function rebuilding the float32 weight from them."""
    if os.environ.get("SINQ_PTH_LOADED") == "1":
        raise RuntimeError(
            "SINQ's sitecustomize.py patched transformers at interpreter start: run with SINQ_AUTO_PATCH=0 "
            "(bench_quality.py sets it and restarts itself)"
        )
    with _quiet():  # sinq prints a notice about its optional GPU backend on import
        from sinq.quantizer import Quantizer
        from sinq.sinqlinear import sinq_base_quant_config

        params = sinq_base_quant_config(nbits, group_size, method="sinq")["weight_quant_params"]
        w_q, meta = Quantizer.quantize(
            weight.detach().float(), None, device="cpu", compute_dtype=torch.float32, **params
        )
    if meta.get("awq_scale") is not None or not (isinstance(meta["scale"], tuple) and isinstance(meta["zero"], tuple)):
        raise RuntimeError(f"unexpected SINQ meta layout {sorted(meta)}: cannot count its stored bytes")
    half = lambda t: t.to(torch.float16)  # noqa: E731
    (s_q, s_step, s_min, s_shape), (z_q, z_step, z_min, z_shape) = meta["scale"], meta["zero"]
    stored = {
        "w_q": w_q,
        "scale_q": s_q,
        "scale_step": half(s_step),
        "scale_min": half(s_min),
        "zero_q": z_q,
        "zero_step": half(z_step),
        "zero_min": half(z_min),
        "column_scale": half(meta["scale2"]),
    }

    def dequantize() -> torch.Tensor:
        m = dict(meta)
        m["scale"] = (stored["scale_q"], stored["scale_step"].float(), stored["scale_min"].float(), s_shape)
        m["zero"] = (stored["zero_q"], stored["zero_step"].float(), stored["zero_min"].float(), z_shape)
        m["scale2"] = stored["column_scale"].float()
        return Quantizer.dequantize(stored["w_q"], m)

    return stored, dequantize


def _nf4_quantize(weight: torch.Tensor, blocksize: int) -> tuple[dict[str, torch.Tensor], Callable]:
    """bitsandbytes NF4 with double quantization (``compress_statistics=True``) of one weight. Returns the stored
    per-layer tensors (codes, absmax codes, the float32 absmax of every 256 blocks, the float32 offset) and a
    function rebuilding the float32 weight. Left out of ``stored``: the two fixed code tables (16 and 256 float32
    values, the same for every layer; bitsandbytes' checkpoints repeat them per layer, 1,088 bytes)."""
    import bitsandbytes.functional as bnb_f

    codes, state = bnb_f.quantize_4bit(
        weight.detach().float(), blocksize=blocksize, quant_type="nf4", compress_statistics=True
    )
    if not state.nested or state.state2 is None:
        raise RuntimeError("bitsandbytes returned no nested statistics for compress_statistics=True")
    stored = {
        "codes": codes,
        "absmax_q": state.absmax,
        "absmax_absmax": state.state2.absmax,
        "absmax_offset": state.offset.reshape(1),
    }
    return stored, lambda: bnb_f.dequantize_4bit(stored["codes"], state)


def _apply_anchor(method: Method, model: nn.Module) -> tuple[float, float, int]:
    """Replace every quantized ``nn.Linear`` by a :class:`DequantizingLinear` holding SINQ's or bitsandbytes
    NF4's stored tensors; returns (seconds, bits/weight, model bytes). Bits count every per-layer stored tensor."""
    quantize = {
        "sinq": lambda w: _sinq_quantize(w, method.bits, method.group_size),
        "nf4": lambda w: _nf4_quantize(w, method.group_size),
    }[method.kind]
    targets = list(_quantized_layers(model).items())
    weights = sum(m.weight.numel() for _, m in targets)
    stored_bytes = 0
    start = time.perf_counter()
    for name, linear in targets:
        stored, dequantize = quantize(linear.weight)
        stored_bytes += sum(_tensor_bytes(t) for t in stored.values())
        _replace(model, name, DequantizingLinear(stored, dequantize, linear.bias))
    seconds = time.perf_counter() - start
    return seconds, 8 * stored_bytes / weights, _model_bytes(model)


def _missing_library(kind: str) -> str | None:
    """Why an anchor kind's optional library cannot be imported (None: it can, or the kind needs none)."""
    if kind not in ANCHOR_LIBRARIES:
        return None
    module, requirement = ANCHOR_LIBRARIES[kind]
    try:
        with _quiet():
            __import__(module)
    except ImportError as exc:
        return f"{module} is not installed ({exc}): pip install '{requirement}' (see scripts/install_anchors.sh)"
    return None


def apply_method(method: Method, load: Callable[[], nn.Module], workdir: Path) -> Applied:
    """Load a fresh float model with ``load`` and quantize it by ``method`` (timing the quantization only)."""
    model = load()
    if method.kind == "fp32":
        return Applied(model, 32.0, 0.0, safetensors_bytes(model, workdir, method.slug), "safetensors")
    if method.kind == "hqq":
        seconds, bits, size = _apply_hqq(method, model)
        return Applied(model, bits, seconds, size, "in memory", hqq_expected_bits(method.bits, method.group_size))
    if method.kind in ANCHOR_LIBRARIES:
        seconds, bits, size = _apply_anchor(method, model)
        nominal = nf4_expected_bits(method.group_size) if method.kind == "nf4" else None
        return Applied(model, bits, seconds, size, "in memory", nominal)
    kept = _kept(model)
    weights = sum(m.weight.numel() for m in _quantized_layers(model).values())
    start = time.perf_counter()
    if method.kind == "splitquant":
        config = SplitQuantConfig(
            bits=method.bits,
            num_clusters=method.num_clusters,
            group_size=method.group_size,
            fit=method.fit,
            clustering=method.clustering,
            range_bits=method.range_bits,
            range_block=method.range_block,
            column_scales=method.column_scales,
        )
        quantize_model(model, config)
        seconds = time.perf_counter() - start
        report = size_report(model)
        return Applied(
            model, report.effective_bits, seconds, safetensors_bytes(model, workdir, method.slug), "safetensors"
        )
    from optimum.quanto import freeze, qint2, qint4, qint8, quantize

    qtype = {2: qint2, 4: qint4, 8: qint8}[method.bits]
    if method.kind == "split+quanto":
        from optimum_splitquant.edge.split import split_model

        split_model(model, num_clusters=method.num_clusters)
    elif method.kind != "quanto":
        raise ValueError(f"unknown method kind {method.kind!r}")
    quantize(model, weights=qtype, exclude=kept or None)
    freeze(model)
    seconds = time.perf_counter() - start
    return Applied(model, _quanto_bits(model, weights), seconds, _model_bytes(model), "in memory")
