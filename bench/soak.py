"""Data-plane soak: real runtimes behind a real router, mixed traffic, one
upstream killed and restarted, every request accounted for, leaks measured.

    python bench/soak.py [--minutes 10] [--concurrency 8] [--models DIR] [--outcomes FILE]
                         [--keep-logs]

Processes, all on 127.0.0.1 and stopped by PID at the end:
- two `terrace-runtime serve` processes, tiers "small" (the demo builder's
  tiny byte-level LM, text-small.onnx on onnxruntime) and "large"
  (text-large.pt2 on torch), one intra-op thread each; the models come from
  `terrace-runtime build-demo-models --preset tiny` (seconds) unless
  --models names a build-demo-models folder;
- `terrace-router serve --tier small=URL --tier large=URL` (quick mode:
  built-in classifier, calibration, escalation, cache, passive health).
Each binds a port the OS picks (`--port 0`) and names it in its log, where
it is read back (hack/localproc.py): no port is chosen here and bound later.
The router reaches "small" through an address this process holds for the
whole run (`Relay`: a listening socket that relays each connection to the
runtime of the moment, and resets it while there is none), so its table
never changes and no other process can take that address during the outage.

Traffic: `--concurrency` async clients (httpx, one shared pool) pick a kind
of request at random, for the whole run:
- chat and completions, unary and streaming, model "auto" or a pinned tier,
  and deterministic chat from a small prompt set (the cache's hit path);
- a unary request given up by a client timeout, and a stream closed after
  its first chunk (intended disconnects);
- bad requests: invalid JSON, a NaN literal, wrong types, an unknown model,
  no messages: each must be a 4xx in OpenAI's error envelope.
At 30% of the run the "small" runtime is SIGKILLed; at 50% it is started
again (on a port of its own, behind the same relayed address). Meanwhile
`auto` requests must be escalated to "large" and pinned "small" requests
must get a clean OpenAI-shaped error.

Every request is classified (`classify_*` below) as:
- answered: a 2xx with a well-formed body, or a well-formed stream ending in
  `data: [DONE]` or carrying a clean in-band error event;
- clean error: a 4xx/5xx with `{"error": {"message", "type", "param", "code"}}`
  (a 4xx other than 429 on a valid request does not count: it is LOST);
- intended disconnect: the client left on purpose;
- LOST: anything else (a transport error from the router, no answer within
  REQUEST_TIMEOUT_S, a malformed body or event, a stream without [DONE] and
  without an error event, a bad request not answered 4xx).

Leaks: RSS (VmRSS) and open file descriptors (/proc/PID/fd) of the router
and of the "large" runtime (never restarted) are read twice, at 20% of the
run (the warm-up) and at the end, both times quiescent: traffic paused,
in-flight requests finished, the client pool closed, and the processes'
TCP connections other than their listening socket gone (the router drops
idle upstream connections after 4 s; this waits up to QUIESCE_S). So pooled
keep-alive connections count the same in both readings and the fd figures
compare like with like: no tolerance. Then, with no client left, the
router's and both runtimes' in-flight gauges must read 0 (a leaked in-flight
slot would end in false 429s).

Prints a table (requests by kind and class with latency medians, by phase
of the outage, RSS and fds); the last line is a JSON object with requests,
lost, rss_growth_router, rss_growth_runtime (end / warm-up - 1), fd_growth
(router fds, end - warm-up) and more. Exits 1 when lost > 0, either RSS
growth is >= 10%, fd_growth > 0, a process still counts requests in flight,
or the restarted "small" runtime never answered again. --outcomes writes
every request (kind, model, class, what the client saw, times, tier) as
JSON lines, for looking into a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "hack"))

from localproc import Relay, ServerProcess  # noqa: E402

# A tiny model answers in well under a second even on a busy 2-core machine;
# a request with no answer after this long is a hang, not a slow answer.
REQUEST_TIMEOUT_S = 30.0
# Client keep-alive shorter than the server's (uvicorn: 5 s), so the client
# never reuses a connection the router is closing (a client-side race, not a
# router fault).
CLIENT_KEEPALIVE_S = 2.0
QUIESCE_S = 8.0
WARMUP_AT, KILL_AT, RESTART_AT = 0.2, 0.3, 0.5
RSS_LIMIT = 0.10

ANSWERED, CLEAN_ERROR, DISCONNECT, LOST = "answered", "clean error", "disconnect", "LOST"
CLASSES = (ANSWERED, CLEAN_ERROR, DISCONNECT, LOST)

# -- what a well-formed answer is (pure) ----------------------------------------


def error_envelope(body: Any) -> bool:
    """OpenAI's error shape: exactly {"error": {"message", "type", "param", "code"}}."""
    if not isinstance(body, dict) or set(body) != {"error"}:
        return False
    err = body["error"]
    return (
        isinstance(err, dict)
        and {"message", "type", "param", "code"} <= set(err)
        and isinstance(err["message"], str)
        and bool(err["message"])
        and isinstance(err["type"], str)
        and (err["param"] is None or isinstance(err["param"], str))
        and (err["code"] is None or isinstance(err["code"], str | int))
    )


def well_formed_answer(endpoint: str, body: Any) -> bool:
    """A chat.completion or text_completion object with at least one choice."""
    if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
        return False
    if not body["choices"]:
        return False
    for choice in body["choices"]:
        if not isinstance(choice, dict) or "finish_reason" not in choice:
            return False
        if endpoint == "chat":
            msg = choice.get("message")
            if not isinstance(msg, dict) or not isinstance(msg.get("content"), str | None):
                return False
        elif not isinstance(choice.get("text"), str):
            return False
    want = "chat.completion" if endpoint == "chat" else "text_completion"
    return body.get("object") == want


@dataclass
class Verdict:
    cls: str
    detail: str = ""  # what the client saw, for a LOST request or an error
    in_band_error: bool = False
    message: str = ""  # a clean error's message


def classify_unary(endpoint: str, valid: bool, status: int, body: bytes) -> Verdict:
    try:
        parsed = json.loads(body)
    except ValueError:
        return Verdict(LOST, f"{status} with a body that is not JSON: {body[:200]!r}")
    if 200 <= status < 300:
        if not valid:
            return Verdict(LOST, f"{status} for a bad request: {body[:200]!r}")
        if well_formed_answer(endpoint, parsed):
            return Verdict(ANSWERED)
        return Verdict(LOST, f"{status} with a malformed answer: {body[:200]!r}")
    if not error_envelope(parsed):
        return Verdict(LOST, f"{status} without OpenAI's error envelope: {body[:200]!r}")
    error = parsed["error"]
    if (not valid and 400 <= status < 500) or (valid and (status == 429 or status >= 500)):
        return Verdict(CLEAN_ERROR, f"{status} {error['code']}", message=error["message"][:300])
    return Verdict(LOST, f"{status} for a {'valid' if valid else 'bad'} request: {body[:200]!r}")


def sse_data(body: bytes) -> list[bytes]:
    """The `data` of each event (events end at an empty line), or [] if none."""
    out = []
    for event in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [ln[5:].lstrip(b" ") for ln in event.split(b"\n") if ln.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(lines))
    return out


def classify_stream(endpoint: str, status: int, content_type: str, body: bytes) -> Verdict:
    if not 200 <= status < 300:
        return classify_unary(endpoint, True, status, body)
    if not content_type.startswith("text/event-stream"):
        return Verdict(LOST, f"{status} stream with content-type {content_type!r}")
    if body and not body.replace(b"\r\n", b"\n").endswith(b"\n\n"):
        return Verdict(LOST, f"stream ends inside an event: {body[-200:]!r}")
    want = "chat.completion.chunk" if endpoint == "chat" else "text_completion"
    events = sse_data(body)
    errors = 0
    for i, data in enumerate(events):
        if data == b"[DONE]":
            if i != len(events) - 1:
                return Verdict(LOST, "events after [DONE]")
            break
        try:
            parsed = json.loads(data)
        except ValueError:
            return Verdict(LOST, f"an event that is not JSON: {data[:200]!r}")
        if isinstance(parsed, dict) and "error" in parsed:
            if not error_envelope(parsed):
                return Verdict(LOST, f"an error event without the envelope: {data[:200]!r}")
            errors += 1
        elif not isinstance(parsed, dict) or parsed.get("object") != want:
            return Verdict(LOST, f"an event that is not a {want}: {data[:200]!r}")
    if errors:
        return Verdict(ANSWERED, "in-band error event", in_band_error=True)
    if events and events[-1] == b"[DONE]":
        return Verdict(ANSWERED)
    return Verdict(LOST, f"stream without [DONE] or error event: {body[-200:]!r}")


# -- requests -------------------------------------------------------------------

_TOPICS = (
    "a rainy afternoon",
    "the history of the bicycle",
    "sourdough bread",
    "black holes",
    "compound interest",
    "the water cycle",
    "TCP congestion control",
    "a job interview",
)
_ASKS = (
    "Write a short poem about {}.",
    "Explain {} to a ten-year-old.",
    "Give me three fun facts about {}.",
    "What should I know about {}?",
)
_HARD = (
    "Prove that the square root of two is irrational, then generalise the argument to any "
    "integer that is not a perfect square, and explain where the proof uses unique "
    "factorisation.",
    "A 0.5 kg mass on a spring with k = 200 N/m is displaced 3 cm and released. Derive the "
    "period, the maximum speed and the total energy, and explain what changes with damping.",
    "Which of the following best explains why enzymes lower activation energy?\n"
    "A. They raise the temperature\nB. They stabilise the transition state\n"
    "C. They change the equilibrium constant\nD. They supply ATP",
)  # fmt: skip
PROMPTS = [a.format(t) for t in _TOPICS for a in _ASKS] + list(_HARD)
CACHED_PROMPTS = ["What is 2 + 2?", "Name a colour.", "Say hello."]


@dataclass(frozen=True)
class Request:
    kind: str
    endpoint: str  # "chat" | "completions"
    body: bytes
    valid: bool = True
    stream: bool = False
    disconnect: bool = False  # the client leaves on purpose
    timeout_s: float = REQUEST_TIMEOUT_S

    @property
    def model(self) -> str:
        try:
            return str(json.loads(self.body)["model"])
        except (ValueError, KeyError):
            return "-"


def _body(endpoint: str, model: str, prompt: str, **extra: Any) -> bytes:
    if endpoint == "chat":
        payload = {"model": model, "messages": [{"role": "user", "content": prompt}]}
    else:
        payload = {"model": model, "prompt": prompt}
    return json.dumps({**payload, **extra}).encode()


def _model(rng: random.Random) -> str:
    return rng.choice(("auto", "auto", "auto", "small", "large"))


def _normal(rng: random.Random, endpoint: str, stream: bool) -> Request:
    model = _model(rng)
    body = _body(endpoint, model, rng.choice(PROMPTS), max_tokens=rng.randint(4, 24),
                 temperature=0.8, stream=stream)  # fmt: skip
    kind = f"{endpoint}{' stream' if stream else ''} {'auto' if model == 'auto' else 'pinned'}"
    return Request(kind, endpoint, body, stream=stream)


BAD_BODIES = {
    "bad: invalid JSON": b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}',
    "bad: NaN literal": b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], '
    b'"temperature": NaN}',
    "bad: wrong types": b'{"model": "auto", "messages": [{"role": "user", "content": "hi"}], '
    b'"max_tokens": "5", "stream": "yes"}',
    "bad: unknown model": b'{"model": "gpt-unknown", "messages": '
    b'[{"role": "user", "content": "hi"}]}',
    "bad: missing messages": b'{"model": "auto", "max_tokens": 4}',
}


def _bad(rng: random.Random) -> Request:
    kind = rng.choice(sorted(BAD_BODIES))
    return Request(kind, "chat", BAD_BODIES[kind], valid=False)


def _cached(rng: random.Random) -> Request:
    body = _body("chat", "auto", rng.choice(CACHED_PROMPTS), max_tokens=8, temperature=0)
    return Request("chat cacheable", "chat", body)


def _leave_unary(rng: random.Random) -> Request:
    body = _body("chat", _model(rng), rng.choice(PROMPTS), max_tokens=400, temperature=0.8)
    return Request("disconnect unary", "chat", body, disconnect=True,
                   timeout_s=rng.uniform(0.02, 0.15))  # fmt: skip


def _leave_stream(rng: random.Random) -> Request:
    body = _body("completions", _model(rng), rng.choice(PROMPTS), max_tokens=400,
                 temperature=0.8, stream=True)  # fmt: skip
    return Request("disconnect stream", "completions", body, stream=True, disconnect=True)


MIX = (
    (lambda r: _normal(r, "chat", False), 4),
    (lambda r: _normal(r, "chat", True), 3),
    (lambda r: _normal(r, "completions", False), 2),
    (lambda r: _normal(r, "completions", True), 2),
    (_cached, 1),
    (_leave_unary, 1),
    (_leave_stream, 1),
    (_bad, 2),
)


def pick(rng: random.Random) -> Request:
    makers, weights = zip(*MIX, strict=True)
    return rng.choices(makers, weights)[0](rng)


# -- processes --------------------------------------------------------------------


def tiny_models(out: Path) -> Path:
    """The demo builder's tiny preset (about 10 s), through its own CLI."""
    cmd = [sys.executable, "-m", "terrace_runtime.cli", "build-demo-models", "--out", str(out),
           "--preset", "tiny"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"build-demo-models failed:\n{done.stdout}\n{done.stderr}")
    return out


# Servers start on port 0 and log the port they bound (uvicorn says so at
# level info; neither the router nor the runtime logs a line per request).
def runtime_argv(tier: str, model: Path) -> list[str]:
    fmt = "onnx" if model.suffix == ".onnx" else "torch"
    return [sys.executable, "-m", "terrace_runtime.cli", "serve", "--model", str(model),
            "--format", fmt, "--device", "cpu", "--name", tier, "--host", "127.0.0.1",
            "--port", "0", "--threads", "1", "--log-level", "info"]  # fmt: skip


def router_argv(small: str, large: str) -> list[str]:
    return [sys.executable, "-m", "terrace_router.cli", "serve", "--tier", f"small={small}",
            "--tier", f"large={large}", "--host", "127.0.0.1", "--port", "0",
            "--log-level", "info"]  # fmt: skip


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def fd_count(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def open_connections(pid: int) -> int:
    """TCP sockets of the process other than listening ones."""
    return sum(c.status != psutil.CONN_LISTEN for c in psutil.Process(pid).net_connections("tcp"))


@dataclass
class Reading:
    rss_kib: int
    fds: int
    connections: int  # non-listening TCP sockets still open when read (0 = quiescent)


async def quiescent_readings(pids: dict[str, int]) -> dict[str, Reading]:
    """Wait (up to QUIESCE_S) until none of the processes holds a TCP
    connection, then read each one's RSS and fds."""
    deadline = time.monotonic() + QUIESCE_S
    while time.monotonic() < deadline:
        if all(open_connections(pid) == 0 for pid in pids.values()):
            break
        await asyncio.sleep(0.2)
    return {
        name: Reading(rss_kib(pid), fd_count(pid), open_connections(pid))
        for name, pid in pids.items()
    }


# -- the run ----------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str
    model: str
    verdict: Verdict
    start: float  # seconds into the run
    end: float
    tier: str = ""  # x-terrace-tier
    escalated: str = ""  # x-terrace-escalated

    @property
    def seconds(self) -> float:
        return self.end - self.start


PHASES = ("up", "at kill", "outage", "restarted")


def phase(o: Outcome, killed: float, ready: float, **_: float) -> str:
    """up: over before the kill; at kill: in flight when it came; outage:
    started while "small" was down (or starting); restarted: after it was ready."""
    if o.end < killed:
        return "up"
    if o.start < killed:
        return "at kill"
    return "outage" if o.start < ready else "restarted"


@dataclass
class Soak:
    """The clients: `concurrency` workers on one shared httpx pool, each
    sending one request at a time until `stop_at`; `pause` and `resume` give
    the quiescent moments the leak readings need."""

    router_url: str
    concurrency: int
    seed: int
    outcomes: list[Outcome] = field(default_factory=list)
    inflight: int = 0
    started: float = field(default_factory=time.monotonic)
    stop_at: float = math.inf

    def __post_init__(self) -> None:
        self.running = asyncio.Event()
        self.running.set()
        self.idle = asyncio.Event()
        self.client = self._client()

    def _client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=self.concurrency * 2,
            max_keepalive_connections=self.concurrency,
            keepalive_expiry=CLIENT_KEEPALIVE_S,
        )
        return httpx.AsyncClient(
            base_url=self.router_url, limits=limits, timeout=REQUEST_TIMEOUT_S, trust_env=False
        )

    async def pause(self) -> None:
        """Stop starting requests, let those in flight end, close the pool."""
        self.running.clear()
        while self.inflight:
            self.idle.clear()
            await self.idle.wait()
        await self.client.aclose()

    def resume(self) -> None:
        self.client = self._client()
        self.running.set()

    async def worker(self, k: int) -> None:
        rng = random.Random(self.seed * 1000 + k)
        while True:
            await self.running.wait()
            if time.monotonic() >= self.stop_at:
                return
            req = pick(rng)
            self.inflight += 1
            try:
                self.outcomes.append(await self.send(req))
            finally:
                self.inflight -= 1
                if not self.inflight:
                    self.idle.set()

    async def send(self, req: Request) -> Outcome:
        path = "/v1/chat/completions" if req.endpoint == "chat" else "/v1/completions"
        t0 = time.monotonic() - self.started
        tier = escalated = ""
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                async with self.client.stream(
                    "POST",
                    path,
                    content=req.body,
                    headers={"content-type": "application/json"},
                    timeout=httpx.Timeout(req.timeout_s, connect=5.0),
                ) as r:
                    tier = r.headers.get("x-terrace-tier", "")
                    escalated = r.headers.get("x-terrace-escalated", "")
                    if req.stream and req.disconnect and r.status_code == 200:
                        async for _ in r.aiter_raw():
                            break  # leave after the first chunk: closes the connection
                        verdict = Verdict(DISCONNECT)
                    else:
                        body = await r.aread()
                        ctype = r.headers.get("content-type", "")
                        verdict = (
                            classify_stream(req.endpoint, r.status_code, ctype, body)
                            if req.stream
                            else classify_unary(req.endpoint, req.valid, r.status_code, body)
                        )
        except httpx.TimeoutException as exc:
            if req.disconnect:
                verdict = Verdict(DISCONNECT)
            else:
                verdict = Verdict(LOST, f"client timeout: {type(exc).__name__}")
        except TimeoutError:
            verdict = Verdict(LOST, f"no answer within {REQUEST_TIMEOUT_S:.0f} s")
        except httpx.HTTPError as exc:
            verdict = Verdict(LOST, f"transport error: {type(exc).__name__}: {exc}")
        t1 = time.monotonic() - self.started
        return Outcome(req.kind, req.model, verdict, t0, t1, tier, escalated)


class Plane:
    """Two runtimes and a router, started here (each on a port it binds
    itself) and stopped by PID; "small" behind `relay`, an address held here."""

    def __init__(self, models: Path, work: Path) -> None:
        self.work = work
        self.models = {"small": models / "text-small.onnx", "large": models / "text-large.pt2"}
        self.procs: dict[str, ServerProcess] = {}
        self.restarts = 0
        self.relay: Relay | None = None

    def start_runtime(self, tier: str) -> ServerProcess:
        log = self.work / f"{tier}-{self.restarts}.log"
        argv = runtime_argv(tier, self.models[tier])
        self.procs[tier] = ServerProcess(tier, argv, 0, "/v2/health/ready", log)
        return self.procs[tier]

    def start(self) -> None:
        for tier in ("small", "large"):
            self.start_runtime(tier)
        self.procs["small"].wait(120)
        self.procs["large"].wait(120)
        self.relay = Relay()
        self.relay.target = self.procs["small"].port
        argv = router_argv(self.relay.url, self.procs["large"].url)
        self.procs["router"] = ServerProcess("router", argv, 0, "/readyz", self.work / "router.log")
        self.procs["router"].wait(120)

    def kill_small(self) -> None:
        assert self.relay is not None
        self.relay.target = None  # from now on the address resets what comes
        proc = self.procs["small"].proc
        proc.kill()  # SIGKILL, by PID
        proc.wait(10)

    def restart_small(self) -> None:
        assert self.relay is not None
        self.restarts += 1
        self.relay.target = self.start_runtime("small").wait(120).port

    def pid(self, name: str) -> int:
        return self.procs[name].proc.pid

    def stop(self) -> None:
        for proc in reversed(list(self.procs.values())):
            proc.stop()
        if self.relay is not None:
            self.relay.stop()


async def drive(plane: Plane, seconds: float, concurrency: int, seed: int) -> dict[str, Any]:
    soak = Soak(plane.procs["router"].url, concurrency, seed)
    pids = {"router": plane.pid("router"), "large": plane.pid("large")}
    start = soak.started
    soak.stop_at = start + seconds
    events: dict[str, float] = {}

    async def timeline() -> dict[str, Reading]:
        await asyncio.sleep(WARMUP_AT * seconds)
        await soak.pause()
        paused = time.monotonic()
        readings = await quiescent_readings(pids)
        soak.stop_at += time.monotonic() - paused  # the pause does not shorten the run
        soak.resume()
        await asyncio.sleep(max(0.0, start + KILL_AT * seconds - time.monotonic()))
        events["killed"] = time.monotonic() - start  # before the signal: nothing ends earlier
        await asyncio.to_thread(plane.kill_small)
        await asyncio.sleep(max(0.0, start + RESTART_AT * seconds - time.monotonic()))
        events["restart"] = time.monotonic() - start
        await asyncio.to_thread(plane.restart_small)
        events["ready"] = time.monotonic() - start
        return readings

    control = asyncio.create_task(timeline())
    await asyncio.gather(*(soak.worker(k) for k in range(concurrency)))
    warm = await control
    elapsed = time.monotonic() - start
    await soak.pause()
    end = await quiescent_readings(pids)
    # Requests the processes still count as in flight, with no client left.
    inflight = {
        "router": await asyncio.to_thread(plane.procs["router"].metric, "terrace_router_inflight"),
        **{
            tier: await asyncio.to_thread(
                plane.procs[tier].metric, "terrace_runtime_inflight_requests"
            )
            for tier in ("small", "large")
        },
    }
    return {
        "outcomes": soak.outcomes,
        "warm": warm,
        "end": end,
        "events": events,
        "elapsed": elapsed,
        "inflight": inflight,
    }


# -- report -------------------------------------------------------------------------


def log_counts(path: Path) -> tuple[int, int]:
    """Tracebacks and ERROR lines in a log."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return text.count("Traceback"), sum("ERROR" in ln for ln in text.splitlines())


def report(run: dict[str, Any], plane: Plane, minutes: float) -> tuple[dict[str, Any], bool]:
    outcomes: list[Outcome] = run["outcomes"]
    warm, end, events = run["warm"], run["end"], run["events"]
    phases = {id(o): phase(o, events["killed"], events["ready"]) for o in outcomes}
    by_class = Counter(o.verdict.cls for o in outcomes)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    latency: dict[str, list[float]] = defaultdict(list)
    by_phase: dict[str, Counter] = defaultdict(Counter)
    for o in outcomes:
        by_kind[o.kind][o.verdict.cls] += 1
        if o.verdict.cls == ANSWERED and not o.verdict.in_band_error:
            latency[o.kind].append(o.seconds)
        row = by_phase[phases[id(o)]]
        row["sent"] += 1
        row[o.verdict.cls] += 1
        if o.verdict.cls == ANSWERED:
            row[f"by {o.tier or '?'}"] += 1
            row["escalated"] += bool(o.escalated)
            row["in-band error"] += o.verdict.in_band_error
        elif o.verdict.cls == CLEAN_ERROR and not o.kind.startswith("bad"):
            row[f"{o.model}: {o.verdict.detail}"] += 1
    lost = [o for o in outcomes if o.verdict.cls == LOST]
    back = [o.start for o in outcomes if o.tier == "small" and o.start >= events["ready"]]
    small_back_s = round(min(back) - events["ready"], 1) if back else None

    def growth(name: str) -> float:
        return end[name].rss_kib / warm[name].rss_kib - 1

    figures = {
        "minutes": minutes,
        "requests": len(outcomes),
        "answered": by_class[ANSWERED],
        "clean_errors": by_class[CLEAN_ERROR],
        "disconnects": by_class[DISCONNECT],
        "lost": len(lost),
        "rss_growth_router": round(growth("router"), 4),
        "rss_growth_runtime": round(growth("large"), 4),
        "fd_growth": end["router"].fds - warm["router"].fds,
        "fd_growth_runtime": end["large"].fds - warm["large"].fds,
        "router_inflight_end": int(run["inflight"]["router"]),
        "runtime_inflight_end": int(run["inflight"]["small"] + run["inflight"]["large"]),
        "small_back_after_restart_s": small_back_s,
        "rps": round(len(outcomes) / run["elapsed"], 1),
    }

    print(
        f"soak: {run['elapsed']:.0f} s of traffic, {len(outcomes)} requests "
        f"({figures['rps']}/s); small SIGKILLed at {events['killed']:.1f} s, restarted at "
        f"{events['restart']:.1f} s, ready at {events['ready']:.1f} s, answering again "
        f"{small_back_s} s after that"
    )
    print()
    header = f"{'kind':26} {'sent':>6} " + " ".join(f"{c:>11}" for c in CLASSES) + "  p50 ms"
    print(header)
    print("-" * len(header))
    for kind in sorted(by_kind):
        c = by_kind[kind]
        p50 = f"{statistics.median(latency[kind]) * 1e3:7.1f}" if latency[kind] else "      -"
        cells = " ".join(f"{c[k]:>11}" for k in CLASSES)
        print(f"{kind:26} {sum(c.values()):>6} {cells}  {p50}")
    cells = " ".join(f"{by_class[k]:>11}" for k in CLASSES)
    print(f"{'all':26} {len(outcomes):>6} {cells}")
    print()
    print("by phase (answered: by the tier in x-terrace-tier; errors on valid requests):")
    for name in PHASES:
        row = by_phase[name]
        rest = ", ".join(
            f"{k} {v}" for k, v in sorted(row.items()) if k != "sent" and k not in CLASSES and v
        )
        classes = ", ".join(f"{k} {row[k]}" for k in CLASSES)
        print(f"  {name:9} sent {row['sent']:>5}: {classes}; {rest or '-'}")
    print()
    print(
        f"{'process':16} {'RSS MiB warm':>13} {'RSS MiB end':>12} {'growth':>8} "
        f"{'fds warm':>9} {'fds end':>8} {'TCP conns warm/end':>19}"
    )
    for name, label in (("router", "router"), ("large", "runtime (large)")):
        w, e = warm[name], end[name]
        print(
            f"{label:16} {w.rss_kib / 1024:13.1f} {e.rss_kib / 1024:12.1f} "
            f"{e.rss_kib / w.rss_kib - 1:8.1%} {w.fds:9} {e.fds:8} "
            f"{w.connections:>10}/{e.connections}"
        )
    print(
        "requests in flight at the end, with no client left: "
        + ", ".join(f"{k} {v:.0f}" for k, v in run["inflight"].items())
    )
    for name in ("router", "large", "small"):
        proc = plane.procs[name]
        tb, err = log_counts(proc.log_path) if proc.log_path else (0, 0)
        print(f"{name} log: {tb} tracebacks, {err} ERROR lines")
    if lost:
        print()
        print(f"LOST requests ({len(lost)}), the first 20:")
        for o in lost[:20]:
            print(
                f"  {o.kind} [{phases[id(o)]}] at {o.start:.2f} s, after {o.seconds:.2f} s: "
                f"{o.verdict.detail}"
            )

    failures = []
    if lost:
        failures.append(f"{len(lost)} lost")
    for name in ("router", "large"):
        if growth(name) >= RSS_LIMIT:
            failures.append(f"{name} RSS grew {growth(name):.1%}")
    if figures["fd_growth"] > 0:
        failures.append(f"router fds grew by {figures['fd_growth']}")
    for name, held in run["inflight"].items():
        if held:
            failures.append(f"{name} still counts {held:.0f} requests in flight")
    if small_back_s is None:
        failures.append("the restarted small runtime never answered")
    print()
    print("result:", "; ".join(failures) if failures else "ok")
    return figures, not failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--outcomes", type=Path, help="write every request here as a JSON line")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs")
    parser.add_argument(
        "--models", type=Path, help="a build-demo-models folder (default: build the tiny preset)"
    )
    args = parser.parse_args()
    seconds = args.minutes * 60
    if seconds < 20:
        parser.error("--minutes: at least 20 seconds, for warm-up, outage and restart")

    work = Path(tempfile.mkdtemp(prefix="terrace-soak-"))
    ok = False
    plane = None
    figures: dict[str, Any] = {}
    try:
        models = args.models or tiny_models(work / "models")
        plane = Plane(models, work)
        plane.start()
        run = asyncio.run(drive(plane, seconds, args.concurrency, args.seed))
        figures, ok = report(run, plane, args.minutes)
        if args.outcomes:
            with args.outcomes.open("w") as fh:
                for o in run["outcomes"]:
                    fh.write(json.dumps({**asdict(o), "phase": phase(o, **run["events"])}) + "\n")
    finally:
        if plane is not None:
            plane.stop()
        if ok and not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}")
    print(json.dumps(figures))
    return 0 if ok else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
