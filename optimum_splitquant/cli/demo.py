"""The default main job (``optimum-splitquant`` with no arguments): a real spam classifier at 2 bits.

1. Once, cached under :func:`~optimum_splitquant.cli.data.cache_dir`: a ``BertForSequenceClassification``
   whose encoder is the shipped all-MiniLM-L6-v2 and whose head (``pooler.dense`` + tanh +
   ``classifier``, the layers the model's own forward uses) is trained on the frozen encoder's
   first-token features of 3,862 real SMS messages; 1,000 others (stratified, seed 0) are held out.
   Only the head trains (the encoder's features are computed once); a 2-epoch full fine-tune of the
   whole model reaches 99.0 %.
2. Once too: the FP32 classifier is quantized while it loads (plain INT2 = one cluster, SplitQuant
   INT2 with k = 3 and k = 4: a 2-bit cluster id has room for 4 clusters at the same size), saved,
   and its reload checked bit-identical.
3. Every run: the quantized models are reloaded from disk and scored on the held-out messages.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from ..checkpoint.saving import staged_folder
from ..hf.config import SplitQuantConfig
from ..report import size_report
from .data import MINILM_HUB_ID, LabeledTexts, cache_dir, embed, minilm_path, predict, sms_spam, split
from .models import safetensors_bytes

__all__ = [
    "DEMO_VERSION",
    "VARIANTS",
    "DemoResult",
    "DemoRow",
    "build_classifier",
    "ensure_classifier",
    "format_report",
    "run",
    "train_head",
]

logger = logging.getLogger(__name__)

DEMO_VERSION = 2
N_TEST = 1000
SEED = 0
MAX_LENGTH = 128
EVAL_BATCH = 128
HEAD_STEPS = 200
HEAD_LR = 1e-3
HEAD_WEIGHT_DECAY = 0.01
METADATA_FILE = "splitquant_demo.json"
CLASSIFIER_DIR = "sms-spam-minilm-fp32"  # the FP32 classifier's folder in the cache
VARIANTS: tuple[tuple[str, str, dict[str, int]], ...] = (
    ("plain INT2 (k=1)", "int2-k1", {"bits": 2, "num_clusters": 1}),
    ("SplitQuant INT2 (k=3)", "int2-k3", {"bits": 2, "num_clusters": 3}),
    ("SplitQuant INT2 (k=4)", "int2-k4", {"bits": 2, "num_clusters": 4}),
)


@dataclass
class DemoRow:
    """One model's line in the demo table (``effective_bits`` and ``quantize_s`` are ``None`` for FP32).

    ``cached``: the quantized model was reloaded from an earlier run (``quantize_s`` is that run's).
    """

    name: str
    accuracy: float
    spam_caught: int
    effective_bits: float | None
    layers_mb: float
    file_mb: float
    quantize_s: float | None
    path: Path
    cached: bool = False


@dataclass
class DemoResult:
    """Everything the demo measured."""

    rows: list[DemoRow]
    n_test: int
    n_spam: int
    classifier_dir: Path
    built: bool
    build_s: float
    total_s: float = 0.0


def train_head(
    features: torch.Tensor,
    labels: list[int],
    pooler: nn.Linear,
    *,
    num_labels: int = 2,
    steps: int = HEAD_STEPS,
    lr: float = HEAD_LR,
    weight_decay: float = HEAD_WEIGHT_DECAY,
    dropout: float = 0.1,
    seed: int = SEED,
) -> tuple[nn.Linear, nn.Linear]:
    """Train ``tanh(pooler(x))`` → dropout → linear classifier on frozen features (full-batch AdamW).

    ``pooler`` is copied (its pretrained weights are the starting point); returns the trained
    ``(pooler, classifier)``.
    """
    torch.manual_seed(seed)
    dense = copy.deepcopy(pooler).float().requires_grad_(True)
    classifier = nn.Linear(dense.out_features, num_labels)
    net = nn.Sequential(dense, nn.Tanh(), nn.Dropout(dropout), classifier)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    x, y = features.float().clone(), torch.tensor(labels)  # a plain tensor even if made in inference mode
    net.train()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
    logger.debug("head trained: final training loss %.4f", loss.item())
    return dense.requires_grad_(False), classifier.requires_grad_(False)


def build_classifier(
    encoder_path: str | Path, train: LabeledTexts, out_dir: Path, *, head_steps: int = HEAD_STEPS
) -> None:
    """Save to ``out_dir`` a BERT sequence classifier: the encoder at ``encoder_path`` plus a head trained on ``train``."""
    tokenizer = AutoTokenizer.from_pretrained(encoder_path)
    encoder = AutoModel.from_pretrained(encoder_path, dtype=torch.float32, use_safetensors=True).eval()
    if getattr(encoder, "pooler", None) is None:
        raise ValueError(f"{encoder_path}: expected a BERT-style encoder with a pooler")
    features = embed(encoder, tokenizer, train.texts, pooling="cls", max_length=MAX_LENGTH)
    dense, classifier = train_head(
        features,
        train.labels,
        encoder.pooler.dense,
        num_labels=len(train.label_names),
        steps=head_steps,
        dropout=encoder.config.hidden_dropout_prob,
    )
    names = dict(enumerate(train.label_names))
    config = AutoConfig.from_pretrained(
        encoder_path, num_labels=len(names), id2label=names, label2id={v: k for k, v in names.items()}
    )
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    model.base_model.load_state_dict(encoder.state_dict())
    model.base_model.pooler.dense.load_state_dict(dense.state_dict())
    model.classifier.load_state_dict(classifier.state_dict())
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def ensure_classifier(
    cache: Path | None = None,
    *,
    encoder_path: str | Path | None = None,
    data: LabeledTexts | None = None,
    n_test: int = N_TEST,
    seed: int = SEED,
    head_steps: int = HEAD_STEPS,
) -> tuple[Path, dict, bool]:
    """The cached FP32 classifier, built first if missing or stale: ``(folder, metadata, built_now)``.

    The metadata holds the recipe, the build time and the FP32 held-out score (measured once, at build).
    """
    cache = cache if cache is not None else cache_dir()
    folder = cache / CLASSIFIER_DIR
    encoder = str(encoder_path or minilm_path())
    wanted = {
        "demo_version": DEMO_VERSION,
        "encoder": MINILM_HUB_ID if encoder_path is None else encoder,
        "n_test": n_test,
        "seed": seed,
        "head_steps": head_steps,
    }
    meta_file = folder / METADATA_FILE
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except ValueError:
            meta = {}
        if all(meta.get(k) == v for k, v in wanted.items()) and (folder / "config.json").is_file():
            return folder, meta, False
        logger.info("cached classifier in %s is stale; rebuilding it", folder)
    start = time.perf_counter()
    logger.info("building the FP32 spam classifier once (cached in %s; one to two minutes)", folder)
    train, test = split(data if data is not None else sms_spam(), n_test, seed=seed)
    with staged_folder(folder) as tmp:
        build_classifier(encoder, train, tmp, head_steps=head_steps)
        model = AutoModelForSequenceClassification.from_pretrained(tmp, dtype=torch.float32, use_safetensors=True)
        accuracy, caught = _score(model, AutoTokenizer.from_pretrained(tmp), test)
        seconds = time.perf_counter() - start
        meta = {
            **wanted,
            "train_messages": len(train),
            "fp32_accuracy": accuracy,
            "fp32_spam_caught": caught,
            "build_seconds": round(seconds, 1),
            "built_at": time.time(),
        }
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    logger.info("FP32 classifier built in %.1f s: %.2f %% on %d held-out messages", seconds, 100 * accuracy, len(test))
    return folder, meta, True


def _safetensors_mb(folder: Path) -> float:
    """Megabytes of the folder's safetensors files (0 if none)."""
    return (safetensors_bytes(folder) or 0) / 1e6


def _score(model: nn.Module, tokenizer, test: LabeledTexts) -> tuple[float, int]:
    # Large batches: a quantized layer dequantizes its weight once per forward call.
    pred = predict(model, tokenizer, test.texts, batch_size=EVAL_BATCH, max_length=MAX_LENGTH)
    labels = torch.tensor(test.labels)
    spam = labels == 1
    return (pred == labels).float().mean().item(), int((pred[spam] == 1).sum())


def _quantized_variant(
    folder: Path, out: Path, name: str, config: SplitQuantConfig, tokenizer, probe_texts: list[str], classifier_id: str
) -> dict:
    """Quantize the FP32 classifier while loading, save it to ``out`` (atomically), check the reload; returns its metadata."""
    t0 = time.perf_counter()
    model = AutoModelForSequenceClassification.from_pretrained(folder, quantization_config=config)
    quantize_s = time.perf_counter() - t0
    with staged_folder(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp)
        probe = tokenizer(probe_texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            if not torch.equal(model(**probe).logits, reloaded(**probe).logits):
                raise RuntimeError(f"the reloaded {name} model does not reproduce the in-memory one")
        meta = {"demo_version": DEMO_VERSION, "classifier": classifier_id, **config.to_dict(), "quantize_s": quantize_s}
        (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return meta


def _cached_variant(out: Path, config: SplitQuantConfig, classifier_id: str) -> dict | None:
    try:
        meta = json.loads((out / METADATA_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    wanted = {"demo_version": DEMO_VERSION, "classifier": classifier_id, **config.to_dict()}
    wanted.pop("modules_to_not_convert")  # resolved at quantization time
    return meta if all(meta.get(k) == v for k, v in wanted.items()) else None


def run(
    cache: Path | None = None,
    *,
    encoder_path: str | Path | None = None,
    data: LabeledTexts | None = None,
    n_test: int = N_TEST,
    seed: int = SEED,
    head_steps: int = HEAD_STEPS,
    variants: tuple[tuple[str, str, dict[str, int]], ...] = VARIANTS,
    fresh: bool = False,
    rebuild: bool = False,
) -> DemoResult:
    """Build (once) and score the FP32 classifier and its quantized variants on the held-out messages.

    The FP32 classifier and the quantized models are cached under ``cache``; every run reloads the
    quantized models from disk and scores them. ``fresh`` quantizes them again, ``rebuild`` also
    rebuilds the FP32 classifier.
    """
    start = time.perf_counter()
    cache = cache if cache is not None else cache_dir()
    folder = cache / CLASSIFIER_DIR
    if rebuild:
        shutil.rmtree(folder, ignore_errors=True)
    folder, meta, built = ensure_classifier(
        cache, encoder_path=encoder_path, data=data, n_test=n_test, seed=seed, head_steps=head_steps
    )
    classifier_id = str(meta["built_at"])
    _, test = split(data if data is not None else sms_spam(), n_test, seed=seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    fp32_row = DemoRow(
        "FP32", meta["fp32_accuracy"], meta["fp32_spam_caught"], None, 0.0, _safetensors_mb(folder), None, folder
    )
    rows = [fp32_row]
    for name, slug, settings in variants:
        row, float_mb = _variant_row(
            cache / f"sms-spam-minilm-{slug}",
            folder,
            name,
            SplitQuantConfig(**settings),
            tokenizer,
            test,
            classifier_id,
            reuse=not (fresh or built),
        )
        fp32_row.layers_mb = float_mb
        rows.append(row)
    counts = test.counts()
    return DemoResult(
        rows=rows,
        n_test=len(test),
        n_spam=counts["spam"],
        classifier_dir=folder,
        built=built,
        build_s=meta["build_seconds"],
        total_s=time.perf_counter() - start,
    )


def _variant_row(
    out: Path,
    folder: Path,
    name: str,
    config: SplitQuantConfig,
    tokenizer: Any,
    test: LabeledTexts,
    classifier_id: str,
    *,
    reuse: bool,
) -> tuple[DemoRow, float]:
    """Score one quantized variant (cached in ``out`` and reused if ``reuse``, else quantized from ``folder``).

    Returns its row and the FP32 size of its quantized layers in MB.
    """
    variant = _cached_variant(out, config, classifier_id) if reuse else None
    cached = variant is not None
    if variant is None:
        variant = _quantized_variant(folder, out, name, config, tokenizer, test.texts[:16], classifier_id)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    report = size_report(model)
    acc, caught = _score(model, tokenizer, test)
    del model
    row = DemoRow(
        name,
        acc,
        caught,
        report.effective_bits,
        report.quantized_bytes / 1e6,
        _safetensors_mb(out),
        variant["quantize_s"],
        out,
        cached,
    )
    how = "reloaded from the cache" if cached else f"quantized while loading in {row.quantize_s:.1f} s, saved, reloaded"
    logger.info("%s: %.2f %% (%s)", name, 100 * acc, how)
    return row, report.quantized_weights * 4 / 1e6


def format_report(result: DemoResult) -> str:
    """The demo's table and its footnotes, ready to print."""
    n_ham = result.n_test - result.n_spam
    lines = [
        f"SMS spam classifier (all-MiniLM-L6-v2 encoder + head trained on frozen features), "
        f"{result.n_test} held-out real SMS ({n_ham} ham / {result.n_spam} spam)",
        "",
        f"{'model':<24}{'accuracy':>10}{'spam caught':>13}{'bits/weight':>13}{'layers MB':>11}"
        f"{'file MB':>9}{'quantize s':>12}",
    ]
    for r in result.rows:
        bits = "32" if r.effective_bits is None else f"{r.effective_bits:.3f}"
        secs = "-" if r.quantize_s is None else f"{r.quantize_s:.1f}" + ("*" if r.cached else "")
        caught = f"{r.spam_caught}/{result.n_spam}"
        lines.append(
            f"{r.name:<24}{100 * r.accuracy:>9.1f}%{caught:>13}{bits:>13}{r.layers_mb:>11.2f}"
            f"{r.file_mb:>9.2f}{secs:>12}"
        )
    lines += [
        "",
        f"always answering 'ham' scores {100 * n_ham / result.n_test:.1f}%.",
        "bits/weight: effective bits per quantized weight (codes + cluster ids + scales + offsets); layers MB: the "
        "quantized layers' weights (FP32: the same layers in float32); file MB: model.safetensors (float word "
        "embeddings dominate it); quantize s: from_pretrained with quantization_config (load + quantize)"
        + (
            "; * measured when first quantized: every run reloads and rescores the cached models "
            "(`optimum-splitquant demo --fresh` quantizes again)."
            if any(r.cached for r in result.rows)
            else "."
        ),
        f"FP32 classifier: {result.classifier_dir}"
        + (f" (built now in {result.build_s:.0f} s)" if result.built else " (cached; its score measured at build)"),
        f"quantized models: {result.rows[-1].path.parent}/sms-spam-minilm-int2-k*  "
        "(from_pretrained loads them where the package is installed)",
        f"total {result.total_s:.0f} s",
    ]
    return "\n".join(lines)
