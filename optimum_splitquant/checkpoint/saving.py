"""Saving without ever leaving a half-written checkpoint in place.

``save_pretrained_atomic`` writes the model into a fresh sibling folder, carries over the files
of the existing folder that the new save does not produce (tokenizer, model card, ...), and only
then swaps the new folder in, atomically where the OS allows it (Linux ``renameat2``
``RENAME_EXCHANGE``). A crash at any point leaves either the previous checkpoint or the new one
at the target path, never a mixture.

A plain ``model.save_pretrained(dir)`` writes in place (that is transformers' code). If it is
interrupted, SplitQuant's load-time checks refuse the mixture: a truncated file, shards of two
different saves, or a ``config.json`` from another save are clear errors.

``staged_folder`` is the same swap for any folder written in steps (a converted model, a cached
build): write into the folder it yields; it takes the target's place only if the block succeeds.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["save_pretrained_atomic", "staged_folder"]

logger = logging.getLogger(__name__)

# Files one save_pretrained owns: stale ones from an older save must not survive the swap.
_WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json", "pytorch_model*.bin")


def save_pretrained_atomic(model: Any, save_directory: str | os.PathLike, *extra: Any, **kwargs: Any) -> Path:
    """``model.save_pretrained(save_directory, **kwargs)`` that replaces the folder all at once.

    ``extra`` objects with a ``save_pretrained`` method (a tokenizer, a processor) are saved into the
    same new folder before the swap. Returns the target path.
    """
    target = Path(save_directory)
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} exists and is not a folder")
    with staged_folder(target) as staging:
        model.save_pretrained(staging, **kwargs)
        for obj in extra:
            obj.save_pretrained(staging)
        if target.exists():
            _carry_over(target, staging)
    return target


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh empty folder next to ``target``; when the block succeeds it becomes ``target``.

    A previous ``target`` folder is exchanged out (atomically where the OS allows) and removed;
    if the block raises, the staging folder is removed and ``target`` is left as it was. A symbolic
    link ``target`` is followed (the folder it names is replaced, the link stays); a mount point is
    refused with ``ValueError``.
    """
    target = Path(target)
    if target.is_symlink():  # save into the folder the link names; the link itself stays
        target = target.resolve()
    if os.path.ismount(target):
        raise ValueError(f"{target} is a mount point and cannot be replaced; save into a folder inside it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.saving-{uuid.uuid4().hex}"
    staging.mkdir()  # the permissions of a plain mkdir (the umask applies), unlike mkdtemp's 0700
    try:
        yield staging
        if target.exists():
            _swap(staging, target)  # afterwards staging holds the previous folder, removed below
        else:
            os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _carry_over(old: Path, new: Path) -> None:
    """Hard-link (or copy) into ``new`` the files of ``old`` that the new save did not write."""
    owned = {p.name for pattern in _WEIGHT_PATTERNS for p in old.glob(pattern)}
    for entry in old.iterdir():
        dest = new / entry.name
        if entry.name in owned or dest.exists() or entry.name.startswith(f".{old.name}.saving-"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, dest, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, dest)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _swap(new: Path, target: Path) -> None:
    """Exchange ``new`` and ``target`` atomically if possible; afterwards ``new`` holds the old files."""
    if _rename_exchange(new, target):
        return
    backup = target.with_name(f".{target.name}.old-{uuid.uuid4().hex}")
    os.replace(target, backup)
    os.replace(new, target)
    os.replace(backup, new)


def _rename_exchange(a: Path, b: Path) -> bool:
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if result != 0:
        logger.debug("renameat2(RENAME_EXCHANGE) failed with errno %d; using two renames", ctypes.get_errno())
        return False
    return True
