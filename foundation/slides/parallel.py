"""Map a function over items in worker processes, surviving workers that die.

Slide libraries are C code: a malformed file can crash the process that reads it. Each worker here
holds one item at a time over its own pipe, so when a worker process dies the parent knows exactly
which item killed it: that item is reported as a :class:`WorkerCrash`, a fresh worker takes its place
and the run goes on. (``concurrent.futures.ProcessPoolExecutor`` cannot say which job crashed, marks
the whole pool broken, and can hang joining the survivors.)

Workers are forked from a ``forkserver`` process that has imported the ``preload`` modules once: a
worker starts in milliseconds instead of re-importing numpy, scipy and the slide libraries (about 2 s
each), and is still forked from a clean single-purpose process, not from the caller.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

_STOP = None  # sent to a worker: exit
_JOIN_SECONDS = 5.0  # grace period for idle workers to exit before they are terminated


@dataclass(frozen=True)
class WorkerCrash:
    """The worker process died (not a Python exception) while running this item."""

    reason: str


def _worker_main(conn: Connection, fn: Callable[[Any], Any], initializer: Callable[..., None] | None,
                 initargs: tuple[Any, ...]) -> None:
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            item = conn.recv()
        except EOFError:  # the parent went away
            return
        if item is _STOP:
            return
        try:
            conn.send((True, fn(item)))
        except Exception as err:  # handed to the parent, which re-raises it
            conn.send((False, err))


class _Worker:
    def __init__(self, context: mp.context.BaseContext, fn: Callable[[Any], Any],
                 initializer: Callable[..., None] | None, initargs: tuple[Any, ...]) -> None:
        self.conn, child = context.Pipe()
        self.process = context.Process(target=_worker_main, args=(child, fn, initializer, initargs), daemon=True)
        self.process.start()
        child.close()
        self.item: Any = None
        self.busy = False

    def submit(self, item: Any) -> None:
        self.item, self.busy = item, True
        self.conn.send(item)

    def stop(self) -> None:
        with contextlib.suppress(OSError):  # a dead worker's pipe is closed
            self.conn.send(_STOP)
        self.process.join(_JOIN_SECONDS)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join()
        self.conn.close()


def imap_unordered(fn: Callable[[T], R], items: Iterable[T], workers: int,
                   initializer: Callable[..., None] | None = None, initargs: tuple[Any, ...] = (),
                   preload: Sequence[str] = ()) -> Iterator[tuple[T, R | WorkerCrash]]:
    """Yield ``(item, fn(item))`` in completion order; ``fn``, its arguments and results must pickle.

    With ``workers <= 1`` everything runs in this process (no crash isolation). Python exceptions
    raised by ``fn`` propagate: ``fn`` is expected to turn expected failures into results.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        for item in items:
            yield item, fn(item)
        return
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(preload))  # takes effect when the server starts (once per process)
    source = iter(items)
    pool: list[_Worker] = []
    try:
        pending = True
        while True:
            for i, worker in enumerate(pool):  # replace workers that died while idle
                if not worker.busy and not worker.process.is_alive():
                    worker.stop()
                    pool[i] = _Worker(context, fn, initializer, initargs)
            while pending:
                idle = next((w for w in pool if not w.busy), None)
                if idle is None and len(pool) < workers:
                    idle = _Worker(context, fn, initializer, initargs)
                    pool.append(idle)
                if idle is None:
                    break
                try:
                    idle.submit(next(source))
                except StopIteration:
                    pending = False
            busy = [w for w in pool if w.busy]
            if not busy:
                return
            ready = set(wait([w.conn for w in busy] + [w.process.sentinel for w in busy]))
            for i, worker in enumerate(pool):
                if not worker.busy or (worker.conn not in ready and worker.process.sentinel not in ready):
                    continue
                item = worker.item
                try:
                    ok, result = worker.conn.recv() if worker.conn.poll() else (None, None)
                except (EOFError, OSError):
                    ok = None
                if ok is None:  # the process died before answering
                    worker.process.join()
                    code = worker.process.exitcode
                    worker.busy = False
                    worker.stop()
                    pool[i] = _Worker(context, fn, initializer, initargs)
                    yield item, WorkerCrash(f"the worker process died while reading it (exit code {code})")
                    continue
                worker.busy = False
                if not ok:
                    raise result
                yield item, result
    finally:
        for worker in pool:
            worker.stop()
