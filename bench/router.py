"""Router benchmark: classifier cost, added latency, and throughput on one core
versus LiteLLM's proxy in front of the same stub backend, in one run.

    python bench/router.py [--duration 5] [--requests 2000] [--skip-litellm]

Two prompt sets go through the router: exam-shaped prompts from the shared
MMLU data (the classifier's sentence encoder runs on every one) and
chat-shaped prompts (scored by the classifier's prior, no encoder).

Prints a table; the last line is a JSON object with classifier_p99_us (exam
prompts of 2,000 characters), classifier_p99_us_by_size, added_p50_ms,
added_p99_ms and rps (exam prompts), chat (the same for chat prompts),
ratio_rps_exam / ratio_rps_chat and litellm_rps (null when LiteLLM's proxy
is not installed: `pip install 'litellm[proxy]'`, or point --litellm-bin at
a `litellm` executable from another environment).

Processes, all on 127.0.0.1 and stopped by PID at the end:
- stub: a minimal OpenAI-shaped HTTP/1.1 server (raw asyncio, canned JSON),
  fast enough never to be the bottleneck;
- router: `terrace-router serve` in front of the stub (two tiers, built-in
  classifier, calibration and low-confidence checks on, cache off);
- litellm: `litellm --config` in front of the same stub;
- load: a separate process driving keep-alive connections (sequential
  requests for latency; a closed loop of N connections for throughput).
The router and LiteLLM are each pinned to one core with `taskset`; the stub
and the load generator get the other cores. Every phase is bounded in
request count and seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Both proxies check this Bearer key (LiteLLM refuses to start without a master key).
BENCH_KEY = "sk-terrace-bench-7f3a9c1e5b2d4f6a8c0e2b4d6f8a0c2e"
DATA = Path(
    os.environ.get(
        "TERRACE_ROUTING_DATA", ROOT.parent / "shared" / "data" / "routing" / "mmlu_routing.jsonl"
    )
)

# -- stub backend (runs in its own process) -----------------------------------

_CHAT = json.dumps(
    {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": 1,
        "model": "stub",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "The answer is B."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55},
    }
).encode()
_MODELS = json.dumps(
    {
        "object": "list",
        "data": [{"id": "stub", "object": "model", "created": 1, "owned_by": "stub"}],
    }
).encode()


def _http_response(body: bytes, status: bytes = b"200 OK") -> bytes:
    return (
        b"HTTP/1.1 "
        + status
        + b"\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


class _StubProtocol(asyncio.Protocol):
    chat = _http_response(_CHAT)
    models = _http_response(_MODELS)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end].lower()
            length = 0
            pos = head.find(b"content-length:")
            if pos >= 0:
                length = int(
                    head[
                        pos + 15 : head.find(b"\r\n", pos)
                        if head.find(b"\r\n", pos) > 0
                        else len(head)
                    ].strip()
                )
            total = end + 4 + length
            if len(self.buf) < total:
                return
            path = head.split(b" ", 2)[1]
            self.buf = self.buf[total:]
            self.transport.write(self.models if path.endswith(b"/models") else self.chat)  # type: ignore[attr-defined]


def run_stub(port: int) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(_StubProtocol, "127.0.0.1", port, backlog=1024)
    )
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    try:
        loop.run_forever()
    finally:
        server.close()


# -- load generator (runs in its own process) ---------------------------------


def _request_bytes(port: int, prompt: str) -> bytes:
    body = json.dumps(
        {"model": "auto", "max_tokens": 16, "messages": [{"role": "user", "content": prompt}]}
    ).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:"
        + str(port).encode()
        + b"\r\ncontent-type: application/json\r\nauthorization: Bearer "
        + BENCH_KEY.encode()
        + b"\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )


async def _roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    low = head.lower()
    pos = low.find(b"content-length:")
    if pos < 0:
        raise RuntimeError("response without content-length")
    length = int(low[pos + 15 : low.find(b"\r\n", pos)].strip())
    await reader.readexactly(length)
    return status


async def _latency(port: int, prompts: list[str], n: int, warmup: int, seconds: float) -> dict:
    reqs = [_request_bytes(port, p) for p in prompts]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    samples = []
    errors = 0
    deadline = time.monotonic() + seconds
    for i in range(warmup + n):
        t0 = time.perf_counter()
        status = await _roundtrip(reader, writer, reqs[i % len(reqs)])
        dt = time.perf_counter() - t0
        if status != 200:
            errors += 1
        if i >= warmup:
            samples.append(dt)
        if time.monotonic() > deadline:
            break
    writer.close()
    samples.sort()
    return {
        "n": len(samples),
        "errors": errors,
        "p50_ms": 1000 * samples[len(samples) // 2],
        "p99_ms": 1000 * samples[min(len(samples) - 1, int(len(samples) * 0.99))],
    }


async def _throughput(port: int, prompts: list[str], conns: int, seconds: float) -> dict:
    reqs = [_request_bytes(port, p) for p in prompts]
    done = 0
    errors = 0
    stop = time.monotonic() + seconds
    measuring_from = time.monotonic() + min(1.0, seconds / 4)  # warm-up excluded
    counted = 0

    async def worker(k: int) -> None:
        nonlocal done, errors, counted
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = k
        try:
            while time.monotonic() < stop:
                status = await _roundtrip(reader, writer, reqs[i % len(reqs)])
                i += conns
                done += 1
                if status != 200:
                    errors += 1
                if time.monotonic() >= measuring_from:
                    counted += 1
        finally:
            writer.close()

    results = await asyncio.gather(*[worker(k) for k in range(conns)], return_exceptions=True)
    failed = sum(isinstance(r, Exception) for r in results)
    window = seconds - (measuring_from - (stop - seconds))
    return {
        "conns": conns,
        "requests": done,
        "errors": errors + failed,
        "rps": counted / window if window > 0 else 0.0,
    }


def run_load(args: argparse.Namespace) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    prompts = json.loads(Path(args.prompts).read_text())
    if args.mode == "latency":
        out = asyncio.run(_latency(args.port, prompts, args.n, args.warmup, args.seconds))
    else:
        out = asyncio.run(_throughput(args.port, prompts, args.conns, args.seconds))
    print(json.dumps(out))


# -- orchestration ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pin(cpus: list[int]) -> list[str]:
    return ["taskset", "-c", ",".join(map(str, cpus))] if shutil.which("taskset") else []


class Procs:
    """Processes started here, stopped by PID (TERM, then KILL)."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(
        self, cmd: list[str], log: Path, env: dict[str, str] | None = None
    ) -> subprocess.Popen:
        fh = open(log, "wb")  # noqa: SIM115 - owned by the child process until it exits
        p = subprocess.Popen(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            self.stop(p)


def _wait_http(port: int, path: str, proc: subprocess.Popen, timeout: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"process exited ({proc.returncode}); log:\n{log.read_text()[-3000:]}"
            )
        try:
            if (
                httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2, trust_env=False).status_code
                < 500
            ):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"port {port} not ready after {timeout}s; log:\n{log.read_text()[-3000:]}")


def _load(
    cpus: list[int], prompts: Path, port: int, mode: str, timeout: float, **kw: object
) -> dict:
    cmd = _pin(cpus) + [
        sys.executable,
        __file__,
        "_load",
        "--prompts",
        str(prompts),
        "--port",
        str(port),
        "--mode",
        mode,
    ]
    for k, v in kw.items():
        cmd += [f"--{k}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _prompts(n: int = 200) -> list[str]:
    """Exam-shaped prompts (the shared MMLU rows): the classifier runs its encoder."""
    rows = []
    if DATA.exists():
        with DATA.open() as fh:
            rows = [json.loads(line)["prompt"] for _, line in zip(range(4000), fh, strict=False)]
    rng = random.Random(7)
    rng.shuffle(rows)
    prompts = [p[:2000] for p in rows[:n]]
    return prompts or ["What is 2 + 2?", "Prove that there are infinitely many primes." * 10]


# Chat-shaped prompts, unlike the exam questions the built-in classifier was
# trained on: it scores them by its domain-free prior, without the encoder.
_CHAT_TOPICS = ("a rainy afternoon", "the history of the bicycle", "sourdough bread",
                "black holes", "a job interview", "the French Revolution", "TCP congestion "
                "control", "a birthday party for a six-year-old", "compound interest",
                "the water cycle")
_CHAT_ASKS = ("Write a short poem about {}.", "Explain {} to a ten-year-old.",
              "Give me three fun facts about {}.", "Summarise what matters most about {}.",
              "What should I know before reading about {}?")


def _chat_prompts() -> list[str]:
    return [ask.format(topic) for topic in _CHAT_TOPICS for ask in _CHAT_ASKS]


def _sized(texts: list[str], chars: int) -> list[str]:
    """Each text brought to `chars` characters: cut, or its body repeated
    before its last line (for an exam prompt: the choices stay at the end)."""
    out = []
    for t in texts:
        head, _, last = t.rpartition("\n") if "\n" in t else (t, "", "")
        tail = ("\n" + last) if last else ""
        body = (head + " ") * (chars // max(len(head) + 1, 1) + 1)
        out.append(body[: max(chars - len(tail), 1)] + tail)
    return out


def bench_classifier(exam: list[str], calls: int) -> list[dict]:
    """Wall and CPU time per score() call on one thread, by prompt size and
    kind, and the share of calls that ran the sentence encoder."""
    from terrace_router.classifier import Classifier

    clf = Classifier.load("builtin")
    short_exam = [p for p in exam if 60 <= len(p) <= 160] or exam
    out = []
    for kind, base in (("exam", exam), ("chat", _chat_prompts())):
        for chars in (100, 2000, 8000):
            texts = (short_exam if kind == "exam" else base) if chars == 100 else _sized(
                base, chars)
            for t in texts[:20]:
                clf.score(t)
            wall, cpu = [], []
            for i in range(calls):
                t = texts[i % len(texts)]
                c0 = time.thread_time_ns()
                t0 = time.perf_counter_ns()
                clf.score(t)
                wall.append(time.perf_counter_ns() - t0)
                cpu.append(time.thread_time_ns() - c0)
            wall.sort()
            cpu.sort()
            p99 = int(len(wall) * 0.99)
            encoded = sum(clf.needs_encoder(clf.features(t)) for t in texts) / len(texts)
            out.append({
                "kind": kind, "chars": chars,
                "mean_chars": sum(len(t) for t in texts) / len(texts),
                "p50_us": wall[len(wall) // 2] / 1000, "p99_us": wall[p99] / 1000,
                "cpu_p99_us": cpu[p99] / 1000, "encoder_share": encoded,
            })
    return out


def _router_config(stub: str, tmp: Path) -> Path:
    from terrace_router.config import RouterConfig

    cfg = RouterConfig.model_validate(
        {
            "tiers": [
                {"name": "small", "endpoints": [stub], "maxInflightPerEndpoint": 1024},
                {"name": "large", "endpoints": [stub], "maxInflightPerEndpoint": 1024},
            ],
            "cache": {"enabled": False},
            "auth": {"apiKeysEnv": "TERRACE_BENCH_KEYS"},
        }
    )
    path = tmp / "router.yaml"
    path.write_text(cfg.dump())
    return path


def _litellm_config(stub: str, tmp: Path) -> Path:
    path = tmp / "litellm.yaml"
    path.write_text(
        "model_list:\n"
        "  - model_name: auto\n"
        "    litellm_params:\n"
        "      model: openai/stub\n"
        f"      api_base: {stub}/v1\n"
        "      api_key: sk-stub\n"
        "general_settings:\n"
        f"  master_key: {BENCH_KEY}\n"
        "litellm_settings:\n"
        "  set_verbose: false\n"
        "  telemetry: false\n"
        "  request_timeout: 60\n"
    )
    return path


def _find_litellm(arg: str | None) -> str | None:
    if arg:
        return arg
    found = shutil.which("litellm")
    if found:
        return found
    venv = Path(__file__).resolve().parent.parent / ".cache" / "bench-venv" / "bin" / "litellm"
    return str(venv) if venv.exists() else None


def _tree_cpu_seconds(pid: int) -> float:
    """User+system CPU of a process and its descendants (LiteLLM may fork workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree = {pid}
    grew = True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in tree and child not in tree:
                tree.add(child)
                grew = True
    return sum(cpu.get(p, 0.0) for p in tree)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    ap.add_argument(
        "--requests", type=int, default=2000, help="sequential requests per latency run"
    )
    ap.add_argument("--conns", default="16,64", help="connection counts tried for max throughput")
    ap.add_argument("--classifier-calls", type=int, default=5000)
    ap.add_argument("--skip-litellm", action="store_true")
    ap.add_argument("--litellm-bin", default=None)
    args = ap.parse_args()

    cpus = sorted(os.sched_getaffinity(0))
    server_cpu = [cpus[0]]
    other_cpus = cpus[1:] or cpus
    conn_levels = [int(c) for c in args.conns.split(",")]
    prompts = _prompts()
    rows: list[tuple[str, str]] = []
    result: dict[str, object] = {"litellm_rps": None}
    load_before = os.getloadavg()[0]
    procs = Procs()
    with tempfile.TemporaryDirectory(prefix="terrace-bench-") as tmpdir:
        tmp = Path(tmpdir)
        prompts_file = tmp / "prompts.json"
        prompts_file.write_text(json.dumps(prompts))

        def latency(port: int, n: int, file: Path = prompts_file) -> dict:
            return _load(
                other_cpus,
                file,
                port,
                "latency",
                180,
                n=n,
                warmup=min(200, n // 5),
                seconds=90,
            )

        def max_rps(pid: int, port: int, file: Path = prompts_file) -> tuple[float, float, str]:
            """Best closed-loop req/s over the connection counts, and req per
            CPU-second of the server (immune to other load on the machine)."""
            best, best_per_cpu, best_conns, errors = 0.0, 0.0, 0, ""
            for conns in conn_levels:
                cpu0 = _tree_cpu_seconds(pid)
                r = _load(
                    other_cpus,
                    file,
                    port,
                    "throughput",
                    args.duration + 60,
                    conns=conns,
                    seconds=args.duration,
                )
                used = _tree_cpu_seconds(pid) - cpu0
                if r["errors"]:
                    errors += f"; {conns} conns: {r['errors']} errors"
                    continue
                per_cpu = r["requests"] / used if used > 0 else 0.0
                if r["rps"] > best:
                    best, best_conns = r["rps"], conns
                best_per_cpu = max(best_per_cpu, per_cpu)
            return best, best_per_cpu, f"{best_conns} conns{errors}"

        try:
            sizes = bench_classifier(prompts, args.classifier_calls)
            for r in sizes:
                rows.append((
                    f"classifier score p50 / p99, {r['kind']} prompts of ~{r['mean_chars']:.0f} "
                    f"chars", f"{r['p50_us']:.0f} / {r['p99_us']:.0f} us (CPU p99 "
                    f"{r['cpu_p99_us']:.0f} us; encoder ran on {r['encoder_share']:.0%})"))
            at_2000 = next(r for r in sizes if r["kind"] == "exam" and r["chars"] == 2000)
            result["classifier_p99_us"] = round(at_2000["p99_us"], 1)
            result["classifier_cpu_p99_us"] = round(at_2000["cpu_p99_us"], 1)
            result["classifier_p99_us_by_size"] = {
                f"{r['kind']}_{r['chars']}": round(r["p99_us"], 1) for r in sizes}

            stub_port = _free_port()
            stub_log = tmp / "stub.log"
            stub = procs.start(
                _pin(other_cpus) + [sys.executable, __file__, "_stub", "--port", str(stub_port)],
                stub_log,
            )
            _wait_http(stub_port, "/v1/models", stub, 30, stub_log)
            stub_url = f"http://127.0.0.1:{stub_port}"

            chat_file = tmp / "chat.json"
            chat_file.write_text(json.dumps(_chat_prompts()))
            direct = latency(stub_port, args.requests, prompts_file)
            rows.append(("stub direct latency p50 / p99",
                         f"{direct['p50_ms']:.3f} / {direct['p99_ms']:.3f} ms"))
            per_set: dict[str, dict] = {}
            for set_name, set_file in (("exam", prompts_file), ("chat", chat_file)):
                router_port = _free_port()
                router_log = tmp / "router.log"
                router = procs.start(
                    _pin(server_cpu)
                    + [
                        shutil.which("terrace-router") or "terrace-router",
                        "serve",
                        "--config",
                        str(_router_config(stub_url, tmp)),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(router_port),
                        "--log-level",
                        "warning",
                    ],
                    router_log,
                    env=dict(os.environ, TERRACE_BENCH_KEYS=BENCH_KEY),
                )
                _wait_http(router_port, "/readyz", router, 120, router_log)

                cpu0 = _tree_cpu_seconds(router.pid)
                via = latency(router_port, args.requests, set_file)
                cpu_per_req_us = (
                    1e6
                    * (_tree_cpu_seconds(router.pid) - cpu0)
                    / (args.requests + min(200, args.requests // 5))
                )
                rps, rps_cpu, rps_detail = max_rps(router.pid, router_port, set_file)
                procs.stop(router)
                per_set[set_name] = dict(
                    added_p50_ms=round(via["p50_ms"] - direct["p50_ms"], 3),
                    added_p99_ms=round(via["p99_ms"] - direct["p99_ms"], 3),
                    rps=round(rps, 1),
                    rps_per_cpu_second=round(rps_cpu, 1),
                    cpu_per_request_us=round(cpu_per_req_us, 1),
                )
                rows.append((f"[{set_name} prompts] via terrace-router latency p50 / p99",
                             f"{via['p50_ms']:.3f} / {via['p99_ms']:.3f} ms"))
                rows.append((f"[{set_name} prompts] terrace-router added p50 / p99",
                             f"{per_set[set_name]['added_p50_ms']:.3f} / "
                             f"{per_set[set_name]['added_p99_ms']:.3f} ms"))
                rows.append((f"[{set_name} prompts] terrace-router CPU per request",
                             f"{cpu_per_req_us:.0f} us"))
                rows.append((f"[{set_name} prompts] terrace-router max req/s, 1 core",
                             f"{rps:.0f} ({rps_detail})"))
                rows.append((f"[{set_name} prompts] terrace-router req per CPU-second",
                             f"{rps_cpu:.0f}"))
            # Headline figures: exam prompts, where the encoder runs on every request.
            result.update(per_set["exam"])
            result["chat"] = per_set["chat"]
            rps, rps_cpu = per_set["exam"]["rps"], per_set["exam"]["rps_per_cpu_second"]

            litellm_bin = None if args.skip_litellm else _find_litellm(args.litellm_bin)
            if litellm_bin:
                ll_port = _free_port()
                ll_log = tmp / "litellm.log"
                env = dict(
                    os.environ,
                    LITELLM_LOG="ERROR",
                    LITELLM_TELEMETRY="False",
                    NO_DOCS="True",
                    DISABLE_ADMIN_UI="True",
                )
                ll = procs.start(
                    _pin(server_cpu)
                    + [
                        litellm_bin,
                        "--config",
                        str(_litellm_config(stub_url, tmp)),
                        "--host",
                        "127.0.0.1",
                        "--port",
                        str(ll_port),
                        "--num_workers",
                        "1",
                    ],
                    ll_log,
                    env=env,
                )
                _wait_http(ll_port, "/health/liveliness", ll, 240, ll_log)
                ll_lat = latency(ll_port, min(args.requests, 500))
                ll_added = ll_lat["p50_ms"] - direct["p50_ms"]
                rows.append(
                    (
                        "via litellm proxy latency p50 / p99",
                        f"{ll_lat['p50_ms']:.3f} / {ll_lat['p99_ms']:.3f} ms",
                    )
                )
                ll_rps, ll_cpu, ll_detail = max_rps(ll.pid, ll_port)
                rows.append(
                    ("litellm proxy max req/s, pinned to 1 core", f"{ll_rps:.0f} ({ll_detail})")
                )
                rows.append(("litellm proxy req per CPU-second", f"{ll_cpu:.0f}"))
                if ll_rps and ll_cpu:
                    for set_name, r in per_set.items():
                        rows.append((
                            f"throughput terrace ({set_name} prompts) / litellm "
                            f"(req/s; per CPU-second)",
                            f"{r['rps'] / ll_rps:.2f}x; {r['rps_per_cpu_second'] / ll_cpu:.2f}x"))
                    result["ratio_rps_exam"] = round(per_set["exam"]["rps"] / ll_rps, 2)
                    result["ratio_rps_chat"] = round(per_set["chat"]["rps"] / ll_rps, 2)
                procs.stop(ll)
                result.update(
                    litellm_rps=round(ll_rps, 1),
                    litellm_rps_per_cpu_second=round(ll_cpu, 1),
                    litellm_added_p50_ms=round(ll_added, 3),
                )
            else:
                rows.append(("litellm proxy", "not installed (pip install 'litellm[proxy]')"))
        finally:
            procs.stop_all()

    load_after = os.getloadavg()[0]
    rows.append(
        (
            "machine: cpus / load average before, after",
            f"{len(cpus)} / {load_before:.1f}, {load_after:.1f}",
        )
    )
    width = max(len(k) for k, _ in rows)
    print(f"{'measure':<{width}}  value")
    print("-" * (width + 30))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if max(load_before, load_after) > len(cpus):
        print(
            f"note: the machine was busy (load > {len(cpus)} cpus); wall-clock figures are "
            "inflated, per-CPU-second figures are not"
        )
    result["cpus"] = len(cpus)
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_stub":
        p = argparse.ArgumentParser()
        p.add_argument("_stub")
        p.add_argument("--port", type=int, required=True)
        run_stub(p.parse_args().port)
    elif len(sys.argv) > 1 and sys.argv[1] == "_load":
        p = argparse.ArgumentParser()
        p.add_argument("_load")
        p.add_argument("--prompts", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--mode", choices=["latency", "throughput"], required=True)
        p.add_argument("--n", type=int, default=1000)
        p.add_argument("--warmup", type=int, default=100)
        p.add_argument("--conns", type=int, default=32)
        p.add_argument("--seconds", type=float, default=5.0)
        run_load(p.parse_args())
    else:
        main()
