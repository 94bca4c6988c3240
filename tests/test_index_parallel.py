"""The crash-isolating process map behind `foundation index --workers N`."""

from __future__ import annotations

import math
import signal

import pytest

from foundation.slides.parallel import WorkerCrash, imap_unordered


def test_results_match_a_serial_map() -> None:
    items = [float(i) for i in range(25)]
    results = dict(imap_unordered(math.sqrt, items, workers=2))
    assert results == {x: math.sqrt(x) for x in items}


def test_a_worker_that_dies_is_reported_and_the_others_finish() -> None:
    # SIGURG is ignored by default (raise_signal returns None); SIGKILL kills the worker process outright.
    items = [signal.SIGURG, signal.SIGKILL, signal.SIGURG, signal.SIGURG, signal.SIGKILL, signal.SIGURG]
    results = list(imap_unordered(signal.raise_signal, items, workers=2))
    assert len(results) == len(items)
    crashed = [item for item, result in results if isinstance(result, WorkerCrash)]
    assert sorted(crashed) == [signal.SIGKILL, signal.SIGKILL]
    assert all("exit code -9" in r.reason for _, r in results if isinstance(r, WorkerCrash))
    assert sum(result is None for _, result in results) == 4


def test_python_errors_propagate() -> None:
    with pytest.raises(ValueError, match="math domain error"):
        list(imap_unordered(math.sqrt, [4.0, -1.0, 9.0], workers=2))


def test_one_worker_runs_in_process() -> None:
    assert list(imap_unordered(abs, [-3, 2], workers=1)) == [(-3, 3), (2, 2)]
