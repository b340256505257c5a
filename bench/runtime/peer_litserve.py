"""LitServe (one worker, its dynamic batching: max_batch_size 32, batch_timeout 5 ms) serving
MiniLM embeddings at /predict. Run as a script: peer_litserve.py PORT THREADS."""

from __future__ import annotations

import sys

import litserve as ls
from embedder import Embedder

BATCH_TIMEOUT_S = 0.005


class MiniLMAPI(ls.LitAPI):
    def __init__(self, threads: int) -> None:
        super().__init__(max_batch_size=32, batch_timeout=BATCH_TIMEOUT_S)
        self.threads = threads

    def setup(self, device) -> None:
        self.embedder = Embedder(threads=self.threads)

    def decode_request(self, request):
        return request["text"]

    def batch(self, inputs):
        return list(inputs)

    def predict(self, texts):
        return self.embedder.embed(texts)

    def unbatch(self, output):
        return list(output)

    def encode_response(self, output):
        return {"embedding": output.tolist()}


def main() -> None:
    port, threads = int(sys.argv[1]), int(sys.argv[2])
    server = ls.LitServer(MiniLMAPI(threads), accelerator="cpu", workers_per_device=1)
    server.run(port=port, host="127.0.0.1", generate_client_file=False, log_level="warning")


if __name__ == "__main__":
    main()
