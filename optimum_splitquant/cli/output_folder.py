"""The ``--output`` folder of ``quantize``: checked before any work, written in full before it appears.

:func:`check_output` refuses an empty value, the input model's folder and a non-empty folder
(unless ``--overwrite`` and it holds a saved model); :func:`prepare_output` creates its parents and
checks it is writable; :func:`staged_output` gives a fresh folder that becomes the output only when
the block succeeds (a new or replaced folder swapped in whole, an existing empty one filled in
place, ``config.json`` last).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..checkpoint.saving import remove_stale_staging, staged_folder, staging_folder
from .console import CliError, one_line

__all__ = ["check_output", "prepare_output", "remove_created", "staged_output"]

# The staging folder of an output filled in place (inside it): ``.saving-<32 hex digits>``.
_IN_PLACE_PREFIX = ".saving-"
# A config.json larger than this is not a model's configuration.
_MAX_CONFIG_BYTES = 16 * 2**20


def check_output(output: str, model: str, overwrite: bool = False) -> Path:
    """The ``--output`` folder, refused when empty, the input model's folder, or a folder already in use.

    Runs before anything is loaded or written: an empty value (an unset shell variable) would write
    into the current directory, and the model's folder (also through a symlink or ``..``) would
    have its float original replaced by the quantized one. A non-empty folder is replaced only with
    ``overwrite``, and only if it holds a saved model and neither the input model nor the current
    directory. The staging folder that a killed earlier run left inside an output it was filling
    in place is removed first (unless still in use). The returned path is absolute.
    """
    if not output.strip():
        raise CliError(
            "--output is empty (an unset shell variable?); give the folder to write the quantized model to, "
            "e.g. --output ./model-int4 (use --output . to write into the current directory on purpose)"
        )
    path = Path(output).expanduser()
    if _same_folder(path, Path(model).expanduser()):
        raise CliError(
            f"output {output!r} is the input model's folder {model!r}: saving there would replace the float "
            "original; choose another --output folder"
        )
    if path.exists() and not path.is_dir():
        raise CliError(f"output {output!r} exists and is not a directory")
    if path.is_dir():
        remove_stale_staging(path, _IN_PLACE_PREFIX)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise CliError(
                f"output folder {output!r} already exists and is not empty; choose another --output folder, "
                "or pass --overwrite to replace its whole content"
            )
        _check_replaceable(path, output, model)
    return Path(os.path.abspath(path))


def _check_replaceable(path: Path, output: str, model: str) -> None:
    """Refuse ``--overwrite`` of a folder whose replacement would lose something that is not a saved model."""
    real = path.resolve()
    local = Path(model).expanduser()
    if local.exists() and local.resolve().is_relative_to(real):
        raise CliError(
            f"output {output!r} contains the input model {model!r}: replacing it would delete the float "
            "original; choose another --output folder"
        )
    if Path.cwd().resolve().is_relative_to(real):
        raise CliError(
            f"output {output!r} is (or contains) the current directory, which --overwrite cannot replace; "
            "run the command from another directory or choose another --output folder"
        )
    if os.path.ismount(real):
        raise CliError(f"output {output!r} is a mount point, which --overwrite cannot replace; use a folder inside it")
    missing = _not_a_saved_model(path)
    if missing:
        raise CliError(
            f"output folder {output!r} holds no saved model ({missing}), so --overwrite leaves it alone; "
            "empty it yourself or choose another --output folder"
        )


def _not_a_saved_model(folder: Path) -> str | None:
    """What keeps ``folder`` from being a saved transformers model, or ``None`` if it is one.

    A saved model has a ``config.json`` holding a JSON object with a ``model_type``, and safetensors
    weights (``*.safetensors`` or a ``model.safetensors.index.json``).
    """
    config = folder / "config.json"
    if not config.is_file():
        return "no config.json"
    if config.stat().st_size > _MAX_CONFIG_BYTES:
        return f"config.json is larger than {_MAX_CONFIG_BYTES // 2**20} MiB, not a model configuration"
    try:
        content = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        return f"config.json is not valid JSON: {one_line(exc)}"
    model_type = content.get("model_type") if isinstance(content, dict) else None
    if not isinstance(model_type, str) or not model_type:
        return "config.json has no model_type"
    weights = [*folder.glob("*.safetensors"), folder / "model.safetensors.index.json"]
    if not any(p.is_file() for p in weights):
        return "no model weights: no *.safetensors file and no model.safetensors.index.json"
    return None


def _same_folder(output: Path, model: Path) -> bool:
    """Whether ``output`` is the existing local folder ``model`` (symlinks, ``..``, bind mounts included)."""
    if not (model.exists() and output.exists()):
        return False  # a Hub id or a new folder: nothing there to replace
    try:
        return os.path.samefile(output, model)
    except OSError:
        return output.resolve() == model.resolve()


def prepare_output(path: Path) -> list[Path]:
    """Create the parents of ``path`` if needed and check the folder written into is writable.

    Returns the folders created (deepest last), removed again by :func:`remove_created` on failure.
    """
    missing = [p for p in (path.parent, *path.parent.parents) if not p.exists()][::-1]
    writes_into = path if _fills_in_place(path) else path.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=writes_into):
            pass
    except OSError as exc:
        remove_created(missing)
        raise CliError(f"cannot write to output directory {str(path)!r}: {exc.strerror or exc}") from exc
    return missing


def remove_created(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only if still empty


def _fills_in_place(path: Path) -> bool:
    """An existing empty folder is filled in place (it may be the current directory or a mount point)."""
    return path.is_dir() and not any(path.iterdir())


@contextlib.contextmanager
def staged_output(path: Path, replace: bool) -> Iterator[Path]:
    """A fresh folder to write into; it becomes ``path`` only when the block succeeds.

    A new or replaced (``replace``: ``--overwrite``) folder is swapped in whole by
    :func:`~optimum_splitquant.checkpoint.saving.staged_folder`. An existing empty folder keeps its
    identity: the files are written into a hidden, locked folder inside it
    (:func:`~optimum_splitquant.checkpoint.saving.staging_folder`), then moved up, ``config.json``
    last, so an interruption never leaves something that loads as a model. Files that appear at
    ``path`` while the model is being written are never replaced without ``replace``.
    """
    if not _fills_in_place(path):
        with staged_folder(path) as staging:
            yield staging
            if not replace:
                _check_still_free(path, staging)
        return
    with staging_folder(path, _IN_PLACE_PREFIX) as staging:
        moved: list[Path] = []
        try:
            yield staging
            _check_still_free(path, staging)
            for entry in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
                os.replace(entry, path / entry.name)
                moved.append(path / entry.name)
        except BaseException:
            for done in moved:  # the folder was empty: leave it empty again
                shutil.rmtree(done) if done.is_dir() else done.unlink()
            raise


def _check_still_free(path: Path, staging: Path) -> None:
    """Refuse to finish if other files appeared at ``path`` while the model was being written."""
    if path.is_dir() and any(entry != staging for entry in path.iterdir()):
        raise CliError(
            f"output folder {str(path)!r} received other files while the model was being written; they are "
            "left as they are and the quantized model is not saved: run again with another --output folder"
        )
