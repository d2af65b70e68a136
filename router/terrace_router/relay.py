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
from .upstream import ERROR, UpstreamFailure

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

    @staticmethod
    async def _forward_sound_prefix(send: Send, block: bytes) -> None:
        """The events of `block` before its first malformed one."""
        for event in sse.split_events(block):
            if not sse.inspect(event).well_formed:
                return
            await send({"type": "http.response.body", "body": event, "more_body": True})

    async def _relay(self, send: Send, collected: list[bytes] | None) -> bool:
        """Forward whole events until the upstream ends; True when what was
        collected is a complete, error-free stream."""
        pending = b""
        clean = True
        done = False
        try:
            async for chunk in self.held.head.chunks():
                pending += chunk
                end = sse.complete_prefix(pending)
                if not end:
                    if len(pending) > MAX_EVENT_BYTES:
                        raise UpstreamFailure(ERROR, f"an event over {MAX_EVENT_BYTES} bytes")
                    continue
                block, pending = pending[:end], pending[end:]
                seen = sse.inspect(block)
                if not seen.well_formed:
                    await self._forward_sound_prefix(send, block)
                    raise UpstreamFailure(ERROR, "an event whose data is not JSON")
                clean = clean and not seen.carries_error
                done = seen.ends_done
                if collected is not None:
                    collected.append(block)
                await send({"type": "http.response.body", "body": block, "more_body": True})
        except UpstreamFailure as failure:
            self.held.failed(failure)
            log.warning(
                "tier %s broke mid-stream: %s: %s", self.tier_name, failure.kind, failure.cause
            )
            event = sse.error_event(_MID_STREAM)
            await send({"type": "http.response.body", "body": event, "more_body": True})
            return False
        self.complete = True
        if pending.strip() or not done:
            # An unterminated last event, or no `[DONE]`: the answer may be cut short.
            log.warning("tier %s ended a stream without [DONE]", self.tier_name)
            event = sse.error_event(_UNFINISHED)
            await send({"type": "http.response.body", "body": event, "more_body": True})
            return False
        return collected is not None and clean
