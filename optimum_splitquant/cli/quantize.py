"""``optimum-splitquant quantize``: float model -> SplitQuant folder with tokenizer and model card (-> Hub).

The configuration is ``--bits`` with the settings given, or ``--budget`` (``SplitQuantConfig.for_budget``,
the settings given overriding its fields, the result still within the budget): :func:`resolve_config`.
The folder is written in full before it appears at ``--output`` (:mod:`.output_folder`) (a fresh folder swapped in, or an
empty one filled), so an interrupted run leaves the previous state (a run killed outright leaves a
staging folder, which the next run removes). A non-empty ``--output`` is replaced only with
``--overwrite``, and only if it holds a saved model. The input is read from safetensors only, never
a pickle, on every path (``--evaluate`` too). A sentence-transformers input keeps its pipeline files
(``modules.json``, pooling, normalization), so ``SentenceTransformer(output)`` embeds as the float
model's pipeline does.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import HfApi, constants, get_token
from torch import nn
from transformers import PretrainedConfig

from ..hf.config import BUDGET_WIDTH, SplitQuantConfig
from ..hf.quantize_model import quantize_model
from ..report import quality_report, size_report
from . import data
from .card import CardInfo, base_card_metadata, model_card
from .console import CliError, one_line, out
from .evaluate import evaluate_model, metrics_table
from .models import (
    auto_class,
    check_safetensors_only,
    load_config,
    load_model,
    load_tokenizer,
    model_source,
    resolve_task,
    safetensors_bytes,
)
from .output_folder import check_output, prepare_output, remove_created, staged_output
from .sentence_files import copy_sentence_files, hub_sentence_folder, sentence_files

__all__ = ["cmd_quantize", "resolve_config"]

# The ``quantize`` settings that map one to one to ``SplitQuantConfig`` fields (``--bits`` and ``--budget`` aside).
_SETTINGS = ("num_clusters", "group_size", "clustering", "fit", "range_bits", "range_block", "column_scales")
# The resolved settings the summary shows (``range_block`` only with ``range_bits``).
_SHOWN_SETTINGS = ("bits", *_SETTINGS, "scale_dtype")


def _check_can_push() -> None:
    """Fail before any work if a push is bound to fail: offline mode, or no token."""
    if constants.HF_HUB_OFFLINE:
        raise CliError(
            "cannot push: offline mode is on (HF_HUB_OFFLINE=1); unset it or upload later with `hf upload REPO_ID DIR`"
        )
    if not get_token():
        raise CliError("cannot push: no Hugging Face token; run `hf auth login` or set HF_TOKEN")


def _hub_api() -> HfApi:
    return HfApi()


def _push(folder: Path, repo_id: str, private: bool) -> str:
    """Upload ``folder`` (model, tokenizer, card) to ``repo_id`` in one commit; returns the repo URL."""
    api = _hub_api()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload SplitQuant model")
    except Exception as exc:  # huggingface_hub raises many error types (HTTP, auth, offline)
        raise CliError(
            f"push to {repo_id!r} failed ({one_line(exc)}); the model is saved in {str(folder)!r}: "
            f"upload it later with `hf upload {repo_id} {folder}`"
        ) from exc
    return f"https://huggingface.co/{repo_id}"


def _base_id(model: str) -> tuple[str | None, str]:
    """(Hub id of the float model if known, display name)."""
    local = Path(model).expanduser()
    if not local.exists():
        return model, model
    if local.resolve() == data.minilm_path().resolve():
        return data.MINILM_HUB_ID, data.MINILM_HUB_ID
    return None, local.resolve().name


def _load_quantized(
    source: str, config: PretrainedConfig, task: str, qconfig: SplitQuantConfig, keep_float: bool
) -> tuple[nn.Module, nn.Module | None, float]:
    """``(quantized model, float copy or None, seconds)``.

    Without ``keep_float`` the weights are quantized as they stream in (peak memory about the
    quantized model's; transformers' loading bar shows the progress). With it (``--evaluate``, which
    needs the float model as reference) the float model is loaded whole, copied, then quantized in
    memory with a bar over the layers.
    """
    auto = auto_class(task)
    start = time.perf_counter()
    if not keep_float:
        transformers.utils.logging.enable_progress_bar()
        try:
            model = load_model(auto, source, config, quantization_config=qconfig)
        finally:
            transformers.utils.logging.disable_progress_bar()
        return model, None, time.perf_counter() - start
    model = load_model(auto, source, config)
    float_model = copy.deepcopy(model)
    quantize_model(model, qconfig, progress=True)
    return model, float_model, time.perf_counter() - start


def _settings_given(args: argparse.Namespace) -> dict[str, Any]:
    """The ``SplitQuantConfig`` fields set on the command line (a setting left out is ``None`` there)."""
    return {name: getattr(args, name) for name in _SETTINGS if getattr(args, name, None) is not None}


def resolve_config(args: argparse.Namespace) -> SplitQuantConfig:
    """The ``SplitQuantConfig`` that ``--bits`` or ``--budget`` (exactly one is set) and the other settings ask for.

    ``--bits`` takes the settings given and ``SplitQuantConfig``'s defaults for the others.
    ``--budget`` takes ``SplitQuantConfig.for_budget(budget, **settings given)`` and refuses a result
    that no longer fits in the budget (counted as ``for_budget`` counts, on rows of
    :data:`~optimum_splitquant.hf.config.BUDGET_WIDTH` inputs). Errors are a ``CliError``.
    """
    given = _settings_given(args)
    try:
        if args.budget is None:
            return SplitQuantConfig(bits=args.bits, **given)
        try:
            SplitQuantConfig.for_budget(args.budget)
        except ValueError as exc:
            raise CliError(f"--budget {args.budget}: {exc}") from exc
        qconfig = SplitQuantConfig.for_budget(args.budget, **given)
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from exc
    stored = _budget_bits(qconfig)
    if stored > args.budget:
        flags = " ".join(_flag(name, value) for name, value in given.items())
        raise CliError(
            f"--budget {args.budget} with {flags} stores {stored:.4g} bits per weight (layers of {BUDGET_WIDTH} "
            f"inputs and outputs), over the budget; drop or change those settings, raise --budget, or give --bits instead"
        )
    return qconfig


def _flag(name: str, value: object) -> str:
    """The command-line form of one setting (``--column-scales`` / ``--no-column-scales`` for a switch)."""
    flag = name.replace("_", "-")
    if isinstance(value, bool):
        return f"--{flag}" if value else f"--no-{flag}"
    return f"--{flag} {value}"


def _budget_bits(qconfig: SplitQuantConfig) -> float:
    """Stored bits per weight of ``qconfig`` on rows of ``BUDGET_WIDTH`` inputs (or the next multiple of its group)."""
    group = qconfig.group_size or 1
    return qconfig.to_spec().bits_per_weight(-(-BUDGET_WIDTH // group) * group)


def cmd_quantize(args: argparse.Namespace) -> int:
    """``quantize``: float model → SplitQuant folder with tokenizer and model card (→ Hub)."""
    qconfig = resolve_config(args)
    output = check_output(args.output, args.model, overwrite=args.overwrite)
    if args.push_to_hub:
        _check_can_push()
    config = load_config(args.model)
    if getattr(config, "quantization_config", None):
        raise CliError(f"{args.model!r} is already quantized; quantize its float original instead")
    task = resolve_task(config, args.task)
    source = model_source(args.model)
    check_safetensors_only(source, config)
    local = Path(args.model).expanduser()
    st_root = local if local.is_dir() else hub_sentence_folder(args.model)
    st_files = sentence_files(st_root) if st_root is not None else {}
    created = prepare_output(output)
    try:
        with staged_output(output, replace=args.overwrite) as staging:
            tokenizer = load_tokenizer(source)
            model, float_model, seconds = _load_quantized(source, config, task, qconfig, keep_float=args.evaluate)
            metrics = evaluate_model(task, model, tokenizer, float_model, limit=args.limit) if args.evaluate else []
            del float_model
            model.save_pretrained(staging)
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            if st_root is not None:
                copy_sentence_files(st_root, st_files, staging)
            info = _card_info(args, model, task, metrics, staging, sentence_transformers=bool(st_files))
            (staging / "README.md").write_text(model_card(info), encoding="utf-8")
    except BaseException:
        remove_created(created)
        raise
    url = _push(output, args.push_to_hub, args.private) if args.push_to_hub else None
    _summary(args.model, task, info, seconds, output, tokenizer is not None, url)
    return 0


def _card_info(
    args: argparse.Namespace, model: nn.Module, task: str, metrics: list, folder: Path, sentence_transformers: bool
) -> CardInfo:
    """What the model card states about the model just saved in ``folder``."""
    report = size_report(model)
    size_after = safetensors_bytes(folder) or report.total_bytes
    # The float checkpoint on disk, else the float size of what was just quantized.
    size_before = safetensors_bytes(Path(args.model).expanduser()) or report.other_bytes + 4 * report.quantized_weights
    base_model, base_name = _base_id(args.model)
    quality = quality_report(model)  # measured while quantizing
    return CardInfo(
        quantization_config=model.config.quantization_config.to_dict(),
        task=task,
        effective_bits=report.effective_bits,
        quantized_layers=report.quantized_layers,
        quantized_weights=report.quantized_weights,
        size_after=size_after,
        size_before=size_before,
        base_model=args.base_model or base_model,
        base_name=args.base_model or base_name,
        repo_id=args.push_to_hub,
        metrics=metrics,
        base_metadata=base_card_metadata(args.model),
        sentence_transformers=sentence_transformers,
        budget=args.budget,
        budget_overrides=_settings_given(args) if args.budget is not None else {},
        sqnr_db=quality.sqnr_db if quality.layers else None,
        layer_sqnr_db={name: error.sqnr_db for name, error in quality.layers.items()},
    )


def _summary(
    model: str, task: str, info: CardInfo, seconds: float, output: Path, tokenizer: bool, url: str | None
) -> None:
    """The command's result on stdout: settings, bits, sizes, time, metrics, where it went, how to load it."""
    cfg = info.quantization_config
    kept = ", ".join(cfg.get("modules_to_not_convert") or []) or "none"
    before, after = info.size_before or 0, info.size_after
    out(f"SplitQuant INT{cfg['bits']} (k={cfg['num_clusters']}) of {model} [{task}]")
    if info.budget is not None:
        overrides = "".join(f", {name}={value!r}" for name, value in info.budget_overrides.items())
        out(
            f"  budget     {info.budget:g} bits per weight asked for: SplitQuantConfig.for_budget({info.budget:g}{overrides})"
        )
    shown = [name for name in _SHOWN_SETTINGS if name != "range_block" or cfg.get("range_bits") is not None]
    out("  settings   " + ", ".join(f"{name}={cfg.get(name)!r}" for name in shown))
    out(f"  layers     {info.quantized_layers} quantized ({info.quantized_weights:,} weights); float: {kept}")
    out(f"  bits       {info.effective_bits:.3f} effective bits per weight (codes + cluster ids + scales + offsets)")
    out(f"  size       {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({before / after:.2f}x smaller)")
    out(f"  time       {seconds:.1f} s to load and quantize")
    for line in metrics_table(list(info.metrics)) if info.metrics else []:
        out(f"  {line}")
    files = "model.safetensors, config.json" + (", tokenizer" if tokenizer else "")
    files += (", sentence-transformers modules" if info.sentence_transformers else "") + ", README.md (model card)"
    out(f"  saved      {output} ({files})")
    if url:
        out(f"  pushed     {url}")
    out(f"  load with  import optimum_splitquant; {auto_class(task).__name__}.from_pretrained({str(output)!r})")
