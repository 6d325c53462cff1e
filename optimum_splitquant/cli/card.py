"""The Hugging Face Hub model card (README.md) of a SplitQuant checkpoint, as a pure function.

The YAML front matter carries ``library_name``, ``base_model`` (with ``base_model_relation:
quantized``), ``tags`` and a ``splitquant`` block (quantization config, effective bits, sizes, the
``--budget`` asked for and any evaluation results), plus the float model's ``license``, ``language``
and ``datasets`` (and its tags, after ours) read from its own card by :func:`base_card_metadata`;
the body explains how to load the model, and what happens where the package is not registered.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..hf.config import BUDGET_WIDTH
from ..report import SQNR_FLOOR_DB
from .console import one_line
from .models import AUTO_CLASSES

__all__ = ["INHERITED_FIELDS", "CardInfo", "Metric", "base_card_metadata", "model_card", "parse_front_matter"]

logger = logging.getLogger(__name__)

# What a quantized model keeps from its float original's card (``tags`` are merged after ours).
INHERITED_FIELDS = ("license", "license_name", "license_link", "language", "datasets", "tags")
_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)", re.DOTALL)

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
        base_metadata: the float model's card fields to keep (see :func:`base_card_metadata`).
        sentence_transformers: whether the folder holds a sentence-transformers pipeline too.
        budget: the stored bits per weight asked for (``--budget``), if the config came from
            ``SplitQuantConfig.for_budget``.
        budget_overrides: the settings given with ``budget`` that override its configuration.
        sqnr_db: the model-level reconstruction SQNR in dB, measured while quantizing
            (:attr:`optimum_splitquant.report.QualityReport.sqnr_db`), if measured.
        layer_sqnr_db: each quantized layer's SQNR in dB, by module name, if measured.
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
    base_metadata: Mapping[str, Any] = field(default_factory=dict)
    sentence_transformers: bool = False
    budget: float | None = None
    budget_overrides: Mapping[str, Any] = field(default_factory=dict)
    sqnr_db: float | None = None
    layer_sqnr_db: Mapping[str, float] = field(default_factory=dict)


def parse_front_matter(text: str, source: str = "README.md") -> dict[str, Any]:
    """The fields of ``INHERITED_FIELDS`` in a model card's YAML front matter (``yaml.safe_load``).

    A card without front matter gives ``{}``; malformed YAML, or a field of the wrong type, is
    logged as a warning naming ``source`` and left out: a float model's card never stops a run.
    """
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        logger.warning("the YAML front matter of %s is malformed (%s); its metadata is not kept", source, one_line(exc))
        return {}
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        logger.warning("the YAML front matter of %s is not a mapping; its metadata is not kept", source)
        return {}
    kept: dict[str, Any] = {}
    for key in INHERITED_FIELDS:
        value = meta.get(key)
        if value is None:
            continue
        single = key in ("license", "license_name", "license_link")
        if isinstance(value, str) and value.strip():
            kept[key] = value if single or key != "tags" else [value]
        elif not single and isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            kept[key] = list(value)
        else:
            expected = "a string" if single else "a string or a list of strings"
            logger.warning("%s: %r in its front matter is not %s; it is not kept", source, key, expected)
    return kept


def base_card_metadata(model: str) -> dict[str, Any]:
    """:func:`parse_front_matter` of the float model's README.md: a local folder's, else the Hub repo's (cached)."""
    local = Path(model).expanduser()
    if local.exists():
        readme = local / "README.md"
        if not readme.is_file():
            return {}
    else:
        try:
            from huggingface_hub import hf_hub_download

            readme = Path(hf_hub_download(model, "README.md"))
        except Exception as exc:  # offline and not cached, no card, no access: the card is optional
            logger.debug("no model card for %s (%s)", model, one_line(exc))
            return {}
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        logger.warning("cannot read %s (%s); its metadata is not kept", readme, one_line(exc))
        return {}
    return parse_front_matter(text, str(readme))


def _mb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e6:.1f} MB"


def _metadata(info: CardInfo) -> dict[str, Any]:
    bits = info.quantization_config.get("bits")
    inherited = info.base_metadata
    meta: dict[str, Any] = {"library_name": "transformers"}
    meta.update({k: inherited[k] for k in INHERITED_FIELDS if k != "tags" and k in inherited})
    if info.base_model:
        meta["base_model"] = info.base_model
        meta["base_model_relation"] = "quantized"
    meta["pipeline_tag"] = info.task
    tags = ["splitquant", "quantized", f"int{bits}"]
    meta["tags"] = tags + [t for t in dict.fromkeys(inherited.get("tags", ())) if t not in tags]
    block: dict[str, Any] = {
        "quantization_config": dict(info.quantization_config),
        "effective_bits_per_weight": round(info.effective_bits, 4),
        "quantized_layers": info.quantized_layers,
        "quantized_weights": info.quantized_weights,
        "size_bytes_before": info.size_before,
        "size_bytes_after": info.size_after,
    }
    if info.budget is not None:
        block["budget_bits_per_weight"] = info.budget
        block["budget_overrides"] = dict(info.budget_overrides)
    if info.sqnr_db is not None:
        block["reconstruction"] = _reconstruction_block(info)
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
        *_budget_row(info),
        f"| code bits per weight | {cfg.get('bits')} |",
        f"| clusters per layer (k-means, k) | {cfg.get('num_clusters')} |",
        f"| clustering | {cfg.get('clustering')} |",
        f"| range granularity | one scale and offset per cluster per {group} |",
        f"| range fit | {cfg.get('fit', 'minmax')} |",
        f"| scale dtype | {cfg.get('scale_dtype')} |",
        f"| coded ranges | {_coded(cfg)} |",
        f"| effective bits per weight | {info.effective_bits:.3f} (codes + cluster ids + scales + offsets) |",
        f"| quantized layers | {info.quantized_layers} ({info.quantized_weights:,} weights) |",
        f"| kept in float | {', '.join(f'`{m}`' for m in kept) if kept else 'none'} (and all non-Linear weights) |",
        f"| checkpoint size | {_mb(info.size_before)} → {_mb(info.size_after)}{ratio} |",
        f"| format version | {cfg.get('format_version')} |",
    ]


def _budget_row(info: CardInfo) -> list[str]:
    """The budget asked for and how the settings below were chosen from it (none without a budget)."""
    if info.budget is None:
        return []
    args = "".join(f", {name}={value!r}" for name, value in info.budget_overrides.items())
    return [
        f"| bits budget asked for | {info.budget:g} stored bits per weight on layers of {BUDGET_WIDTH} inputs and outputs: the settings "
        f"below are `SplitQuantConfig.for_budget({info.budget:g}{args})` |"
    ]


def _db(value: float) -> float | str:
    """A dB figure for the card: rounded to 0.01, ``"inf"`` for an exact reconstruction."""
    return round(value, 2) if abs(value) != float("inf") else str(value)


def _reconstruction_block(info: CardInfo) -> dict[str, Any]:
    """The ``reconstruction`` entry of the front matter: model-level, worst and per-layer SQNR (dB)."""
    block: dict[str, Any] = {"sqnr_db": _db(info.sqnr_db), "sqnr_floor_db": SQNR_FLOOR_DB}
    if info.layer_sqnr_db:
        worst = min(info.layer_sqnr_db, key=info.layer_sqnr_db.__getitem__)
        block["worst_layer"] = {"name": worst, "sqnr_db": _db(info.layer_sqnr_db[worst])}
        block["layer_sqnr_db"] = {name: _db(db) for name, db in info.layer_sqnr_db.items()}
    return block


def _reconstruction_section(info: CardInfo) -> list[str]:
    """How far the quantized weights lie from the float ones: the model-level figure and one row per layer."""
    verdict = (
        "at or above"
        if info.sqnr_db >= SQNR_FLOOR_DB
        else "**below** (the model is likely unusable; `SplitQuantConfig.for_budget(4.5)` stores enough bits)"
    )
    lines = [
        "## Reconstruction error",
        "",
        "SQNR = 10 log10(‖W‖² / ‖W - Ŵ‖²) of each quantized weight W and its dequantized form Ŵ, measured while "
        f"quantizing. Model level: **{info.sqnr_db:.1f} dB** (the mean of the layers' noise-to-signal ratios, "
        f"weighted by their weights), {verdict} the floor of {SQNR_FLOOR_DB:.1f} dB under which the models "
        "measured with optimum-splitquant stop being usable.",
        "",
    ]
    if info.layer_sqnr_db:
        lines += [
            f"<details><summary>SQNR per layer ({len(info.layer_sqnr_db)} layers)</summary>",
            "",
            "| layer | SQNR dB |",
            "|---|---:|",
            *(f"| `{name}` | {db:.1f} |" for name, db in info.layer_sqnr_db.items()),
            "",
            "</details>",
            "",
        ]
    return lines


def _coded(cfg: dict) -> str:
    if cfg.get("range_bits") is None:
        return "no (each scale and offset stored in the scale dtype)"
    return f"{cfg['range_bits']}-bit codes, steps shared by {cfg.get('range_block')} ranges"


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
    if info.sqnr_db is not None:
        body += _reconstruction_section(info)
    if info.metrics:
        body += ["## Evaluation", "", *_metrics_table(info.metrics), ""]
    body += _how_to_load(info)
    return f"---\n{front}---\n\n" + "\n".join(body)


def _how_to_load(info: CardInfo) -> list[str]:
    """The card's "How to load" section: install, load, the sentence-transformers pipeline, the package note."""
    where = info.repo_id or "path/to/this/folder"
    auto = AUTO_CLASSES.get(info.task, "AutoModel")
    lines = [
        "## How to load",
        "",
        "```bash",
        "pip install optimum-splitquant",
        "```",
        "",
        "```python",
        'import optimum_splitquant  # registers quant_method="splitquant" (the installed package also does at start-up)',
        f"from transformers import {auto}, AutoTokenizer, pipeline",
        "",
        f'model = {auto}.from_pretrained("{where}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
        f'pipe = pipeline("{info.task}", model=model, tokenizer=tokenizer)',
        "```",
        "",
    ]
    if info.sentence_transformers:
        lines += [
            "The sentence-transformers pipeline of the float model (pooling, normalization) is kept:",
            "",
            "```python",
            "import optimum_splitquant  # first, as above",
            "from sentence_transformers import SentenceTransformer",
            "",
            f'embeddings = SentenceTransformer("{where}").encode(["a sentence", "another one"])',
            "```",
            "",
        ]
    lines += [
        "**The package must be installed.** Its start-up hook (`optimum_splitquant-autoload.pth`) registers "
        '`quant_method: "splitquant"` with transformers; where the hook is off (`OPTIMUM_SPLITQUANT_NO_AUTOLOAD=1`, '
        "`python -S`), import `optimum_splitquant` before loading. Without either, transformers only logs "
        '"Unknown quantization type ... we will skip the quantization", reports the packed tensors as UNEXPECTED '
        "and the layer weights as MISSING, and builds every quantized layer as a float `nn.Linear` with **random "
        "weights**. That model runs and returns "
        "garbage.",
        "",
        "The checkpoint is plain safetensors (no pickle); the settings needed to read it, including a format "
        "version, are in `config.json` under `quantization_config`.",
        "",
    ]
    return lines
