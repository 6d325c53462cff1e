"""The sentence-transformers files of a model folder, to copy beside its quantized save.

A sentence-transformers folder is a transformers folder plus ``modules.json`` (the pipeline: the
transformer, then pooling, normalization, ...), ``config_sentence_transformers.json``,
``sentence_*_config.json`` and a sub-folder per further module (``1_Pooling/config.json``, ...).
``SentenceTransformer(folder)`` rebuilds the pipeline from them; without them it falls back to
plain mean pooling, without normalization: silently different embeddings.

Only what is safe is copied: plain files inside the input folder (``..`` and absolute module paths
are refused, and so are symbolic links, except the links of a Hugging Face cache snapshot into its
own ``blobs/``), from the root and the module folders that ``modules.json`` names, and only data
files (JSON, text, safetensors, sentencepiece): never pickles or Python code.

A module path naming the folder root (``""``, as sentence-transformers writes it, or ``"."``,
which it reads the same way) is the place of the first module only, the transformer, whose
files the quantized save replaces: it is skipped, the root is never walked, and a later module
placed there is refused. The files are checked before the model loads and copied after, so each
is pinned when checked (its device and inode) and copied from a descriptor opened without
following a symbolic link and matched against that pin: a file swapped meanwhile, for a link or
anything else, is refused, and nothing of it is copied.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from .console import CliError

__all__ = ["SAFE_SUFFIXES", "FileIdentity", "copy_sentence_files", "hub_sentence_folder", "sentence_files"]

logger = logging.getLogger(__name__)

_ROOT_FILES = ("modules.json", "config_sentence_transformers.json")
_ROOT_GLOB = "sentence_*_config.json"  # sentence_bert_config.json and its older per-architecture names
# Data only: a module's pickled weights (.bin, .pt, .pkl) or code (.py) are never copied.
SAFE_SUFFIXES = frozenset({".json", ".txt", ".safetensors", ".model"})
# O_NOFOLLOW and O_NONBLOCK (a FIFO swapped in must not hang the open) where the OS has them.
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NO_BLOCK = getattr(os, "O_NONBLOCK", 0)


class FileIdentity(NamedTuple):
    """The file a path named when it was checked: its device and inode, and whether a link led there."""

    device: int
    inode: int
    linked: bool  # a Hugging Face cache snapshot's link to its blob


def sentence_files(folder: Path) -> dict[str, FileIdentity]:
    """The sentence-transformers files of ``folder``: path (relative, ``/``-separated) -> the file checked.

    ``{}`` if it has none. Raises ``CliError`` for a malformed ``modules.json``, a module path that
    leaves the folder, a module other than the first placed in the folder root, a symbolic link
    pointing elsewhere, or something that is not a regular file. Files that are not data (pickles,
    code) are left out with a warning.
    """
    modules_json = folder / "modules.json"
    if not modules_json.exists():
        return {}
    modules = _read_modules(modules_json)
    _check_inside(folder, modules_json)
    files = [name for name in _ROOT_FILES if (folder / name).exists()]
    files += sorted(p.name for p in folder.glob(_ROOT_GLOB))
    for name in files:
        _check_inside(folder, folder / name)
    for position, module in enumerate(modules):
        path, kind = module["path"], str(module.get("type", ""))
        if _is_root(path):
            if position == 0:
                continue  # the transformer itself: the quantized save and its tokenizer replace its files
            raise CliError(
                f"{str(modules_json)!r} places module {position} ({kind or 'of no type'}) in the model folder "
                f"itself (path {path!r}); sentence-transformers keeps only its first module, the transformer, "
                "there, so its files cannot be told from the model's: give the module its own sub-folder"
            )
        if kind.rsplit(".", 1)[-1] == "Transformer":
            logger.warning(
                "%s places the transformer in %r, not in the folder root: its float weights there would "
                "bypass the quantized model, so no sentence-transformers files are copied",
                modules_json,
                path,
            )
            return {}
        module_dir = folder / path
        if not module_dir.exists() and not module_dir.is_symlink():
            continue  # e.g. Normalize, which has nothing to save
        _check_inside(folder, module_dir)
        files += _module_files(folder, module_dir)
    return {rel: _identify(folder, rel) for rel in files}  # a folder named by two modules is copied once


def hub_sentence_folder(repo_id: str) -> Path | None:
    """A local snapshot holding the sentence-transformers files of the Hub model ``repo_id``, or ``None``.

    Downloads (or, offline, finds in the cache) ``modules.json``, then only the root configuration
    files and the data files of the module folders it names. A model without ``modules.json`` gives
    ``None``; a download failure is a warning (the quantized model is still saved, without them).
    """
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        modules_json = Path(hf_hub_download(repo_id, "modules.json"))
    except EntryNotFoundError:
        return None
    except Exception as exc:  # offline and not cached, no access, HTTP errors
        logger.debug("no modules.json for %s (%s)", repo_id, exc)
        return None
    paths = [PurePosixPath(m["path"]).as_posix() for m in _read_modules(modules_json) if not _is_root(m["path"])]
    patterns = [*_ROOT_FILES, _ROOT_GLOB] + [f"{p}/*{suffix}" for p in paths for suffix in sorted(SAFE_SUFFIXES)]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        logger.warning("could not fetch the sentence-transformers files of %s (%s); they are not copied", repo_id, exc)
        return None


def copy_sentence_files(src: Path, files: Mapping[str, FileIdentity], dst: Path) -> None:
    """Copy ``files`` (from :func:`sentence_files`) from ``src`` to ``dst``; never overwrites a saved file.

    Each is read through a descriptor that must reach the very file checked by :func:`sentence_files`;
    one that was replaced since (by a symbolic link or otherwise) raises ``CliError`` naming it.
    """
    for rel, identity in files.items():
        target = dst / rel
        if target.exists():
            logger.warning("%s was written by the save itself; the copy from %s is skipped", rel, src)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        _copy_checked(src / rel, identity, target)
    if files:
        logger.info("copied the sentence-transformers pipeline files: %s", ", ".join(files))


def _identify(folder: Path, rel: str) -> FileIdentity:
    """The identity of the checked file ``folder/rel``; ``CliError`` unless it is a regular file."""
    path = folder / rel
    try:
        st = os.stat(path)  # a Hub snapshot's link is followed to its blob (checked by _check_inside)
    except OSError as exc:
        raise CliError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise CliError(f"{str(path)!r} is not a regular file; sentence-transformers files are copied only as files")
    return FileIdentity(st.st_dev, st.st_ino, path.is_symlink())


def _copy_checked(path: Path, identity: FileIdentity, target: Path) -> None:
    """Copy ``path`` to the new file ``target`` from a descriptor, if it is still the file ``identity`` pins."""

    def replaced(how: str) -> CliError:
        return CliError(
            f"{str(path)!r} was replaced after it was checked (before the model loaded), {how}; nothing of it is "
            "copied and the quantized model is not saved: make sure nothing changes the model folder, then run again"
        )

    try:
        fd = os.open(path, os.O_RDONLY | _NO_BLOCK | (0 if identity.linked else _NO_FOLLOW))
    except OSError as exc:
        how = "by a symbolic link" if exc.errno == errno.ELOOP else f"and cannot be opened ({exc.strerror or exc})"
        raise replaced(how) from exc
    with open(fd, "rb") as source:
        st = os.fstat(source.fileno())
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (identity.device, identity.inode):
            raise replaced("by another file")
        with open(target, "xb") as copy:
            shutil.copyfileobj(source, copy)


def _read_modules(modules_json: Path) -> list[dict]:
    try:
        modules = json.loads(modules_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CliError(f"cannot read {str(modules_json)!r}: {exc}") from exc
    if not isinstance(modules, list) or not all(
        isinstance(m, dict) and isinstance(m.get("path"), str) for m in modules
    ):
        raise CliError(f"{str(modules_json)!r} is not a list of modules, each with a string 'path'")
    for m in modules:
        pure = PurePosixPath(m["path"])
        if pure.is_absolute() or ".." in pure.parts or "\\" in m["path"] or ":" in m["path"]:
            raise CliError(
                f"{str(modules_json)!r} names the module path {m['path']!r}, which leaves the model folder; "
                "only sub-folders of the model folder are copied"
            )
    return modules


def _is_root(path: str) -> bool:
    """Whether a module path names the model folder itself: ``""``, ``"."``, ``"./"``, ..."""
    return not PurePosixPath(path).parts


def _module_files(folder: Path, module_dir: Path) -> list[str]:
    """The data files under ``module_dir`` (recursively), relative to ``folder``."""
    found = []
    for root, dirs, names in os.walk(module_dir):
        dirs.sort()
        for d in dirs:
            _check_inside(folder, Path(root) / d)
        for name in sorted(names):
            path = Path(root) / name
            rel = path.relative_to(folder).as_posix()
            if name.startswith("."):
                continue
            if path.suffix not in SAFE_SUFFIXES:
                logger.warning(
                    "%s is not copied: only data files (%s) are, never pickles or code; "
                    "the sentence-transformers module that needs it will not load from the output",
                    rel,
                    ", ".join(sorted(SAFE_SUFFIXES)),
                )
                continue
            _check_inside(folder, path)
            found.append(rel)
    return found


def _check_inside(folder: Path, path: Path) -> None:
    """Refuse a symbolic link, or a path leading outside ``folder``, bar a Hub cache snapshot's links to its blobs."""
    if not path.is_symlink() and path.resolve().is_relative_to(folder.resolve()):
        return
    target = path.resolve()
    snapshot = folder.resolve()
    blobs = snapshot.parent.parent / "blobs"
    if snapshot.parent.name == "snapshots" and target.is_relative_to(blobs) and target.is_file():
        return  # a Hugging Face cache snapshot: every file is a link to the repository's blobs
    raise CliError(
        f"{str(path)!r} is a symbolic link (to {str(target)!r}): sentence-transformers files are copied only "
        f"as plain files inside the model folder {str(folder)!r}; copy the folder with `cp -rL` first"
    )
