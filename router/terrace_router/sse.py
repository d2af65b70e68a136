"""Server-sent event framing, as the relay needs it (WHATWG HTML, "Server-sent
events", event stream interpretation).

An event ends at an empty line; lines end in CRLF, LF or CR. The relay
forwards only whole events, so that if the upstream breaks off inside one,
the half-written event is dropped and the client's parser still sees a
well-formed stream followed by the router's error event.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

# A line terminator followed by an empty line's terminator. A CR right before
# an LF is the CRLF pair, never a line end of its own (so a chunk ending in
# CRLF is not taken for the end of an event).
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r)")
_LINE = re.compile(rb"\r\n|\r|\n")


def complete_prefix(buffer: bytes) -> int:
    """Length of the longest prefix of `buffer` made of whole events (0: none)."""
    if buffer.endswith(b"\n\n"):  # the usual case: a chunk is one or more whole events
        return len(buffer)
    end = 0
    for match in _EVENT_END.finditer(buffer):
        end = match.end()
    return end


def split_events(block: bytes) -> list[bytes]:
    """The events of a block of whole events, each with its terminator."""
    out = []
    start = 0
    for match in _EVENT_END.finditer(block):
        out.append(block[start : match.end()])
        start = match.end()
    return out


def data_fields(block: bytes) -> list[bytes]:
    """The `data` of each event in a block of whole events (multi-line data
    joined with LF, as a parser would), events without data left out."""
    out: list[bytes] = []
    lines: list[bytes] = []
    for line in _LINE.split(block):
        if not line:
            if lines:
                out.append(b"\n".join(lines))
                lines = []
            continue
        field, sep, value = line.partition(b":")
        if field == b"data":
            lines.append(value[1:] if sep and value.startswith(b" ") else value)
    return out


@dataclass(frozen=True, slots=True)
class Inspection:
    """What a block of whole events holds, as the relay and the cache need it."""

    usable: int  # bytes of the block to relay: its events up to the first bad one, or to [DONE]
    well_formed: bool  # False: the event after `usable` has data that is not a JSON object
    carries_error: bool  # an event within `usable` is an in-band error (`{"error": ...}`)
    done: bool  # `usable` ends with OpenAI's `data: [DONE]`


def inspect(block: bytes) -> Inspection:
    """Inspect a block of whole events, event by event. Events without data
    (comments used as keep-alives, `retry:`) are fine; nothing after
    `[DONE]` belongs to the stream."""
    offset = 0
    error = False
    for event in split_events(block):
        end = offset + len(event)
        for data in data_fields(event):
            if data.strip() == b"[DONE]":
                return Inspection(end, True, error, True)
            try:
                parsed: Any = json.loads(data)
            except (ValueError, RecursionError):
                return Inspection(offset, False, error, False)
            if not isinstance(parsed, dict):
                return Inspection(offset, False, error, False)
            error = error or "error" in parsed
        offset = end
    return Inspection(offset, True, error, False)


def error_event(message: str, type_: str = "server_error", code: str | None = None) -> bytes:
    """An OpenAI in-band error event: `data: {"error": {...}}` and an empty line."""
    err = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return b"data: " + json.dumps(err).encode() + b"\n\n"
