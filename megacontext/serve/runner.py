"""Runner: model work off the event loop, one request at a time per session, in arrival order.

Each call on a session first takes the session's ``asyncio.Lock`` (FIFO, so requests on one session run in
the order they arrived and a queue of them ties up no thread), then runs the blocking service call in a
bounded thread pool (torch releases the GIL, so different sessions run concurrently). The lock is released
when the *thread* finishes, not when the request ends: a client that disconnects mid-call cannot let the next
request overtake work still running on its session. The registry's per-session ``threading.Lock`` below is
the second line of the same guarantee.

Streaming: the worker thread pushes ``("start" | "text" | "end", value)`` items into an ``asyncio.Queue``
through ``call_soon_threadsafe``; :meth:`Runner.stream` waits for the first item, so a request refused before
it started (unknown session, bad parameters) raises here and becomes a 4xx, not a 200 stream with an error.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass


@dataclass
class StreamEnd:
    result: dict | None = None
    error: BaseException | None = None


class Runner:
    def __init__(self, workers: int):
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="megacontext-serve")
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)

    def _lock(self, key: str) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = asyncio.Lock()
            self._locks[key] = lock
        return lock

    async def _submit(self, key: str | None, fn: Callable, *args, **kwargs) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        call = functools.partial(fn, *args, **kwargs)
        if key is None:
            return loop.run_in_executor(self.pool, call)
        lock = self._lock(key)
        await lock.acquire()
        try:
            fut = loop.run_in_executor(self.pool, call)
        except BaseException:
            lock.release()
            raise
        fut.add_done_callback(lambda _f: lock.release())
        return fut

    async def call(self, key: str | None, fn: Callable, *args, **kwargs):
        """Run ``fn`` in the pool, after every earlier call with the same ``key`` (a session id)."""
        fut = await self._submit(key, fn, *args, **kwargs)
        fut.add_done_callback(_retrieve)
        return await asyncio.shield(fut)  # a cancelled request leaves the work (and the lock) to finish

    async def stream(self, key: str, fn: Callable, **kwargs) -> AsyncIterator[tuple[str, object]]:
        """Run ``fn(on_start=, on_text=, cancel=, **kwargs)``; returns an iterator over ("text", piece) items
        ending with ("end", StreamEnd). Raises the call's exception if it failed before starting."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        put = lambda item: loop.call_soon_threadsafe(queue.put_nowait, item)
        fut = await self._submit(key, fn, on_start=lambda _: put(("start", None)),
                                 on_text=lambda t: put(("text", t)), cancel=cancel, **kwargs)

        def finished(f: asyncio.Future) -> None:
            if f.cancelled():
                queue.put_nowait(("end", StreamEnd(error=asyncio.CancelledError())))
            elif f.exception() is not None:
                queue.put_nowait(("end", StreamEnd(error=f.exception())))
            else:
                queue.put_nowait(("end", StreamEnd(result=f.result())))

        fut.add_done_callback(finished)
        try:
            kind, value = await queue.get()
        except BaseException:
            cancel.set()
            raise
        if kind == "end" and value.error is not None:
            raise value.error
        return _drain(queue, cancel, first=None if kind == "start" else (kind, value))


async def _drain(queue: asyncio.Queue, cancel: threading.Event, first) -> AsyncIterator[tuple[str, object]]:
    try:
        if first is not None:
            yield first
            if first[0] == "end":
                return
        while True:
            kind, value = await queue.get()
            yield kind, value
            if kind == "end":
                return
    finally:
        cancel.set()  # the client went away (or the stream ended): stop generating at the next token


def _retrieve(f: asyncio.Future) -> None:
    if not f.cancelled():
        f.exception()  # marks the exception retrieved when the awaiting request was cancelled
