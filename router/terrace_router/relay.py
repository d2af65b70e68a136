"""Relaying an upstream's server-sent events to the client.

`SseRelay` is the ASGI response for a streamed answer whose tier is settled
(its 2xx head is in). It forwards whole events only (`sse.py`), and holds
the endpoint's in-flight slot until the stream ends, however it ends:

- the upstream finishes with `data: [DONE]`: the stream is complete (and
  cached when asked, unless an event in it was an in-band error). One that
  ends without it, or inside an event, gets the error event below;
- the upstream breaks off (reset, timeout, truncated, an event that is not
  JSON, an event that never ends): too late to escalate,
  bytes are out. A half-written event is dropped, and the stream ends with
  OpenAI's in-band error event and no `[DONE]`: the `openai` client raises
  an APIError, never a JSON decode error, and nothing pretends success;
- the client leaves (noticed by watching `receive`, since the server
  silently drops writes then): the upstream connection is closed, so the
  tier stops generating for nobody.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import anyio
from starlette.types import Receive, Scope, Send

from . import sse
from .attempts import Held
from .upstream import ERROR, TIMEOUT, UpstreamFailure

log = logging.getLogger(__name__)

_MID_STREAM = "The upstream tier failed mid-stream; the answer is incomplete."
_UNFINISHED = "The upstream tier ended the stream without [DONE]; the answer may be incomplete."

# An event longer than this without its end is a broken upstream, not a big token.
MAX_EVENT_BYTES = 1 << 20


class SseRelay:
    def __init__(
        self,
        held: Held,
        tier_name: str,
        headers: list[tuple[bytes, bytes]],
        on_end: Callable[[bytes | None], None],
        *,
        collect: bool,
    ) -> None:
        """`on_end(body)` runs once at the end; `body` is the whole stream
        when `collect` was asked and the stream is worth caching (complete,
        ended by `[DONE]`, no in-band error), else None."""
        self.held = held
        self.tier_name = tier_name
        self.headers = headers
        self.on_end = on_end
        self.collect = collect
        self.complete = False  # the upstream body was read to its end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        collected: list[bytes] | None = [] if self.collect else None
        cacheable = False
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.headers})
            async with anyio.create_task_group() as tg:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    tg.cancel_scope.cancel()

                tg.start_soon(watch_disconnect)
                cacheable = await self._relay(send, collected)
                tg.cancel_scope.cancel()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            self.held.finish(self.complete)
            body = b"".join(collected) if cacheable and collected is not None else None
            self.on_end(body)

    async def _relay(self, send: Send, collected: list[bytes] | None) -> bool:
        """Forward whole events until the upstream ends; True when what was
        collected is a complete, error-free stream."""
        pending = b""
        clean = True
        done = False
        try:
            async for chunk in self.held.head.chunks():
                if done:  # the stream is over; what follows [DONE] is not part of it
                    continue
                pending += chunk
                end = sse.complete_prefix(pending)
                if not end:
                    if len(pending) > MAX_EVENT_BYTES:
                        raise UpstreamFailure(ERROR, f"an event over {MAX_EVENT_BYTES} bytes")
                    continue
                block, pending = pending[:end], pending[end:]
                seen = sse.inspect(block)
                if seen.usable:
                    usable = block[: seen.usable]
                    if collected is not None:
                        collected.append(usable)
                    await send({"type": "http.response.body", "body": usable, "more_body": True})
                if not seen.well_formed:
                    raise UpstreamFailure(ERROR, "an event whose data is not JSON")
                clean = clean and not seen.carries_error
                done = seen.done
        except UpstreamFailure as failure:
            self.held.blame(endpoint_fault=failure.kind != TIMEOUT)
            if done:  # it broke after [DONE]: the answer is whole
                return collected is not None and clean
            log.warning(
                "tier %s broke mid-stream: %s: %s", self.tier_name, failure.kind, failure.cause
            )
            await self._end_with_error(send, _MID_STREAM)
            return False
        except Exception:  # a fault of the router's own: still a well-formed end
            log.exception("relaying tier %s's stream failed", self.tier_name)
            await self._end_with_error(send, _MID_STREAM)
            return False
        self.complete = True
        if not done:
            # No `[DONE]` (an unterminated last event included): the answer may
            # be cut short. An upstream that said so itself (an in-band error,
            # as Terrace's runtime and vLLM end a failed stream) is not echoed.
            if clean or pending.strip():
                log.warning("tier %s ended a stream without [DONE]", self.tier_name)
                await self._end_with_error(send, _UNFINISHED)
            return False
        return collected is not None and clean

    @staticmethod
    async def _end_with_error(send: Send, message: str) -> None:
        event = sse.error_event(message)
        await send({"type": "http.response.body", "body": event, "more_body": True})
