"""What the operator assumes of `kubemaas-runtime serve` beyond the values it writes.

The operator image carries no runtime package, so these are copies, each written once here and
pinned to the runtime's own parser, routes and defaults by tests/unit/test_contract.py: a change
on one side fails that test until the other follows. The variables the builders write are the
runtime's flags by its own rule (`--max-num-seqs` <-> `KUBEMAAS_MAX_NUM_SEQS`, `env_name`), and
the same test parses every rendered container with the runtime's parser.
"""

from __future__ import annotations

ENV_PREFIX = "KUBEMAAS_"
HTTP_PORT = 8080  # --port: the operator writes it, Services and probes target it
MODEL_DIR = "/mnt/models"  # --model-dir: where the model volume is mounted
ADAPTER_DIR = "/mnt/adapters"  # --adapter-dir: where the adapter sidecar fetches to
READY_PATH = "/v2/health/ready"  # readiness (and startup) probe
LIVE_PATH = "/v2/health/live"  # liveness probe
# --max-num-seqs when spec.runtime.maxNumSeqs is empty (the operator then writes none): the
# GPU-fit estimate's KV budget assumes this many sequences of maxModelLen.
MAX_NUM_SEQS = 16
# --compile (KUBEMAAS_COMPILE): the builtin engine's compiled decode. The operator writes
# COMPILE_DECODE for a variant that asks for it and nothing otherwise: off is the runtime's
# default, so no existing pod's env changes.
COMPILE_FLAG = "--compile"
COMPILE_DECODE = "decode"
COMPILE_DEFAULT = "off"


def compile_graphs(max_num_seqs: int) -> int:
    """Decode graphs `--compile decode` compiles before readiness: one per batch bucket, 1, 2,
    4, ... below max_num_seqs and max_num_seqs itself (compiled_decode.batch_buckets): 5 at 16."""
    return (max_num_seqs - 1).bit_length() + 1


def env_name(flag: str) -> str:
    """`--max-num-seqs` -> `KUBEMAAS_MAX_NUM_SEQS`, the runtime's rule (config.env_var_for)."""
    return ENV_PREFIX + flag.lstrip("-").replace("-", "_").upper()
