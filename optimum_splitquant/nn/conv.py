"""``SplitQuantConv2d``: a 2-D convolution stored in SplitQuant's compact form.

A convolution is a linear layer over unfolded patches: each output channel's kernel
``weight[o]`` of shape ``(in_channels / groups, kh, kw)`` is one row of length
``K = in_channels / groups * kh * kw``. The kernel is quantized exactly like a
:class:`~optimum_splitquant.nn.SplitQuantLinear` weight of shape ``(out_channels, K)`` (flattened
in ``weight.reshape(out_channels, -1)`` order), so ``clustering="channel"`` clusters each output
kernel on its own (the paper's choice for Conv2d) and ``"tensor"`` clusters the whole weight.

Stored tensors (names as in ``state_dict``; ``k = num_clusters``, ``G = K / group_size`` or 1,
``w = bits + ceil(log2 k)``):

========================  ==================  ============================================
name                      dtype               shape
========================  ==================  ============================================
``weight_packed``         ``uint8``           ``(out_channels, ceil(K / 8) * w)``
``weight_scale``          scale dtype (fp16)  ``(out_channels, G, k)``
``weight_offset``         scale dtype (fp16)  ``(out_channels, G, k)``
``bias`` (parameter)      float               ``(out_channels,)``, only if the layer has one
========================  ==================  ============================================

The layout of ``weight_packed`` and the dequantization rule are those of
:mod:`optimum_splitquant.core.quantize`. ``stride``, ``padding``, ``dilation``, ``groups`` and
``padding_mode`` are not stored: they come from the model's config, which rebuilds the layer.
The class subclasses ``SplitQuantLinear`` (``in_features = K``, ``out_features = out_channels``)
so size accounting, validation and the loader treat both the same way; only the weight layout
and the forward pass differ.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..core.quantize import quantize_weight
from ..core.spec import QuantSpec
from .linear import SplitQuantLinear

__all__ = ["SplitQuantConv2d"]


class SplitQuantConv2d(SplitQuantLinear):
    """``nn.Conv2d`` whose kernels are split into clusters and quantized per cluster (one convolution)."""

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
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"unsupported padding_mode {padding_mode!r}")
        kernel_size = _pair(kernel_size)
        width = in_channels // groups * kernel_size[0] * kernel_size[1]
        super().__init__(width, out_channels, bias, spec=spec, device=device, dtype=dtype)
        self.source = "conv2d"
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation = _pair(dilation)
        self.groups = groups
        self.padding_mode = padding_mode
        if float_weight:
            self._parameters["weight"] = nn.Parameter(
                torch.empty(self.kernel_shape, device=device, dtype=dtype), requires_grad=False
            )

    @property
    def kernel_shape(self) -> tuple[int, int, int, int]:
        """Shape of the float weight: ``(out_channels, in_channels / groups, kh, kw)``."""
        return (self.out_channels, self.in_channels // self.groups, *self.kernel_size)

    @classmethod
    def from_float(
        cls, module: nn.Conv2d, spec: QuantSpec, *, source: str = "conv2d", ids: torch.Tensor | None = None
    ) -> SplitQuantConv2d:
        """Quantize a float ``nn.Conv2d``; ``ids`` (shape ``(out_channels, K)``) overrides the clustering."""
        if not isinstance(module, nn.Conv2d):
            raise TypeError(f"expected an nn.Conv2d, got {type(module).__name__}")
        if source != "conv2d":
            raise ValueError(f"SplitQuantConv2d only replaces nn.Conv2d (source='conv2d'), got source={source!r}")
        weight = module.weight.detach()
        layer = cls(
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            module.stride,
            module.padding,
            module.dilation,
            module.groups,
            module.bias is not None,
            module.padding_mode,
            spec=spec,
            device=weight.device,
            dtype=weight.dtype,
        )
        if module.bias is not None:
            layer.bias.data.copy_(module.bias.detach())
        layer.quantize_(weight, ids=ids)
        return layer

    @property
    def weight(self) -> torch.Tensor:
        """The float kernel ``(out_channels, in_channels / groups, kh, kw)``, dequantized on each access (a copy)."""
        placeholder = self._parameters.get("weight")
        if placeholder is not None:
            return placeholder
        return self.dequantize_kernel(self.bias.dtype if self.bias is not None else torch.float32)

    def quantize_(self, weight: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        """Quantize a float kernel of :attr:`kernel_shape` into the buffers; drops the float weight."""
        if tuple(weight.shape) != self.kernel_shape:
            raise ValueError(f"expected a kernel of shape {self.kernel_shape}, got {tuple(weight.shape)}")
        q = quantize_weight(weight.detach().reshape(self.out_features, self.in_features), self.spec, ids=ids)
        self.clear_weight_cache_()
        self.weight_packed = q.packed.to(weight.device)
        self.weight_scale = q.scale.to(weight.device)
        self.weight_offset = q.offset.to(weight.device)
        self._parameters.pop("weight", None)

    def dequantize_kernel(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float kernel this layer convolves with."""
        return self.dequantize_weight(dtype).reshape(self.kernel_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_quantized:
            raise RuntimeError("SplitQuantConv2d was never given its weight: call quantize_() or load a checkpoint")
        bias = None if self.bias is None else self.bias.to(x.dtype)
        weight = self.dequantize_kernel(x.dtype)
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding(), mode=self.padding_mode)
            return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def dequantize(self, dtype: torch.dtype | None = None) -> nn.Conv2d:
        """A plain ``nn.Conv2d`` holding the dequantized kernel (and the float bias)."""
        if dtype is None:
            dtype = self.bias.dtype if self.bias is not None else torch.float32
        layer = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.bias is not None,
            self.padding_mode,
            device=self.weight_packed.device,
            dtype=dtype,
        )
        with torch.no_grad():
            layer.weight.copy_(self.dequantize_kernel(dtype))
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

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
        s = self.spec
        group = "row" if s.group_size is None else s.group_size
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, "
            f"bits={s.bits}, num_clusters={s.num_clusters}, group={group}, clustering={s.clustering}"
        )
