"""Stopping the work of a client that went away.

Starlette does not cancel a request handler when its client disconnects, so
a unary request would keep an upstream generating for nobody. `unless_gone`
runs the work while watching the ASGI `receive` channel, which yields
`http.disconnect` once the body is read and the client has left.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import anyio
from starlette.types import Receive

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def unless_gone(receive: Receive, work: Awaitable[T]) -> T:
    """The result of `work`, or ClientGone once the client disconnects (the
    work is cancelled then: its `finally` blocks close upstream connections)."""
    done = False
    failure: Exception | None = None
    result: T
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            result = await work
            done = True
        except Exception as exc:  # raised as itself, not in a task group's ExceptionGroup
            failure = exc
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if not done:
        raise ClientGone
    return result
