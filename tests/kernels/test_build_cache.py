"""The kernel cache survives damage: truncated or foreign libraries are rebuilt, never loaded, and
a build that dies or times out leaves neither a compiler running nor a folder behind.

A stand-in compiler (a shell script that copies the real library, built once for the whole
session in the ordinary cache) keeps these tests free of compiles; processes that might crash
while loading a library run as children, whose exit status is the verdict.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from optimum_splitquant import kernels
from optimum_splitquant.kernels import _build

FAKE_CXX = """#!/bin/sh
if [ "$1" = "--version" ]; then echo "stand-in compiler 1.0"; exit 0; fi
echo "$$" >> "$FAKE_CXX_LOG"
if [ -n "$FAKE_CXX_SLEEP" ]; then
    sleep "$FAKE_CXX_SLEEP" &
    echo "$$ $!" > "$FAKE_CXX_PIDS"
    wait
fi
out=""; prev=""
for a in "$@"; do
    if [ "$prev" = "-o" ]; then out="$a"; fi
    prev="$a"
done
cp "$FAKE_CXX_LIBRARY" "$out"
"""

# Loads the kernels from the cache (OPTIMUM_SPLITQUANT_KERNELS=require) and checks a forward pass.
CHILD = """
import torch
import torch.nn.functional as F
from torch import nn
from optimum_splitquant import kernels
from optimum_splitquant.core import QuantSpec, dequantize_weight
from optimum_splitquant.nn import SplitQuantLinear

spec = QuantSpec(2, 3)
torch.manual_seed(0)
q = SplitQuantLinear.from_float(nn.Linear(40, 24), spec)
x = torch.randn(3, 40)
w = dequantize_weight(q.weight_packed, q.weight_scale, q.weight_offset, 40, spec)
st = kernels.status()
assert st.active, st.reason
got = kernels.dequantize(q.weight_packed, q.weight_scale, q.weight_offset, 40, spec.bits, spec.symbol_width)
assert torch.equal(got, w), "the kernels dequantize other values than the pure-torch path"
with torch.no_grad():
    y = q(x)
assert torch.allclose(y, F.linear(x, w, q.bias), rtol=1e-5, atol=1e-5), "the forward pass differs"
print(st.path)
"""


@pytest.fixture(scope="module")
def real_library() -> Path:
    """The real compiled library (from the ordinary cache; built there if it is not yet)."""
    if _build.find_compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    try:
        return _build.build_library()
    except _build.KernelBuildError as exc:
        pytest.skip(f"the kernels cannot be built here: {exc}")


@pytest.fixture
def fake_cache(real_library: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary cache root whose compiler is the stand-in; returns the cache's ``kernels/`` folder."""
    cxx = tmp_path / "fake-cxx"
    cxx.write_text(FAKE_CXX)
    cxx.chmod(0o755)
    monkeypatch.setenv("CXX", str(cxx))
    monkeypatch.setenv("FAKE_CXX_LIBRARY", str(real_library))
    monkeypatch.setenv("FAKE_CXX_PIDS", str(tmp_path / "pids"))
    monkeypatch.setenv("FAKE_CXX_LOG", str(tmp_path / "compiles"))
    monkeypatch.setenv(_build.CACHE_ENV, str(tmp_path / "cache"))
    return tmp_path / "cache" / "kernels"


def run_child() -> subprocess.CompletedProcess[str]:
    env = {**os.environ, kernels.ENV_VAR: "require", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)


def damage(path: Path, how: str) -> Path:
    """Damage a cached library in place; returns the path a later process may find."""
    if how == "truncated":  # power loss after the rename, before the data reached the disk
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
        return path
    garbage = b"this is not a shared library\n"
    path.unlink()
    if how == "garbage":  # intact bytes (the name matches them) that do not load
        out = path.with_name(f"{path.name.rsplit('-', 1)[0]}-{_build._sha(garbage)}.so")
    else:  # "unhashed": a file under the name older versions used
        out = path.with_name(f"{path.name.rsplit('-', 1)[0]}.so")
    out.write_bytes(garbage)
    return out


@pytest.mark.parametrize(
    "how",
    ["truncated", pytest.param("garbage", marks=pytest.mark.slow), pytest.param("unhashed", marks=pytest.mark.slow)],
)  # each case rebuilds the library: one by default
def test_damaged_library_is_rebuilt_not_loaded(how: str, fake_cache: Path, real_library: Path) -> None:
    built = _build.build_library()
    assert built.parent == fake_cache and built.read_bytes() == real_library.read_bytes()
    bad = damage(built, how)
    proc = run_child()
    assert proc.returncode == 0, f"the process with a {how} cached library failed ({proc.returncode}): {proc.stderr}"
    loaded = Path(proc.stdout.strip().splitlines()[-1])
    assert loaded == built and loaded.read_bytes() == real_library.read_bytes()
    if bad != built:
        assert not bad.exists(), f"the {how} library was left in the cache"


def test_intact_library_is_reused(fake_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built = _build.build_library()
    stamp = built.stat().st_mtime_ns

    def no_compile(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        raise AssertionError(f"an intact cached library was compiled again: {cmd}")

    monkeypatch.setattr(_build, "_run_compiler", no_compile)
    assert _build.build_library() == built and built.stat().st_mtime_ns == stamp


def test_concurrent_builds_compile_once(fake_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_CXX_SLEEP", "1")
    with ThreadPoolExecutor(3) as pool:
        paths = list(pool.map(lambda _: _build.build_library(), range(3)))
    assert paths[0] == paths[1] == paths[2] and paths[0].is_file()
    compiles = (tmp_path / "compiles").read_text().split()
    assert len(compiles) == 1, f"{len(compiles)} compiles for one library"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_abandoned_build_folders_are_removed(fake_cache: Path) -> None:
    host = socket.gethostname()
    fake_cache.mkdir(parents=True)
    dead = fake_cache / f".build-{host}-{dead_pid()}-dead"
    live = fake_cache / f".build-{host}-{os.getpid()}-live"
    old = fake_cache / ".build-elsewhere-1-old"
    fresh = fake_cache / ".build-elsewhere-1-fresh"
    for folder in (dead, live, old, fresh):
        folder.mkdir()
    long_ago = time.time() - 2 * _build._STALE_S
    os.utime(old, (long_ago, long_ago))
    _build.build_library()
    assert not dead.exists(), "the folder of a dead build on this host was kept"
    assert not old.exists(), "a folder older than any build was kept"
    assert live.exists() and fresh.exists(), "the folder of a build that may still run was removed"


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for a parent that does not reap counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def wait_for(predicate, what: str, seconds: float = 20.0) -> None:  # type: ignore[no-untyped-def]
    end = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting until {what}")
        time.sleep(0.05)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_compiler_is_killed_when_the_build_times_out(
    fake_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_CXX_SLEEP", "60")
    monkeypatch.setattr(_build, "_TIMEOUT_S", 1)
    with pytest.raises(_build.KernelBuildError, match="no result after 1 s"):
        _build.build_library()
    driver, child = map(int, (tmp_path / "pids").read_text().split())
    wait_for(lambda: process_gone(driver) and process_gone(child), "the compiler and its child exit")
    assert not list(fake_cache.glob(".build-*")) and not list(fake_cache.glob("*.so"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux only")
def test_compiler_dies_with_a_killed_build(fake_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGKILL of the building process ends the compiler too; its folder goes at the next build."""
    monkeypatch.setenv("FAKE_CXX_SLEEP", "60")
    builder = subprocess.Popen(
        [sys.executable, "-c", "from optimum_splitquant.kernels import _build; _build.build_library()"],
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    pids = tmp_path / "pids"
    try:
        wait_for(lambda: pids.is_file() and len(pids.read_text().split()) == 2, "the compiler starts", 60.0)
    finally:
        builder.send_signal(signal.SIGKILL)
        builder.wait()
    driver, child = map(int, pids.read_text().split())
    os.kill(child, signal.SIGKILL)  # a grandchild; the real compiler's would finish its one file
    wait_for(lambda: process_gone(driver), "the compiler exits after the build was killed")
    assert len(list(fake_cache.glob(".build-*"))) == 1, "the killed build should have left its folder"
    monkeypatch.delenv("FAKE_CXX_SLEEP")
    _build.build_library()
    assert not list(fake_cache.glob(".build-*")), "the abandoned build folder was not removed"
