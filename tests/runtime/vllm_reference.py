"""vLLM's own offline greedy answers, the reference of tests/runtime/test_generation_vllm.py.
Run with the vLLM venv's python (hack/vllm-venv), never imported by the tests:

    python vllm_reference.py MODEL_DIR REQUESTS.json OUT.json

REQUESTS.json: {"max_tokens": N, "chats": [[{"role", "content"}, ...], ...], "logprobs": K};
OUT.json gets [{"text", "prompt_tokens", "completion_tokens", "finish_reason", "logprobs"}, ...]
from `LLM.chat` with temperature 0, in the same order; "logprobs" (with K given) is the chosen
token's logprob at each position."""

from __future__ import annotations

import json
import os
import sys

EAGER = os.environ.get("REF_EAGER", "0") == "1"  # the server compiles: so does this


def main(model_dir: str, requests_path: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    with open(requests_path) as given:
        requests = json.load(given)
    # as the runtime's --quantization none serves fp32 weights: as stored
    llm = LLM(model=model_dir, max_model_len=2048, dtype="float32", enforce_eager=EAGER, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=requests["max_tokens"],
                            logprobs=requests.get("logprobs"))
    outputs = llm.chat(requests["chats"], params, use_tqdm=False)
    answers = [{"text": o.outputs[0].text, "prompt_tokens": len(o.prompt_token_ids),
                "completion_tokens": len(o.outputs[0].token_ids),
                "finish_reason": o.outputs[0].finish_reason,
                "logprobs": [position[token].logprob for token, position in zip(
                    o.outputs[0].token_ids, o.outputs[0].logprobs)]
                if o.outputs[0].logprobs is not None else None} for o in outputs]
    with open(out_path, "w") as out:
        json.dump(answers, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
