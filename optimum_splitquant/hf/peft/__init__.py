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

Layout: :mod:`.layers` (the LoRA and ``modules_to_save`` layers, the dispatcher), :mod:`.hooks`
(:func:`register_with_peft`), :mod:`.adapters` (loading, merging, the deprecated helpers). Only
this subpackage imports ``peft``.
"""

from .adapters import get_lora_model, load_lora_adapter, merge_lora, register_lora_layers
from .hooks import register_with_peft
from .layers import SplitQuantLoraLinear, SplitQuantModulesToSave, dispatch_splitquant, weights_in_buffers

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

register_with_peft()
