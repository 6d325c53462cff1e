"""Bounded-time mutation fuzzer for the checkpoint reader and the config parser.

Not part of the default test run. Usage::

    .venv/bin/python fuzz/fuzz_checkpoint.py --seconds 60          # all targets, seed 0
    .venv/bin/python fuzz/fuzz_checkpoint.py --target config --seconds 10 --seed 3
    .venv/bin/python fuzz/fuzz_checkpoint.py --make-corpus         # rewrite the small seed corpus

Each target may only fail with ``ValueError`` / ``TypeError`` (the documented errors). Any other
exception, or a result that violates an invariant, is a finding: the input is written to
``fuzz/findings/`` and the run exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load, save

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from optimum_splitquant import FORMAT_VERSION, SplitQuantConfig  # noqa: E402
from optimum_splitquant.checkpoint import check_consistency, header_metadata, read_checkpoint_index  # noqa: E402
from optimum_splitquant.nn.linear import SplitQuantLinear  # noqa: E402

logger = logging.getLogger("fuzz")
CORPUS = HERE / "corpus"
FINDINGS = HERE / "findings"
ALLOWED = (ValueError, TypeError)
CONFIG = SplitQuantConfig(bits=2, group_size=8)


def make_corpus() -> None:
    """A tiny quantized layer as safetensors (with header metadata) and its config, < 4 KB in all."""
    CORPUS.mkdir(exist_ok=True)
    torch.manual_seed(0)
    layer = SplitQuantLinear.from_float(torch.nn.Linear(16, 6), CONFIG.to_spec())
    tensors = {f"layer.{k}": v.contiguous() for k, v in layer.state_dict().items()}
    meta = {**header_metadata(FORMAT_VERSION, CONFIG.storage_settings()), "format": "pt"}
    (CORPUS / "layer.safetensors").write_bytes(save(tensors, metadata=meta))
    (CORPUS / "config.json").write_text(json.dumps(CONFIG.to_dict(), sort_keys=True))


def target_header(data: bytes) -> None:
    """Header reader + consistency check on arbitrary bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(data)
        index = read_checkpoint_index([path])
        check_consistency(index, FORMAT_VERSION, CONFIG.storage_settings())


def target_layer(data: bytes) -> None:
    """Load tensors from arbitrary bytes into a layer the way the loader does, validate, run it."""
    target_header(data)  # the loader reads (and refuses damaged) headers before any tensor
    tensors = load(data)
    layer = SplitQuantLinear(16, 6, True, spec=CONFIG.to_spec())
    expected = {k: v for k, v in layer.state_dict().items()}
    for name, ref in expected.items():
        got = tensors.get(f"layer.{name}")
        if got is None or got.shape != ref.shape or got.dtype.is_floating_point != ref.dtype.is_floating_point:
            raise ValueError(f"tensor layer.{name} missing or mis-shaped")
        if got.dtype != ref.dtype and not got.dtype.is_floating_point:
            raise ValueError(f"tensor layer.{name} has dtype {got.dtype}")
    layer.load_state_dict({k: tensors[f"layer.{k}"] for k in expected})
    layer.validate()
    out = layer(torch.ones(2, 16))
    if layer.bias is not None and not bool(torch.isfinite(layer.bias).all()):
        return  # a non-finite float bias is the model's own business, as in any float checkpoint
    if not bool(torch.isfinite(out).all()):
        raise AssertionError("validated layer produced non-finite output")


def target_config(data: bytes) -> None:
    """Config parser on arbitrary JSON text."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return
    if not isinstance(obj, dict):
        return
    cfg = SplitQuantConfig.from_dict(obj)
    again = SplitQuantConfig.from_dict(json.loads(cfg.to_json_string()))
    if again != cfg:
        raise AssertionError("config JSON round trip changed the config")


TARGETS: dict[str, tuple[Callable[[bytes], None], str]] = {
    "header": (target_header, "layer.safetensors"),
    "layer": (target_layer, "layer.safetensors"),
    "config": (target_config, "config.json"),
}


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and buf:  # flip bits
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # random byte
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        elif op == 2 and buf:  # truncate
            del buf[rng.randrange(len(buf)) :]
        elif op == 3:  # insert
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 4 and len(buf) > 8:  # overwrite an 8-byte little-endian integer
            i = rng.randrange(len(buf) - 8)
            buf[i : i + 8] = rng.choice([0, 1, 2**31, 2**63 - 1, rng.randrange(2**64)]).to_bytes(8, "little")
        elif op == 5:  # splice text tokens that matter to JSON / headers
            token = rng.choice([b'"U8"', b'"F16"', b'"I64"', b"null", b"-1", b"1e309", b'"99"', b"[]", b"{}"])
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = token
    return bytes(buf)


def run(name: str, seconds: float, seed: int) -> int:
    fn, seed_file = TARGETS[name]
    base = (CORPUS / seed_file).read_bytes()
    fn(base)  # the seed itself must pass
    rng = random.Random(seed)
    deadline, count, refused = time.monotonic() + seconds, 0, 0
    while time.monotonic() < deadline:
        data = mutate(base, rng)
        count += 1
        try:
            fn(data)
        except ALLOWED:
            refused += 1
        except Exception:
            FINDINGS.mkdir(exist_ok=True)
            out = FINDINGS / f"{name}-{seed}-{count}.bin"
            out.write_bytes(data)
            logger.error("%s: finding after %d inputs, saved to %s\n%s", name, count, out, traceback.format_exc())
            return 1
    logger.info(
        "%s: %d inputs in %.0f s, %d refused with ValueError/TypeError, no finding", name, count, seconds, refused
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--seconds", type=float, default=30.0, help="time budget per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--make-corpus", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("optimum_splitquant").setLevel(logging.WARNING)
    if args.make_corpus:
        make_corpus()
        return 0
    names = list(TARGETS) if args.target == "all" else [args.target]
    return max(run(n, args.seconds, args.seed) for n in names)


if __name__ == "__main__":
    sys.exit(main())
