"""`kubemaas-runtime fetch` against a local S3 (moto's server) and a local stand-in for the
Hugging Face hub's HTTP endpoint, both on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

import pytest

from tests.runtime.conftest import PYTHON, free_port, runtime_env

HUB_TOKEN = "hf_test_token"
HUB_REPO = "acme/tiny"
HUB_FILES = {
    "config.json": b'{"hidden": 8}',
    "model.safetensors": b"\x00weights\x01" * 100,
    "nested/tokenizer.json": b"{}",
    "pytorch_model.bin": b"pickled, never fetched",
    "onnx/model.onnx": b"other framework, never fetched",
    "gguf/tiny-Q8_0.gguf": b"GGUF" + b"\x08" * 64,
    "gguf/tiny-Q4_K_M.gguf": b"GGUF" + b"\x04" * 32,
}
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run_fetch(uri: str, dest: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    tlog = env.pop("KUBEMAAS_TERMINATION_LOG", str(dest.parent / "tlog"))
    return subprocess.run([PYTHON, "-m", "kubemaas_runtime", "fetch", "--uri", uri,
                           "--dest", str(dest), *extra],
                          env=runtime_env(KUBEMAAS_TERMINATION_LOG=tlog,
                                          HF_HUB_OFFLINE="0",  # fetch is what goes online
                                          **env),
                          capture_output=True, text=True, check=False, timeout=120)


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{port}", "AWS_REGION": "us-east-1"}
    import boto3

    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")
    client.create_bucket(Bucket="models")
    client.put_object(Bucket="models", Key="minilm/config.json", Body=b'{"a": 1}')
    client.put_object(Bucket="models", Key="minilm/1_Pooling/config.json", Body=b"{}")
    client.put_object(Bucket="models", Key="minilm-other/x.json", Body=b"not under the prefix")
    client.put_object(Bucket="models", Key="single/model.pt2", Body=b"archive")
    yield env
    server.stop()


def test_s3_prefix_copies_every_object_below_it(s3, tmp_path):
    dest = tmp_path / "models"
    result = run_fetch("s3://models/minilm", dest, **s3)
    assert result.returncode == 0, result.stderr
    assert (dest / "config.json").read_bytes() == b'{"a": 1}'
    assert (dest / "1_Pooling" / "config.json").read_bytes() == b"{}"
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["config.json",
                                                                      "config.json"]


def test_s3_single_object(s3, tmp_path):
    dest = tmp_path / "models"
    result = run_fetch("s3://models/single/model.pt2", dest, **s3)
    assert result.returncode == 0, result.stderr
    assert (dest / "model.pt2").read_bytes() == b"archive"


def test_s3_missing_key_fails_with_reason(s3, tmp_path):
    result = run_fetch("s3://models/absent", tmp_path / "models", **s3)
    assert result.returncode == 1
    assert "ModelFetchFailed: s3://models/absent: no objects found" in result.stderr
    assert (tmp_path / "tlog").read_text().startswith("ModelFetchFailed:")


def test_s3_unreachable_endpoint_fails(s3, tmp_path):
    result = run_fetch("s3://models/minilm", tmp_path / "models",
                       **{**s3, "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"})
    assert result.returncode == 1 and "ModelFetchFailed" in result.stderr


class HubHandler(BaseHTTPRequestHandler):
    """The hub routes huggingface_hub uses to fetch: model info (with file sizes) and file
    resolve (HEAD for the commit, ETag and size; GET for the bytes)."""

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._answer(with_body=False)

    def do_GET(self):
        self._answer(with_body=True)

    def _answer(self, with_body: bool):
        if self.headers.get("Authorization") != f"Bearer {HUB_TOKEN}":
            return self._send(401, b'{"error": "unauthorized"}', with_body)
        path = unquote(self.path).split("?", 1)[0]
        info_prefix = f"/api/models/{HUB_REPO}/revision/"
        resolve_prefixes = [f"/{HUB_REPO}/resolve/{rev}/" for rev in (HUB_COMMIT, "main")]
        if path.startswith(info_prefix) and path[len(info_prefix):] in ("main", HUB_COMMIT):
            doc = {"id": HUB_REPO, "sha": HUB_COMMIT,
                   "siblings": [{"rfilename": name, "size": len(data)}
                                for name, data in HUB_FILES.items()]}
            return self._send(200, json.dumps(doc).encode(), with_body)
        tree_prefix = f"/api/models/{HUB_REPO}/tree/"
        if path.startswith(tree_prefix) and path[len(tree_prefix):] in ("main", HUB_COMMIT):
            entries = [{"type": "file", "path": name, "size": len(data),
                        "oid": hashlib.sha1(data).hexdigest()} for name, data in HUB_FILES.items()]
            return self._send(200, json.dumps(entries).encode(), with_body)
        for prefix in resolve_prefixes:
            if path.startswith(prefix) and path[len(prefix):] in HUB_FILES:
                data = HUB_FILES[path[len(prefix):]]
                etag = hashlib.sha1(data).hexdigest()
                return self._send(200, data, with_body,
                                  {"X-Repo-Commit": HUB_COMMIT, "ETag": f'"{etag}"'})
        return self._send(404, b'{"error": "not found"}', with_body)

    def _send(self, status: int, body: bytes, with_body: bool = True,
              headers: dict[str, str] | None = None):
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if with_body:
            self.wfile.write(body)


@pytest.fixture(scope="module")
def hub():
    server = ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_hf_repository_files(hub, tmp_path):
    dest = tmp_path / "models"
    result = run_fetch(f"hf://{HUB_REPO}", dest, HF_ENDPOINT=hub, HF_TOKEN=HUB_TOKEN)
    assert result.returncode == 0, result.stderr
    fetched = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert fetched == {name: HUB_FILES[name] for name in
                       ("config.json", "model.safetensors", "nested/tokenizer.json",
                        "gguf/tiny-Q8_0.gguf", "gguf/tiny-Q4_K_M.gguf")}


def test_hf_one_named_gguf_file(hub, tmp_path):
    dest = tmp_path / "models"
    result = run_fetch(f"hf://{HUB_REPO}/gguf/tiny-Q8_0.gguf", dest, HF_ENDPOINT=hub, HF_TOKEN=HUB_TOKEN)
    assert result.returncode == 0, result.stderr
    fetched = {str(p.relative_to(dest)): p.read_bytes() for p in dest.rglob("*") if p.is_file()}
    assert fetched == {"tiny-Q8_0.gguf": HUB_FILES["gguf/tiny-Q8_0.gguf"]}  # only it, at the top


@pytest.mark.parametrize("path", ["gguf/absent.gguf", "gguf/../config.json"])
def test_hf_named_file_must_be_in_the_repository(hub, tmp_path, path):
    result = run_fetch(f"hf://{HUB_REPO}/{path}", tmp_path / "models", HF_ENDPOINT=hub, HF_TOKEN=HUB_TOKEN)
    assert result.returncode == 1 and "ModelFetchFailed" in result.stderr
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").rglob("*.*"))


def test_hf_without_token_is_refused(hub, tmp_path):
    result = run_fetch(f"hf://{HUB_REPO}", tmp_path / "models", HF_ENDPOINT=hub)
    assert result.returncode == 1
    assert "hub answered 401" in result.stderr


def test_hf_unknown_revision(hub, tmp_path):
    result = run_fetch(f"hf://{HUB_REPO}@v9", tmp_path / "models", HF_ENDPOINT=hub,
                       HF_TOKEN=HUB_TOKEN)
    assert result.returncode == 1 and "hub answered 404" in result.stderr


def test_s3_past_max_bytes_fails_before_downloading(s3, tmp_path):
    dest = tmp_path / "models"
    result = run_fetch("s3://models/minilm", dest, "--max-bytes", "5", **s3)
    assert result.returncode == 1
    assert "past --max-bytes 5" in result.stderr
    assert not any(p.is_file() for p in dest.rglob("*"))


def test_hf_past_max_bytes_stops_the_download(hub, tmp_path):
    result = run_fetch(f"hf://{HUB_REPO}", tmp_path / "models", "--max-bytes", "100",
                       HF_ENDPOINT=hub, HF_TOKEN=HUB_TOKEN)
    assert result.returncode == 1 and "past --max-bytes 100" in result.stderr
    assert (tmp_path / "tlog").read_text().startswith("ModelFetchFailed:")


def test_a_fetch_that_stalls_stops_at_its_timeout(s3, tmp_path):
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = run_fetch("s3://models/minilm", tmp_path / "models", "--timeout-seconds", "2",
                           **{**s3, "AWS_ENDPOINT_URL_S3": endpoint})
    assert result.returncode == 1
    assert "longer than --timeout-seconds 2" in result.stderr


# The node-local cache (`fetch --cache`): the first fetch fills the entry, the next skips.

def cache_report(tlog: Path) -> dict:
    line = tlog.read_text().strip()
    assert line.startswith("KubemaasCache: "), line
    return json.loads(line.removeprefix("KubemaasCache: "))


def test_cache_first_fetch_fills_the_entry_and_the_second_skips(s3, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    entry = root / "minilm-0123abcd"
    first = run_fetch("s3://models/minilm", entry, "--cache", KUBEMAAS_TERMINATION_LOG=str(tmp_path / "tlog"), **s3)
    assert first.returncode == 0, first.stderr
    filled = cache_report(tmp_path / "tlog")
    assert filled["cache"] == "filled" and filled["uri"] == "s3://models/minilm"
    assert filled["bytes"] == len(b'{"a": 1}') + len(b"{}")
    assert (entry / "config.json").read_bytes() == b'{"a": 1}'
    assert not [p for p in root.iterdir() if p.name.startswith(".partial-")]
    # the object changes in the bucket: a cache hit never downloads, so the copy stays
    import boto3
    boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                 aws_access_key_id="test", aws_secret_access_key="test").put_object(
        Bucket="models", Key="minilm/config.json", Body=b'{"a": 2}')
    marker = entry / ".kubemaas-cache.json"
    os.utime(marker, (1_000_000, 1_000_000))  # long ago: the hit marks the entry used now
    try:
        second = run_fetch("s3://models/minilm", entry, "--cache", KUBEMAAS_TERMINATION_LOG=str(tmp_path / "tlog"), **s3)
        assert second.returncode == 0, second.stderr
        assert marker.stat().st_mtime > 1_000_000  # cache-evict --used-before reads it
        assert "cache hit" in second.stderr and "skipping the fetch" in second.stderr
        hit = cache_report(tmp_path / "tlog")
        assert hit == {**filled, "cache": "hit"}
        assert (entry / "config.json").read_bytes() == b'{"a": 1}'
    finally:
        boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL_S3"], region_name="us-east-1",
                     aws_access_key_id="test", aws_secret_access_key="test").put_object(
            Bucket="models", Key="minilm/config.json", Body=b'{"a": 1}')


def test_cache_an_incomplete_entry_is_fetched_again(s3, tmp_path):
    root = tmp_path / "cache"
    entry = root / "minilm-0123abcd"
    entry.mkdir(parents=True)
    (entry / "leftover.part").write_bytes(b"half")  # no marker: an interrupted fill
    result = run_fetch("s3://models/minilm", entry, "--cache", KUBEMAAS_TERMINATION_LOG=str(tmp_path / "tlog"), **s3)
    assert result.returncode == 0, result.stderr
    assert cache_report(tmp_path / "tlog")["cache"] == "filled"
    assert not (entry / "leftover.part").exists()


def test_cache_entry_of_another_uri_is_not_a_hit(s3, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    entry = root / "shared-key"
    assert run_fetch("s3://models/single/model.pt2", entry, "--cache", KUBEMAAS_TERMINATION_LOG=str(tmp_path / "tlog"), **s3).returncode == 0
    result = run_fetch("s3://models/minilm", entry, "--cache", KUBEMAAS_TERMINATION_LOG=str(tmp_path / "tlog"), **s3)
    assert result.returncode == 0, result.stderr
    assert cache_report(tmp_path / "tlog")["cache"] == "filled"
    assert (entry / "config.json").exists() and not (entry / "model.pt2").exists()


def test_cache_failed_fill_leaves_no_entry(s3, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    entry = root / "missing"
    result = run_fetch("s3://models/no-such-key", entry, "--cache", KUBEMAAS_TERMINATION_LOG=str(tmp_path / "tlog"), **s3)
    assert result.returncode == 1
    assert (tmp_path / "tlog").read_text().startswith("ModelFetchFailed:")
    assert not entry.exists()
    assert [p.name for p in root.iterdir()] == [".lock-missing"]


def test_cache_without_the_node_cache_mounted_fails(s3, tmp_path):
    result = run_fetch("s3://models/minilm", tmp_path / "absent" / "entry", "--cache", KUBEMAAS_TERMINATION_LOG=str(tmp_path / "tlog"), **s3)
    assert result.returncode == 1
    assert "node cache" in (tmp_path / "tlog").read_text()


def test_cache_two_fills_at_once_download_once(hub, tmp_path):
    root = tmp_path / "cache"
    root.mkdir()
    entry = root / "tiny"
    uri = f"hf://{HUB_REPO}@{HUB_COMMIT}"
    procs = [subprocess.Popen([PYTHON, "-m", "kubemaas_runtime", "fetch", "--uri", uri, "--dest", str(entry),
                               "--cache"],
                              env=runtime_env(KUBEMAAS_TERMINATION_LOG=str(tmp_path / f"tlog{i}"),
                                              HF_HUB_OFFLINE="0", HF_ENDPOINT=hub,
                                              HF_TOKEN=HUB_TOKEN),
                              stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    for proc in procs:
        proc.communicate(timeout=120)
        assert proc.returncode == 0
    reports = sorted(cache_report(tmp_path / f"tlog{i}")["cache"] for i in range(2))
    assert reports == ["filled", "hit"]
    assert cache_report(tmp_path / "tlog0")["revision"] == HUB_COMMIT
    assert (entry / "model.safetensors").read_bytes() == HUB_FILES["model.safetensors"]


def test_cache_an_evicted_entry_is_fetched_again_and_its_neighbour_stays_a_hit(s3, tmp_path):
    """fetch --cache fills two entries; cache-evict removes one; the next fetch of it fills
    again, the other is still a hit."""
    root = tmp_path / "cache"
    root.mkdir()
    tlog = str(tmp_path / "tlog")
    for key, uri in (("minilm-0123abcd", "s3://models/minilm"), ("single-4567ef01", "s3://models/single/model.pt2")):
        assert run_fetch(uri, root / key, "--cache", KUBEMAAS_TERMINATION_LOG=tlog, **s3).returncode == 0
    evict = subprocess.run([PYTHON, "-m", "kubemaas_runtime", "cache-evict", "--root", str(root),
                            "--key", "minilm-0123abcd"], env=runtime_env(KUBEMAAS_TERMINATION_LOG=tlog),
                           capture_output=True, text=True, check=False, timeout=60)
    assert evict.returncode == 0, evict.stderr
    assert not (root / "minilm-0123abcd").exists() and (root / "single-4567ef01" / "model.pt2").exists()
    assert run_fetch("s3://models/single/model.pt2", root / "single-4567ef01", "--cache",
                     KUBEMAAS_TERMINATION_LOG=tlog, **s3).returncode == 0
    assert cache_report(tmp_path / "tlog")["cache"] == "hit"
    assert run_fetch("s3://models/minilm", root / "minilm-0123abcd", "--cache",
                     KUBEMAAS_TERMINATION_LOG=tlog, **s3).returncode == 0
    assert cache_report(tmp_path / "tlog")["cache"] == "filled"
