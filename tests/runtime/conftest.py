"""Real runtime server processes on 127.0.0.1 for the runtime tier."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def runtime_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEMAAS_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), str(REPO / "runtime"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["HF_HUB_OFFLINE"] = "1"
    env.update(extra)
    return env


class RuntimeServer:
    """One `kubemaas-runtime serve` process; `url` once ready."""

    def __init__(self, args: list[str], workdir: Path, *, env: dict[str, str] | None = None,
                 command: list[str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.termination_log = workdir / "termination-log"
        self.log_path = workdir / f"server-{self.port}.log"
        base = command or [PYTHON, "-m", "kubemaas_runtime", "serve"]
        self.command = [*base, "--host", "127.0.0.1", "--port", str(self.port),
                        "--termination-log", str(self.termination_log), *args]
        self.env = env if env is not None else runtime_env()
        self.process: subprocess.Popen | None = None

    def launch(self) -> RuntimeServer:
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - open while the server runs
        self.process = subprocess.Popen(self.command, env=self.env, cwd=REPO,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        return self

    def start(self, timeout: float = 180.0) -> RuntimeServer:
        if self.process is None:
            self.launch()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"runtime exited with {self.process.returncode}:\n"
                                     f"{self.logs()}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"runtime not ready after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metric(self, name: str, labels: str = "") -> float:
        """Sum of the samples of `name` whose label text contains `labels`."""
        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and (line[len(name)] in " {") and labels in line:
                total += float(line.rsplit(" ", 1)[1])
        return total

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Path:
    return tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])


def start_servers(*servers: RuntimeServer) -> None:
    """Launch all, then wait for each: their slow imports overlap."""
    for server in servers:
        server.launch()
    try:
        for server in servers:
            server.start()
    except BaseException:
        for server in servers:
            server.stop()
        raise
