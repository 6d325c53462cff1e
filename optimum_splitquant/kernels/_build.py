"""Compile ``splitquant_cpu.cpp`` into a shared library at first use, cached per source and toolchain.

Needs only a C++17/20 compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++`` on ``PATH``) and the
headers that every torch wheel ships; no ninja, no Python headers. The library lands in
``$OPTIMUM_SPLITQUANT_CACHE`` (default ``$XDG_CACHE_HOME/optimum-splitquant`` or
``~/.cache/optimum-splitquant``) under ``kernels/``, named by a hash of the source, the compiler's
version, the flags and the torch version, so an upgrade of any of them rebuilds instead of loading
a stale binary. It is written to a temporary file first and moved into place atomically, so
concurrent first uses (test workers, several processes) never load a half-written file.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

__all__ = ["KernelBuildError", "build_library", "cache_dir", "cache_root", "find_compiler"]

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("splitquant_cpu.cpp")
# Compiled into the same library as SOURCE: the exact 1-D k-means search (core/kmeans/'s binned path).
KMEANS_SOURCE = Path(__file__).with_name("kmeans_cpu.cpp")
# Also in the same library: least-squares range fitting (core/quantize.py's fit="mse").
FIT_SOURCE = Path(__file__).with_name("fit_cpu.cpp")
CACHE_ENV = "OPTIMUM_SPLITQUANT_CACHE"
_TIMEOUT_S = 600


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


def build_library() -> Path:
    """Path of the compiled library, building it first if this source/toolchain has no cached build."""
    sources = (SOURCE, KMEANS_SOURCE, FIT_SOURCE)
    for path in sources:
        if not path.is_file():
            raise KernelBuildError(f"kernel source {path} is missing from the installation")
    cxx = find_compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (install g++ or clang++, or set CXX)")
    key_parts = [path.read_bytes() for path in sources]
    key_parts += [_compiler_version(cxx).encode(), torch.__version__.encode(), platform.machine().encode()]
    key_parts += [" ".join(_flags(True) + _link_flags()).encode()]
    key = hashlib.sha256(b"\0".join(key_parts)).hexdigest()[:16]
    target = cache_dir() / f"splitquant_cpu-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("SplitQuant: compiling the CPU kernels with %s (one time, ~20 s); cache: %s", cxx, target)
    start = time.perf_counter()
    errors = []
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        out = Path(tmp) / target.name
        for openmp in (True, False):  # Apple clang has no -fopenmp: build single-threaded instead
            cmd = [cxx, *_flags(openmp), *map(str, sources), "-o", str(out), *_link_flags()]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
            except (OSError, subprocess.SubprocessError) as exc:
                raise KernelBuildError(f"compiling the kernels failed: {exc}") from None
            if proc.returncode == 0:
                break
            errors.append(proc.stderr.strip()[-2000:])
        else:
            raise KernelBuildError("compiling the kernels failed:\n" + "\n---\n".join(errors))
        os.replace(out, target)
    logger.info("SplitQuant: kernels compiled in %.1f s", time.perf_counter() - start)
    return target
