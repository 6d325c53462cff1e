"""Staged folder swaps: permissions, symbolic links, mount points, failures."""

from __future__ import annotations

import os
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
