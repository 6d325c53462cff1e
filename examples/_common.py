"""What the examples share: logging set-up, the real SMS texts they score, and mean-pooled embeddings.

Imported by the example scripts as ``_common`` (``python examples/NAME.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import logging
import sys

import torch
import transformers

from optimum_splitquant.cli.data import embed as embed_texts
from optimum_splitquant.cli.data import sms_spam

__all__ = ["BATCH_SIZE", "MAX_LENGTH", "embed", "setup", "sms_texts"]

BATCH_SIZE = 64
MAX_LENGTH = 64


def setup(verbose: bool, *loggers: str, level: int = logging.INFO) -> None:
    """Log to stderr, no progress bars, torch seed 0.

    Records of ``level`` and above are shown (DEBUG with ``verbose``); the named ``loggers`` and the
    package's own show INFO whatever ``level`` is, so ``level=logging.WARNING`` quiets other libraries.
    """
    logging.basicConfig(
        level=logging.DEBUG if verbose else level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not verbose:
        for name in (*loggers, "optimum_splitquant"):
            logging.getLogger(name).setLevel(logging.INFO)
    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)


def sms_texts(n: int, skip: int = 0) -> list[str]:
    """Texts ``skip .. skip + n`` of the shipped SMS Spam Collection (real messages, file order)."""
    texts = sms_spam().texts
    if len(texts) < skip + n:
        raise ValueError(f"the SMS Spam Collection has {len(texts)} texts, {skip + n} needed")
    return texts[skip : skip + n]


def embed(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled (over the attention mask) last hidden states, one row per text."""
    return embed_texts(model, tokenizer, texts, batch_size=BATCH_SIZE, max_length=MAX_LENGTH)
