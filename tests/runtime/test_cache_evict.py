"""`kubemaas-runtime cache-evict`: removes exactly one entry of the node cache, never a path outside it."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.runtime.conftest import PYTHON, runtime_env

KEY = "tiny-0123456789ab"


def run_evict(root: Path, key: str, tlog: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "kubemaas_runtime", "cache-evict", "--root", str(root), f"--key={key}"],
                          env=runtime_env(KUBEMAAS_TERMINATION_LOG=str(tlog)),
                          capture_output=True, text=True, check=False, timeout=60)


def entry(root: Path, key: str, size: int = 10) -> Path:
    folder = root / key
    (folder / "nested").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * size)
    (folder / "nested" / "config.json").write_bytes(b"{}")
    (folder / ".kubemaas-cache.json").write_text(json.dumps({"key": key}))
    return folder


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    """A node cache with the entry, its neighbours (a longer key with the same start, another
    entry, their staging folders and locks) and a file beside the root that must survive."""
    root = tmp_path / "cache"
    root.mkdir()
    entry(root, KEY, size=100)
    entry(root, KEY + "-2")
    entry(root, "other-fedcba987654")
    (root / f".partial-{KEY}-4242").mkdir()
    (root / f".partial-{KEY}-4242" / "half.bin").write_bytes(b"x")
    (root / f".partial-{KEY}-2-77").mkdir()
    (root / f".lock-{KEY}").touch()
    (root / ".lock-other-fedcba987654").touch()
    (tmp_path / "outside.txt").write_text("not the cache")
    return root


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_removes_exactly_that_entry_and_its_staging_folders(cache: Path, tmp_path: Path) -> None:
    before = tree(cache)
    result = run_evict(cache, KEY, tmp_path / "tlog")
    assert result.returncode == 0, result.stderr
    removed = before - tree(cache)
    assert removed == {KEY, f"{KEY}/model.safetensors", f"{KEY}/nested", f"{KEY}/nested/config.json",
                       f"{KEY}/.kubemaas-cache.json", f".partial-{KEY}-4242", f".partial-{KEY}-4242/half.bin"}
    assert tree(cache) <= before  # nothing made but what was there
    assert (cache / f".lock-{KEY}").exists()  # a waiting fill holds it open
    assert (tmp_path / "outside.txt").read_text() == "not the cache"
    line = (tmp_path / "tlog").read_text().strip()
    assert json.loads(line.removeprefix("KubemaasCacheEvicted: ")) == {"key": KEY, "removed": True, "bytes": 102}


def test_an_absent_entry_is_not_an_error(cache: Path, tmp_path: Path) -> None:
    before = tree(cache)
    result = run_evict(cache, "absent-000000000000", tmp_path / "tlog")
    assert result.returncode == 0, result.stderr
    assert tree(cache) - before == {".lock-absent-000000000000"} and before <= tree(cache)
    assert '"removed": false' in (tmp_path / "tlog").read_text()


@pytest.mark.parametrize("key", ["..", "../cache", f"../cache/{KEY}", "/etc", f"{KEY}/nested", ".lock-x",
                                 f".partial-{KEY}-4242", "", "UPPER", "a" * 64, "-lead", "trail-", "*"])
def test_a_key_that_is_not_a_dns_label_is_refused_and_nothing_is_touched(cache: Path, tmp_path: Path,
                                                                         key: str) -> None:
    before = tree(cache)
    outside = tree(tmp_path)
    result = run_evict(cache, key, tmp_path / "tlog")
    assert result.returncode == 1
    assert (tmp_path / "tlog").read_text().startswith("CacheEvictFailed: refusing the key")
    assert tree(cache) == before and tree(tmp_path) - {"tlog"} == outside


def test_a_symlinked_entry_is_left_and_its_target_kept(cache: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.mkdir()
    (target / "precious").write_text("keep")
    (cache / "link-000000000000").symlink_to(target)
    result = run_evict(cache, "link-000000000000", tmp_path / "tlog")
    assert result.returncode == 1 and "not a cache entry" in (tmp_path / "tlog").read_text()
    assert (target / "precious").read_text() == "keep" and (cache / "link-000000000000").is_symlink()


def test_without_the_cache_mounted_it_fails(tmp_path: Path) -> None:
    result = run_evict(tmp_path / "absent", KEY, tmp_path / "tlog")
    assert result.returncode == 1 and "not mounted" in (tmp_path / "tlog").read_text()


def test_it_waits_for_a_fill_that_holds_the_entry_lock(cache: Path, tmp_path: Path) -> None:
    """A fill on the node holds .lock-<key> (fetch_cache.entry_lock): eviction waits for it."""
    with open(cache / f".lock-{KEY}", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        process = subprocess.Popen([PYTHON, "-m", "kubemaas_runtime", "cache-evict", "--root", str(cache),
                                    "--key", KEY], env=runtime_env(KUBEMAAS_TERMINATION_LOG=str(tmp_path / "tlog")),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        time.sleep(2)
        assert process.poll() is None and (cache / KEY).is_dir()  # still waiting, nothing removed
        fcntl.flock(handle, fcntl.LOCK_UN)
    assert process.wait(timeout=60) == 0
    assert not (cache / KEY).exists()


def test_an_entry_used_after_the_decision_is_kept(cache: Path, tmp_path: Path) -> None:
    """--used-before: a pod that hit or filled the entry since (its marker's time) keeps it."""
    marker = cache / KEY / ".kubemaas-cache.json"
    decided = time.time()
    os.utime(marker, (decided + 5, decided + 5))  # a hit after the decision
    kept = subprocess.run([PYTHON, "-m", "kubemaas_runtime", "cache-evict", "--root", str(cache), "--key", KEY,
                           "--used-before", str(decided)], env=runtime_env(KUBEMAAS_TERMINATION_LOG=str(tmp_path / "t")),
                          capture_output=True, text=True, check=False, timeout=60)
    assert kept.returncode == 0 and (cache / KEY).is_dir() and '"removed": false' in (tmp_path / "t").read_text()
    os.utime(marker, (decided - 60, decided - 60))  # last used before it
    removed = subprocess.run([PYTHON, "-m", "kubemaas_runtime", "cache-evict", "--root", str(cache), "--key", KEY,
                              "--used-before", str(decided)], env=runtime_env(KUBEMAAS_TERMINATION_LOG=str(tmp_path / "t")),
                             capture_output=True, text=True, check=False, timeout=60)
    assert removed.returncode == 0 and not (cache / KEY).exists()
