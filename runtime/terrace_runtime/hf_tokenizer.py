"""A Hugging Face model folder's own tokenizer and chat template.

Reads ``tokenizer.json`` with the `tokenizers` library and
``tokenizer_config.json`` (special tokens, ``add_bos_token``,
``chat_template``; or ``chat_template.jinja``), and ``generation_config.json``
for the end-of-sequence ids. Chat templates are rendered with Jinja2's
sandbox, the way transformers renders them. A model with no chat template (a
base model such as Gemma 3 270M) is refused for chat with a clear error;
the completions API still serves it.

Token ids map to bytes so that stop strings and streaming work on bytes
whatever the tokenizer: SentencePiece pieces (``▁`` is a space, ``<0xNN>`` a
byte), byte-level BPE pieces (GPT-2's byte-to-character table), and special
tokens, which have no bytes (they are never shown as text).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class TokenizerError(ValueError):
    """The folder's tokenizer cannot be used; the message says why."""


class ChatTemplateError(ValueError):
    """The messages cannot be rendered with the model's chat template."""


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable bytes stand for themselves,
    the others are shifted to code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + shift)
            shift += 1
    return {c: b for b, c in chars.items()}


def _special(config: Mapping[str, Any], key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, Mapping):  # {"content": "<eos>", ...}
        value = value.get("content")
    return value if isinstance(value, str) else None


class HFTokenizer:
    """The tokenizer of one model folder. Shapes: ids are ``list[int]``."""

    def __init__(self, folder: Path, *, chat_template: str | None = None) -> None:
        """`chat_template`: a Jinja file path, or "qa" (packaged), replacing the model's."""
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.exists():
            raise TokenizerError(f"{folder} has no tokenizer.json")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises its own exception type
            raise TokenizerError(f"tokenizers cannot read {path}: {exc}") from exc
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        bos = _special(config, "bos_token")
        self.bos_id = self._tok.token_to_id(bos) if bos else None
        self.add_bos = bool(config.get("add_bos_token", self.bos_id is not None))
        eos_ids: set[int] = set()
        eos = _special(config, "eos_token")
        if eos and self._tok.token_to_id(eos) is not None:
            eos_ids.add(self._tok.token_to_id(eos))
        raw = generation.get("eos_token_id")
        eos_ids.update(raw if isinstance(raw, list) else [raw] if isinstance(raw, int) else [])
        if not eos_ids:
            raise TokenizerError(f"{folder}: no eos_token in tokenizer_config.json")
        self.eos_ids = frozenset(eos_ids)
        self.eos_id = min(self.eos_ids)
        self.bos_token, self.eos_token = bos or "", eos or ""
        template = config.get("chat_template")
        jinja = folder / "chat_template.jinja"
        if jinja.exists():
            template = jinja.read_text()
        self.chat_template: str | None = template if isinstance(template, str) else None
        if chat_template is not None:
            self.chat_template = load_chat_template(chat_template)
        self._special_ids = {
            t.id if hasattr(t, "id") else i
            for i, t in self._tok.get_added_tokens_decoder().items()
            if getattr(t, "special", False)
        }
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        self._byte_level = "ByteLevel" in json.dumps(decoder)

    @property
    def never_sampled(self) -> tuple[int, ...]:
        """Ids the engine never samples: the beginning-of-sequence token."""
        return (self.bos_id,) if self.bos_id is not None else ()

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        bos = self.add_bos if add_bos is None else add_bos
        if bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", "replace")

    @functools.lru_cache(maxsize=65536)  # noqa: B019 - one tokenizer per process
    def token_bytes(self, token_id: int) -> bytes:
        if token_id in self._special_ids or token_id in self.eos_ids:
            return b""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if m := BYTE_PIECE.match(piece):
            return bytes([int(m.group(1), 16)])
        if self._byte_level:
            table = _byte_level_decoder()
            if all(c in table for c in piece):
                return bytes(table[c] for c in piece)
        return piece.replace("\u2581", " ").encode("utf-8")

    def token_text(self, token_id: int) -> str:
        """How OpenAI shows a token: its text, ``bytes:\\xNN`` for a partial
        UTF-8 byte, the piece itself for a special token."""
        raw = self.token_bytes(token_id)
        if not raw:
            return self._tok.id_to_token(token_id) or ""
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return "".join(f"bytes:\\x{b:02x}" for b in raw)

    def render_chat(self, messages: list[dict[str, Any]]) -> str:
        """The prompt text for `messages` (OpenAI shape: role, content), ending
        with the assistant's turn. Raises ChatTemplateError."""
        if self.chat_template is None:
            raise ChatTemplateError(
                "this model has no chat template (a base model): use /v1/completions "
                "with a few-shot prompt"
            )
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise ChatTemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc


def load_chat_template(name_or_path: str) -> str:
    """A packaged template by name ("qa") or a Jinja file's text. Raises TokenizerError."""
    packaged = Path(__file__).parent / "chat_templates" / f"{name_or_path}.jinja"
    path = packaged if packaged.exists() else Path(name_or_path)
    try:
        return path.read_text()
    except OSError as exc:
        raise TokenizerError(f"chat template {name_or_path!r}: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError as exc:
        raise TokenizerError(f"{path} is not JSON: {exc}") from exc
    return data if isinstance(data, dict) else {}
