"""`kubemaas-runtime fetch`: the init container that fills /mnt/models from s3:// or hf://.

s3://bucket/key copies the object `key` (as its base name) or, when `key` is a prefix, every
object under it (keeping paths relative to the prefix). hf://org/name[@revision] copies the
repository's files at that revision (default main), skipping other frameworks' weights and
pickled weights; hf://org/name/path/file.gguf[@revision] copies that one file (a GGUF repo
holds many quantizations), saved under its base name. S3 objects land under a temporary name
and are renamed when complete; hub files come through huggingface_hub (retries, resume).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import logging
import shutil
import signal
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from kubemaas_runtime.termination import write_termination_log

log = logging.getLogger("kubemaas_runtime.fetch")
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
# Never fetched from the hub: other frameworks' weights and pickled PyTorch weights.
HF_SKIP_PATTERNS = ("*.h5", "*.msgpack", "*.ot", "*.onnx", "*.onnx_data", "*.tflite",
                    "*.bin", "*.pth", "*.ckpt", "*.pkl", "onnx/*", "openvino/*", "coreml/*")


class FetchError(Exception):
    pass


def add_fetch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--uri", required=True, help="s3://bucket/key or hf://org/name[/file][@rev]")
    parser.add_argument("--dest", required=True, help="directory to fill (created if missing)")
    parser.add_argument("--max-bytes", type=int, default=None,
                        help="most bytes to fetch in all; past it the fetch fails (the operator "
                             "passes the model volume's sizeLimit)")
    parser.add_argument("--timeout-seconds", type=int, default=None,
                        help="longest the whole fetch may take; past it the fetch fails")
    parser.add_argument("--cache", action="store_true",
                        help="--dest is an entry of the node-local model cache: skip the fetch when "
                             "the entry is complete, else fill it once for every pod on the node "
                             "(kubemaas_runtime.fetch_cache)")


class Budget:
    """Bytes left to fetch; raises FetchError when a file would pass --max-bytes."""

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, size: int, name: str) -> None:
        self.used += size
        if self.max_bytes is not None and self.used > self.max_bytes:
            raise FetchError(f"{name} takes the fetch past --max-bytes {self.max_bytes} (the model "
                             f"volume's size limit)")


def safe_destination(dest: Path, relative: str) -> Path:
    """`dest/relative`, refusing names that would escape `dest`."""
    parts = PurePosixPath(relative).parts
    if not parts or any(p in ("..", "") for p in parts) or PurePosixPath(relative).is_absolute():
        raise FetchError(f"refusing to write {relative!r} outside {dest}")
    return dest.joinpath(*parts)


def fetch_s3(uri: str, dest: Path, env: Mapping[str, str], budget: Budget) -> list[Path]:
    import boto3

    parsed = urlparse(uri)
    bucket, key = parsed.netloc, parsed.path.lstrip("/")
    if not bucket:
        raise FetchError(f"{uri}: no bucket")
    session = boto3.session.Session(
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=env.get("AWS_SESSION_TOKEN"),
        region_name=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1")
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    s3 = session.client("s3", endpoint_url=endpoint)
    prefix = key.rstrip("/")
    objects: list[tuple[str, str]] = []  # (key, relative path)
    paginator = s3.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            name = item["Key"]
            if name == prefix:
                objects.append((name, PurePosixPath(name).name))
                budget.take(int(item.get("Size", 0)), name)
            elif not prefix or name.startswith(prefix + "/"):
                relative = name[len(prefix) + 1:] if prefix else name
                if relative and not relative.endswith("/"):
                    objects.append((name, relative))
                    budget.take(int(item.get("Size", 0)), name)
    if not objects:
        raise FetchError(f"{uri}: no objects found")
    written = []
    for name, relative in objects:
        target = safe_destination(dest, relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".part")
        s3.download_file(bucket, name, str(partial))
        partial.replace(target)
        written.append(target)
    return written


def parse_hf_uri(uri: str) -> tuple[str, str | None, str]:
    """hf://org/name[/file][@revision] -> (org/name, the file or None, revision)."""
    parsed = urlparse(uri)
    path = (parsed.netloc + parsed.path).strip("/")
    path, _, revision = path.partition("@")
    parts = path.split("/")
    if len(parts) < 2 or not all(parts) or ".." in parts:
        raise FetchError(f"{uri}: expected hf://org/name[/file][@revision]")
    return "/".join(parts[:2]), "/".join(parts[2:]) or None, revision or "main"


def fetch_hf(uri: str, dest: Path, env: Mapping[str, str], budget: Budget) -> list[Path]:
    """huggingface_hub does the transfer (retries, resumable downloads, the commit a revision
    names); this sizes the files first against --max-bytes and keeps pickled weights out."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    repo, single, revision = parse_hf_uri(uri)
    endpoint = (env.get("HF_ENDPOINT") or DEFAULT_HF_ENDPOINT).rstrip("/")
    token = env.get("HF_TOKEN") or False  # False: never a token from a file on the node
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(
            repo, revision=revision, files_metadata=True)
        sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
        if single is not None:
            if single not in sizes:
                raise FetchError(f"{uri}: the repository has no file {single}")
            wanted = [single]
        else:
            wanted = [f for f in sizes if not any(fnmatch.fnmatch(f, p) for p in HF_SKIP_PATTERNS)]
        if not wanted:
            raise FetchError(f"{uri}: the repository has no files to fetch")
        for name in wanted:
            safe_destination(dest, name)
            budget.take(sizes[name], name)
        commit = info.sha or revision  # every file from the one commit the revision named
        if single is not None:
            fetched = Path(hf_hub_download(repo, single, revision=commit, local_dir=dest,
                                           endpoint=endpoint, token=token))
            # one named file lands at the top (the runtime finds the one .gguf there)
            target = dest / PurePosixPath(single).name
            if fetched != target:
                fetched.replace(target)
            _drop_download_state(dest)
            return [target]
        snapshot_download(repo, revision=commit, local_dir=dest, allow_patterns=wanted,
                          endpoint=endpoint, token=token, max_workers=4)
        _drop_download_state(dest)
    except (EntryNotFoundError, HfHubHTTPError) as exc:
        response = getattr(exc, "response", None)
        status = response.status_code if response is not None else None
        raise FetchError(f"{uri}: hub answered {status or type(exc).__name__} (missing "
                         f"repository or revision, or HF_TOKEN lacks access)") from None
    return [dest / name for name in wanted]


def _drop_download_state(dest: Path) -> None:
    """huggingface_hub keeps resume state in <local_dir>/.cache/huggingface (an interrupted
    fetch, retried in the same pod, picks up there); once complete it is not model data."""
    shutil.rmtree(dest / ".cache" / "huggingface", ignore_errors=True)
    with contextlib.suppress(OSError):
        (dest / ".cache").rmdir()


def fetch(uri: str, dest: Path, env: Mapping[str, str], max_bytes: int | None = None) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    scheme = urlparse(uri).scheme
    budget = Budget(max_bytes)
    if scheme == "s3":
        return fetch_s3(uri, dest, env, budget)
    if scheme == "hf":
        return fetch_hf(uri, dest, env, budget)
    raise FetchError(f"fetch handles s3:// and hf:// URIs, not {uri!r}")


class FetchTimedOut(BaseException):
    """Raised from SIGALRM: a BaseException, so no client library's retry loop (which catch
    Exception) can swallow it."""


def _timed_out(seconds: int):
    def handler(signum, frame):
        raise FetchTimedOut(f"the fetch took longer than --timeout-seconds {seconds}")
    return handler


def fetch_command(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.timeout_seconds:
        signal.signal(signal.SIGALRM, _timed_out(args.timeout_seconds))
        signal.alarm(args.timeout_seconds)
    termination_log = env.get("KUBEMAAS_TERMINATION_LOG", "/dev/termination-log")
    if args.cache:
        return cached_fetch_command(args, env, termination_log)
    try:
        written = fetch(args.uri, Path(args.dest), env, args.max_bytes)
    except (Exception, FetchTimedOut) as exc:  # noqa: BLE001 - any failure: the pod's one-line reason
        write_termination_log(termination_log, f"ModelFetchFailed: {exc}")
        return 1
    for path in written:
        log.info("fetched %s", path)
    print(f"fetched {len(written)} files into {args.dest}")
    return 0


def cached_fetch_command(args: argparse.Namespace, env: Mapping[str, str], termination_log: str) -> int:
    """`fetch --cache`: the node's copy when complete, else fetched once into it."""
    from kubemaas_runtime.fetch_cache import fetch_through_cache

    try:
        entry = fetch_through_cache(args.uri, Path(args.dest),
                                    lambda staging: fetch(args.uri, staging, env, args.max_bytes))
    except (Exception, FetchTimedOut) as exc:  # noqa: BLE001 - any failure: the pod's one-line reason
        write_termination_log(termination_log, f"ModelFetchFailed: {exc}")
        return 1
    if entry.cache == "hit":
        log.info("cache hit: %s is on this node at %s (%d bytes, revision %s); skipping the fetch",
                 args.uri, args.dest, entry.bytes, entry.revision or "-")
    else:
        log.info("cache filled: fetched %s into %s (%d bytes, revision %s)",
                 args.uri, args.dest, entry.bytes, entry.revision or "-")
    write_termination_log(termination_log, entry.report())
    return 0
