"""lm-evaluation-harness scores a saved SplitQuant folder in a process that never imports the package.

``python -m lm_eval --model hf`` runs the local perplexity task of docs/evaluation.md (its YAML
file, and a JSON-lines file of texts, read with ``--include_path``) on a tiny random Llama saved with
4-bit codes and coded ranges. The start-up hook (``_optimum_splitquant_autoload``) is what lets
transformers load the checkpoint there; the log-likelihoods lm_eval reports must be those of the
quantized model computed here, not the float model's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tiny import TINY, load
from transformers import AutoTokenizer

import _optimum_splitquant_autoload as autoload
from optimum_splitquant import SplitQuantConfig
from optimum_splitquant.hf import QUANT_METHOD

pytest.importorskip("lm_eval", reason="needs the eval extra (lm_eval)")

NAME = "llama-lm"
DOCS = Path(__file__).resolve().parents[2] / "docs" / "evaluation.md"
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "free entry to win a prize, text now",
    "a small model reads a few lines of plain text",
    "quantized weights take less memory than floats",
]
CONFIG = SplitQuantConfig(bits=4, num_clusters=1, group_size=32, fit="mse", range_bits=6)
"""4-bit codes in groups of 32 with coded ranges: 4.5 stored bits per weight on wide layers."""
TOLERANCE = 1e-3
"""Nats per text: lm_eval sums float32 log-probabilities, the reference float64 ones (they differ by ~1e-5)."""


@pytest.fixture(scope="module")
def folders(tokenizer_path, tmp_path_factory) -> tuple[Path, Path]:
    """A float tiny Llama and its SplitQuant copy (:data:`CONFIG`), each saved with its tokenizer."""
    root = tmp_path_factory.mktemp("lm-eval")
    auto, make_config = TINY[NAME]
    config = make_config()
    config.initializer_range = 0.2  # weights large enough for 4-bit rounding to move the log-likelihoods
    torch.manual_seed(0)
    auto.from_config(config).save_pretrained(root / "float")
    # lm_eval prefixes each text with the BOS token (here [CLS], the tiny model's bos_token_id).
    tokenizer = AutoTokenizer.from_pretrained(
        tokenizer_path, bos_token="[CLS]", eos_token="[SEP]", model_input_names=["input_ids", "attention_mask"]
    )
    tokenizer.save_pretrained(root / "float")
    load(NAME, root / "float", quantization_config=CONFIG).save_pretrained(root / "q")
    tokenizer.save_pretrained(root / "q")
    return root / "float", root / "q"


def _write_task(folder: Path) -> str:
    """The local perplexity task of docs/evaluation.md over :data:`TEXTS`, written to ``folder``; returns its name."""
    (block,) = re.findall(r"```yaml\n(.*?)```", DOCS.read_text(encoding="utf-8"), re.DOTALL)
    task = yaml.safe_load(block)
    assert task["output_type"] == "loglikelihood_rolling", task
    folder.mkdir()
    data = folder / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in TEXTS), encoding="utf-8")
    task["dataset_kwargs"]["data_files"]["test"] = str(data)
    (folder / f"{task['task']}.yaml").write_text(yaml.safe_dump(task), encoding="utf-8")
    return task["task"]


def _reference_loglikelihoods(folder: Path) -> list[float]:
    """log p(text) of each of :data:`TEXTS` under the model in ``folder``, in float64.

    As lm_eval's ``loglikelihood_rolling`` scores a text shorter than the context: every token the
    tokenizer gives (special tokens included), each predicted from the BOS token and the tokens before it.
    """
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load(NAME, folder)
    out = []
    for text in TEXTS:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(text)["input_ids"]]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), dim=-1)
        out.append(logp[0, :-1].gather(-1, ids[0, 1:, None]).sum().item())
    return out


@pytest.mark.slow  # runs lm_eval in a fresh process: about a minute
def test_lm_eval_scores_a_saved_folder_without_importing_the_package(folders, tmp_path):
    float_folder, folder = folders
    assert json.loads((folder / "config.json").read_text())["quantization_config"]["quant_method"] == QUANT_METHOD
    # The evaluated process runs lm_eval's code alone: none of it names the package, so only the hook imports it.
    lm_eval_root = Path(importlib.util.find_spec("lm_eval").origin).parent
    naming = [p for p in lm_eval_root.rglob("*.py") if "optimum_splitquant" in p.read_text("utf-8", "replace")]
    assert not naming, naming

    task = _write_task(tmp_path / "tasks")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache"),
        "OMP_NUM_THREADS": "1",
    }
    env.pop(autoload.OPT_OUT_ENV, None)
    cmd = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={folder},dtype=float32",
        "--tasks",
        task,
        "--include_path",
        str(tmp_path / "tasks"),
        "--device",
        "cpu",
        "--output_path",
        str(tmp_path / "results"),
        "--log_samples",
    ]
    # cwd outside the repository: the package comes from the installation, as in a user's process.
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, check=False, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]

    (samples_file,) = (tmp_path / "results").rglob(f"samples_{task}_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    reported = [float(s["resps"][0][0]) for s in samples]
    expected, float_model = _reference_loglikelihoods(folder), _reference_loglikelihoods(float_folder)
    assert reported == pytest.approx(expected, abs=TOLERANCE, rel=0)
    # The SplitQuant layers ran: the float model scores every text differently, by far more than the tolerance.
    assert min(abs(q - f) for q, f in zip(expected, float_model, strict=True)) > 100 * TOLERANCE

    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    words = sum(len(re.split(r"\s+", text)) for text in TEXTS)
    word_perplexity = json.loads(results_file.read_text())["results"][task]["word_perplexity,none"]
    assert word_perplexity == pytest.approx(math.exp(-sum(expected) / words), rel=len(TEXTS) * TOLERANCE / words)
