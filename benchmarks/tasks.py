"""The quality benchmark's tasks: a real model, real offline data and one number per quantized model.

Each task loads a fresh float32 model (``load``), computes its references once from the FP32
model (``prepare``), scores any model (``score``) and provides one fixed batch for timing
(``inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from optimum_splitquant.cli import data

__all__ = ["BbcProbe", "EmbeddingCosine", "Perplexity", "SmsAccuracy", "Task"]


@dataclass
class Task:
    """Base class; ``path`` is the float model folder."""

    path: Path
    name: str = ""
    metric: str = ""
    higher_is_better: bool = True
    model_desc: str = ""
    data_desc: str = ""
    _tokenizer: Any = field(default=None, repr=False)
    #: the last ``score``'s predicted class per example (classification tasks; ``None`` otherwise)
    predictions: list[int] | None = field(default=None, repr=False)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = AutoTokenizer.from_pretrained(self.path)
        return self._tokenizer

    def load(self) -> nn.Module:
        raise NotImplementedError

    def prepare(self, fp32: nn.Module) -> None:
        """Compute what scoring needs from the FP32 model (references, probes)."""

    def score(self, model: nn.Module) -> float:
        raise NotImplementedError

    def inputs(self) -> dict[str, torch.Tensor]:
        """One fixed batch for forward-time measurements."""
        raise NotImplementedError

    def labels(self) -> list[int] | None:
        """The true class per scored example (classification tasks; ``None`` otherwise)."""
        return None

    def describe(self) -> dict[str, Any]:
        return {
            "task": self.name,
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "model": self.model_desc,
            "data": self.data_desc,
        }


@dataclass
class EmbeddingCosine(Task):
    """Mean cosine of mean-pooled sentence embeddings to the FP32 model's, on real SMS texts."""

    n_texts: int = 512
    max_length: int = 128

    def __post_init__(self) -> None:
        self.name = self.name or "minilm-embedding-cosine"
        self.metric = "mean cosine to FP32"
        self.model_desc = self.model_desc or "all-MiniLM-L6-v2 (22.7 M params)"
        self.texts = data.sms_spam().texts[: self.n_texts]
        self.data_desc = f"first {len(self.texts)} SMS texts of the SMS Spam Collection, mean pooling"

    def load(self) -> nn.Module:
        return AutoModel.from_pretrained(self.path, dtype=torch.float32).eval()

    def prepare(self, fp32: nn.Module) -> None:
        self.reference = data.embed(fp32, self.tokenizer, self.texts, max_length=self.max_length)

    def score(self, model: nn.Module) -> float:
        return data.mean_cosine(
            data.embed(model, self.tokenizer, self.texts, max_length=self.max_length), self.reference
        )

    def inputs(self) -> dict[str, torch.Tensor]:
        return dict(self.tokenizer(self.texts[:32], padding=True, truncation=True, max_length=64, return_tensors="pt"))


@dataclass
class SmsAccuracy(Task):
    """Accuracy of the demo's MiniLM spam classifier on its held-out messages."""

    n_test: int = 1000
    limit: int | None = None

    def __post_init__(self) -> None:
        self.name = self.name or "sms-spam-accuracy"
        self.metric = "accuracy"
        self.model_desc = self.model_desc or "MiniLM SMS spam classifier (optimum-splitquant demo)"
        _, test = data.split(data.sms_spam(), self.n_test, seed=0)
        self.test = test.subset(list(range(min(self.limit or len(test), len(test)))))
        counts = self.test.counts()
        self.data_desc = f"{len(self.test)} held-out SMS ({counts['ham']} ham / {counts['spam']} spam)"

    def load(self) -> nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(self.path, dtype=torch.float32).eval()

    def score(self, model: nn.Module) -> float:
        pred = data.predict(model, self.tokenizer, self.test.texts, batch_size=128)
        self.predictions = pred.tolist()
        return (pred == torch.tensor(self.test.labels)).float().mean().item()

    def labels(self) -> list[int]:
        return list(self.test.labels)

    def inputs(self) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(self.test.texts[:64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        )


@dataclass
class BbcProbe(Task):
    """5-topic BBC News accuracy of a logistic-regression probe trained on FP32 mean-pooled features."""

    n_train: int = 1000
    n_test: int = 445
    max_length: int = 128

    def __post_init__(self) -> None:
        self.name = self.name or "bbc-news-probe"
        self.metric = "accuracy"
        self.model_desc = self.model_desc or "all-MiniLM-L6-v2 + logistic-regression probe (fit on FP32 features)"
        train_all, test_all = data.split(data.bbc_news(), 445, seed=0)
        self.train = _stratified_subset(train_all, self.n_train)
        self.test = _stratified_subset(test_all, self.n_test)
        self.data_desc = (
            f"BBC News, 5 topics: probe fit on {len(self.train)} articles, scored on {len(self.test)} held-out "
            f"articles (first {self.max_length} tokens)"
        )

    def load(self) -> nn.Module:
        return AutoModel.from_pretrained(self.path, dtype=torch.float32).eval()

    def _features(self, model: nn.Module, texts: list[str]) -> torch.Tensor:
        return data.embed(model, self.tokenizer, texts, batch_size=32, max_length=self.max_length)

    def prepare(self, fp32: nn.Module) -> None:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        features = self._features(fp32, self.train.texts).numpy()
        self.probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
        self.probe.fit(features, self.train.labels)

    def score(self, model: nn.Module) -> float:
        pred = self.probe.predict(self._features(model, self.test.texts).numpy())
        self.predictions = [int(p) for p in pred]
        return sum(p == t for p, t in zip(self.predictions, self.test.labels, strict=True)) / len(self.predictions)

    def labels(self) -> list[int]:
        return list(self.test.labels)

    def inputs(self) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                self.test.texts[:16], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
        )


@dataclass
class Perplexity(Task):
    """Perplexity of a causal LM on held-out BBC News text, in non-overlapping windows."""

    n_tokens: int = 4096
    window: int = 512

    def __post_init__(self) -> None:
        self.name = self.name or "smollm2-perplexity"
        self.metric = "perplexity"
        self.higher_is_better = False
        self.model_desc = self.model_desc or "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to FP32)"
        self.data_desc = f"{self.n_tokens} tokens of held-out BBC News articles, windows of {self.window}"

    def load(self) -> nn.Module:
        return AutoModelForCausalLM.from_pretrained(self.path, dtype=torch.float32).eval()

    def prepare(self, fp32: nn.Module) -> None:
        self.ids = data.bbc_heldout_tokens(self.tokenizer, self.n_tokens)

    def score(self, model: nn.Module) -> float:
        return data.perplexity(model, self.ids, window=self.window)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[: self.window].unsqueeze(0)}


def _stratified_subset(items: data.LabeledTexts, n: int) -> data.LabeledTexts:
    """``n`` items of ``items`` with label proportions kept (all of them if ``n >= len(items)``)."""
    if n >= len(items):
        return items
    return data.split(items, n, seed=0)[1]
