"""A handle on the cluster the e2e tests run against (hack/cluster or an existing one)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest

REPO = Path(__file__).resolve().parents[2]
HACK_CLUSTER = REPO / "hack" / "cluster"


def unavailable(message: str) -> NoReturn:
    """A tier's prerequisite is missing (a binary not built, a cluster that did not start):
    under CI=true the test fails with `message`; on a developer's machine it is skipped with it,
    so `message` must say what to run to get it."""
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _bin_dir() -> Path:
    out = subprocess.run([str(HACK_CLUSTER), "bin"], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _kubectl_binary() -> str:
    local = _bin_dir() / "kubectl"
    if local.exists():
        return str(local)
    found = shutil.which("kubectl")
    if not found:
        raise FileNotFoundError("kubectl: run `hack/cluster build` or put kubectl on PATH")
    return found


def reachable(kubeconfig: str) -> bool:
    try:
        proc = subprocess.run(
            [_kubectl_binary(), "--kubeconfig", kubeconfig, "get", "--raw", "/readyz"],
            capture_output=True, text=True, timeout=15, check=False,
        )
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@dataclass
class Cluster:
    kubeconfig: str
    started_here: bool = False
    kubectl_path: str = field(default_factory=_kubectl_binary)

    @classmethod
    def existing(cls, kubeconfig: str) -> Cluster:
        return cls(kubeconfig=kubeconfig)

    @property
    def env(self) -> dict[str, str]:
        import os

        env = dict(os.environ)
        env["KUBECONFIG"] = self.kubeconfig
        env["PATH"] = f"{Path(self.kubectl_path).parent}:{env.get('PATH', '')}"
        return env

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 60) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl_path, "--kubeconfig", self.kubeconfig, *args],
            input=input, capture_output=True, text=True, timeout=timeout, check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}")
        return proc

    def get_json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def wait_until(self, predicate, timeout: float = 60, interval: float = 0.5, what: str = "condition"):
        """Poll ``predicate`` until it returns a truthy value; fail with ``what`` after ``timeout``."""
        return wait_for(predicate, timeout, what, interval=interval)

    def log_tail(self, lines: int = 30) -> str:
        if not self.started_here:
            return "(cluster not started by this test session: no component logs)"
        proc = subprocess.run([str(HACK_CLUSTER), "logs"], capture_output=True, text=True, check=False)
        return proc.stdout[-lines * 400:]

    def stop(self) -> None:
        if self.started_here:
            subprocess.run([str(HACK_CLUSTER), "down"], check=False)


def start_local_cluster(repo: Path) -> Cluster:
    """`hack/cluster up`; if it was already up (a developer's cluster), leave it running."""
    status = subprocess.run([str(HACK_CLUSTER), "status"], capture_output=True, text=True, check=False)
    already_up = status.returncode == 0
    try:
        out = subprocess.run([str(HACK_CLUSTER), "up"], check=True, stdout=subprocess.PIPE, text=True)
    except subprocess.CalledProcessError:
        if not already_up:  # e.g. the real node could not start: stop what did start
            subprocess.run([str(HACK_CLUSTER), "down"], check=False)
        raise
    kubeconfig = out.stdout.strip().splitlines()[-1]
    return Cluster(kubeconfig=kubeconfig, started_here=not already_up)


def wait_for(predicate, timeout: float, what: str, report=lambda: "", interval: float = 1.0):
    """Poll until ``predicate()`` is truthy; on timeout fail naming ``what``, with ``report()``'s
    diagnostics."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}\n{report()}")
