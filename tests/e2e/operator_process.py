"""The operator as a real process, started the way a user or a Deployment starts it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.ports import free_ports

REPO = Path(__file__).resolve().parents[2]


class OperatorProcess:
    """`python -m kubemaas_operator run` with its own ports and a log file."""

    def __init__(self, kubeconfig: str, extra_env: dict[str, str] | None = None,
                 python_args: list[str] | None = None) -> None:
        self.kubeconfig = kubeconfig
        self.extra_env = extra_env or {}
        # what runs the module instead of plain `python` (the benchmark's memory profiler)
        self.python_args = python_args or []
        self.health_port, self.metrics_port = free_ports(2)
        self.log_path = Path(tempfile.mkstemp(prefix="kubemaas-operator-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> OperatorProcess:
        env = dict(os.environ)
        env.update({
            "KUBECONFIG": self.kubeconfig,
            "KUBEMAAS_OPERATOR_HEALTH_PORT": str(self.health_port),
            "KUBEMAAS_OPERATOR_METRICS_PORT": str(self.metrics_port),
            "PYTHONUNBUFFERED": "1",
        })
        # The e2e tier runs placeholder images from many registries; tests of the allowlist
        # itself pass their own KUBEMAAS_OPERATOR_ALLOWED_RUNTIME_IMAGES.
        env.setdefault("KUBEMAAS_OPERATOR_ALLOWED_RUNTIME_IMAGES", "*")
        env.update(self.extra_env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, *self.python_args, "-m", "kubemaas_operator", "run"],
                                     cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"operator exited with {self.proc.returncode}:\n{self.log_tail()}")
            if self.healthy():
                return self
            time.sleep(0.3)
        raise RuntimeError(f"operator not healthy after {timeout}s:\n{self.log_tail()}")

    def healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> str:
        return httpx.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, as when a node dies."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def cpu_seconds(self) -> float:
        """User + system CPU the process has used, from /proc."""
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"
