"""LoRA fine-tuning of SplitQuant models with PEFT (needs ``pip install optimum-splitquant[train]``).

The package never imports this module itself, so it imports without ``peft``. Importing it (or
calling :func:`register_with_peft`) teaches PEFT the SplitQuant layers; the start-up hook
(``_optimum_splitquant_autoload``) imports it as soon as a process has imported both ``peft`` and
``optimum_splitquant``, so PEFT's own entry points work with no call to this module::

    from peft import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], modules_to_save=["o_proj"])
    model = get_peft_model(splitquant_model, config)  # train with transformers.Trainer or a loop
    model.save_pretrained("adapter")  # the LoRA weights and the modules_to_save copies only
    model = PeftModel.from_pretrained(fresh_splitquant_model, "adapter")

(so do ``model.load_adapter`` / ``add_adapter``, ``AutoPeftModelFor*`` and tools built on them).
:func:`register_with_peft` installs three hooks into PEFT, each wrapping PEFT's own function and
changing nothing for other layers:

* LoRA's dispatcher list (``_create_new_module`` in ``peft.tuners.lora.model``) tries
  :func:`dispatch_splitquant` just before PEFT's ``dispatch_default`` (after a config's own
  ``_register_custom_module`` mapping and PEFT's quantized-layer dispatchers);
* ``_set_trainable`` (which wraps ``modules_to_save``) first wraps the modules holding SplitQuant
  layers in :class:`SplitQuantModulesToSave`, so that they train float copies;
* ``get_nb_trainable_parameters`` (``print_trainable_parameters``) counts each SplitQuant layer's
  weights (``out_features * in_features``, as the float layer had), which it holds in buffers.

Each adapted :class:`~optimum_splitquant.nn.SplitQuantLinear` computes ``layer(x) +
lora_B(lora_A(dropout(x))) * scaling``; its packed buffers are never trained or written.

``modules_to_save`` naming a SplitQuant layer (or a module holding some), or a SplitQuant task head
PEFT adds by itself (``classifier``, ``score``), trains a float copy of it:
:class:`SplitQuantModulesToSave` keeps the packed layer for the base model and gives each adapter
the float layer it replaced, holding the dequantized weight in the model's float dtype. The
adapter file stores those float copies (of the named modules only).

Merging (``merge_adapter()``, ``merge_and_unload()``, :func:`merge_lora`) puts back the float
layer the SplitQuant layer replaced (``nn.Linear``, or ``Conv1D`` for GPT-2) holding the
dequantized weight plus the LoRA delta: the outputs stay those of the adapted model, but that layer
is float again. ``unmerge_adapter()`` restores the quantized layer bit for bit.
``merge_lora(model, requantize=True)`` quantizes the merged layers, and the trained copies of
``modules_to_save`` SplitQuant layers, again with their own settings (compact again, at the price
of a new rounding of the merged weight).

The helpers :func:`register_lora_layers` and :func:`get_lora_model` are deprecated (plain PEFT does
what they did); :func:`load_lora_adapter` is ``PeftModel.from_pretrained`` that also loads adapter
files whose ``modules_to_save`` copies were saved packed (by versions that did not make float copies).

Not supported: LoRA on :class:`~optimum_splitquant.nn.SplitQuantConv2d` (a ``TypeError`` names
the layer), initialisations that rewrite the base weight (PiSSA, OLoRA, LoftQ, CorDA, ...), PEFT
methods other than LoRA. ``target_modules="all-linear"`` finds only float ``nn.Linear`` layers in
PEFT: name the projections instead.
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
import logging
import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.constants import SAFETENSORS_WEIGHTS_NAME
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from safetensors import safe_open
from torch import nn

from ..checkpoint.format import PACKED
from ..core.spec import QuantSpec
from ..layers import dequantize_model, layer_kind, quantize_layer, set_submodule
from ..nn.compact import SplitQuantModule
from ..nn.conv import SplitQuantConv2d
from ..nn.linear import SplitQuantLinear

__all__ = [
    "SplitQuantLoraLinear",
    "SplitQuantModulesToSave",
    "dispatch_splitquant",
    "get_lora_model",
    "load_lora_adapter",
    "merge_lora",
    "register_lora_layers",
    "register_with_peft",
    "weights_in_buffers",
]

logger = logging.getLogger(__name__)

# Initialisations that only read the base weight; the others rewrite it, which packed buffers cannot take.
READ_ONLY_INITS = (True, False, "gaussian", "orthogonal", "eva")

# Layers whose modules_to_save copy stays packed while an adapter file that stores it so is loaded.
_KEEP_PACKED: ContextVar[frozenset[str]] = ContextVar("splitquant_keep_packed", default=frozenset())


def _base(layer: nn.Module) -> nn.Module:
    return layer.get_base_layer() if isinstance(layer, BaseTunerLayer) else layer


class SplitQuantLoraLinear(LoraLinear):
    """PEFT's LoRA ``Linear`` over a :class:`SplitQuantLinear`: a frozen packed base, float adapters.

    Adapters take the device of the packed buffers and the dtype the layer dequantizes to (its bias
    dtype, else float32). While merged, ``_quantized_base`` holds the quantized layer.
    """

    _quantized_base: SplitQuantModule | None

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        init = config.init_lora_weights
        if not any(init is allowed or (isinstance(init, str) and init == allowed) for allowed in READ_ONLY_INITS):
            raise ValueError(
                f"init_lora_weights={init!r} rewrites the base weight, which a SplitQuant layer stores packed; "
                f"use one of {READ_ONLY_INITS}"
            )
        # The packed rows are output features; a Conv1D source (GPT-2) merges back into (in, out) weights.
        conv1d = getattr(_base(base_layer), "source", "linear") == "conv1d"
        if config.fan_in_fan_out != conv1d:
            logger.warning("setting fan_in_fan_out=%s for %s", conv1d, type(_base(base_layer)).__name__)
            config.fan_in_fan_out = conv1d
        object.__setattr__(self, "_quantized_base", None)
        super().__init__(base_layer, adapter_name, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int] | tuple[None, None]:
        if isinstance(module, SplitQuantLinear):
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
        # Without this PEFT reads ``base_layer.weight``, which dequantizes the whole layer.
        if isinstance(base_layer, SplitQuantModule):
            return base_layer.weight_packed.device, base_layer._float_dtype()
        return super()._get_base_layer_device_and_dtype(base_layer)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Swap in the float layer (dequantized weight), then merge the adapters into it as PEFT does."""
        base = self.get_base_layer()
        if isinstance(base, SplitQuantModule):
            float_layer = layer_kind(base).to_float(base).requires_grad_(False)
            self.base_layer = float_layer
            object.__setattr__(self, "_quantized_base", base)  # kept out of the module tree and state dict
        try:
            super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        finally:
            if not self.merged and self._quantized_base is not None:
                self._restore_quantized_base()

    def unmerge(self) -> None:
        """Put the original quantized layer back (exact: its buffers were never touched)."""
        if self._quantized_base is None or not self.merged:
            super().unmerge()
            return
        self._restore_quantized_base()
        self.merged_adapters.clear()

    def _restore_quantized_base(self) -> None:
        device = self.get_base_layer().weight.device
        self.base_layer = self._quantized_base.to(device)
        object.__setattr__(self, "_quantized_base", None)


def _float_copy(module: nn.Module, dtype: torch.dtype | None) -> nn.Module:
    """A copy of ``module`` in which every SplitQuant layer is the float layer it replaced (in ``dtype``)."""
    if isinstance(module, SplitQuantModule):
        return layer_kind(module).to_float(module, dtype)
    return dequantize_model(copy.deepcopy(module), dtype)


def _holds_splitquant(module: nn.Module) -> bool:
    return any(isinstance(m, SplitQuantModule) for m in module.modules())


class SplitQuantModulesToSave(ModulesToSaveWrapper):
    """PEFT's ``modules_to_save`` wrapper over a module holding SplitQuant layers: float copies that train.

    ``original_module`` keeps the packed layers (it runs while no adapter of this module is active);
    each adapter's entry of ``modules_to_save`` is a copy in which every SplitQuant layer is the float
    layer it replaced, holding the dequantized weight in ``dtype`` (``None``: the layer's own float
    dtype). PEFT saves and loads those copies as for any float module.
    """

    copy_dtype: torch.dtype | None

    def __init__(
        self, module_to_save: nn.Module, adapter_name: str, dtype: torch.dtype | None = None, **kwargs: Any
    ) -> None:
        object.__setattr__(self, "copy_dtype", dtype)  # read by update(), which the base __init__ calls
        super().__init__(module_to_save, adapter_name, **kwargs)

    def update(self, adapter_name: str, tied_module: nn.Module | None = None, **kwargs: Any) -> None:
        """Give ``adapter_name`` its float copy (once), then let PEFT set it up as usual."""
        if tied_module is not None:
            kwargs["tied_module"] = tied_module
        elif adapter_name not in self.modules_to_save:
            self.modules_to_save[adapter_name] = _float_copy(self.original_module, self.copy_dtype)
        super().update(adapter_name, **kwargs)


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of ``model``'s first float parameter (embeddings, norms), ``None`` without one."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


@contextmanager
def _modules_to_save_in_float(
    model: nn.Module, patterns: Collection[str], adapter_name: str, keep_packed: Collection[str] = ()
) -> Iterator[dict[str, SplitQuantModulesToSave]]:
    """Wrap the modules of ``model`` named by ``patterns`` that hold SplitQuant layers before PEFT does.

    PEFT wraps the module under every name that ends with an entry of ``modules_to_save`` and, finding
    a wrapper there, adds the adapter to it. Modules holding a layer named in ``keep_packed`` are left
    to PEFT. Yields the new wrappers by name; if the body raises, the modules are put back.
    """
    dtype = _float_dtype(model)
    wrapped: dict[str, SplitQuantModulesToSave] = {}
    originals: dict[str, nn.Module] = {}
    for name, module in list(model.named_modules()):
        if not name or not any(name.endswith(p) for p in patterns):
            continue
        if any(name.startswith(f"{outer}.") for outer in wrapped):
            continue  # inside a module wrapped already
        if isinstance(module, (AuxiliaryTrainingWrapper, BaseTunerLayer)) or not _holds_splitquant(module):
            continue
        plain = name.removeprefix("base_model.model.")  # the names PEFT saves under
        if any(layer == plain or layer.startswith(f"{plain}.") for layer in keep_packed):
            continue
        wrapped[name] = SplitQuantModulesToSave(module, adapter_name, dtype)
        originals[name] = module
        set_submodule(model, name, wrapped[name])
    if wrapped:
        logger.info("SplitQuant: modules_to_save trains float copies of %s", sorted(wrapped))
    try:
        yield wrapped
    except BaseException:
        for name, module in originals.items():
            set_submodule(model, name, module)
        raise


def _refuse_pickled_adapter(adapter: str | Path, subfolder: str | None) -> None:
    """Raise ``ValueError`` when a local adapter folder holds its weights only as a pickle (PEFT would unpickle it)."""
    folder = Path(adapter, subfolder or "")
    if folder.is_dir() and not (folder / SAFETENSORS_WEIGHTS_NAME).is_file():
        pickled = sorted(p.name for p in folder.glob("adapter_model*.bin"))
        if pickled:
            raise ValueError(
                f"{folder} holds the adapter weights as {pickled[0]}, a pickle; optimum-splitquant loads safetensors "
                "only: save the adapter again with save_pretrained() (safetensors by default) and load that"
            )


def _packed_copies(adapter: str | Path, subfolder: str | None) -> set[str]:
    """Layers whose ``modules_to_save`` copy a local adapter file stores packed (from the file's header).

    Only adapters saved by versions that copied such layers packed hold them.
    """
    path = Path(adapter, subfolder or "", SAFETENSORS_WEIGHTS_NAME)
    if not path.is_file():
        return set()
    with safe_open(str(path), framework="pt") as stored:
        keys = list(stored.keys())
    suffix = f".{PACKED}"
    return {key.removeprefix("base_model.model.").removesuffix(suffix) for key in keys if key.endswith(suffix)}


def _reject_conv2d(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module:
    name = kwargs.get("target_name") or type(_base(target)).__name__
    raise TypeError(
        f"LoRA on SplitQuantConv2d ({name}) is not supported: leave it out of target_modules, or keep it in "
        "float with SplitQuantConfig(modules_to_not_convert=[...])"
    )


def dispatch_splitquant(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module | None:
    """PEFT LoRA dispatcher: a :class:`SplitQuantLoraLinear` over a SplitQuant linear ``target``, else ``None``.

    Raises ``TypeError`` for a :class:`SplitQuantConv2d` target. ``kwargs`` are PEFT's (``r``,
    ``lora_alpha``, ``target_name``, ...).
    """
    if kwargs.pop("parameter_name", None) is not None:
        return None  # target_parameters: PEFT's ParamWrapper, for float parameters only
    base = _base(target)
    if isinstance(base, SplitQuantLinear):
        return SplitQuantLoraLinear(target, adapter_name, config, **kwargs)
    if isinstance(base, SplitQuantConv2d):
        _reject_conv2d(target, adapter_name, config, **kwargs)
    return None


def weights_in_buffers(model: nn.Module) -> int:
    """How many weights ``model``'s SplitQuant layers hold in buffers (``out_features * in_features`` each)."""
    return sum(
        m.out_features * m.in_features
        for m in model.modules()
        if isinstance(m, SplitQuantModule) and "weight" not in m._parameters  # a float placeholder is counted
    )


# The hooks ---------------------------------------------------------------------------------------

_ORIGINAL = "_splitquant_original"  # attribute of a hook: the PEFT function it wraps


def _hook(owner: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> bool:
    """Set ``owner.name`` to ``wrap(original)`` (again over the original if hooked before); False if absent."""
    current = getattr(owner, name, None)
    if current is None:
        return False
    original = getattr(current, _ORIGINAL, current)
    hooked = wrap(original)
    setattr(hooked, _ORIGINAL, original)
    setattr(owner, name, hooked)
    return True


def _dispatch_splitquant_first(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def dispatch_default(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> Any:
        module = dispatch_splitquant(target, adapter_name, config, **kwargs)
        return module if module is not None else original(target, adapter_name, config=config, **kwargs)

    return dispatch_default


def _with_float_copies(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def _set_trainable(*args: Any, **kwargs: Any) -> Any:
        call = signature.bind(*args, **kwargs).arguments
        patterns = call.get("module_names")
        model = call.get("model")
        if (
            not patterns
            or not isinstance(model, nn.Module)
            or call.get("wrapper_cls") not in (None, ModulesToSaveWrapper)
            or kwargs.get("tied_module") is not None
        ):
            return original(*args, **kwargs)
        adapter_name = call["adapter_name"]
        with _modules_to_save_in_float(model, patterns, adapter_name, _KEEP_PACKED.get()) as wrapped:
            result = original(*args, **kwargs)
        if not call.get("activate_adapter", True):  # as PEFT leaves a wrapper it creates for an inactive adapter
            for wrapper in wrapped.values():
                wrapper.modules_to_save[adapter_name].requires_grad_(False)
        return result

    return _set_trainable


def _counting_weights_in_buffers(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def get_nb_trainable_parameters(self: nn.Module) -> tuple[int, int]:
        trainable, total = original(self)
        return trainable, total + weights_in_buffers(self)

    return get_nb_trainable_parameters


def register_with_peft() -> None:
    """Teach PEFT's own entry points the SplitQuant layers (idempotent; importing this module calls it).

    Hooks LoRA's dispatcher list, ``modules_to_save`` and the parameter count (see the module
    docstring). A hook whose PEFT function this PEFT version lacks is skipped with a warning.
    """
    sites: list[tuple[str, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
        ("peft.tuners.lora.model", "dispatch_default", _dispatch_splitquant_first),
        # _set_trainable is called through these modules' own names for it.
        ("peft.utils.other", "_set_trainable", _with_float_copies),
        ("peft.utils", "_set_trainable", _with_float_copies),
        ("peft.peft_model", "_set_trainable", _with_float_copies),
        ("peft.mixed_model", "_set_trainable", _with_float_copies),
        ("peft.peft_model", "PeftModel.get_nb_trainable_parameters", _counting_weights_in_buffers),
        ("peft.mixed_model", "PeftMixedModel.get_nb_trainable_parameters", _counting_weights_in_buffers),
    ]
    missing = []
    for module_name, path, wrap in sites:
        try:
            owner: Any = importlib.import_module(module_name)
        except ImportError:
            owner = None
        *outer, name = path.split(".")
        for part in outer:
            owner = getattr(owner, part, None)
        if owner is None or not _hook(owner, name, wrap):
            missing.append(f"{module_name}.{path}")
    if missing:
        logger.warning(
            "SplitQuant: this PEFT version has no %s; plain PEFT may not adapt SplitQuant layers there "
            "(pin peft to a tested version, see the [train] extra)",
            missing,
        )


# The helpers of earlier versions ----------------------------------------------------------------


def register_lora_layers(config: LoraConfig) -> LoraConfig:
    """Deprecated: plain PEFT adapts SplitQuant layers now. Registers them on this ``config`` (in place)."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"expected a peft LoraConfig, got {type(config).__name__}")
    warnings.warn(
        "register_lora_layers is no longer needed: peft's get_peft_model and PeftModel.from_pretrained adapt "
        "SplitQuant layers with a plain LoraConfig",
        DeprecationWarning,
        stacklevel=2,
    )
    config._register_custom_module({SplitQuantLinear: SplitQuantLoraLinear, SplitQuantConv2d: _reject_conv2d})
    return config


def get_lora_model(model: nn.Module, config: LoraConfig, *, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """Deprecated: ``peft.get_peft_model(model, config, adapter_name=adapter_name, **kwargs)`` does the same."""
    warnings.warn("get_lora_model is no longer needed: use peft.get_peft_model", DeprecationWarning, stacklevel=2)
    register_with_peft()
    return get_peft_model(model, config, adapter_name=adapter_name, **kwargs)


def load_lora_adapter(
    model: nn.Module,
    adapter: str | Path,
    *,
    adapter_name: str = "default",
    is_trainable: bool = False,
    **kwargs: Any,
) -> PeftModel:
    """``PeftModel.from_pretrained`` for a SplitQuant ``model``, also for adapters with packed copies.

    ``modules_to_save`` copies of SplitQuant layers load as float copies, as PEFT makes them now;
    copies a local adapter file stores packed (saved by versions that copied such layers packed) load
    as saved, and do not train. ``kwargs`` go to ``PeftModel.from_pretrained``.
    """
    register_with_peft()
    _refuse_pickled_adapter(adapter, kwargs.get("subfolder"))
    packed = _packed_copies(adapter, kwargs.get("subfolder"))
    if packed:
        logger.warning(
            "%s stores the modules_to_save copies of %s packed (saved by an earlier version): they load as "
            "saved and do not train; train them again with peft.get_peft_model to save float copies",
            adapter,
            sorted(packed),
        )
    token = _KEEP_PACKED.set(frozenset(packed))
    try:
        return PeftModel.from_pretrained(
            model, str(adapter), adapter_name=adapter_name, is_trainable=is_trainable, **kwargs
        )
    finally:
        _KEEP_PACKED.reset(token)


def merge_lora(model: PeftModel, *, requantize: bool = False, safe_merge: bool = False) -> nn.Module:
    """Merge the active adapters and drop PEFT's wrappers; returns the underlying transformers model.

    The adapted layers come back as float layers holding ``dequantized weight + delta`` (outputs
    unchanged), and ``modules_to_save`` SplitQuant layers as their trained float copies; with
    ``requantize``, both as SplitQuant layers quantized again from those weights with their original
    settings.
    """
    specs: dict[str, QuantSpec] = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, SplitQuantLoraLinear):
            held = module._quantized_base
            specs[name] = (held if held is not None else module.get_base_layer()).spec
        elif isinstance(module, SplitQuantModulesToSave) and module.active_adapters:
            for inner, layer in module.original_module.named_modules():
                if isinstance(layer, SplitQuantModule):
                    specs[f"{name}.{inner}" if inner else name] = layer.spec
    merged = model.merge_and_unload(safe_merge=safe_merge)
    if requantize:
        for name, spec in specs.items():
            with torch.no_grad():
                set_submodule(merged, name, quantize_layer(merged.get_submodule(name), spec))
        logger.info("SplitQuant: %d merged layers quantized again", len(specs))
    return merged


register_with_peft()
