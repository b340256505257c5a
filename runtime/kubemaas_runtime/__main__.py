"""`kubemaas-runtime` / `python -m kubemaas_runtime`: `serve`, `fetch`, `fetch-adapters` and
`cache-evict`."""

from __future__ import annotations

import argparse
import os
import sys


def build_parser() -> argparse.ArgumentParser:
    from kubemaas_runtime.config import add_serve_arguments
    from kubemaas_runtime.fetch import add_fetch_arguments

    parser = argparse.ArgumentParser(
        prog="kubemaas-runtime",
        description="The KubeMaaS PyTorch runtime: an Open Inference Protocol (KServe v2) server.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="load one model and serve it over HTTP",
        description="Serve one PyTorch model over the Open Inference Protocol (KServe v2). "
                    "Every flag can also be set with its KUBEMAAS_* environment variable "
                    "(--max-batch-size <-> KUBEMAAS_MAX_BATCH_SIZE); the command line wins.")
    add_serve_arguments(serve)
    fetch = commands.add_parser(
        "fetch", help="download model files from s3:// or hf:// into a directory",
        description="Download a model for the serve step (the init container). Credentials come "
                    "from the environment: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                    "AWS_SESSION_TOKEN, AWS_ENDPOINT_URL(_S3), AWS_REGION for s3://; HF_TOKEN "
                    "and HF_ENDPOINT for hf://.")
    add_fetch_arguments(fetch)
    from kubemaas_runtime.adapter_fetch import add_fetch_adapters_arguments

    fetch_adapters = commands.add_parser(
        "fetch-adapters", help="keep a directory holding the s3:// and hf:// LoRA adapters of a list",
        description="The adapter-fetch sidecar: follows the adapter list (JSON) and fetches each "
                    "adapter into --dest/<name>, with the same credentials as fetch.")
    add_fetch_adapters_arguments(fetch_adapters)
    from kubemaas_runtime.cache_evict import add_cache_evict_arguments

    cache_evict = commands.add_parser(
        "cache-evict", help="remove one entry of the node-local model cache",
        description="Remove <root>/<key> (and a killed fill's staging folders) under the entry's "
                    "lock; the operator's eviction Job runs it once no ModelService refers to the key.")
    add_cache_evict_arguments(cache_evict)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.parse_args(argv or ["--help"])
    command, rest = argv[0], argv[1:]
    if command == "serve":
        from kubemaas_runtime.config import parse_serve_config
        from kubemaas_runtime.serve import serve

        config = parse_serve_config(rest, os.environ)
        raise SystemExit(serve(config))
    if command == "fetch":
        from kubemaas_runtime.fetch import fetch_command

        raise SystemExit(fetch_command(parser.parse_args(argv), os.environ))
    if command == "fetch-adapters":
        from kubemaas_runtime.adapter_fetch import fetch_adapters_command

        raise SystemExit(fetch_adapters_command(parser.parse_args(argv), os.environ))
    if command == "cache-evict":
        from kubemaas_runtime.cache_evict import cache_evict_command

        raise SystemExit(cache_evict_command(parser.parse_args(argv), os.environ))
    parser.parse_args(argv)  # reports the unknown command


if __name__ == "__main__":
    main()
