"""Bearer API keys, from a mounted Secret file (one key a line) and/or an
environment variable (comma-separated). No keys configured = no auth."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .config import AuthConfig
from .errors import unauthorized


def _digest(key: str) -> bytes:
    # Keys are kept and compared as digests: a set lookup on the digest does
    # not leak the key's prefix through timing the way `==` on strings can.
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    __slots__ = ("_digests",)

    def __init__(self, keys: set[str]) -> None:
        self._digests = frozenset(_digest(k) for k in keys if k)

    @classmethod
    def from_config(cls, auth: AuthConfig) -> ApiKeys:
        keys: set[str] = set()
        if auth.api_keys_file:
            for line in Path(auth.api_keys_file).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.add(line)
        if auth.api_keys_env:
            keys.update(k.strip() for k in os.environ.get(auth.api_keys_env, "").split(","))
        keys.discard("")
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise a 401 RouterError unless the header carries a known key."""
        if not self._digests:
            return
        if not authorization:
            raise unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("The Authorization header must be 'Bearer YOUR_KEY'.")
        if _digest(token.strip()) not in self._digests:
            raise unauthorized("Incorrect API key provided.")
