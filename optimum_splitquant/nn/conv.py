"""``SplitQuantConv2d``: an ``nn.Conv2d`` stored in SplitQuant's compact form.

Each output kernel is one row of ``K = in_channels / groups * kh * kw`` weights, flattened in
``weight.reshape(out_channels, -1)`` order, and stores the tensors of
:mod:`optimum_splitquant.checkpoint.format` with ``rows = out_channels`` and ``width = K``
(``in_features = K``, ``out_features = out_channels``). So ``clustering="channel"`` clusters each
output kernel on its own (the paper's choice for Conv2d) and ``"tensor"`` the whole weight.

``stride``, ``padding``, ``dilation``, ``groups`` and ``padding_mode`` are not stored: they come
from the model's config, which rebuilds the layer. The forward pass dequantizes the kernel (on the
path :meth:`~.compact.SplitQuantModule.select_compute_` chose, or from the weight cache) and runs one
``F.conv2d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..core.spec import QuantSpec
from .compact import SplitQuantModule
from .geometry import conv2d_settings

__all__ = ["SplitQuantConv2d"]

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class SplitQuantConv2d(SplitQuantModule):
    """``nn.Conv2d`` whose kernels are split into clusters and quantized per cluster (one convolution)."""

    source = "conv2d"
    _weight_noun = "kernel"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        spec: QuantSpec,
        float_weight: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if groups < 1 or in_channels % groups or out_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels} and out_channels={out_channels}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"unsupported padding_mode {padding_mode!r}")
        kernel_size = _pair(kernel_size)
        width = in_channels // groups * kernel_size[0] * kernel_size[1]
        super().__init__(width, out_channels, bias, spec=spec, device=device, dtype=dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        if float_weight:
            self._add_float_placeholder(device, dtype)
        self.select_compute_()

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """Shape of the float weight: ``(out_channels, in_channels / groups, kh, kw)``."""
        return self.float_shape

    @classmethod
    def from_float(cls, module: nn.Conv2d, spec: QuantSpec, *, ids: torch.Tensor | None = None) -> SplitQuantConv2d:
        """Quantize a float ``nn.Conv2d``; ``ids`` (shape ``(out_channels, K)``) overrides the clustering."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(module).__name__}")
        weight = module.weight.detach()
        layer = cls(
            **conv2d_settings(module), bias=module.bias is not None, spec=spec, device=weight.device, dtype=weight.dtype
        )
        layer._copy_bias(module)
        layer.quantize_(weight, ids=ids)
        return layer

    def dequantize_kernel(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float kernel this layer convolves with."""
        return self.view.from_rows(self.dequantize_weight(dtype), self.float_shape)

    def _forward_packed(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.dequantize_kernel(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding(), mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    _forward_cached = _forward_packed  # dequantize_weight() reads the cache when one is kept

    def _reversed_padding(self) -> list[int]:
        """``F.pad`` amounts (left, right, top, bottom), as ``nn.Conv2d`` computes them."""
        if self.padding == "valid":
            return [0, 0, 0, 0]
        if self.padding == "same":
            pads = []
            for d, k in zip(reversed(self.dilation), reversed(self.kernel_size), strict=True):
                total = d * (k - 1)
                pads += [total // 2, total - total // 2]
            return pads
        ph, pw = self.padding
        return [pw, pw, ph, ph]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"{self._settings_repr()}"
        )
