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
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path, PurePosixPath

from .console import CliError

__all__ = ["SAFE_SUFFIXES", "copy_sentence_files", "hub_sentence_folder", "sentence_files"]

logger = logging.getLogger(__name__)

_ROOT_FILES = ("modules.json", "config_sentence_transformers.json")
_ROOT_GLOB = "sentence_*_config.json"  # sentence_bert_config.json and its older per-architecture names
# Data only: a module's pickled weights (.bin, .pt, .pkl) or code (.py) are never copied.
SAFE_SUFFIXES = frozenset({".json", ".txt", ".safetensors", ".model"})


def sentence_files(folder: Path) -> list[str]:
    """Paths (relative to ``folder``, ``/``-separated) of its sentence-transformers files; ``[]`` if it has none.

    Raises ``CliError`` for a malformed ``modules.json``, a module path that leaves the folder, or a
    symbolic link pointing elsewhere. Files that are not data (pickles, code) are left out with a warning.
    """
    modules_json = folder / "modules.json"
    if not modules_json.exists():
        return []
    modules = _read_modules(modules_json)
    _check_inside(folder, modules_json)
    files = [name for name in _ROOT_FILES if (folder / name).exists()]
    files += sorted(p.name for p in folder.glob(_ROOT_GLOB))
    for name in files:
        _check_inside(folder, folder / name)
    for module in modules:
        path, kind = module["path"], str(module.get("type", ""))
        if path == "":
            continue  # the transformer itself, in the root: the quantized save and its tokenizer
        if kind.rsplit(".", 1)[-1] == "Transformer":
            logger.warning(
                "%s places the transformer in %r, not in the folder root: its float weights there would "
                "bypass the quantized model, so no sentence-transformers files are copied",
                modules_json,
                path,
            )
            return []
        module_dir = folder / path
        if not module_dir.exists() and not module_dir.is_symlink():
            continue  # e.g. Normalize, which has nothing to save
        _check_inside(folder, module_dir)
        files += _module_files(folder, module_dir)
    return list(dict.fromkeys(files))  # a folder named by two modules is copied once


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
    paths = [m["path"] for m in _read_modules(modules_json) if m["path"]]
    patterns = [*_ROOT_FILES, _ROOT_GLOB] + [f"{p}/*{suffix}" for p in paths for suffix in sorted(SAFE_SUFFIXES)]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:
        logger.warning("could not fetch the sentence-transformers files of %s (%s); they are not copied", repo_id, exc)
        return None


def copy_sentence_files(src: Path, files: list[str], dst: Path) -> None:
    """Copy ``files`` (from :func:`sentence_files`) from ``src`` to ``dst``; never overwrites a saved file."""
    for rel in files:
        target = dst / rel
        if target.exists():
            logger.warning("%s was written by the save itself; the copy from %s is skipped", rel, src)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src / rel, target)
    if files:
        logger.info("copied the sentence-transformers pipeline files: %s", ", ".join(files))


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
