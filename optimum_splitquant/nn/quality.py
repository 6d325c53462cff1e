"""How far a quantized weight lies from the float weight it was quantized from.

:class:`QuantizationError` is what :meth:`SplitQuantModule.quantize_ <.compact.SplitQuantModule.quantize_>`
records on the layer (attribute ``quantization_error``; ``None`` for a layer read from a checkpoint,
never saved); :func:`measure_error` computes it without a full-size float copy of the layer.
:mod:`optimum_splitquant.report` sums it over a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..core.quantize import QuantizedWeight
from ..core.spec import QuantSpec
from .compute import dequantize_compact

__all__ = ["QuantizationError", "measure_error"]

# Rows of the error measurement hold about this many weights: its temporaries (a dequantized chunk and
# its difference to the float chunk) stay small beside the layer's own float weight.
_ERROR_CHUNK_WEIGHTS = 1 << 20


@dataclass(frozen=True)
class QuantizationError:
    """Reconstruction error of one quantized weight, measured when it was quantized.

    Attributes:
        weights: number of weights.
        signal: ``||W||^2``, the squared norm of the float weight.
        noise: ``||W - W_hat||^2``, the squared norm of its difference to the dequantized weight.
    """

    weights: int
    signal: float
    noise: float

    @property
    def relative_noise(self) -> float:
        """``noise / signal`` (0 for an exact reconstruction, a zero weight included)."""
        if self.noise == 0:
            return 0.0
        return self.noise / self.signal if self.signal > 0 else math.inf

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio, ``10 log10(signal / noise)`` dB (``inf`` when exact)."""
        ratio = self.relative_noise
        if ratio == 0:
            return math.inf
        return -10 * math.log10(ratio) if math.isfinite(ratio) else -math.inf


def measure_error(rows: torch.Tensor, q: QuantizedWeight, spec: QuantSpec) -> QuantizationError:
    """:class:`QuantizationError` of float ``rows`` ``(out, in)`` against their quantized form ``q``.

    Dequantized a chunk of rows at a time (:data:`_ERROR_CHUNK_WEIGHTS`): no full-size float copy of
    the layer beside the one the caller holds, and no difference tensor (``torch.dist``). Norms per
    chunk in float32, their squares summed in float64.
    """
    out_f, in_f = rows.shape
    signal = noise = 0.0
    step = max(1, _ERROR_CHUNK_WEIGHTS // max(in_f, 1))
    with torch.no_grad():
        for r0 in range(0, out_f if in_f else 0, step):
            w = rows[r0 : r0 + step].float()
            rebuilt = dequantize_compact(
                q.packed[r0 : r0 + step],
                q.scale[r0 : r0 + step],
                q.offset[r0 : r0 + step],
                in_f,
                spec,
                column_scale=q.column_scale,
            )
            signal += float(torch.linalg.vector_norm(w)) ** 2
            noise += float(torch.dist(rebuilt, w)) ** 2
    return QuantizationError(out_f * in_f, signal, noise)
