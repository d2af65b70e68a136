"""Exact-match response cache: normalized request -> the answer that was served.

Bounded in entries (least recently used goes first) and in age (TTL). The
key is the request JSON with sorted keys, so `{"a":1,"b":2}` and
`{"b":2,"a":1}` hit the same entry. Everything that can change the bytes of
the answer is in the key (`stream_options` adds a usage chunk to a stream);
only `user`, an end-user id for abuse monitoring, is left out. Only
complete, successful answers are stored (the proxy and the relay decide).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

_IGNORED_FIELDS = ("user",)


@dataclass(frozen=True, slots=True)
class CachedAnswer:
    body: bytes
    media_type: str
    tier: str
    complexity: str
    escalated: str | None


def cache_key(kind: str, payload: dict[str, Any]) -> str:
    if any(f in payload for f in _IGNORED_FIELDS):
        payload = {k: v for k, v in payload.items() if k not in _IGNORED_FIELDS}
    return kind + json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class ResponseCache:
    def __init__(self, max_entries: int, ttl_seconds: float) -> None:
        self.max_entries = max_entries
        self.ttl = ttl_seconds
        self._data: OrderedDict[str, tuple[float, CachedAnswer]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str, now: float) -> CachedAnswer | None:
        item = self._data.get(key)
        if item is None:
            return None
        expires, answer = item
        if expires <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return answer

    def put(self, key: str, answer: CachedAnswer, now: float) -> None:
        if self.max_entries <= 0 or self.ttl <= 0:
            return
        self._data[key] = (now + self.ttl, answer)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)
