"""Map a function over items in worker processes, surviving workers that die.

Slide libraries are C code: a malformed file can crash the process that reads it. A crash breaks a
``ProcessPoolExecutor`` and every job in flight with it, so after a crash each job that was in flight
is re-run alone in a fresh one-worker pool: the job that crashes again is reported as a
:class:`WorkerCrash`, the others complete, and the remaining items continue in a new pool.

Workers are forked from a ``forkserver`` process that has imported the ``preload`` modules once: a worker
starts in milliseconds instead of re-importing numpy, scipy and the slide libraries (about 2 s each), and
is still forked from a clean single-purpose process, not from the caller.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_IN_FLIGHT_PER_WORKER = 4  # bounded submission: memory stays flat for a million slides
_DONE = object()


@dataclass(frozen=True)
class WorkerCrash:
    """The worker process died (not a Python exception) while running this item."""

    reason: str


def _fill(pool: ProcessPoolExecutor, fn: Callable[[T], R], source: Iterator[T], inflight: dict[Future[R], T],
          limit: int) -> bool:
    """Submit items until ``limit`` are in flight; True once the source is exhausted."""
    while len(inflight) < limit:
        item = next(source, _DONE)
        if item is _DONE:
            return True
        inflight[pool.submit(fn, item)] = item  # type: ignore[arg-type]
    return False


def _context(preload: Sequence[str]) -> mp.context.BaseContext:
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(preload))  # takes effect when the server starts (once per process)
    return context


def _solo(fn: Callable[[T], R], item: T, initializer: Callable[..., None] | None,
          initargs: tuple[Any, ...], context: mp.context.BaseContext) -> R | WorkerCrash:
    with ProcessPoolExecutor(1, mp_context=context, initializer=initializer, initargs=initargs) as pool:
        try:
            return pool.submit(fn, item).result()
        except BrokenProcessPool as err:
            return WorkerCrash(f"the worker process died while reading it ({err})")


def imap_unordered(fn: Callable[[T], R], items: Iterable[T], workers: int,
                   initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = (),
                   preload: Sequence[str] = ()) -> Iterator[tuple[T, R | WorkerCrash]]:
    """Yield ``(item, fn(item))`` in completion order; ``fn`` and the items must pickle.

    With ``workers <= 1`` everything runs in this process (no crash isolation). Python exceptions
    raised by ``fn`` propagate: ``fn`` is expected to turn expected failures into results.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield item, fn(item)
        return
    source = iter(items)
    context = _context(preload)
    while True:
        suspects: list[T] = []
        with ProcessPoolExecutor(workers, mp_context=context, initializer=initializer, initargs=initargs) as pool:
            inflight: dict[Future[R], T] = {}
            limit = workers * _IN_FLIGHT_PER_WORKER
            exhausted = _fill(pool, fn, source, inflight, limit)
            while inflight:
                done, _ = wait(inflight, return_when=FIRST_COMPLETED)
                for future in done:
                    item = inflight.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        suspects.append(item)
                        continue
                    yield item, result
                if suspects:
                    suspects.extend(inflight.values())
                    inflight.clear()
                    break
                if not exhausted:
                    exhausted = _fill(pool, fn, source, inflight, limit)
        for item in suspects:
            yield item, _solo(fn, item, initializer, initargs, context)
        if not suspects:
            return
