"""Stopping the work of a client that went away.

Starlette does not cancel a request handler when its client disconnects, so
a unary request would keep an upstream generating for nobody. `unless_gone`
runs the work in the handler's own task while one small watcher task reads
the ASGI `receive` channel, which yields `http.disconnect` once the body is
read and the client has left; the watcher then cancels the handler's task.
(One plain asyncio task per request: a task group costs several times more
on the router's sub-millisecond budget.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.types import Receive

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def _watch(receive: Receive, task: asyncio.Task[object]) -> bool:
    while (await receive())["type"] != "http.disconnect":
        pass
    task.cancel()
    return True


async def unless_gone(receive: Receive, work: Awaitable[T]) -> T:
    """The result of `work`, or ClientGone once the client disconnects (the
    work is cancelled then: its `finally` blocks close upstream connections).

    Call it only once the body has been read."""
    task = asyncio.current_task()
    assert task is not None
    watcher = asyncio.get_running_loop().create_task(_watch(receive, task))
    try:
        return await work
    except asyncio.CancelledError:
        if watcher.done() and not watcher.cancelled():
            task.uncancel()  # the watcher's cancel, not the server's: answer ClientGone
            raise ClientGone from None
        raise
    finally:
        watcher.cancel()
