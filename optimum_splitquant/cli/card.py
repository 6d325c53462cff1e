"""The Hugging Face Hub model card (README.md) of a SplitQuant checkpoint, as a pure function.

The YAML front matter carries ``library_name``, ``base_model`` (with ``base_model_relation:
quantized``), ``tags`` and a ``splitquant`` block (quantization config, effective bits, sizes and
any evaluation results); the body explains how to load the model, including why
``import optimum_splitquant`` must come first.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import yaml

from .models import AUTO_CLASSES

__all__ = ["CardInfo", "Metric", "model_card"]

PAPER = "https://arxiv.org/abs/2501.12428"


@dataclass(frozen=True)
class Metric:
    """One evaluation result: ``value`` for the quantized model, ``base_value`` for its float original."""

    name: str
    dataset: str
    value: float
    base_value: float | None = None


@dataclass(frozen=True)
class CardInfo:
    """What a model card states about one quantized checkpoint.

    Attributes:
        quantization_config: the saved ``quantization_config`` dict (as in ``config.json``).
        task: pipeline task (``feature-extraction``, ``text-classification``, ``text-generation``).
        effective_bits: (codes + cluster ids + scales + offsets) bits per quantized weight.
        quantized_layers: number of layers stored in SplitQuant form.
        quantized_weights: weights those layers stand for.
        size_after: bytes of the quantized checkpoint's safetensors files.
        size_before: bytes of the float checkpoint, if known.
        base_model: Hub id of the float model, if it has one.
        base_name: how the float model is named in the text (defaults to ``base_model``).
        repo_id: where the card will live (used in the loading snippet).
        metrics: evaluation results, if computed.
    """

    quantization_config: Mapping[str, Any]
    task: str
    effective_bits: float
    quantized_layers: int
    quantized_weights: int
    size_after: int
    size_before: int | None = None
    base_model: str | None = None
    base_name: str | None = None
    repo_id: str | None = None
    metrics: Sequence[Metric] = ()


def _mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:.1f} MB"


def _metadata(info: CardInfo) -> dict[str, Any]:
    bits = info.quantization_config.get("bits")
    meta: dict[str, Any] = {"library_name": "transformers"}
    if info.base_model:
        meta["base_model"] = info.base_model
        meta["base_model_relation"] = "quantized"
    meta["pipeline_tag"] = info.task
    meta["tags"] = ["splitquant", "quantized", f"int{bits}"]
    block: dict[str, Any] = {
        "quantization_config": dict(info.quantization_config),
        "effective_bits_per_weight": round(info.effective_bits, 4),
        "quantized_layers": info.quantized_layers,
        "quantized_weights": info.quantized_weights,
        "size_bytes_before": info.size_before,
        "size_bytes_after": info.size_after,
    }
    if info.metrics:
        block["evaluation"] = [{k: v for k, v in asdict(m).items() if v is not None} for m in info.metrics]
    meta["splitquant"] = block
    return meta


def _settings_table(info: CardInfo) -> list[str]:
    cfg = info.quantization_config
    group = f"group of {cfg['group_size']} input columns" if cfg.get("group_size") else "output row"
    kept = cfg.get("modules_to_not_convert") or []
    ratio = f" ({info.size_before / info.size_after:.2f}x smaller)" if info.size_before and info.size_after else ""
    return [
        "| setting | value |",
        "|---|---|",
        f"| code bits per weight | {cfg.get('bits')} |",
        f"| clusters per layer (k-means, k) | {cfg.get('num_clusters')} |",
        f"| clustering | {cfg.get('clustering')} |",
        f"| range granularity | one scale and offset per cluster per {group} |",
        f"| range fit | {cfg.get('fit', 'minmax')} |",
        f"| scale dtype | {cfg.get('scale_dtype')} |",
        f"| effective bits per weight | {info.effective_bits:.3f} (codes + cluster ids + scales + offsets) |",
        f"| quantized layers | {info.quantized_layers} ({info.quantized_weights:,} weights) |",
        f"| kept in float | {', '.join(f'`{m}`' for m in kept) if kept else 'none'} (and all non-Linear weights) |",
        f"| checkpoint size | {_mb(info.size_before)} → {_mb(info.size_after)}{ratio} |",
        f"| format version | {cfg.get('format_version')} |",
    ]


def _metrics_table(metrics: Sequence[Metric]) -> list[str]:
    lines = ["| metric | data | this model | float original |", "|---|---|---|---|"]
    for m in metrics:
        base = "-" if m.base_value is None else f"{m.base_value:.4f}"
        lines.append(f"| {m.name} | {m.dataset} | {m.value:.4f} | {base} |")
    return lines


def model_card(info: CardInfo) -> str:
    """The README.md text: YAML front matter, then Markdown."""
    cfg = info.quantization_config
    bits, k = cfg.get("bits"), cfg.get("num_clusters")
    base = info.base_name or info.base_model or "a float model"
    base_link = f"[{base}](https://huggingface.co/{info.base_model})" if info.base_model else f"`{base}`"
    where = info.repo_id or "path/to/this/folder"
    auto = AUTO_CLASSES.get(info.task, "AutoModel")
    front = yaml.safe_dump(_metadata(info), sort_keys=False, allow_unicode=True)
    method = (
        "plain min-max quantization (one cluster)"
        if k == 1
        else f"SplitQuant: each layer's weights are split by 1-D k-means into {k} clusters and every cluster is "
        "quantized over its own narrow range, so outliers are kept without crushing the resolution of the rest"
    )
    body = [
        f"# {info.repo_id.split('/')[-1] if info.repo_id else base}: INT{bits} ({'SplitQuant' if k != 1 else 'min-max'})",
        "",
        f"{base_link} with its Linear layers quantized to {bits}-bit codes by "
        f"optimum-splitquant ([SplitQuant, arXiv 2501.12428]({PAPER})): {method}. Per weight the checkpoint stores a cluster id "
        "and a code in one packed byte stream, plus a scale and an offset per cluster and range group; "
        "inference dequantizes and runs one matmul per layer. No calibration data was used.",
        "",
        "## Quantization",
        "",
        *_settings_table(info),
        "",
    ]
    if info.metrics:
        body += ["## Evaluation", "", *_metrics_table(info.metrics), ""]
    body += [
        "## How to load",
        "",
        "```bash",
        "pip install optimum-splitquant",
        "```",
        "",
        "```python",
        'import optimum_splitquant  # registers quant_method="splitquant" with transformers: required',
        f"from transformers import {auto}, AutoTokenizer, pipeline",
        "",
        f'model = {auto}.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        f'pipe = pipeline("{info.task}", model=model, tokenizer=tokenizer)',
        "```",
        "",
        "**Import `optimum_splitquant` before loading.** Without it transformers does not know "
        '`quant_method: "splitquant"`: it only logs "Unknown quantization type ... we will skip the '
        'quantization", reports the packed tensors as UNEXPECTED and the layer weights as MISSING, and builds '
        "every quantized layer as a float `nn.Linear` with **random weights**. That model runs and returns "
        "garbage.",
        "",
        "The checkpoint is plain safetensors (no pickle); the settings needed to read it, including a format "
        "version, are in `config.json` under `quantization_config`.",
        "",
    ]
    return f"---\n{front}---\n\n" + "\n".join(body)
