"""Benchmark terrace-runtime on the tensor demo model (CPU, onnxruntime).

    python bench/runtime.py [--models DIR] [--requests 600] [--concurrency 32]

Prints a table:
  1. server overhead at batch 1: p50 latency of POST /v2/models/mlp/infer vs
     onnxruntime.InferenceSession.run called directly with the same session
     options (target: server p50 <= direct p50 x 1.10 + 0.5 ms), and vs a bare
     asyncio server that hands the same run to a thread (bench/bare_server.py;
     target: at most 0.3 ms more);
  2. dynamic batching: throughput at concurrency 32 with --max-batch-size 32
     vs --max-batch-size 1 (target: >= 3x);
  3. int8 dynamic quantization vs fp32: file size and direct latency.
  4. language models (bench/llm.py): Gemma 3 270M on Terrace's onnxruntime-genai
     runtime, Terrace's torch runtime and llama.cpp's llama-server on the same
     cores: tokens/s at concurrency 1 and 8, time to first token, inter-token
     latency, peak RSS (targets: onnx >= 1.5x llama-server's tokens/s at
     concurrency 8; inter-token latency at concurrency 1 within 10% of a bare
     onnxruntime-genai generate loop).
The last line is JSON: overhead_p50_ms, overhead_vs_bare_ms, overhead_ratio, batching_gain,
int8_speedup, ort_tps_c8, llamacpp_tps_c8, ratio_c8, itl_overhead_c1, torch_tps_c8.

The client speaks raw HTTP/1.1 over keep-alive sockets with a pre-encoded
body, so that on a small machine the load generator costs little CPU next to
the server it measures. Servers bind 127.0.0.1 and are stopped by PID.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from llm import run_llm_bench
from terrace_runtime.cgroup import container_threads
from terrace_runtime.models import session_options
from terrace_runtime.quantize import quantize_int8

MODEL_NAME = "mlp"


def build_tensor_model(out: Path) -> Path:
    """Only the demo preset's MLP (seconds), unless --models points at a build."""
    import torch
    from terrace_runtime.demo_models import PRESETS, export_onnx, mlp_metadata, train_mlp

    cfg = PRESETS["demo"].mlp
    model = train_mlp(cfg, seed=2)
    path = out / "tensor-mlp.onnx"
    export_onnx(model, (torch.zeros(3, cfg.features),), path, mlp_metadata(cfg))
    return path


def features_of(path: Path) -> int:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return int(session.get_inputs()[0].shape[1])


SPINNING = False  # set from --spinning: the server and the direct baseline agree


def direct_latency(path: Path, batch: int, iterations: int, threads: int) -> float:
    """p50 seconds of InferenceSession.run, with the options the runtime uses."""
    session = ort.InferenceSession(
        str(path), session_options(threads, SPINNING), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(0).normal(size=(batch, features_of(path))).astype(np.float32)
    for _ in range(30):
        session.run(None, {"input": x})
    samples = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        session.run(None, {"input": x})
        samples.append(time.perf_counter() - t0)
    return float(np.median(samples))


# --- a minimal, cheap HTTP/1.1 client ---------------------------------------------


def request_bytes(port: int, features: int) -> bytes:
    x = np.random.default_rng(1).normal(size=(1, features)).astype(np.float32)
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": [1, features],
                    "datatype": "FP32",
                    "data": x.ravel().tolist(),
                }
            ]
        }
    ).encode()
    head = (
        f"POST /v2/models/{MODEL_NAME}/infer HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def _content_length(head: bytes) -> tuple[int, int]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return status, int(value)
    raise RuntimeError(f"no content-length in {head!r}")


class Sequential:
    """One keep-alive connection sending requests one at a time."""

    def __init__(self, port: int, payload: bytes) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.stream = self.sock.makefile("rb")
        self.payload = payload

    def once(self) -> float:
        t0 = time.perf_counter()
        self.sock.sendall(self.payload)
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            head += self.stream.readline()
        status, length = _content_length(head)
        self.stream.read(length)
        if status != 200:
            raise RuntimeError(f"HTTP {status}")
        return time.perf_counter() - t0

    def close(self) -> None:
        self.stream.close()
        self.sock.close()


def interleaved_overhead(
    path: Path, port: int, payload: bytes, iterations: int, threads: int
) -> tuple[float, float]:
    """p50 of direct run() and of the server at batch 1, measured in alternating
    rounds so that both see the same background load (this machine is shared)."""
    session = ort.InferenceSession(
        str(path), session_options(threads, SPINNING), providers=["CPUExecutionProvider"]
    )
    x = np.random.default_rng(1).normal(size=(1, features_of(path))).astype(np.float32)
    client = Sequential(port, payload)
    direct: list[float] = []
    served: list[float] = []
    try:
        for _ in range(50):  # warm both
            session.run(None, {"input": x})
            client.once()
        rounds = max(1, iterations // 20)
        for _ in range(rounds):
            for _ in range(20):
                t0 = time.perf_counter()
                session.run(None, {"input": x})
                direct.append(time.perf_counter() - t0)
            for _ in range(20):
                served.append(client.once())
    finally:
        client.close()
    return float(np.median(direct)), float(np.median(served))


def interleaved_servers(
    port_a: int, port_b: int, payload_a: bytes, payload_b: bytes, iterations: int
) -> tuple[float, float]:
    """p50 of two servers at batch 1, in alternating rounds of 20 requests."""
    a, b = Sequential(port_a, payload_a), Sequential(port_b, payload_b)
    first: list[float] = []
    second: list[float] = []
    try:
        for _ in range(50):
            a.once()
            b.once()
        for _ in range(max(1, iterations // 20)):
            first += [a.once() for _ in range(20)]
            second += [b.once() for _ in range(20)]
    finally:
        a.close()
        b.close()
    return float(np.median(first)), float(np.median(second))


class BareServer:
    """bench/bare_server.py: asyncio, the same session.run in a thread, nothing else."""

    def __init__(self, model: Path, threads: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        argv = [sys.executable, str(Path(__file__).parent / "bare_server.py"), str(model),
                str(self.port), str(threads), *(["--spinning"] if SPINNING else [])]  # fmt: skip
        self.proc = subprocess.Popen(argv)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the bare server exited")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("the bare server did not listen")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _worker(port: int, payload: bytes, count: int, statuses: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for _ in range(count):
            writer.write(payload)
            head = await reader.readuntil(b"\r\n\r\n")
            status, length = _content_length(head)
            await reader.readexactly(length)
            statuses.append(status)
    finally:
        writer.close()


def throughput(port: int, payload: bytes, concurrency: int, total: int) -> tuple[float, int]:
    """Requests per second with `concurrency` clients; and how many were not 200."""
    per_worker = max(1, total // concurrency)

    async def run() -> tuple[float, list[int]]:
        statuses: list[int] = []
        await asyncio.gather(*[_worker(port, payload, 5, []) for _ in range(concurrency)])
        t0 = time.perf_counter()
        await asyncio.gather(
            *[_worker(port, payload, per_worker, statuses) for _ in range(concurrency)]
        )
        return time.perf_counter() - t0, statuses

    wall, statuses = asyncio.run(run())
    return len(statuses) / wall, sum(1 for s in statuses if s != 200)


# --- servers ---------------------------------------------------------------------------


class Server:
    def __init__(self, model: Path, *extra: str) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = int(s.getsockname()[1])
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "terrace_runtime.cli",
                "serve",
                "--model",
                str(model),
                "--format",
                "onnx",
                "--name",
                MODEL_NAME,
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
                *extra,
            ],
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("the runtime exited")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                    sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
                    if b" 200 " in sock.recv(200):
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError("the runtime did not become ready")

    def mean_batch(self) -> float:
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        values = {}
        for line in data.decode().splitlines():
            if line.startswith("terrace_runtime_batch_size_sum") or line.startswith(
                "terrace_runtime_batch_size_count"
            ):
                values[line.split("{")[0]] = float(line.rsplit(" ", 1)[1])
        return values["terrace_runtime_batch_size_sum"] / max(
            1.0, values["terrace_runtime_batch_size_count"]
        )

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="a build-demo-models output directory")
    parser.add_argument("--requests", type=int, default=600, help="latency samples per case")
    parser.add_argument(
        "--total", type=int, default=4800, help="requests per throughput case, over all rounds"
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="alternating throughput rounds")
    parser.add_argument(
        "--spinning", action="store_true", help="serve and measure with onnxruntime spinning on"
    )
    parser.add_argument("--no-llm", action="store_true", help="skip the language-model table")
    args = parser.parse_args()
    global SPINNING
    SPINNING = args.spinning

    work = Path(tempfile.mkdtemp(prefix="terrace-bench-"))
    try:
        if args.models:
            shutil.copy(args.models / "tensor-mlp.onnx", work / "tensor-mlp.onnx")
            fp32 = work / "tensor-mlp.onnx"
        else:
            fp32 = build_tensor_model(work)
        int8 = quantize_int8(fp32, work / "cache")
        sizes = {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}
        threads = container_threads()
        features = features_of(fp32)
        n = args.requests

        fp32_p50 = direct_latency(fp32, 1, n, threads)
        fp32_b32 = direct_latency(fp32, 32, n // 4, threads)
        int8_p50 = direct_latency(int8, 1, n, threads)
        int8_b32 = direct_latency(int8, 32, n // 4, threads)

        server = Server(fp32)
        single = Server(fp32, "--max-batch-size", "1")
        bare = BareServer(fp32, threads)
        try:
            direct_p50, server_p50 = interleaved_overhead(
                fp32, server.port, request_bytes(server.port, features), n, threads
            )
            bare_p50, served_p50 = interleaved_servers(
                bare.port,
                server.port,
                request_bytes(bare.port, features),
                request_bytes(server.port, features),
                n,
            )
            # Alternate the two servers over a few rounds and take medians: the
            # background load of a shared machine drifts over a minute.
            batched: list[float] = []
            unbatched: list[float] = []
            batched_errors = single_errors = 0
            per_round = max(args.concurrency, args.total // args.rounds)
            for _ in range(args.rounds):
                rps, errors = throughput(
                    single.port,
                    request_bytes(single.port, features),
                    args.concurrency,
                    per_round,
                )
                unbatched.append(rps)
                single_errors += errors
                rps, errors = throughput(
                    server.port,
                    request_bytes(server.port, features),
                    args.concurrency,
                    per_round,
                )
                batched.append(rps)
                batched_errors += errors
            batched_rps, single_rps = float(np.median(batched)), float(np.median(unbatched))
            mean_batch = server.mean_batch()
        finally:
            server.stop()
            single.stop()
            bare.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    overhead = server_p50 - direct_p50
    over_bare = served_p50 - bare_p50
    ratio = overhead / direct_p50
    budget = direct_p50 * 0.10 + 0.0005
    gain = batched_rps / single_rps
    speedup = fp32_p50 / int8_p50
    rows = [
        (
            "model",
            f"MLP, {features} inputs, {sizes['fp32'] / 4e6:.1f}M params",
            f"onnxruntime CPU, {threads} intra-op threads, spinning {'on' if SPINNING else 'off'}, "
            f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        ),
        ("direct InferenceSession.run p50, batch 1", f"{direct_p50 * 1e3:.3f} ms", ""),
        ("server POST /infer p50, batch 1", f"{server_p50 * 1e3:.3f} ms", ""),
        (
            "server overhead p50",
            f"{overhead * 1e3:.3f} ms ({ratio:.0%})",
            f"target <= {budget * 1e3:.3f} ms: {'met' if overhead <= budget else 'MISSED'}",
        ),
        (
            "bare asyncio server p50, batch 1",
            f"{bare_p50 * 1e3:.3f} ms",
            "bench/bare_server.py: the same session.run in a thread, nothing else",
        ),
        (
            "server over the bare server p50",
            f"{over_bare * 1e3:.3f} ms",
            f"target <= 0.300 ms: {'met' if over_bare <= 0.0003 else 'MISSED'} "
            f"(server p50 {served_p50 * 1e3:.3f} ms in these rounds)",
        ),
        (
            f"throughput c={args.concurrency}, max batch 1",
            f"{single_rps:.0f} req/s",
            f"{single_errors} errors",
        ),
        (
            f"throughput c={args.concurrency}, max batch 32",
            f"{batched_rps:.0f} req/s",
            f"{batched_errors} errors, mean batch {mean_batch:.1f}",
        ),
        (
            "dynamic batching gain",
            f"{gain:.2f}x",
            f"target >= 3x: {'met' if gain >= 3 else 'MISSED'}",
        ),
        (
            "fp32 size / direct p50 b1 / b32",
            f"{sizes['fp32'] / 1e6:.2f} MB",
            f"{fp32_p50 * 1e3:.3f} ms / {fp32_b32 * 1e3:.3f} ms",
        ),
        (
            "int8 size / direct p50 b1 / b32",
            f"{sizes['int8'] / 1e6:.2f} MB",
            f"{int8_p50 * 1e3:.3f} ms / {int8_b32 * 1e3:.3f} ms",
        ),
        (
            "int8 speedup b1 / b32",
            f"{speedup:.2f}x / {fp32_b32 / int8_b32:.2f}x",
            f"size {sizes['fp32'] / sizes['int8']:.1f}x smaller",
        ),
    ]
    figures = {
        "overhead_p50_ms": round(overhead * 1e3, 4),
        "overhead_vs_bare_ms": round(over_bare * 1e3, 4),
        "overhead_ratio": round(ratio, 4),
        "batching_gain": round(gain, 3),
        "int8_speedup": round(speedup, 3),
    }
    if not args.no_llm:
        llm_rows, llm_figures = run_llm_bench()
        rows += [("-- language models: c1 / c8 generated tokens/s", "", "")] + llm_rows
        figures.update(llm_figures)
    width = max(len(r[0]) for r in rows)
    print(f"{'case':{width}}  {'result':>28}  notes")
    for name, value, note in rows:
        print(f"{name:{width}}  {value:>28}  {note}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
