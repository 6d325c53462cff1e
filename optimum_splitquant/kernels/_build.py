"""Compile ``splitquant_cpu.cpp`` (with the other ``*_cpu.cpp`` kernels) into one shared library at first use, cached per source and toolchain.

Needs only a C++17/20 compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++`` on ``PATH``) and the
headers that every torch wheel ships; no ninja, no Python headers. The library lands in
``$OPTIMUM_SPLITQUANT_CACHE`` (default ``$XDG_CACHE_HOME/optimum-splitquant`` or
``~/.cache/optimum-splitquant``) under ``kernels/``, named by a hash of the source, the compiler's
version, the flags and the torch version, so an upgrade of any of them rebuilds instead of loading
a stale binary.

The cache survives crashes and power loss:

* The library is compiled in a private ``.build-<host>-<pid>-*`` folder, flushed to disk
  (``fsync``) and only then moved into place atomically, so concurrent first uses never see a
  half-written file.
* Processes that need the same library at once wait for one compile (a lock file per key).
* Its file name ends with a hash of its own bytes (``splitquant_cpu-<key>-<content>.so``). A file
  whose bytes no longer match (truncated by a crash, overwritten) is removed and rebuilt, never
  loaded: loading a truncated library would crash the process (``SIGBUS``) at first use.
* The compiler runs in its own process group, killed with the build when the build fails, times
  out or is interrupted (on Linux the compiler driver also dies with the building process), and
  build folders left behind by dead processes are removed by the next build.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

__all__ = ["KernelBuildError", "build_library", "cache_dir", "cache_root", "discard", "find_compiler"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("splitquant_cpu.cpp")
# Compiled into the same library as SOURCE: the exact 1-D k-means search (core/kmeans/'s binned path).
KMEANS_SOURCE = Path(__file__).with_name("kmeans_cpu.cpp")
# Also in the same library: least-squares range fitting (core/quantize.py's fit="mse").
FIT_SOURCE = Path(__file__).with_name("fit_cpu.cpp")
# And the layers of the k-means dynamic programme (core/kmeans/dp.py, many clusters).
KMEANS_DP_SOURCE = Path(__file__).with_name("kmeans_dp_cpu.cpp")
# And the load-time check of a layer's stored tensors (nn/validation.py's check_layer()).
CHECK_SOURCE = Path(__file__).with_name("check_cpu.cpp")
# And the decode of coded ranges on every forward pass (core/ranges.py's decode_layer_ranges()).
RANGES_SOURCE = Path(__file__).with_name("ranges_cpu.cpp")
CACHE_ENV = "OPTIMUM_SPLITQUANT_CACHE"
_TIMEOUT_S = 600
_STALE_S = 2 * _TIMEOUT_S  # a build folder this old belongs to no running build
_PREFIX = "splitquant_cpu"
_HASH_LEN = 16  # hex digits of the key and of the content hash in the file name
_BUILD_PREFIX = ".build-"


class KernelBuildError(RuntimeError):
    """The compiled kernels could not be built (no compiler, compile error, missing source)."""


def cache_root() -> Path:
    """The package's cache folder, shared by the kernels and the CLI's data and models.

    ``$OPTIMUM_SPLITQUANT_CACHE``, else ``$XDG_CACHE_HOME/optimum-splitquant``, else
    ``~/.cache/optimum-splitquant`` (a leading ``~`` in either variable is expanded).
    """
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "optimum-splitquant"


def cache_dir() -> Path:
    """Folder holding the compiled kernels: ``kernels/`` under :func:`cache_root`."""
    return cache_root() / "kernels"


def find_compiler() -> str | None:
    """``$CXX`` if set, else the first of ``c++``, ``g++``, ``clang++`` found on ``PATH``."""
    cxx = os.environ.get("CXX")
    if cxx:
        return cxx
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _torch_dirs() -> tuple[list[str], str]:
    root = Path(torch.__file__).parent
    return [str(root / "include"), str(root / "include" / "torch" / "csrc" / "api" / "include")], str(root / "lib")


def _flags(openmp: bool) -> list[str]:
    includes, _ = _torch_dirs()
    flags = [
        "-O3",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-w",
        # No fused multiply-add contraction: dequantized weights must round exactly as in torch.
        "-ffp-contract=off",
        # Floating-point exceptions are never inspected: clamps become min / max and their loops vectorize
        # (the values are the same; only the status flags an operation could raise are not kept).
        "-fno-trapping-math",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
    ]
    if openmp:
        flags.append("-fopenmp")
    return flags + [f"-I{d}" for d in includes]


def _link_flags() -> list[str]:
    _, lib = _torch_dirs()
    flags = [f"-L{lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{lib}"]
    if platform.system() == "Darwin":
        flags += ["-undefined", "dynamic_lookup"]
    return flags


def _compiler_version(cxx: str) -> str:
    try:
        proc = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise KernelBuildError(f"C++ compiler {cxx!r} cannot run: {exc}") from None
    if proc.returncode != 0:
        raise KernelBuildError(f"C++ compiler {cxx!r} cannot run: {proc.stderr.strip()[:200]}")
    return proc.stdout.strip()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:_HASH_LEN]


def _cache_key(cxx: str, sources: tuple[Path, ...]) -> str:
    parts = [path.read_bytes() for path in sources]
    parts += [_compiler_version(cxx).encode(), torch.__version__.encode(), platform.machine().encode()]
    parts += [" ".join(_flags(True) + _link_flags()).encode()]
    return _sha(b"\0".join(parts))


def _remove(path: Path, why: str, level: int = logging.WARNING) -> None:
    logger.log(level, "SplitQuant: removing the cached kernel library %s (%s); it will be rebuilt", path, why)
    try:
        path.unlink()
    except FileNotFoundError:
        pass  # another process removed it first
    except OSError as exc:
        raise KernelBuildError(f"cannot remove the damaged kernel library {path}: {exc}") from None


def _cached(folder: Path, key: str) -> Path | None:
    """The first library of ``key`` whose bytes match the hash in its name; the others are removed."""
    if not folder.is_dir():
        return None
    stem = f"{_PREFIX}-{key}"
    for path in sorted(folder.glob(f"{stem}*.so")):
        content = path.name[len(stem) : -len(".so")]
        if not content.startswith("-") or len(content) != _HASH_LEN + 1:
            _remove(path, "written by an older version, without a content hash", logging.INFO)
            continue
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            continue
        if _sha(data) == content[1:]:
            return path
        _remove(path, f"its {len(data)} bytes do not match the hash in its name: truncated or overwritten")
    return None


def discard(path: Path) -> None:
    """Remove a cached library that cannot be loaded, so that the next :func:`build_library` rebuilds it."""
    _remove(Path(path), "it cannot be loaded")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _clean_stale_builds(folder: Path) -> None:
    """Remove build folders whose process is gone (same host) or older than any build can take."""
    host = socket.gethostname()
    now = time.time()
    for tmp in folder.glob(f"{_BUILD_PREFIX}*"):
        try:
            age = now - tmp.stat().st_mtime
        except FileNotFoundError:
            continue
        owner_host, _, rest = tmp.name[len(_BUILD_PREFIX) :].rpartition("-")[0].rpartition("-")
        owner_gone = owner_host == host and rest.isdigit() and not _pid_alive(int(rest))
        if owner_gone or age > _STALE_S:
            logger.info("SplitQuant: removing the abandoned kernel build folder %s", tmp)
            shutil.rmtree(tmp, ignore_errors=True)


def _death_signal_hook() -> Callable[[], None] | None:
    """On Linux, a hook run in the compiler's process before exec: SIGKILL it when the building process dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig, sigkill = 1, int(signal.SIGKILL)
    return lambda: prctl(pr_set_pdeathsig, sigkill)  # resolved before the fork: no import in the child


def _run_compiler(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run one compile in its own process group; the whole group is killed if the build does not end normally."""
    try:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
            preexec_fn=_death_signal_hook(),
        )
    except OSError as exc:
        raise KernelBuildError(f"compiling the kernels failed: {exc}") from None
    try:
        out, err = proc.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        raise KernelBuildError(f"compiling the kernels failed: no result after {_TIMEOUT_S} s") from None
    except BaseException:  # interrupted (KeyboardInterrupt, ...): the compiler must not outlive the build
        _kill_group(proc)
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _kill_group(proc: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported here (e.g. Windows): the rename is still atomic
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def build_library() -> Path:
    """Path of the compiled library, building it first if this source/toolchain has no intact cached build."""
    sources = (SOURCE, KMEANS_SOURCE, FIT_SOURCE, KMEANS_DP_SOURCE, CHECK_SOURCE, RANGES_SOURCE)
    for path in sources:
        if not path.is_file():
            raise KernelBuildError(f"kernel source {path} is missing from the installation")
    cxx = find_compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (install g++ or clang++, or set CXX)")
    key = _cache_key(cxx, sources)
    folder = cache_dir()
    found = _cached(folder, key)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    with _exclusive(folder / f".lock-{key}"):  # one compile per key at a time; the others wait for it
        found = _cached(folder, key)
        if found is not None:
            return found
        _clean_stale_builds(folder)
        return _compile(cxx, sources, key, folder)


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``lock`` (released by the system if the process dies); no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builds stay safe (atomic rename), only duplicated
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _compile(cxx: str, sources: tuple[Path, ...], key: str, folder: Path) -> Path:
    logger.info("SplitQuant: compiling the CPU kernels with %s (one time, about a minute); cache: %s", cxx, folder)
    start = time.perf_counter()
    errors = []
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f"{_BUILD_PREFIX}{socket.gethostname()}-{os.getpid()}-"))
    try:
        out = tmp / f"{_PREFIX}-{key}.so"
        for openmp in (True, False):  # Apple clang has no -fopenmp: build single-threaded instead
            cmd = [cxx, *_flags(openmp), *map(str, sources), "-o", str(out), *_link_flags()]
            proc = _run_compiler(cmd)
            if proc.returncode == 0 and out.is_file():
                break
            errors.append(proc.stderr.strip()[-2000:] or f"exit status {proc.returncode}, no output file")
        else:
            raise KernelBuildError("compiling the kernels failed:\n" + "\n---\n".join(errors))
        with open(out, "rb") as f:  # the bytes reach the disk before the name does
            data = f.read()
            os.fsync(f.fileno())
        if not data:
            raise KernelBuildError(f"compiling the kernels failed: the compiler {cxx!r} wrote an empty library")
        target = folder / f"{_PREFIX}-{key}-{_sha(data)}.so"
        os.replace(out, target)
        _fsync_dir(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SplitQuant: kernels compiled in %.1f s: %s", time.perf_counter() - start, target)
    return target
