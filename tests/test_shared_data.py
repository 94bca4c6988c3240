"""Where tests and benchmarks find the real data: the variable, beside the checkout, beside the clone's origin."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from foundation.shared_data import DATA_ENV, shared_data_dir


def _data(root: Path) -> Path:
    (root / "shared" / "data" / "wsi").mkdir(parents=True)
    return (root / "shared" / "data").resolve()


@pytest.fixture
def origin(tmp_path: Path) -> Path:
    """A checkout with the data beside it, and nothing set in the environment."""
    repo = tmp_path / "site" / "main"
    repo.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "init"], check=True)
    _data(tmp_path / "site")
    return repo


def test_beside_the_checkout(origin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert shared_data_dir(origin) == (origin.parent / "shared" / "data").resolve()


def test_a_clone_elsewhere_finds_the_data_beside_its_origin(origin: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    clone = tmp_path / "elsewhere" / "clone"
    subprocess.run(["git", "clone", "-q", str(origin), str(clone)], check=True)
    assert shared_data_dir(clone) == (origin.parent / "shared" / "data").resolve()


def test_the_variable_wins_and_missing_data_is_named(origin: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    other = _data(tmp_path / "other")
    monkeypatch.setenv(DATA_ENV, str(other))
    assert shared_data_dir(origin) == other
    missing = tmp_path / "missing"
    monkeypatch.setenv(DATA_ENV, str(missing))
    assert shared_data_dir(origin) == missing.resolve()  # reported by the caller as not found
    proc = subprocess.run([sys.executable, "-m", "foundation.shared_data"], capture_output=True, text=True,
                          env={**os.environ, DATA_ENV: str(missing)}, check=False)
    assert proc.returncode == 1 and DATA_ENV in proc.stderr and str(missing) in proc.stderr
