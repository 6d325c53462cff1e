"""Greedy tokens of a model served by ``vllm.LLM``, printed as one JSON line (run by test_serve.py in a subprocess).

Usage: ``python tests/vllm/serve_greedy.py MODEL_DIR TP_SIZE MAX_TOKENS PROMPTS_JSON``; the prompts are lists
of token ids (the tiny test model has no tokenizer). vLLM spawns its engine processes, hence the main guard.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, tp, max_tokens, prompts = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
    llm = LLM(
        model,
        dtype="float32",
        tensor_parallel_size=tp,
        enforce_eager=True,
        skip_tokenizer_init=True,
        max_model_len=128,
        max_num_seqs=4,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    print("GREEDY " + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)


if __name__ == "__main__":
    main()
