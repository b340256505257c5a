"""vLLM's own offline greedy chat, the reference of bench/gpu's vllm check. Run with the vLLM
venv's python, never imported:

    python vllm_offline.py MODEL_DIR REQUESTS.json OUT.json DTYPE

REQUESTS.json: {"max_tokens": N, "chats": [[{"role", "content"}, ...], ...]}; OUT.json gets
[{"text"}, ...] from `LLM.chat` (temperature 0, tensor parallelism 1) in the same order."""

from __future__ import annotations

import json
import sys


def main(model_dir: str, requests_path: str, out_path: str, dtype: str) -> None:
    from vllm import LLM, SamplingParams

    with open(requests_path) as given:
        requests = json.load(given)
    llm = LLM(model=model_dir, max_model_len=2048, dtype=dtype, tensor_parallel_size=1, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=requests["max_tokens"])
    outputs = llm.chat(requests["chats"], params, use_tqdm=False)
    with open(out_path, "w") as out:
        json.dump([{"text": o.outputs[0].text} for o in outputs], out)


if __name__ == "__main__":
    main(*sys.argv[1:5])
