"""The runtime under hostile input, against a real server process serving the real MiniLM:
each attack gets its 4xx, liveness keeps answering, good requests are unaffected, and the
server's memory stays bounded (VmRSS / VmHWM of the process, from /proc)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time

import httpx
import numpy as np
import orjson
import pytest

from tests.runtime.conftest import RuntimeServer, start_servers
from tests.runtime.test_transformers import minilm_dir

MIB = 1 << 20
BODY_TIMEOUT_S = 3
TOKEN = "s3cret-token-for-tests"


def minilm_args(*extra: str) -> list[str]:
    return ["--model-uri", "hf://sentence-transformers/all-MiniLM-L6-v2",
            "--model-dir", str(minilm_dir()), "--format", "transformers",
            "--task", "feature-extraction", "--name", "minilm", "--max-batch-size", "8",
            "--max-queue", "32", *extra]


@pytest.fixture(scope="module")
def servers(module_tmp):
    token_file = module_tmp / "token"
    token_file.write_text(TOKEN + "\n")
    running = {
        "open": RuntimeServer(minilm_args("--body-timeout-seconds", str(BODY_TIMEOUT_S)),
                              module_tmp),
        "locked": RuntimeServer(minilm_args("--auth-token-file", str(token_file)), module_tmp),
    }
    start_servers(*running.values())
    yield running
    for server in running.values():
        assert server.stop() == 0, server.logs()


@pytest.fixture(scope="module")
def server(servers) -> RuntimeServer:
    return servers["open"]


def memory_kib(server: RuntimeServer) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of the server process, in KiB."""
    values = {}
    with open(f"/proc/{server.process.pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def infer_url(server: RuntimeServer) -> str:
    return f"{server.url}/v2/models/minilm/infer"


def text_request(*texts: str) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)],
                        "data": list(texts)}]}


def binary_request(header: dict, data: bytes = b"") -> tuple[bytes, dict[str, str]]:
    raw = orjson.dumps(header)
    return raw + data, {"Inference-Header-Content-Length": str(len(raw)),
                        "Content-Type": "application/octet-stream"}


def bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def embedding(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    return np.array(response.json()["outputs"][0]["data"], dtype=np.float32)


def nested(depth: int, leaf: bytes) -> bytes:
    """JSON text of `leaf` inside `depth` lists (deeper than orjson.dumps would write)."""
    return b"[" * depth + leaf + b"]" * depth


def text_input(**fields) -> dict:
    return {"inputs": [{"name": "text", "datatype": "BYTES", **fields}]}


# Each attack as (id, body, headers, status, words the error must contain).
HUGE = 2 ** 62
ATTACKS = [
    ("huge-declared-bytes-shape", *binary_request(text_input(
        shape=[2_000_000_000], parameters={"binary_data_size": 0})), 400, "--max-tensor-elements"),
    ("declared-bytes-count-beyond-data", *binary_request(text_input(
        shape=[1_000_000], parameters={"binary_data_size": 8}), bytes_elements(b"ab", b"")),
     400, "cannot hold 1000000"),
    ("overflowing-dimensions", orjson.dumps(text_input(shape=[HUGE, HUGE, HUGE], data=["a"])),
     {}, 400, "--max-tensor-elements"),
    ("beyond-int64-dimension", (b'{"inputs":[{"name":"text","datatype":"BYTES",'
     b'"shape":[99999999999999999999999],"data":["a"]}]}'), {}, 400, "input 'text'"),
    ("many-dimensions", orjson.dumps(text_input(shape=[1] * 10_000, data=["a"])), {}, 400,
     "--max-tensor-rank"),
    ("deeply-nested-data", b'{"inputs":[{"name":"text","datatype":"BYTES","shape":[1],"data":'
     + nested(800, b'"a"') + b"}]}", {}, 400, "nested deeper"),
    ("nesting-past-the-json-parser", b'{"inputs":' + b"[" * 5000 + b"]" * 5000 + b"}", {}, 400,
     "malformed JSON"),
    ("deeply-nested-id", orjson.dumps(text_request("a"))[:-1] + b',"id":' + nested(800, b"1")
     + b"}", {}, 400, "'id' must be a string"),
    ("same-output-many-times", orjson.dumps({**text_request("a"),
                                             "outputs": [{"name": "embedding"}] * 30_000}),
     {}, 400, "'outputs' lists 30000 entries"),
    ("duplicate-output", orjson.dumps({**text_request("a"),
                                       "outputs": [{"name": "embedding"}] * 2}),
     {}, 400, "requested more than once"),
    ("unknown-output", orjson.dumps({**text_request("a"), "outputs": [{"name": "logits"}]}),
     {}, 400, "unknown output 'logits'"),
    ("numbers-to-a-bytes-input", orjson.dumps(text_input(shape=[3], data=[1, 2, 3])), {}, 400,
     "BYTES data must be strings"),
    ("floats-to-a-text-input", orjson.dumps({"inputs": [
        {"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}), {}, 400,
     "expected datatype BYTES, got FP32"),
    ("one-long-json-string", orjson.dumps(text_request("x" * 40_000_000)), {}, 413,
     "--max-json-bytes"),
    ("one-long-binary-string", *binary_request(
        text_input(shape=[1], parameters={"binary_data_size": 40_000_004}),
        bytes_elements(b"x" * 40_000_000)), 400, "--max-string-bytes"),
    ("a-string-over-the-limit", orjson.dumps(text_request("word " * 20_000)), {}, 400,
     "--max-string-bytes"),
    ("declared-size-beyond-the-body", *binary_request(
        text_input(shape=[1], parameters={"binary_data_size": 1 << 40}), b"\0" * 8), 400,
     "outside the request body"),
    ("body-over-the-limit", b"{" + b" " * (65 * MIB), {}, 413, "--max-request-bytes"),
    ("rows-beyond-the-batch-size", orjson.dumps(text_request(*["a"] * 9)), {}, 400,
     "max batch size is 8"),
]


@pytest.mark.parametrize("name, body, headers, status, words", ATTACKS,
                         ids=[a[0] for a in ATTACKS])
def test_each_attack_gets_its_status_and_the_server_serves_on(server, name, body, headers,
                                                              status, words):
    response = httpx.post(infer_url(server), content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text[:500]
    assert words in response.json()["error"]
    assert embedding(httpx.post(infer_url(server), json=text_request("still serving"))).size


def test_memory_stays_bounded_and_liveness_answers_during_the_attacks(server):
    httpx.post(infer_url(server), json=text_request("warm"), timeout=30)
    before = memory_kib(server)
    stop = threading.Event()
    live_codes: list[int] = []

    def poll_liveness():
        with httpx.Client(timeout=10) as client:
            while not stop.is_set():
                live_codes.append(client.get(f"{server.url}/v2/health/live").status_code)
                time.sleep(0.02)

    poller = threading.Thread(target=poll_liveness)
    poller.start()
    try:
        with httpx.Client(timeout=60) as client:
            for _ in range(3):
                for _, body, headers, status, _ in ATTACKS:
                    assert client.post(infer_url(server), content=body,
                                       headers=headers).status_code == status
    finally:
        stop.set()
        poller.join()
    after = memory_kib(server)
    assert live_codes and set(live_codes) == {200}
    # Bodies of up to 64 MiB arrive and are refused; nothing is decoded past its limits.
    assert after["VmHWM"] - before["VmHWM"] < 400 * 1024, (before, after)
    assert after["VmRSS"] - before["VmRSS"] < 300 * 1024, (before, after)


def test_invalid_utf8_mixed_into_concurrent_good_traffic_fails_only_itself(server):
    good_texts = [f"sentence number {i} about serving models" for i in range(24)]
    reference = {t: embedding(httpx.post(infer_url(server), json=text_request(t), timeout=30))
                 for t in good_texts[:3]}
    bad_body, bad_headers = binary_request(
        text_input(shape=[1], parameters={"binary_data_size": 6}), bytes_elements(b"\xff\xfe"))

    async def scenario():
        async with httpx.AsyncClient(timeout=60) as client:
            calls = []
            for i, text in enumerate(good_texts):
                calls.append(("good", client.post(infer_url(server), json=text_request(text))))
                if i % 2 == 0:
                    calls.append(("bad", client.post(infer_url(server), content=bad_body,
                                                     headers=bad_headers)))
            responses = await asyncio.gather(*(call for _, call in calls))
            return [(kind, r) for (kind, _), r in zip(calls, responses)]

    before_batches = server.metric("kubemaas_batch_size_count")
    answered = asyncio.run(scenario())
    good = [r for kind, r in answered if kind == "good"]
    bad = [r for kind, r in answered if kind == "bad"]
    assert len(good) == 24 and len(bad) == 12
    assert [r.status_code for r in bad] == [400] * 12
    assert all("not UTF-8" in r.json()["error"] for r in bad)
    assert [r.status_code for r in good] == [200] * 24
    for response, text in zip(good, good_texts):
        if text in reference:
            vector = embedding(response)
            assert float(vector @ reference[text]) > 0.999
    assert server.metric("kubemaas_batch_size_count") > before_batches


def slow_client(port: int, declared: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\n"
                 b"Content-Type: application/json\r\n"
                 b"Content-Length: " + str(declared).encode() + b"\r\n\r\n{\"inp")
    return sock


def read_status(sock: socket.socket) -> int | None:
    sock.settimeout(BODY_TIMEOUT_S * 4)
    try:
        head = sock.recv(4096)
    except OSError:
        return None
    return int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/1.1 ") else None


def test_slow_bodies_hold_no_slots_and_are_dropped_with_408(server):
    # more slow clients than there are in-flight slots (max-queue 32 + max-batch-size 8)
    slow = [slow_client(server.port, 1000) for _ in range(60)]
    try:
        time.sleep(0.5)
        assert server.metric("kubemaas_inflight_requests") == 0
        assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
        for text in ("the server", "still answers", "good requests"):
            assert embedding(httpx.post(infer_url(server), json=text_request(text),
                                        timeout=30)).size
        statuses = [read_status(sock) for sock in slow]
    finally:
        for sock in slow:
            sock.close()
    assert statuses == [408] * 60


def test_headers_that_never_finish_are_closed_at_the_deadline(server):
    sock = socket.create_connection(("127.0.0.1", server.port))
    try:
        sock.sendall(b"POST /v2/models/minilm/infer HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        sock.settimeout(BODY_TIMEOUT_S * 4)
        assert sock.recv(4096) == b""  # closed by the server, not left open
    finally:
        sock.close()
    assert embedding(httpx.post(infer_url(server), json=text_request("fine"))).size


def test_headers_too_large_are_refused_before_the_app(server):
    response = httpx.post(infer_url(server), json=text_request("a"),
                          headers={"X-Padding": "p" * 100_000})
    assert response.status_code == 400
    assert embedding(httpx.post(infer_url(server), json=text_request("fine"))).size


def test_auth_refuses_a_missing_or_wrong_token(servers):
    locked = servers["locked"]
    url = infer_url(locked)
    missing = httpx.post(url, json=text_request("a"))
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = httpx.post(url, json=text_request("a"), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "wrong bearer token" in wrong.json()["error"]
    near = httpx.post(url, json=text_request("a"),
                      headers={"Authorization": f"Bearer {TOKEN}x"})
    assert near.status_code == 401
    metadata = httpx.get(f"{locked.url}/v2/models/minilm")
    assert metadata.status_code == 401
    assert httpx.get(f"{locked.url}/v1/models").status_code == 401


def test_auth_admits_the_right_token_and_leaves_health_and_metrics_open(servers):
    locked = servers["locked"]
    headers = {"Authorization": f"Bearer {TOKEN}"}
    assert embedding(httpx.post(infer_url(locked), json=text_request("a"),
                                headers=headers)).size == 384
    assert httpx.get(f"{locked.url}/v2/models/minilm", headers=headers).status_code == 200
    assert httpx.get(f"{locked.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{locked.url}/v2/health/ready").status_code == 200
    assert "kubemaas_requests_total" in httpx.get(f"{locked.url}/metrics").text


@pytest.fixture(scope="module")
def locked_generator(module_tmp):
    from tests.runtime.tiny_llm import build_tiny_llm

    model_dir = build_tiny_llm(module_tmp / "tiny-llm")
    token_file = module_tmp / "llm-token"
    token_file.write_text(TOKEN)
    server = RuntimeServer(["--model-uri", f"file://{model_dir}", "--format", "transformers",
                            "--task", "text-generation", "--name", "tiny", "--max-num-seqs", "4",
                            "--max-model-len", "128", "--auth-token-file", str(token_file)],
                           module_tmp).start()
    yield server
    assert server.stop() == 0, server.logs()


def test_the_openai_routes_share_the_token_and_the_limits(locked_generator):
    import openai

    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{locked_generator.url}/v1", api_key=key, max_retries=0,
                             timeout=60)

    with pytest.raises(openai.AuthenticationError):
        client("wrong").completions.create(model="tiny", prompt="hello", max_tokens=2)
    answer = client(TOKEN).completions.create(model="tiny", prompt="hello", max_tokens=2)
    assert answer.usage.completion_tokens >= 1
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    url = f"{locked_generator.url}/v1/completions"
    too_big = httpx.post(url, content=b"{" + b" " * (65 * MIB), headers=headers, timeout=60)
    assert too_big.status_code == 413
    deep = httpx.post(url, content=b'{"model":"tiny","prompt":' + nested(5000, b'"x"') + b"}",
                      headers=headers, timeout=60)
    assert 400 <= deep.status_code < 500
    assert httpx.get(f"{locked_generator.url}/v2/health/live").status_code == 200
