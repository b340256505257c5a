"""KServe's Python model server (kserve.ModelServer, one worker) serving MiniLM embeddings
over its v2 endpoint. Run as a script: peer_kserve.py PORT THREADS."""

from __future__ import annotations

import sys


def main() -> None:
    port, threads = int(sys.argv[1]), int(sys.argv[2])
    sys.argv = sys.argv[:1]  # kserve parses argv at import
    import kserve
    from embedder import Embedder
    from kserve import InferOutput, InferRequest, InferResponse

    class MiniLM(kserve.Model):
        def __init__(self) -> None:
            super().__init__("minilm")
            self.embedder = Embedder(threads=threads)
            self.ready = True

        def predict(self, payload: InferRequest, headers=None, response_headers=None):
            texts = [t.decode() if isinstance(t, bytes) else t for t in payload.inputs[0].data]
            vectors = self.embedder.embed(texts)
            output = InferOutput("embedding", list(vectors.shape), "FP32", vectors)
            return InferResponse(payload.id or "bench", self.name, [output])

    kserve.ModelServer(http_port=port, grpc_port=port + 1, enable_grpc=False, workers=1,
                       enable_latency_logging=False).start([MiniLM()])


if __name__ == "__main__":
    main()
