"""``optimum-splitquant``: quantize a model into a SplitQuant folder (and push it), evaluate it, or run the demo.

::

    optimum-splitquant                                   # the demo: a real spam classifier at 2 bits
    optimum-splitquant quantize MODEL --bits 2 --output DIR [--push-to-hub REPO_ID] [--evaluate]
    optimum-splitquant evaluate DIR [--base MODEL]

Results go to stdout; progress and diagnostics to stderr. A failure ends with one ``error:`` line
on stderr and exit status 1 (2 for a malformed command line); ``--verbose`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import transformers
from huggingface_hub import HfApi, ModelCard, constants, get_token
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from . import data, demo
from .card import CardInfo, Metric, model_card
from .config import SplitQuantConfig
from .convert import quantize_model
from .report import size_report

__all__ = ["CliError", "main"]

logger = logging.getLogger("optimum_splitquant.cli")

TASKS = ("auto", "feature-extraction", "text-classification", "text-generation")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


class CliError(Exception):
    """A failure the user can act on; its message is printed as the single ``error:`` line."""


def _out(text: str = "") -> None:
    """User-facing output (stdout)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# ---- loading -----------------------------------------------------------------------------------


def _load_config(model: str) -> PretrainedConfig:
    """The model's transformers config; a missing folder or an unreachable Hub id is a ``CliError``."""
    local = Path(model).expanduser()
    if not local.exists() and (model.startswith((".", "/", "~")) or not _HUB_ID.match(model)):
        raise CliError(f"model path {model!r} does not exist")
    if local.exists() and not (local / "config.json").is_file():
        raise CliError(f"{model!r} is not a transformers model folder (no config.json)")
    try:
        return AutoConfig.from_pretrained(str(local) if local.exists() else model)
    except (OSError, ValueError) as exc:
        if local.exists():
            raise CliError(f"cannot read the config of {model!r}: {_one_line(exc)}") from exc
        if constants.HF_HUB_OFFLINE:
            raise CliError(
                f"{model!r} is not a local folder, and offline mode (HF_HUB_OFFLINE=1) forbids a download"
            ) from exc
        raise CliError(
            f"{model!r} is neither a local folder nor a model on the Hugging Face Hub: {_one_line(exc)}"
        ) from exc


def resolve_task(config: PretrainedConfig, task: str = "auto") -> str:
    """The pipeline task of a model: ``task`` itself, or inferred from ``config.architectures``."""
    if task != "auto":
        return task
    arch = (getattr(config, "architectures", None) or [""])[0]
    if arch.endswith("ForSequenceClassification"):
        return "text-classification"
    if arch.endswith(("ForCausalLM", "LMHeadModel")):
        return "text-generation"
    if arch == "" or arch.endswith("Model"):
        return "feature-extraction"
    raise CliError(f"cannot infer the task of architecture {arch!r}; pass --task {{{','.join(TASKS[1:])}}}")


def _auto_class(task: str) -> type:
    names = {
        "feature-extraction": "AutoModel",
        "text-classification": "AutoModelForSequenceClassification",
        "text-generation": "AutoModelForCausalLM",
    }
    return getattr(transformers, names[task])


def _load_tokenizer(source: str):
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        logger.warning("no tokenizer could be loaded from %s (%s)", source, _one_line(exc))
        return None


def _safetensors_bytes(folder: Path) -> int | None:
    files = list(folder.glob("*.safetensors")) if folder.is_dir() else []
    return sum(f.stat().st_size for f in files) if files else None


# ---- evaluation ----------------------------------------------------------------------------------


def evaluate_model(task: str, model, tokenizer, base=None, *, limit: int | None = None) -> list[Metric]:
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

        def acc(m) -> float:
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


def _metrics_table(metrics: list[Metric]) -> list[str]:
    rows = [("metric", "data", "model", "float base")]
    for m in metrics:
        base = "-" if m.base_value is None else f"{m.base_value:.4f}"
        rows.append((m.name, m.dataset, f"{m.value:.4f}", base))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]


# ---- commands ------------------------------------------------------------------------------------


def _prepare_output(path: Path) -> bool:
    """Create ``path`` if needed and check it is writable; returns whether it was created."""
    if path.exists() and not path.is_dir():
        raise CliError(f"output {str(path)!r} exists and is not a directory")
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise CliError(f"cannot write to output directory {str(path)!r}: {exc.strerror or exc}") from exc
    return created


def _check_can_push() -> None:
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
            f"push to {repo_id!r} failed ({_one_line(exc)}); the model is saved in {str(folder)!r}: "
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


def _load_quantized(source: str, task: str, qconfig: SplitQuantConfig, keep_float: bool):
    """``(quantized model, float copy or None, seconds)``.

    Without ``keep_float`` the weights are quantized as they stream in (peak memory about the
    quantized model's; transformers' loading bar shows the progress). With it (``--evaluate``, which
    needs the float model as reference) the float model is loaded whole, copied, then quantized in
    memory with a bar over the layers.
    """
    auto = _auto_class(task)
    start = time.perf_counter()
    if not keep_float:
        transformers.utils.logging.enable_progress_bar()
        try:
            model = auto.from_pretrained(source, quantization_config=qconfig)
        finally:
            transformers.utils.logging.disable_progress_bar()
        return model, None, time.perf_counter() - start
    model = auto.from_pretrained(source)
    float_model = copy.deepcopy(model)
    quantize_model(model, qconfig, progress=True)
    return model, float_model, time.perf_counter() - start


def cmd_quantize(args: argparse.Namespace) -> int:
    """``quantize``: float model → SplitQuant folder with tokenizer and model card (→ Hub)."""
    try:
        qconfig = SplitQuantConfig(
            bits=args.bits, num_clusters=args.num_clusters, group_size=args.group_size, clustering=args.clustering
        )
    except (ValueError, TypeError) as exc:
        raise CliError(str(exc)) from exc
    if args.push_to_hub:
        _check_can_push()
    config = _load_config(args.model)
    if getattr(config, "quantization_config", None):
        raise CliError(f"{args.model!r} is already quantized; quantize its float original instead")
    task = resolve_task(config, args.task)
    output = Path(args.output).expanduser()
    created = _prepare_output(output)
    local = Path(args.model).expanduser()
    source = str(local) if local.exists() else args.model
    try:
        tokenizer = _load_tokenizer(source)
        model, float_model, seconds = _load_quantized(source, task, qconfig, keep_float=args.evaluate)
        metrics = evaluate_model(task, model, tokenizer, float_model, limit=args.limit) if args.evaluate else []
        del float_model
        model.save_pretrained(output)
        if tokenizer is not None:
            tokenizer.save_pretrained(output)
    except BaseException:
        if created and output.is_dir() and not any(output.iterdir()):
            shutil.rmtree(output, ignore_errors=True)
        raise
    report = size_report(model)
    size_after = _safetensors_bytes(output) or report.total_bytes
    # The float checkpoint on disk, else the float size of what was just quantized.
    size_before = _safetensors_bytes(local) or report.other_bytes + 4 * report.quantized_weights
    base_model, base_name = _base_id(args.model)
    info = CardInfo(
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
    )
    (output / "README.md").write_text(model_card(info), encoding="utf-8")
    url = _push(output, args.push_to_hub, args.private) if args.push_to_hub else None
    _summary(args.model, task, info, seconds, output, tokenizer is not None, url)
    return 0


def _summary(model: str, task: str, info: CardInfo, seconds: float, output: Path, tokenizer: bool, url: str | None):
    cfg = info.quantization_config
    kept = ", ".join(cfg.get("modules_to_not_convert") or []) or "none"
    before, after = info.size_before or 0, info.size_after
    _out(f"SplitQuant INT{cfg['bits']} (k={cfg['num_clusters']}) of {model} [{task}]")
    _out(f"  layers     {info.quantized_layers} quantized ({info.quantized_weights:,} weights); float: {kept}")
    _out(f"  bits       {info.effective_bits:.3f} effective bits per weight (codes + cluster ids + scales + offsets)")
    _out(f"  size       {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB ({before / after:.2f}x smaller)")
    _out(f"  time       {seconds:.1f} s to load and quantize")
    for line in _metrics_table(list(info.metrics)) if info.metrics else []:
        _out(f"  {line}")
    files = "model.safetensors, config.json" + (", tokenizer" if tokenizer else "") + ", README.md (model card)"
    _out(f"  saved      {output} ({files})")
    if url:
        _out(f"  pushed     {url}")
    _out(f"  load with  import optimum_splitquant; {_auto_class(task).__name__}.from_pretrained({str(output)!r})")


def _read_card_base(path: Path) -> str | None:
    readme = path / "README.md"
    if not readme.is_file():
        return None
    try:
        return ModelCard.load(readme).data.to_dict().get("base_model")
    except Exception:  # a malformed card only means the base is unknown
        return None


def cmd_evaluate(args: argparse.Namespace) -> int:
    """``evaluate``: score a saved (quantized or float) model on the offline real data."""
    config = _load_config(args.model)
    task = resolve_task(config, args.task)
    auto = _auto_class(task)
    source = str(Path(args.model).expanduser()) if Path(args.model).expanduser().exists() else args.model
    model = auto.from_pretrained(source)
    tokenizer = _load_tokenizer(args.tokenizer or source)
    base_ref = args.base
    if base_ref is None and getattr(config, "quantization_config", None):
        base_ref = _read_card_base(Path(source))
    base = None
    if base_ref:
        local = data.local_model_path(base_ref)
        base_source = str(local) if local is not None else base_ref
        _load_config(base_source)
        base = auto.from_pretrained(base_source)
        if tokenizer is None:
            tokenizer = _load_tokenizer(base_source)
    start = time.perf_counter()
    metrics = evaluate_model(task, model, tokenizer, base, limit=args.limit)
    quant = getattr(config, "quantization_config", None)
    kind = f"SplitQuant INT{quant['bits']} (k={quant['num_clusters']})" if isinstance(quant, dict) else "float"
    _out(f"{args.model} [{task}, {kind}]" + (f", base {base_ref}" if base_ref else ""))
    if not metrics:
        _out("no metric computed (see the warning above)")
        return 0
    for line in _metrics_table(metrics):
        _out(line)
    _out(f"({time.perf_counter() - start:.1f} s)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The default job: a real MiniLM spam classifier, FP32 vs plain INT2 vs SplitQuant INT2."""
    result = demo.run(fresh=getattr(args, "fresh", False), rebuild=getattr(args, "rebuild", False))
    _out(demo.format_report(result))
    return 0


# ---- entry point ---------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="debug logs, tracebacks"
    )
    parser = argparse.ArgumentParser(
        prog="optimum-splitquant",
        description="SplitQuant (arXiv 2501.12428) low-bit weight quantization for transformers models. "
        "With no command: build (once) a real SMS spam classifier and compare it at 2 bits.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs, tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="{quantize,evaluate,demo}")

    q = sub.add_parser("quantize", parents=[common], help="quantize a model into a SplitQuant folder")
    q.add_argument("model", help="local model folder or Hub id")
    q.add_argument("--bits", type=int, required=True, help="code bits per weight: 2, 3, 4 or 8")
    q.add_argument("--num-clusters", type=int, default=3, help="k-means clusters per layer (1 = plain min-max)")
    q.add_argument("--group-size", type=int, default=None, help="input columns per range (default: whole row)")
    q.add_argument("--clustering", default="tensor", help="tensor (one k-means per layer) or channel (per row)")
    q.add_argument("--task", choices=TASKS, default="auto", help="model head to load (default: from config)")
    q.add_argument("--output", required=True, help="folder to write the quantized model to")
    q.add_argument("--push-to-hub", metavar="REPO_ID", help="also upload the folder to this Hub repository")
    q.add_argument("--private", action="store_true", help="create the Hub repository as private")
    q.add_argument("--base-model", help="Hub id of the float model, for the model card")
    q.add_argument("--evaluate", action="store_true", help="score it against the float model; results go in the card")
    q.add_argument("--limit", type=int, help="evaluation size (texts, messages or tokens)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("evaluate", parents=[common], help="score a model on offline real data")
    e.add_argument("model", help="saved model folder (SplitQuant or float) or Hub id")
    e.add_argument("--task", choices=TASKS, default="auto")
    e.add_argument("--base", help="float model to compare with (default: the card's base_model, if available)")
    e.add_argument("--tokenizer", help="tokenizer folder if the model folder has none")
    e.add_argument("--limit", type=int, help="evaluation size (texts, messages or tokens)")
    e.set_defaults(func=cmd_evaluate)

    d = sub.add_parser("demo", parents=[common], help="the default job (same as no command)")
    d.add_argument("--fresh", action="store_true", help="quantize the cached classifier again")
    d.add_argument("--rebuild", action="store_true", help="also rebuild the cached FP32 classifier")
    d.set_defaults(func=cmd_demo)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time of the record (robust to redirection)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


@contextlib.contextmanager
def _logging(verbose: bool) -> Iterator[None]:
    """Show the package's INFO logs (DEBUG with ``verbose``) on stderr while the command runs."""
    handler = _StderrHandler()
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose else "%(message)s")
    )
    pkg = logging.getLogger("optimum_splitquant")
    saved = (pkg.level, pkg.propagate)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    pkg.addHandler(handler)
    pkg.setLevel(logging.DEBUG if verbose else logging.INFO)
    pkg.propagate = False
    if not verbose:
        transformers.utils.logging.disable_progress_bar()
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        pkg.setLevel(saved[0])
        pkg.propagate = saved[1]
        if bars:
            transformers.utils.logging.enable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status."""
    args = _parser().parse_args(argv)
    verbose = bool(getattr(args, "verbose", False))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        with _logging(verbose):
            func: Any = getattr(args, "func", cmd_demo)
            return func(args)
    except KeyboardInterrupt:
        sys.stderr.write("optimum-splitquant: interrupted\n")
        return 130
    except Exception as exc:
        if verbose:
            raise
        hint = "" if isinstance(exc, CliError) else f" ({type(exc).__name__}; --verbose shows the traceback)"
        sys.stderr.write(f"optimum-splitquant: error: {_one_line(exc)}{hint}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
