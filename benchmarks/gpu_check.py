"""One short, prepared GPU check (run by hand where a CUDA GPU is available; never in CI).

Builds a random ~1 B-parameter Llama-architecture checkpoint (bf16, several safetensors shards)
on the GPU machine, then through ``device_map=args.device``: quantizes it at load (SplitQuant INT4 and
INT2), measures load throughput and peak GPU memory, compares forward and greedy-decoding time with
the bf16 model side by side, saves the INT4 model, reloads it on the GPU and on the CPU, and checks
that packed bytes are the same whether a layer is quantized on the GPU or on the CPU. For the default
and ``SplitQuantConfig.for_budget`` configurations it measures decode tokens/s (batch 1 and 8) and
prefill tokens/s (8 x 512) against bf16 with the Triton kernels on and off, and how far the
outputs are from the kernels-off path and from the CPU path.

    python benchmarks/gpu_check.py --out results/    # writes gpu_check.json
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

import optimum_splitquant as osq
from benchmarks.output import machine_info
from optimum_splitquant.core import QuantSpec, dequantize_weight, quantize_weight
from optimum_splitquant.kernels import triton_ops
from optimum_splitquant.nn import SplitQuantLinear

logger = logging.getLogger("gpu_check")


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time(fn, repeat: int = 5) -> float:
    fn()
    _sync()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        _sync()
        best = min(best, time.perf_counter() - t)
    return best


def _reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.reset_peak_memory_stats()


def _peak(cuda: bool) -> int:
    return torch.cuda.max_memory_allocated() if cuda else 0


def _allocated(cuda: bool) -> int:
    return torch.cuda.memory_allocated() if cuda else 0


def _empty(cuda: bool) -> None:
    if cuda:
        torch.cuda.empty_cache()


@torch.no_grad()
def _bench(model, ids: torch.Tensor, prompt: torch.Tensor) -> tuple[float, float]:
    """(best forward time on ``ids``, best time of 32 greedy tokens from ``prompt``)."""
    forward = _time(lambda: model(ids))
    generate = _time(lambda: model.generate(prompt, max_new_tokens=32, min_new_tokens=32, do_sample=False), repeat=2)
    return forward, generate


@torch.no_grad()
def _speeds(model, ids: torch.Tensor, prompts: torch.Tensor) -> dict:
    """Decode tokens/s at batch 1 and 8 (32 greedy tokens after the prompt) and prefill tokens/s on ``ids``."""
    out = {}
    for batch in (1, 8):
        p = prompts[:batch]
        s = _time(lambda p=p: model.generate(p, max_new_tokens=32, min_new_tokens=32, do_sample=False), repeat=2)
        out[f"decode_b{batch}_tok_s"] = batch * 32 / s
    out[f"prefill_{ids.shape[0]}x{ids.shape[1]}_tok_s"] = ids.numel() / _time(lambda: model(ids), repeat=3)
    return out


KERNEL_CONFIGS = {
    "int4-default": lambda: osq.SplitQuantConfig(),
    "int2-k3": lambda: osq.SplitQuantConfig(bits=2),
    "budget-4.0": lambda: osq.SplitQuantConfig.for_budget(4.0),
    "budget-4.5": lambda: osq.SplitQuantConfig.for_budget(4.5),
    "budget-6.0": lambda: osq.SplitQuantConfig.for_budget(6.0),
}


@torch.no_grad()
def _layer_vs_cpu(model) -> dict:
    """One quantized layer on the model's device against its CPU copy (dequantize bits, outputs)."""
    layer = next(m for m in model.modules() if isinstance(m, SplitQuantLinear))
    cpu = copy.deepcopy(layer).to("cpu")
    dev = layer.weight_packed.device
    args = (layer.weight_packed, layer.weight_scale, layer.weight_offset, layer.in_features)
    ref = dequantize_weight(*(a.cpu() if torch.is_tensor(a) else a for a in args), cpu.spec)
    out = {"symbol_width": layer.spec.symbol_width}
    if triton_ops.unavailable_reason() == "":
        got = triton_ops.dequantize(*args, layer.spec.bits, layer.spec.symbol_width)
        out["triton_dequantize_identical"] = bool(torch.equal(got.cpu(), ref))
    gen = torch.Generator().manual_seed(2)
    for tokens in (1, 8, 64):
        x = torch.randn(tokens, layer.in_features, generator=gen)
        want = cpu(x).double()
        err = (layer(x.to(dev)).cpu().double() - want).norm() / want.norm()
        out[f"rel_err_vs_cpu_{tokens}tok"] = err.item()
    return out


def _kernel_speeds(args, float_dir: Path, ids: torch.Tensor, prompts: torch.Tensor, res: dict) -> dict:
    """Per configuration: speeds with the Triton kernels on and off, ratios to bf16, output agreement."""
    env = triton_ops.ENV_VAR
    before = os.environ.get(env)
    section: dict = {"triton_unavailable_reason": triton_ops.unavailable_reason()}
    bf16 = res["bf16_speeds"]
    for name in filter(None, args.kernel_configs.split(",")):
        config = KERNEL_CONFIGS[name]()
        q = AutoModelForCausalLM.from_pretrained(
            float_dir, dtype=torch.bfloat16, device_map=args.device, quantization_config=config
        ).eval()
        entry: dict = {"config": {k: getattr(config, k) for k in ("bits", "num_clusters", "group_size", "fit")}}
        logits = {}
        try:
            for state, value in (("on", "auto"), ("off", "off")):
                os.environ[env] = value
                entry[state] = _speeds(q, ids, prompts)
                entry[f"{state}_vs_bf16"] = {k: v / bf16[k] for k, v in entry[state].items()}
                with torch.no_grad():
                    logits[state] = q(ids[:1, :32]).logits.float().cpu()
            os.environ[env] = "auto"
            entry["layer"] = _layer_vs_cpu(q)
        finally:
            if before is None:
                os.environ.pop(env, None)
            else:
                os.environ[env] = before
        on, off = logits["on"].double().flatten(), logits["off"].double().flatten()
        entry["logits_on_vs_off_max_abs"] = (on - off).abs().max().item()
        entry["logits_on_vs_off_cosine"] = torch.nn.functional.cosine_similarity(on, off, dim=0).item()
        logger.info("kernels %s: %s", name, entry)
        section[name] = entry
        del q
        _empty(cuda=torch.device(args.device).type == "cuda")
    return section


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=".")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--device", default="cuda", help="'cpu' only for a dry run of the script itself")
    parser.add_argument(
        "--kernel-configs",
        default=",".join(KERNEL_CONFIGS),
        help=f"comma-separated configurations timed with the Triton kernels on and off, of {list(KERNEL_CONFIGS)}; "
        "'' skips the section",
    )
    args = parser.parse_args()
    unknown = set(filter(None, args.kernel_configs.split(","))) - set(KERNEL_CONFIGS)
    if unknown:
        parser.error(f"unknown --kernel-configs {sorted(unknown)}; choose from {list(KERNEL_CONFIGS)}")
    return args


def _build_float(args: argparse.Namespace, dev: torch.device, float_dir: Path, res: dict) -> None:
    """Save a random Llama of ``args.layers`` x ``args.hidden`` (bf16, shards) into ``float_dir``; sizes into ``res``."""
    cfg = LlamaConfig(
        vocab_size=32000,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=16,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )
    t = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    res["params"] = sum(p.numel() for p in model.parameters())
    model.save_pretrained(float_dir, max_shard_size="500MB")
    del model
    _empty(dev.type == "cuda")
    res["build_s"] = time.perf_counter() - t
    res["shards"] = len(list(float_dir.glob("*.safetensors")))
    logger.info("random Llama: %.2f B params, %d shards", res["params"] / 1e9, res["shards"])


def _bf16_baseline(
    float_dir: Path, device: str, ids: torch.Tensor, prompt: torch.Tensor, prompts: torch.Tensor, res: dict
) -> tuple[torch.Tensor, float, float]:
    """Load the bf16 model on ``device``: its peak memory and speeds into ``res``; returns (logits, forward s, generate s)."""
    cuda = torch.device(device).type == "cuda"
    _reset_peak(cuda)
    fp = AutoModelForCausalLM.from_pretrained(float_dir, dtype=torch.bfloat16, device_map=device).eval()
    res["bf16_peak_gib"] = _peak(cuda) / 2**30
    with torch.no_grad():
        ref_logits = fp(ids[:1, :64]).logits.float()
    t_fp, g_fp = _bench(fp, ids, prompt)
    res["bf16_forward_s"], res["bf16_generate32_s"] = t_fp, g_fp
    res["bf16_speeds"] = _speeds(fp, ids, prompts)
    del fp
    _empty(cuda)
    return ref_logits, t_fp, g_fp


def _quantized_entry(
    q, ids: torch.Tensor, prompt: torch.Tensor, ref_logits: torch.Tensor, load_s: float, peak: float, resident: float
) -> dict:
    """Load throughput, bits, GPU memory (GiB), closeness to the bf16 logits and speed of the quantized model ``q``."""
    rep = osq.size_report(q)
    entry = {
        "load_s": load_s,
        "weights_per_s_M": rep.quantized_weights / load_s / 1e6,
        "effective_bits": rep.effective_bits,
        "peak_gib": peak,
        "resident_gib": resident,
    }
    with torch.no_grad():
        logits = q(ids[:1, :64]).logits.float()
        entry["logit_cosine_to_bf16"] = torch.nn.functional.cosine_similarity(
            logits.double().flatten(), ref_logits.double().flatten(), dim=0
        ).item()
    entry["forward_s"], entry["generate32_s"] = _bench(q, ids, prompt)
    return entry


def _reload_checks(qdir: Path, out_gpu: torch.Tensor, ids: torch.Tensor, device: str, res: dict) -> None:
    """Reload the saved INT4 model on ``device`` (bit-identical to ``out_gpu``?) and on the CPU (how close?)."""
    again = AutoModelForCausalLM.from_pretrained(qdir, device_map=device).eval()
    with torch.no_grad():
        res["reload_gpu_identical"] = bool(torch.equal(again(ids[:1, :32]).logits.float().cpu(), out_gpu))
    del again
    cpu = AutoModelForCausalLM.from_pretrained(qdir, device_map="cpu").eval()
    with torch.no_grad():
        out_cpu = cpu(ids[:1, :32].cpu()).logits.float()
    res["reload_cpu_max_abs_diff"] = (out_cpu - out_gpu).abs().max().item()
    res["reload_cpu_cosine"] = torch.nn.functional.cosine_similarity(
        out_cpu.double().flatten(), out_gpu.double().flatten(), dim=0
    ).item()


def _same_bytes(hidden: int, dev: torch.device) -> dict[str, bool]:
    """Whether a real-sized layer quantizes to the same bytes on ``dev`` and on the CPU, per bit width."""
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(hidden, 4 * hidden, generator=gen) * 0.02
    w[0, :4] = torch.tensor([0.9, -0.7, 0.5, -1.2])
    same = {}
    for bits in (2, 4):
        spec = QuantSpec(bits=bits)
        a = quantize_weight(w, spec)
        b = quantize_weight(w.to(dev), spec)
        same[f"int{bits}"] = bool(
            torch.equal(a.packed, b.packed.cpu())
            and torch.equal(a.scale, b.scale.cpu())
            and torch.equal(a.offset, b.offset.cpu())
        )
    return same


def main() -> None:
    args = _arguments()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    machine = machine_info()
    res: dict = {
        "gpu": torch.cuda.get_device_name(0) if cuda else "none (dry run)",
        "torch": machine["versions"]["torch"],
        "transformers": machine["versions"]["transformers"],
        "python": machine["python"],
    }
    work = Path(tempfile.mkdtemp())
    float_dir = work / "float"
    _build_float(args, dev, float_dir, res)

    ids = torch.randint(0, 32000, (8, 512), device=dev)
    prompt = torch.randint(0, 32000, (1, 16), device=dev)
    prompts = torch.randint(0, 32000, (8, 16), device=dev)

    ref_logits, t_fp, g_fp = _bf16_baseline(float_dir, args.device, ids, prompt, prompts, res)

    for bits in (4, 2):
        _reset_peak(cuda)
        base = _allocated(cuda)
        t = time.perf_counter()
        q = AutoModelForCausalLM.from_pretrained(
            float_dir, dtype=torch.bfloat16, device_map=args.device, quantization_config=osq.SplitQuantConfig(bits=bits)
        ).eval()
        _sync()
        load_s = time.perf_counter() - t
        peak, resident = (_peak(cuda) - base) / 2**30, (_allocated(cuda) - base) / 2**30
        entry = _quantized_entry(q, ids, prompt, ref_logits, load_s, peak, resident)
        entry["forward_ratio"] = entry["forward_s"] / t_fp
        entry["generate_ratio"] = entry["generate32_s"] / g_fp
        logger.info("INT%d: %s", bits, entry)
        res[f"int{bits}"] = entry
        if bits == 4:
            q.save_pretrained(work / "q4")
            with torch.no_grad():
                out_gpu = q(ids[:1, :32]).logits.float().cpu()
        del q
        _empty(cuda)
        if bits == 4:
            _reload_checks(work / "q4", out_gpu, ids, args.device, res)
            _empty(cuda)

    res["kernels"] = _kernel_speeds(args, float_dir, ids, prompts, res)
    res["gpu_cpu_same_bytes"] = _same_bytes(args.hidden, dev)  # same bytes on GPU and CPU for a real-sized layer
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2))
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
