"""``optimum-splitquant evaluate``: score a saved model on the offline real data (also used by ``quantize --evaluate``)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard
from torch import nn
from transformers import PretrainedConfig

from . import data
from .card import Metric
from .console import CliError, out
from .models import auto_class, load_config, load_model, load_tokenizer, model_source, resolve_task

__all__ = ["cmd_evaluate", "evaluate_model", "metrics_table"]

logger = logging.getLogger(__name__)


def evaluate_model(
    task: str, model: nn.Module, tokenizer: Any, base: nn.Module | None = None, *, limit: int | None = None
) -> list[Metric]:
    """Score ``model`` (and ``base``, its float original, if given) on the offline real data for ``task``.

    feature-extraction: mean cosine of mean-pooled embeddings to ``base`` on real SMS texts;
    text-classification: accuracy on the 1,000 held-out SMS messages of the demo's split;
    text-generation: perplexity on held-out BBC News text.
    """
    if tokenizer is None:
        raise CliError("evaluation needs a tokenizer; save one next to the model or pass --tokenizer")
    if task == "feature-extraction":
        if base is None:
            logger.warning("no float base model known: pass --base to measure the embedding cosine")
            return []
        texts = data.sms_spam().texts[: limit or 512]
        cos = data.mean_cosine(data.embed(model, tokenizer, texts), data.embed(base, tokenizer, texts))
        return [Metric("mean cosine to float embeddings", f"SMS Spam Collection, first {len(texts)} texts", cos, 1.0)]
    if task == "text-classification":
        if model.config.num_labels != 2:
            raise CliError(
                f"the SMS spam evaluation needs a 2-label classifier, this one has {model.config.num_labels}"
            )
        _, test = data.split(data.sms_spam(), 1000, seed=0)
        if limit:
            test = test.subset(list(range(min(limit, len(test)))))
        labels = _spam_label_ids(model.config)
        gold = [labels[y] for y in test.labels]

        def acc(m: nn.Module) -> float:
            pred = data.predict(m, tokenizer, test.texts, batch_size=128)
            return sum(int(p) == g for p, g in zip(pred.tolist(), gold, strict=True)) / len(gold)

        dataset = f"SMS Spam Collection, {len(test)} held-out messages"
        return [Metric("accuracy", dataset, acc(model), None if base is None else acc(base))]
    if task == "text-generation":
        ids = data.bbc_heldout_tokens(tokenizer, limit or 4096)
        ppl = data.perplexity(model, ids)
        return [
            Metric(
                "perplexity",
                f"BBC News held-out text, {ids.numel()} tokens",
                ppl,
                None if base is None else data.perplexity(base, ids),
            )
        ]
    raise CliError(f"no offline evaluation for task {task!r}")


def _spam_label_ids(config: PretrainedConfig) -> dict[int, int]:
    """Map ham/spam (0/1) to the model's label ids, by label name if it has ham/spam names, else identity."""
    names = {str(v).lower(): int(k) for k, v in (config.id2label or {}).items()}
    if {"ham", "spam"} <= names.keys():
        return {0: names["ham"], 1: names["spam"]}
    logger.info("labels %s are not named ham/spam: label 1 is taken as spam", sorted(names))
    return {0: 0, 1: 1}


def metrics_table(metrics: list[Metric]) -> list[str]:
    """The metrics as aligned text rows (header first): metric, data, model, float base."""
    rows = [("metric", "data", "model", "float base")]
    for m in metrics:
        base = "-" if m.base_value is None else f"{m.base_value:.4f}"
        rows.append((m.name, m.dataset, f"{m.value:.4f}", base))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]


def _read_card_base(path: Path) -> str | None:
    """The ``base_model`` named in the folder's model card, if any."""
    readme = path / "README.md"
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("base_model")
    except Exception:  # a malformed card only means the base is unknown
        return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``evaluate``: score a saved (quantized or float) model on the offline real data."""
    config = load_config(args.model)
    task = resolve_task(config, args.task)
    auto = auto_class(task)
    source = model_source(args.model)
    model = load_model(auto, source, config)
    tokenizer = load_tokenizer(args.tokenizer or source)
    base_ref = args.base
    if base_ref is None and getattr(config, "quantization_config", None):
        base_ref = _read_card_base(Path(source))
    base = None
    if base_ref:
        local = data.local_model_path(base_ref)
        base_source = str(local) if local is not None else base_ref
        base = load_model(auto, base_source, load_config(base_source))
        if tokenizer is None:
            tokenizer = load_tokenizer(base_source)
    start = time.perf_counter()
    metrics = evaluate_model(task, model, tokenizer, base, limit=args.limit)
    quant = getattr(config, "quantization_config", None)
    kind = f"SplitQuant INT{quant['bits']} (k={quant['num_clusters']})" if isinstance(quant, dict) else "float"
    out(f"{args.model} [{task}, {kind}]" + (f", base {base_ref}" if base_ref else ""))
    if not metrics:
        out("no metric computed (see the warning above)")
        return 0
    for line in metrics_table(metrics):
        out(line)
    out(f"({time.perf_counter() - start:.1f} s)")
    return 0
