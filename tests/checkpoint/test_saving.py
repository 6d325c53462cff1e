"""Staged folder swaps: permissions, symbolic links, mount points, failures."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from optimum_splitquant.checkpoint import saving
from optimum_splitquant.checkpoint.saving import staged_folder


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".saving-" in p.name or ".old-" in p.name)


def test_new_folder_gets_the_permissions_of_a_plain_mkdir(tmp_path):
    (tmp_path / "plain").mkdir()
    with staged_folder(tmp_path / "saved") as staging:
        (staging / "a.txt").write_text("new")
    assert (tmp_path / "saved" / "a.txt").read_text() == "new"
    assert (tmp_path / "saved").stat().st_mode & 0o777 == (tmp_path / "plain").stat().st_mode & 0o777
    assert leftovers(tmp_path) == []


def test_a_symlinked_target_keeps_its_link_and_replaces_the_folder_it_names(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "a.txt").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    with staged_folder(link) as staging:
        (staging / "a.txt").write_text("new")
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert (real / "a.txt").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_a_mount_point_is_refused_before_anything_is_written(tmp_path, monkeypatch: pytest.MonkeyPatch):
    target = tmp_path / "mnt"
    target.mkdir()
    (target / "a.txt").write_text("old")
    monkeypatch.setattr(saving.os.path, "ismount", lambda p: Path(p) == target)
    with pytest.raises(ValueError, match="mount point"), staged_folder(target):
        pytest.fail("the block must not run")
    assert (target / "a.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_a_failing_block_leaves_the_previous_folder(tmp_path):
    target = tmp_path / "saved"
    target.mkdir()
    (target / "a.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"), staged_folder(target) as staging:
        (staging / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "old" and leftovers(tmp_path) == []


# ---- staging folders left by a killed save ------------------------------------------------------------------

# Runs staged_folder in a child process that loads saving.py alone (standard library only: no torch import).
_CHILD = """
import importlib.util, os, pathlib, signal, sys
spec = importlib.util.spec_from_file_location("saving_alone", sys.argv[1])
saving = importlib.util.module_from_spec(spec)
spec.loader.exec_module(saving)
with saving.staged_folder(sys.argv[2]) as staging:
    (pathlib.Path(staging) / "model.safetensors").write_bytes(b"half written")
    print(staging, flush=True)
    if sys.argv[3] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.stdin.readline()  # "wait": hold the staging folder until told to go on
"""


def _child(target: Path, mode: str) -> subprocess.Popen:
    args = [sys.executable, "-c", _CHILD, saving.__file__, str(target), mode]
    return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_a_killed_saves_staging_folder_is_removed_by_the_next_save(tmp_path):
    target = tmp_path / "saved"
    child = _child(target, "kill")
    staging = Path(child.stdout.readline().strip())
    assert child.wait(timeout=60) == -signal.SIGKILL
    assert staging.parent == tmp_path and staging.name.startswith(".saved.saving-")
    assert (staging / "model.safetensors").is_file(), "kill -9 leaves the staging folder"
    with staged_folder(target) as fresh:
        (fresh / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_a_staging_folder_in_use_is_left_alone(tmp_path):
    target = tmp_path / "saved"
    child = _child(target, "wait")
    try:
        staging = Path(child.stdout.readline().strip())
        assert saving.remove_stale_staging(tmp_path, ".saved.saving-") == []
        with staged_folder(target) as fresh:
            (fresh / "a.txt").write_text("mine")
        assert (staging / "model.safetensors").read_bytes() == b"half written"
    finally:
        child.kill()
        child.wait(timeout=60)
    assert saving.remove_stale_staging(tmp_path, ".saved.saving-") == [staging]  # its process is gone now
    assert not staging.exists() and (target / "a.txt").read_text() == "mine"


def test_only_this_targets_unlocked_staging_folders_are_removed(tmp_path, caplog):
    hexid = "0123456789abcdef" * 2
    stale = tmp_path / f".saved.saving-{hexid}"
    kept = [
        tmp_path / f".other.saving-{hexid}",  # another target's
        tmp_path / ".saved.saving-notes",  # not our name
        tmp_path / f".saved.saving-{hexid}0",  # not our name either
        tmp_path / f".saved.saving-{hexid.upper()}",
    ]
    for folder in [stale, *kept]:
        folder.mkdir()
        (folder / "f.txt").write_text("x")
    (tmp_path / f".saved.saving-{'1' * 32}").write_text("a file of that name")
    (tmp_path / f".saved.saving-{'2' * 32}").symlink_to(kept[0], target_is_directory=True)
    with caplog.at_level(logging.INFO, logger="optimum_splitquant"):
        assert saving.remove_stale_staging(tmp_path, ".saved.saving-") == [stale]
    assert str(stale) in caplog.text
    assert all((folder / "f.txt").is_file() for folder in kept)
    assert (tmp_path / f".saved.saving-{'1' * 32}").is_file() and (tmp_path / f".saved.saving-{'2' * 32}").is_symlink()


def test_without_locks_leftovers_are_named_in_a_warning_and_kept(tmp_path, monkeypatch, caplog):
    stale = tmp_path / f".saved.saving-{'3' * 32}"
    stale.mkdir()
    monkeypatch.setattr(saving, "fcntl", None)
    with caplog.at_level(logging.WARNING, logger="optimum_splitquant"):
        assert saving.remove_stale_staging(tmp_path, ".saved.saving-") == []
    assert stale.is_dir() and str(stale) in caplog.text and "remove them by hand" in caplog.text
