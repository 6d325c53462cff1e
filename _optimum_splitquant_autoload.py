"""Start-up hook: transformers loads SplitQuant checkpoints, and PEFT adapts them, without ``import optimum_splitquant``.

``optimum_splitquant-autoload.pth``, installed into site-packages with the package, calls
:func:`install` when the interpreter starts. That only puts :class:`RegistryFinder` on
``sys.meta_path``; nothing else is imported (no torch, no transformers, not even ``logging``).

When ``transformers.quantizers.auto`` (the module whose maps ``from_pretrained`` consults through
``get_hf_quantizer``) has finished loading, the finder maps ``quant_method="splitquant"`` to two
stand-ins. The first time transformers reads a SplitQuant config, the stand-ins import
``optimum_splitquant``, which registers the real config and quantizer in their place: the model
loads exactly as it would after an explicit import. If that import fails, loading raises
:class:`ImportError` instead of building float layers with random weights.

Once a process has imported both ``peft`` and ``optimum_splitquant`` (in either order; a SplitQuant
layer cannot exist before the package is imported), the finder imports
``optimum_splitquant.hf.peft``, which registers the SplitQuant layers with PEFT
(:func:`connect_peft`): ``get_peft_model``, ``PeftModel.from_pretrained`` and ``load_adapter`` then
adapt them. A process that imports only one of the two imports nothing more.

``OPTIMUM_SPLITQUANT_NO_AUTOLOAD=1`` skips the hook: transformers then knows nothing of SplitQuant
until ``import optimum_splitquant`` (it warns "Unknown quantization type" and loads random weights),
and PEFT until ``import optimum_splitquant.hf.peft``.

This module is top level so that the ``.pth`` line can import it without importing the package.
"""

import os
import sys

# Start-up path: no `from __future__ import annotations` and no `typing` (each is an import), hence the
# quoted annotations and this stand-in for typing.TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType
    from typing import Any

__all__ = [
    "OPT_OUT_ENV",
    "PACKAGE",
    "PEFT_GLUE",
    "PEFT_MODULE",
    "QUANT_METHOD",
    "REGISTRY_MODULE",
    "DeferredSplitQuantConfig",
    "DeferredSplitQuantHfQuantizer",
    "RegistryFinder",
    "connect_peft",
    "enabled",
    "install",
    "plugin_class",
    "register_stand_ins",
]

OPT_OUT_ENV = "OPTIMUM_SPLITQUANT_NO_AUTOLOAD"
REGISTRY_MODULE = "transformers.quantizers.auto"
PEFT_MODULE = "peft"
PACKAGE = "optimum_splitquant"
PEFT_GLUE = "optimum_splitquant.hf.peft"  # registers the SplitQuant layers with PEFT when imported
QUANT_METHOD = "splitquant"  # optimum_splitquant.hf.config.QUANT_METHOD, without importing it
_LOGGER = "optimum_splitquant.autoload"


def enabled() -> bool:
    """False when ``OPTIMUM_SPLITQUANT_NO_AUTOLOAD`` is set to anything but ``""``, ``0``, ``false`` or ``no``."""
    return os.environ.get(OPT_OUT_ENV, "").strip().lower() in ("", "0", "false", "no")


def install() -> None:
    """Put :class:`RegistryFinder` first on ``sys.meta_path`` (once per process), unless opted out."""
    if not enabled() or any(getattr(f, "is_splitquant_autoload", False) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, RegistryFinder())


def _warn(message: str, *args: object) -> None:
    import logging

    logging.getLogger(_LOGGER).warning(message, *args)


class RegistryFinder:
    """Meta-path finder that answers for :data:`REGISTRY_MODULE`, :data:`PEFT_MODULE` and :data:`PACKAGE` only.

    It wraps their real loaders so that a function runs once each has loaded (see ``_AFTER_LOAD``).
    """

    is_splitquant_autoload = True

    def find_spec(
        self, fullname: str, path: "Sequence[str] | None" = None, target: "ModuleType | None" = None
    ) -> "ModuleSpec | None":
        after = _AFTER_LOAD.get(fullname)
        if after is None:
            return None
        try:
            for finder in sys.meta_path:
                find = getattr(finder, "find_spec", None)
                if finder is self or getattr(finder, "is_splitquant_autoload", False) or find is None:
                    continue
                spec = find(fullname, path, target)
                if spec is not None:
                    break
            else:
                return None
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _RegistryLoader(spec.loader, after)
            return spec
        except Exception as exc:  # a broken hook must never break `import transformers`
            _warn(
                "SplitQuant auto-registration is off (%s: %s); `import optimum_splitquant` first.",
                type(exc).__name__,
                exc,
            )
            return None


class _RegistryLoader:
    """Runs the real loader, then ``after(module)``."""

    def __init__(self, loader: "Any", after: "Callable[[ModuleType], None]") -> None:
        self.loader = loader
        self.after = after

    def create_module(self, spec: "ModuleSpec") -> "ModuleType | None":
        return self.loader.create_module(spec)

    def exec_module(self, module: "ModuleType") -> None:
        # The module keeps the real loader (source lookup, reload and pickling see no wrapper).
        module.__loader__ = self.loader
        if getattr(module, "__spec__", None) is not None and module.__spec__.loader is self:
            module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        self.after(module)

    def __getattr__(self, name: str) -> "Any":
        return getattr(self.loader, name)


def register_stand_ins(registry: "ModuleType") -> None:
    """Map ``quant_method="splitquant"`` to the stand-ins in ``registry``, keeping real classes already there.

    Logs a warning (and leaves transformers untouched) if the maps are not what this hook expects.
    """
    try:
        configs, quantizers = registry.AUTO_QUANTIZATION_CONFIG_MAPPING, registry.AUTO_QUANTIZER_MAPPING
        configs.setdefault(QUANT_METHOD, DeferredSplitQuantConfig)
        quantizers.setdefault(QUANT_METHOD, DeferredSplitQuantHfQuantizer)
    except Exception as exc:
        _warn(
            "Could not register quant_method=%r with transformers (%s: %s); `import optimum_splitquant` before "
            "loading a SplitQuant checkpoint.",
            QUANT_METHOD,
            type(exc).__name__,
            exc,
        )


def _imported(name: str) -> bool:
    """Whether module ``name`` is in ``sys.modules`` and has finished loading."""
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def connect_peft(module: "ModuleType") -> None:
    """Import :data:`PEFT_GLUE` once ``module`` (``peft`` or the package, just loaded) has company.

    Does nothing until both ``peft`` and ``optimum_splitquant`` are imported, or once ``PEFT_GLUE``
    is (importing it registers). Logs a warning, and leaves PEFT untouched, if the import fails.
    """
    other = PACKAGE if module.__name__ == PEFT_MODULE else PEFT_MODULE
    if sys.modules.get(PEFT_GLUE) is not None or not _imported(other):
        return
    try:
        __import__(PEFT_GLUE)
    except Exception as exc:
        _warn(
            "Plain PEFT cannot adapt SplitQuant layers in this process (%s: %s); `import %s` to see why.",
            type(exc).__name__,
            exc,
            PEFT_GLUE,
        )


def plugin_class(name: str) -> type:
    """Import ``optimum_splitquant`` (which registers it with transformers) and return ``optimum_splitquant.hf.<name>``.

    Raises :class:`ImportError` naming the cause when the package cannot be imported.
    """
    try:
        from optimum_splitquant import hf

        hf.register()  # the package import registers too, but not again if it was imported before a reload
        return getattr(hf, name)
    except Exception as exc:
        raise ImportError(
            f"This checkpoint was saved with quant_method={QUANT_METHOD!r}, but optimum_splitquant could not be "
            f"imported ({type(exc).__name__}: {exc}). Without it transformers would build float layers with random "
            "weights, so loading stops here; repair the installation (pip install optimum-splitquant) and retry."
        ) from exc


class _Deferred(type):
    """Metaclass of the stand-ins: calls and attribute reads go to the real class, imported on first use."""

    target: str

    def __getattr__(cls, name: str) -> "Any":
        if name.startswith("__"):  # introspection (copy, pickle, inspect) must not import the package
            raise AttributeError(name)
        return getattr(plugin_class(cls.target), name)

    def __call__(cls, *args: "Any", **kwargs: "Any") -> "Any":
        return plugin_class(cls.target)(*args, **kwargs)


class DeferredSplitQuantConfig(metaclass=_Deferred):
    """Stands in for ``SplitQuantConfig`` in transformers' config map until a SplitQuant config is read."""

    target = "SplitQuantConfig"


class DeferredSplitQuantHfQuantizer(metaclass=_Deferred):
    """Stands in for ``SplitQuantHfQuantizer`` in transformers' quantizer map until one is built."""

    target = "SplitQuantHfQuantizer"


# What runs once each watched module has loaded.
_AFTER_LOAD = {REGISTRY_MODULE: register_stand_ins, PEFT_MODULE: connect_peft, PACKAGE: connect_peft}
