"""An order-keeping map over worker processes, shared by corpus extraction and preprocessing."""

from __future__ import annotations

import multiprocessing
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def ordered_map(fn: Callable[[T], R], items: Iterable[T], *, workers: int,
                initializer: Callable | None = None, initargs: tuple = ()) -> Iterator[R]:
    """``map(fn, items)`` in order; with ``workers > 1`` over a process pool.

    Spawned (not forked) workers: the caller may hold torch or tokenizer threads, and a fork
    would copy their locks mid-use. ``fn`` and ``initializer`` must be module-level functions
    of modules that import quickly.
    """
    if workers <= 1:
        if initializer is not None:
            initializer(*initargs)
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=initializer, initargs=initargs) as pool:
        yield from pool.imap(fn, items)
