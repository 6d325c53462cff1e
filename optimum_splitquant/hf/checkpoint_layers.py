"""Matching a SplitQuant checkpoint's stored layers to a model's layers, and rebuilding those layers.

transformers names checkpoint keys in the model through conversions (the model's own, plus a
``key_mapping`` given to ``from_pretrained``), and shows the quantizer those conversions late. A
:class:`CheckpointLayers` keeps the stored layers not matched yet (``pending``) and the ones rebuilt
(``loaded``: name in the checkpoint -> name in the model) across the loader's calls.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..checkpoint.format import layer_tensors
from ..checkpoint.headers import CheckpointIndex
from ..core.spec import QuantSpec
from ..layers import eligible_layers, layer_kind, replace_layers
from .key_mapping import checkpoint_key_renamer, module_renamer, outside_base_model

__all__ = ["CheckpointLayers"]


class CheckpointLayers:
    """The SplitQuant layers stored in a checkpoint (``index``), rebuilt in a model as the loader names them.

    ``loaded`` (name in the checkpoint -> name in the model) is updated in place, so a caller may
    pass the dict it keeps.
    """

    def __init__(self, index: CheckpointIndex, spec: QuantSpec, loaded: dict[str, str] | None = None) -> None:
        self.index = index
        self.spec = spec
        self.pending: list[str] = sorted(index.quantized_modules())  # stored layers not found in the model yet
        self.loaded: dict[str, str] = loaded if loaded is not None else {}

    def skip_outside(self, model: torch.nn.Module, rename: Callable[[str], str]) -> list[str]:
        """Stop expecting the stored layers that lie outside ``model`` (a task head it lacks); returns them."""
        module, layers = module_renamer(rename), eligible_layers(model)
        outside = outside_base_model(model, self.pending, [s for s in self.pending if module(s) not in layers])
        self.pending = [s for s in self.pending if s not in outside]
        return outside

    def rebuild(self, model: torch.nn.Module, rename: Callable[[str], str]) -> None:
        """Replace the model's layers that the checkpoint stores in SplitQuant form, under the loader's names.

        ``rename`` gives a checkpoint key its name in the model (:func:`checkpoint_key_renamer`). A
        layer found earlier must keep its name; layers not found stay pending.
        """
        module = module_renamer(rename)
        for stored, name in sorted(self.loaded.items()):
            if module(stored) != name:
                raise ValueError(
                    f"the key mapping of this load renames the SplitQuant layer stored as {stored!r} to "
                    f"{module(stored)!r}, but it was rebuilt as {name!r} from the model's own key conversions; "
                    "drop key_mapping, or save the model again under the new names"
                )
        layers = eligible_layers(model)
        found = {s: module(s) for s in self.pending if module(s) in layers}
        if not found:
            return
        index = self.index.renamed(rename)
        for name in found.values():
            self._check_layer_tensors(name, layers[name], index)
        replace_layers(model, self.spec, list(found.values()), float_weight=False)
        self.loaded.update(found)
        self.pending = [s for s in self.pending if s not in found]

    def unknown_layers(self, model: torch.nn.Module) -> ValueError:
        """The error for the stored layers still pending: none of the model's layers is theirs."""
        module = module_renamer(checkpoint_key_renamer(model))
        shown = [s if module(s) == s else f"{s} (loads as {module(s)})" for s in self.pending[:5]]
        return ValueError(
            f"checkpoint holds SplitQuant tensors for {shown} which are not Linear/Conv1D/Conv2d layers of "
            f"{type(model).__name__}; was it saved from another architecture?"
        )

    def _check_layer_tensors(self, name: str, module: torch.nn.Module, index: CheckpointIndex) -> None:
        spec = self.spec
        kind = layer_kind(module)
        layer = kind.describe(module)
        rows, width = kind.dims(module)
        try:
            expected = layer_tensors(rows, width, spec, bias=module.bias is not None)
        except ValueError as exc:
            raise ValueError(f"{name} ({layer}): {exc}") from None
        settings = f"bits={spec.bits}, num_clusters={spec.num_clusters}, group_size={spec.group_size}"
        index.check_layer(name, expected, layer, settings)
