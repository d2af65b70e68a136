"""Text generation with continuous batching of decode steps.

The engine schedules; a `Decoder` computes. Every step the engine admits
waiting sequences (up to `max_batch_size` running), asks the decoder for each
running sequence's next-token logits in one call, samples, checks stop
strings and lengths, and retires finished or cancelled sequences, which frees
their KV cache (`Decoder.release`). New requests join at the next step and
finished ones leave: continuous batching. Steps run on the worker thread.

Decoders: `ByteDecoder` here (Terrace's byte-level test models, KV-cache
free: one padded forward per step), and the real language models'
decoders in `language_models.py` (onnxruntime-genai and transformers, with a
KV cache per sequence).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from .batching import BatcherClosed, QueueFull, RunFn, retry_after_seconds
from .metrics import RuntimeMetrics


@dataclass(frozen=True)
class ByteTokenizer:
    """Token i < 256 is byte i; three special tokens follow."""

    pad_id: int = 256
    bos_id: int = 257
    eos_id: int = 258

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any]) -> ByteTokenizer:
        kind = meta.get("type")
        if kind != "byte":
            raise ValueError(f"unsupported tokenizer type {kind!r} (terrace-runtime knows 'byte')")
        return cls(int(meta["pad_id"]), int(meta["bos_id"]), int(meta["eos_id"]))

    def to_metadata(self) -> dict[str, Any]:
        return {"type": "byte", "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}

    @property
    def vocab_size(self) -> int:
        return max(self.pad_id, self.bos_id, self.eos_id) + 1

    @property
    def eos_ids(self) -> frozenset[int]:
        return frozenset((self.eos_id,))

    @property
    def never_sampled(self) -> tuple[int, ...]:
        return (self.pad_id, self.bos_id)

    @property
    def add_bos(self) -> bool:
        return True

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        return [self.bos_id, *text.encode("utf-8")]

    @staticmethod
    def render_chat(messages: list[dict[str, Any]]) -> str:
        """The byte models know no chat template; a plain transcript ending in the
        assistant's turn is what they continue."""
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def token_text(self, token_id: int) -> str:
        """How OpenAI shows a token: its text, or `bytes:\\xNN` for a byte that is
        not a character on its own."""
        if token_id < 0x80:
            return chr(token_id)
        if token_id < 0x100:
            return f"bytes:\\x{token_id:02x}"
        return {self.eos_id: "<|endoftext|>", self.bos_id: "<|bos|>"}.get(token_id, "<|pad|>")

    @staticmethod
    def token_bytes(token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 0x100 else b""


class Tokenizer(Protocol):
    """What the engine and the OpenAI API need of a tokenizer (ByteTokenizer,
    hf_tokenizer.HFTokenizer). Ids are ints; texts are str; bytes are UTF-8."""

    vocab_size: int
    eos_ids: frozenset[int]

    @property
    def never_sampled(self) -> tuple[int, ...]: ...
    @property
    def add_bos(self) -> bool: ...
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]: ...
    def token_bytes(self, token_id: int) -> bytes: ...
    def token_text(self, token_id: int) -> str: ...
    def render_chat(self, messages: list[dict[str, Any]]) -> str: ...


# Temperatures below this decode greedily (vLLM's _SAMPLING_EPS). Dividing by
# a tinier one overflows: logits / 1e-38 is -inf for every token but the top
# one (and NaN for all of them in float32), and the tempered distribution is
# the argmax anyway.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[bytes, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's plus k alternatives
    seed: int | None = None
    ignore_eos: bool = False  # vLLM's extension: generate exactly max_tokens (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class TokenEvent:
    token_id: int
    logprob: float  # NaN when the request asked for no logprobs and decodes greedily
    top: tuple[tuple[int, float], ...] = ()
    piece: bytes | None = None  # what to show when a stop string cut the token short


@dataclass(frozen=True)
class FinishEvent:
    reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    joules: float


@dataclass(eq=False)
class Sequence_:
    prompt: list[int]  # only the last context-window tokens: all the model ever sees
    prompt_tokens: int
    params: SamplingParams
    events: asyncio.Queue[TokenEvent | FinishEvent | BaseException]
    rng: np.random.Generator
    generated: list[int] = field(default_factory=list)
    pieces: list[bytes] = field(default_factory=list)  # each generated token's bytes
    logprobs: list[TokenEvent] = field(default_factory=list)
    released: int = 0  # tokens handed to the client (the rest may still become a stop string)
    joules: float = 0.0
    cancelled: bool = False
    enqueued: float = field(default_factory=time.monotonic)
    state: Any = None  # the decoder's (its KV cache)
    tail: bytes | None = None  # set when a stop string cut the last token short


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities along the last axis, stable for any finite logits:
    the max is subtracted first, so exp never overflows and the sum is >= 1
    (a difference that overflows is -inf, a probability of 0)."""
    peak = logits.max(axis=-1, keepdims=True)
    with np.errstate(over="ignore"):
        shifted = logits - peak
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


# Top-p looks for its nucleus among this many most likely tokens first (a
# partition, not a sort of the whole vocabulary), and sorts everything only
# when they do not reach top_p.
NUCLEUS_CANDIDATES = 1024


def choose_token(logprobs: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """Greedy below GREEDY_BELOW, else sample from the tempered,
    top-p-truncated distribution. `logprobs` are log-probabilities (a
    log-softmax: the largest is 0), finite or -inf where masked.

    Numerically safe for every temperature in range: the largest tempered
    logprob is shifted to 0, so exp gives at most 1 and the total is at
    least 1; anything that overflows goes to -inf, a probability of 0. No
    NaN, no inf.
    Sampling is by the inverse CDF (one uniform draw, a float64 running sum):
    on a 262k vocabulary about 4x cheaper than `Generator.choice` with `p`."""
    if params.greedy:
        return int(np.argmax(logprobs))
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        scaled = logprobs * np.float32(1.0 / params.temperature)
        scaled -= scaled.max()  # the most likely token gets exp(0) = 1, however low T is
        probs = np.exp(scaled, dtype=np.float32)
    if params.top_p < 1.0:
        probs = _nucleus(probs, params.top_p)
    cumulative = np.cumsum(probs, dtype=np.float64)
    token = int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right"))
    if token >= len(probs) or probs[token] == 0.0:  # the draw hit the very end: round down
        token = int(np.flatnonzero(probs)[-1])
    return token


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """`probs` kept only on the most likely tokens whose mass first reaches
    `top_p` of the total (at least one), zero elsewhere."""
    total = float(probs.sum(dtype=np.float64))
    k = min(NUCLEUS_CANDIDATES, len(probs))
    candidates = np.argpartition(-probs, k - 1)[:k] if k < len(probs) else np.arange(len(probs))
    if float(probs[candidates].sum(dtype=np.float64)) < top_p * total:
        candidates = np.arange(len(probs))  # a flat distribution: sort it all
    order = candidates[np.argsort(-probs[candidates], kind="stable")]
    mass = np.cumsum(probs[order], dtype=np.float64)
    keep = order[: int(np.searchsorted(mass, top_p * total)) + 1]
    kept = np.zeros_like(probs)
    kept[keep] = probs[keep]
    return kept


def sample_row(scores: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> TokenEvent:
    """One sequence's next token from its logits (finite, or -inf where masked),
    with its log-probability and the `params.logprobs` most likely alternatives
    (the model's own distribution, before temperature and top-p)."""
    if params.greedy:
        # The logits' own argmax: rounding in log_softmax may tie near-equal ones.
        token = int(scores.argmax())
        if params.logprobs is None:  # nobody asked: the argmax is all it takes
            return TokenEvent(token, math.nan)
        row_logprobs = log_softmax(scores)
    else:
        row_logprobs = log_softmax(scores)
        token = choose_token(row_logprobs, params, rng)
    top: tuple[tuple[int, float], ...] = ()
    k = params.logprobs
    if k:
        best = np.argpartition(-row_logprobs, k)[:k]
        best = best[np.argsort(-row_logprobs[best])]
        top = tuple((int(t), float(row_logprobs[t])) for t in best)
    return TokenEvent(token, float(row_logprobs[token]), top)


def find_stop(generated: bytes, stops: Sequence[bytes]) -> int | None:
    """Byte index where the earliest stop string starts, if any is complete."""
    hits = [i for s in stops if (i := generated.find(s)) >= 0]
    return min(hits) if hits else None


def cut_at_stop(pieces: Sequence[bytes], stops: Sequence[bytes]) -> tuple[int, bytes] | None:
    """Where a complete stop string starts in the tokens' bytes `pieces`:
    (how many tokens to keep, the kept part of the cut token's bytes), or None.
    The token the stop string starts in is kept when text precedes the stop in it."""
    at = find_stop(b"".join(pieces), stops)
    if at is None:
        return None
    offset = 0
    for n, piece in enumerate(pieces):
        if offset + len(piece) > at:
            return n, piece[: at - offset]
        offset += len(piece)
    return len(pieces), b""


def safe_release(pieces: Sequence[bytes], stops: Sequence[bytes]) -> int:
    """How many generated tokens can be shown while a stop string may still be
    forming at the end: the tokens before the last (longest stop - 1) bytes."""
    if not stops:
        return len(pieces)
    hold = max(len(s) for s in stops) - 1
    n, held = len(pieces), 0
    while n > 0 and held < hold:
        n -= 1
        held += len(pieces[n])
    return n


# Decode steps one hand-off to the worker may run before the event loop looks
# at the batch again (it also looks whenever a sequence ends or one arrives).
MAX_STEPS_PER_HOP = 64


class ContextTooLong(ValueError):
    """prompt + max_tokens does not fit the model's context."""


class Decoder(Protocol):
    """The model side of generation: next-token logits for a batch of running
    sequences. A decoder feeds each sequence's prompt the first time it sees
    it and only the newest token after that (its KV cache holds the rest), and
    keeps its per-sequence state in `seq.state`. Every sequence a decoder holds
    state for is in each batch until it is released (the engine's running
    set). Runs on the worker thread."""

    def logits(self, batch: list[Sequence_]) -> np.ndarray:
        """Float logits, shape [len(batch), vocab]: a new array (the engine masks it in place)."""
        ...

    def release(self, seq: Sequence_) -> None:
        """Free what the decoder holds for a finished or cancelled sequence."""
        ...


class ByteDecoder:
    """Terrace's byte-level test models: KV-cache free, so every step pads all
    running sequences' contexts (left) into one [batch, time] forward pass."""

    def __init__(self, run: RunFn, tokenizer: ByteTokenizer, context_length: int) -> None:
        self._run, self._tok, self._window = run, tokenizer, context_length

    def logits(self, batch: list[Sequence_]) -> np.ndarray:
        contexts = [(s.prompt + s.generated)[-self._window :] for s in batch]
        width = max(len(c) for c in contexts)
        ids = np.full((len(batch), width), self._tok.pad_id, dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, ctx in enumerate(contexts):
            ids[row, width - len(ctx) :] = ctx  # left padding: the last column is "now"
            mask[row, width - len(ctx) :] = 1
        return self._run({"input_ids": ids, "attention_mask": mask}, ["logits"])["logits"]

    def release(self, seq: Sequence_) -> None:
        pass


class GenerationEngine:
    def __init__(
        self,
        decoder: Decoder,
        *,
        tokenizer: Tokenizer,
        context_length: int,
        sliding: bool = True,
        max_batch_size: int,
        max_wait_s: float,
        max_queue: int,
        executor: Executor,
        metrics: RuntimeMetrics,
    ) -> None:
        self._decoder = decoder
        self.tokenizer = tokenizer
        self.context_length = context_length
        # sliding: the model sees only the last context_length tokens (the byte
        # models); otherwise prompt + max_tokens must fit in the KV cache.
        self.sliding = sliding
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.max_queue = max_queue
        self._executor = executor
        self._metrics = metrics
        self._waiting: deque[Sequence_] = deque()
        self._active: list[Sequence_] = []
        self._retired: list[Sequence_] = []
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._step_seconds = 0.01

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="generation")

    async def stop(self) -> None:
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for seq in [*self._waiting, *self._active]:
            seq.events.put_nowait(BatcherClosed("the runtime is shutting down"))
        self._waiting.clear()
        self._active.clear()

    def submit(self, prompt: list[int], params: SamplingParams, stream: int = 0) -> Sequence_:
        """Queue a sequence. Raises ContextTooLong, QueueFull or BatcherClosed."""
        if self._closed:
            raise BatcherClosed("the runtime is shutting down")
        if not self.sliding and len(prompt) + params.max_tokens > self.context_length:
            raise ContextTooLong(
                f"this model's maximum context length is {self.context_length} tokens; "
                f"the prompt has {len(prompt)} and max_tokens asks for {params.max_tokens}"
            )
        if len(self._waiting) >= self.max_queue:
            # Draining the queue takes roughly one full generation per batch slot.
            raise QueueFull(
                retry_after_seconds(
                    len(self._waiting), self.max_batch_size, self._step_seconds * params.max_tokens
                )
            )
        seq = Sequence_(
            prompt=prompt[-self.context_length :],
            prompt_tokens=len(prompt),
            params=params,
            events=asyncio.Queue(),
            # A seed (any integer, as OpenAI takes) and the choice's `stream`
            # index seed the sequence's generator together.
            rng=np.random.default_rng(
                None if params.seed is None else [params.seed % (1 << 64), stream]
            ),
        )
        self._waiting.append(seq)
        self._arrived.set()
        return seq

    @property
    def depth(self) -> int:
        return len(self._waiting)

    async def warm_up(self, prompt: list[int]) -> None:
        """Generate two tokens so arenas and kernels are ready before traffic."""
        seq = self.submit(prompt, SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        async for _ in self.events(seq):
            pass

    def cancel(self, seq: Sequence_) -> None:
        seq.cancelled = True

    async def events(self, seq: Sequence_) -> AsyncIterator[TokenEvent | FinishEvent]:
        """The sequence's tokens as they become final, then one FinishEvent."""
        try:
            while True:
                event = await seq.events.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, FinishEvent):
                    return
        finally:
            self.cancel(seq)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._active:
                while not self._waiting:
                    self._arrived.clear()
                    await self._arrived.wait()
                if self.max_wait_s > 0:
                    deadline = self._waiting[0].enqueued + self.max_wait_s
                    while len(self._waiting) < self.max_batch_size:
                        remaining = deadline - time.monotonic()
                        if remaining <= 0:
                            break
                        self._arrived.clear()
                        try:
                            await asyncio.wait_for(self._arrived.wait(), remaining)
                        except TimeoutError:
                            break
            self._admit()
            self._retire()
            if not self._active:
                if self._retired:
                    await loop.run_in_executor(self._executor, self._release)
                continue
            batch = list(self._active)
            try:
                await loop.run_in_executor(self._executor, self._steps, batch, loop)
            except Exception as exc:  # the model failed: fail this batch, keep serving
                self._metrics.error("inference")
                for seq in batch:
                    if not seq.cancelled:
                        seq.events.put_nowait(exc)
                    seq.cancelled = True
            self._retire()

    def _retire(self) -> None:
        """Finished and cancelled sequences leave; their KV caches are freed
        on the worker thread before the next step."""
        gone = [s for s in self._active if s.cancelled]
        if gone:
            self._retired.extend(gone)
            self._active = [s for s in self._active if not s.cancelled]

    def _release(self) -> None:
        retired, self._retired = self._retired, []
        for seq in retired:
            self._decoder.release(seq)
            seq.state = None

    def _admit(self) -> None:
        now = time.monotonic()
        while self._waiting and len(self._active) < self.max_batch_size:
            seq = self._waiting.popleft()
            if seq.cancelled:
                continue
            self._metrics.child(self._metrics.queue_wait).observe(now - seq.enqueued)
            self._metrics.child(self._metrics.prompt_tokens).inc(seq.prompt_tokens)
            self._active.append(seq)

    @staticmethod
    def _deliver(out: list[tuple[Sequence_, TokenEvent | FinishEvent]]) -> None:
        """On the event loop: hand what the worker produced to the sequences' queues."""
        for seq, event in out:
            seq.events.put_nowait(event)

    def _advance(
        self, seq: Sequence_, event: TokenEvent
    ) -> list[tuple[Sequence_, TokenEvent | FinishEvent]]:
        """Apply one sampled token; return what is final (to deliver); finish when done."""
        if seq.cancelled:
            return []
        out: list[tuple[Sequence_, TokenEvent | FinishEvent]] = []
        params = seq.params
        finish: str | None = None
        if event.token_id in self.tokenizer.eos_ids and not params.ignore_eos:
            finish = "stop"
        else:
            seq.generated.append(event.token_id)
            seq.pieces.append(self.tokenizer.token_bytes(event.token_id))
            seq.logprobs.append(event)
            cut = cut_at_stop(seq.pieces, params.stop) if params.stop else None
            if cut is not None:
                keep, partial = cut
                if partial:  # the stop string starts inside this token: show its head
                    seq.logprobs[keep] = replace(seq.logprobs[keep], piece=partial)
                    keep += 1
                del seq.generated[keep:], seq.pieces[keep:], seq.logprobs[keep:]
                finish = "stop"
            elif len(seq.generated) >= params.max_tokens:
                finish = "length"
        release_to = len(seq.generated) if finish else safe_release(seq.pieces, params.stop)
        out += [(seq, tok) for tok in seq.logprobs[seq.released : release_to]]
        seq.released = max(seq.released, release_to)
        if finish:
            out.append(
                (seq, FinishEvent(finish, seq.prompt_tokens, len(seq.generated), seq.joules))
            )
            self._metrics.observe_request_energy(seq.joules)
            seq.cancelled = True  # leaves the active set
        return out

    # --- worker thread -------------------------------------------------

    def _steps(self, batch: list[Sequence_], loop: asyncio.AbstractEventLoop) -> None:
        """Decode steps back to back while the batch stays the same: no sequence
        finished or was cancelled and nobody waits to join (the event loop
        admits them between hops). Each step's tokens go to the event loop
        at once, so streaming is not held back; skipping the hop back to the
        loop between steps saves its wake-ups on every token."""
        for _ in range(MAX_STEPS_PER_HOP):
            events, joules = self._step(batch)
            share = joules / len(batch)
            self._metrics.child(self._metrics.tokens_generated).inc(
                sum(1 for seq in batch if not seq.cancelled)
            )
            out: list[tuple[Sequence_, TokenEvent | FinishEvent]] = []
            for seq, event in zip(batch, events, strict=True):
                seq.joules += share
                out += self._advance(seq, event)
            if out:
                loop.call_soon_threadsafe(self._deliver, out)
            if self._waiting or self._closed or any(s.cancelled for s in batch):
                return

    def _step(self, batch: list[Sequence_]) -> tuple[list[TokenEvent], float]:
        self._release()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        # float32 and one row at a time: a real vocabulary is 10^5 wide, and
        # a greedy step needs only its argmax and one log-sum-exp.
        logits = np.asarray(self._decoder.logits(batch), dtype=np.float32)
        # Padding and BOS are never generated: renormalise over the rest.
        logits[:, list(self.tokenizer.never_sampled)] = -np.inf
        events = []
        for row, seq in enumerate(batch):
            scores = logits[row]
            if seq.params.ignore_eos:
                scores[list(self.tokenizer.eos_ids)] = -np.inf
            events.append(sample_row(scores, seq.params, seq.rng))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        self._step_seconds = 0.8 * self._step_seconds + 0.2 * wall
        joules = self._metrics.observe_batch(len(batch), wall, cpu)
        return events, joules
