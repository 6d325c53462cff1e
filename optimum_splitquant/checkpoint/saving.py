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

Staging folders are named ``.<target name>.saving-<32 hex digits>`` and sit next to the target.
A process killed outright (``kill -9``, out of memory) cannot remove its own, so each one is
locked while in use: its creator holds an exclusive ``flock`` on the folder itself, taken before
the folder gets its final name and released by the kernel when the process ends, however it ends.
:func:`remove_stale_staging` (run by ``staged_folder`` before each save) removes the staging
folders of the same target whose lock it can take, i.e. whose creator is gone; one still locked
is in use and left alone. Where no lock can be taken (a file system without ``flock`` on
folders, such as some network file systems; no ``fcntl`` module), nothing is removed and the
leftovers are named in a warning instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import re
import shutil
import stat
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # not on Windows: staging folders are then never locked, so never removed as stale
    fcntl = None

__all__ = ["remove_stale_staging", "save_pretrained_atomic", "staged_folder", "staging_folder", "staging_prefix"]

logger = logging.getLogger(__name__)

# A folder opened to lock it: never through a symbolic link.
_FOLDER_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)

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
    refused with ``ValueError``. Staging folders of ``target`` that a killed earlier save left are
    removed first (:func:`remove_stale_staging`).
    """
    target = Path(target)
    if target.is_symlink():  # save into the folder the link names; the link itself stays
        target = target.resolve()
    if os.path.ismount(target):
        raise ValueError(f"{target} is a mount point and cannot be replaced; save into a folder inside it")
    target.parent.mkdir(parents=True, exist_ok=True)
    prefix = staging_prefix(target)
    remove_stale_staging(target.parent, prefix)
    with staging_folder(target.parent, prefix) as staging:
        yield staging
        if target.exists():
            _swap(staging, target)  # afterwards staging holds the previous folder, removed on exit
        else:
            os.replace(staging, target)


def staging_prefix(target: str | os.PathLike) -> str:
    """The name prefix of ``target``'s staging folders: ``.<name>.saving-`` (a 32-digit hex id follows)."""
    return f".{Path(target).name}.saving-"


@contextlib.contextmanager
def staging_folder(parent: str | os.PathLike, prefix: str) -> Iterator[Path]:
    """Yield a fresh empty folder ``parent/<prefix><32 hex digits>``, locked while in use; removed on exit.

    The folder is created under a temporary name, locked (see the module docstring), then renamed
    to its final name, so :func:`remove_stale_staging` never sees it unlocked while its creator
    lives. If the block moves the folder away, whatever is at its name on exit is removed.
    """
    parent = Path(parent)
    name = f"{prefix}{uuid.uuid4().hex}"
    fresh = parent / f"{name}.new"
    fresh.mkdir()  # the permissions of a plain mkdir (the umask applies), unlike mkdtemp's 0700
    staging = parent / name
    lock = None
    try:
        lock = _lock_folder(fresh)
        os.rename(fresh, staging)
        yield staging
    finally:
        shutil.rmtree(fresh, ignore_errors=True)  # only there if the lock or the rename failed
        shutil.rmtree(staging, ignore_errors=True)
        if lock is not None:
            os.close(lock)


def remove_stale_staging(parent: str | os.PathLike, prefix: str) -> list[Path]:
    """Remove the staging folders ``parent/<prefix><32 hex digits>`` whose creator is gone; returns them.

    Only folders whose name matches exactly are considered (never a symbolic link), and only those
    whose lock can be taken are removed: a folder still locked is in use by a live process. Ones
    that cannot be locked at all (no ``flock`` there) are named in a warning and kept.
    """
    parent = Path(parent)
    pattern = re.compile(re.escape(prefix) + "[0-9a-f]{32}")
    try:
        entries = sorted(e for e in os.listdir(parent) if pattern.fullmatch(e))
    except OSError:
        return []
    if fcntl is None:
        _warn_kept([parent / e for e in entries if (parent / e).is_dir() and not (parent / e).is_symlink()])
        return []
    removed, unknown = [], []
    for name in entries:
        path = parent / name
        try:
            fd = os.open(path, _FOLDER_FLAGS)
        except OSError:
            continue  # not a folder (a file or a link of that name is not ours), or already gone
        try:
            if not _try_lock(fd):
                continue  # its creator is still writing it
            if not _same_file(os.fstat(fd), path):
                continue  # renamed or replaced between the open and the lock
            shutil.rmtree(path)
            removed.append(path)
        except _LockUnavailable:
            unknown.append(path)
        except OSError as exc:
            logger.warning("could not remove the stale staging folder %s (%s); remove it by hand", path, exc)
        finally:
            os.close(fd)
    if removed:
        logger.info(
            "removed %d staging folder(s) left by an interrupted save: %s", len(removed), ", ".join(map(str, removed))
        )
    _warn_kept(unknown)
    return removed


def _warn_kept(folders: list[Path]) -> None:
    if folders:
        logger.warning(
            "staging folder(s) of an earlier save found, which may be in use (no lock can be taken on this file "
            "system): %s; remove them by hand once no save is running",
            ", ".join(map(str, folders)),
        )


class _LockUnavailable(Exception):
    """No ``flock`` on this folder (no ``fcntl``, or the file system refuses it)."""


def _lock_folder(folder: Path) -> int | None:
    """An open descriptor of ``folder`` holding its exclusive lock, or ``None`` where no lock can be taken."""
    if fcntl is None:
        return None
    fd = os.open(folder, _FOLDER_FLAGS)
    try:
        if _try_lock(fd):
            return fd
        raise OSError(f"{folder} is already locked")  # a fresh folder nobody else knows of
    except _LockUnavailable:
        logger.debug("no flock on %s: it is not protected from removal as stale", folder)
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise


def _try_lock(fd: int) -> bool:
    """Take the exclusive lock of ``fd`` without waiting: ``False`` if another process holds it."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as exc:
        raise _LockUnavailable from exc
    return True


def _same_file(st: os.stat_result, path: Path) -> bool:
    """Whether ``path`` is (still) the folder that ``st`` describes."""
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(now.st_mode) and (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)


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
