"""The quantization methods compared by the quality benchmark, and honest size accounting for each.

Every method quantizes the same layers: the eligible Linear layers minus what SplitQuant's default
head policy keeps in float (task head, tied output embeddings). Effective bits per weight count
every stored tensor of the quantized layers (codes, cluster ids, scales, offsets / shifts) over
the number of original weights.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from optimum_splitquant import SplitQuantConfig, quantize_model, size_report
from optimum_splitquant.layers import eligible_layers, resolve_modules_to_not_convert

__all__ = ["Applied", "Method", "all_methods", "apply_method", "extra_methods", "quick_methods", "safetensors_bytes"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Method:
    """One quantization setting. ``family`` is the line it belongs to in the plot."""

    name: str
    family: str
    kind: str  # "fp32" | "splitquant" | "quanto" | "split+quanto"
    bits: int | None = None
    num_clusters: int = 3
    group_size: int | None = None

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


def quick_methods() -> list[Method]:
    """One method of each kind, for tests."""
    wanted = {"FP32", "plain INT2 (k=1)", "quanto qint4", "split + quanto qint4", "SplitQuant INT2 (k=3)"}
    return [m for m in all_methods() if m.name in wanted]


@dataclass
class Applied:
    """A quantized model and what it cost."""

    model: nn.Module
    effective_bits: float
    quantize_s: float
    size_bytes: int
    size_kind: str  # "safetensors" or "in memory"


def _kept(model: nn.Module) -> list[str]:
    return resolve_modules_to_not_convert(model, None)


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


def apply_method(method: Method, load: Callable[[], nn.Module], workdir: Path) -> Applied:
    """Load a fresh float model with ``load`` and quantize it by ``method`` (timing the quantization only)."""
    model = load()
    if method.kind == "fp32":
        return Applied(model, 32.0, 0.0, safetensors_bytes(model, workdir, method.slug), "safetensors")
    kept = _kept(model)
    weights = sum(m.weight.numel() for n, m in eligible_layers(model).items() if n not in set(kept))
    start = time.perf_counter()
    if method.kind == "splitquant":
        config = SplitQuantConfig(bits=method.bits, num_clusters=method.num_clusters, group_size=method.group_size)
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
