"""The language-model half of `bench/runtime.py`: one real model (Gemma 3 270M,
from hack/real_models.py) served three ways on the same cores, side by side in
one run (all three up, measured in alternating rounds; medians over rounds):

- Terrace's runtime, format onnx (onnxruntime-genai int4 folder);
- Terrace's runtime, format torch (transformers, fp32 folder);
- llama.cpp's `llama-server` on the Q4_K_M GGUF (hack/build-llama-server.sh),
  with as many slots as the highest concurrency.

Terrace's onnx runtime runs with ``--spinning`` here: onnxruntime-genai's loop
(the baseline) and llama.cpp keep their threads spinning too; Terrace's
default lets them sleep, which costs about 15% inter-token latency on this
model (measured on 2 cores) and saves the CPU time of idle spinning.

Each serves streamed `/v1/completions` of `max_tokens` tokens (ignore_eos) at
concurrency 1 (4 requests a round) and 8 (16 a round). Reported: generated
tokens/s, time to first token p50/p99, inter-token latency p50, peak RSS.
Also a bare onnxruntime-genai generate loop (greedy, batch 1, same threads)
for the runtime's added inter-token latency at concurrency 1.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))
from localproc import ServerProcess, free_port  # noqa: E402

PROMPTS = [
    "Q: What is the capital of France?\nA:",
    "The history of the printing press begins",
    "Q: Why is the sky blue?\nA:",
    "Once upon a time, in a small village by the sea,",
    "Q: How do plants make their food?\nA:",
    "The three most important ideas in economics are",
    "Q: What does a compiler do?\nA:",
    "In the morning the market opened and",
]


def prepare() -> tuple[dict[str, Path], Path]:
    models = subprocess.run(
        [sys.executable, str(ROOT / "hack" / "real_models.py")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    llama = subprocess.run(
        ["bash", str(ROOT / "hack" / "build-llama-server.sh")],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    paths = {k: Path(v) for k, v in json.loads(models.stdout.strip().splitlines()[-1]).items()}
    return paths, Path(llama.stdout.strip().splitlines()[-1])


@dataclass
class Run:
    tokens: int = 0
    wall_s: float = 0.0
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)
    errors: int = 0
    reasons: list[str] = field(default_factory=list)  # what the first errors were

    @property
    def tps(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0


MODEL = "m"  # the name every server serves the model under here


async def _one(
    client: httpx.AsyncClient, proc: ServerProcess, prompt: str, max_tokens: int, run: Run
) -> None:
    body = {
        "model": MODEL,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    for attempt in (1, 2):
        start = time.perf_counter()
        last = None
        count = 0
        try:
            async with client.stream("POST", proc.url + "/v1/completions", json=body) as r:
                if r.status_code != 200:
                    run.errors += 1
                    run.reasons.append(f"HTTP {r.status_code}: {(await r.aread())[:120]!r}")
                    return
                # Raw bytes split into server-sent events, parsed with orjson: the
                # load generator shares the cores with the server it measures.
                pending = b""
                async for data in r.aiter_bytes():
                    now = time.perf_counter()
                    *events, pending = (pending + data).split(b"\n\n")
                    for event in events:
                        if not event.startswith(b"data: ") or event == b"data: [DONE]":
                            continue
                        chunk = orjson.loads(event[6:])
                        if not chunk.get("choices") or not chunk["choices"][0].get("text"):
                            continue
                        if last is None:
                            run.ttft_s.append(now - start)
                        else:
                            run.itl_s.append(now - last)
                        last = now
                        count += 1
        except httpx.RemoteProtocolError as exc:
            # A keep-alive connection the server had closed: nothing was
            # answered, so the request is sent once more on a new connection.
            if attempt == 1 and count == 0:
                continue
            run.errors += 1
            run.reasons.append(f"{type(exc).__name__}: {exc}"[:160])
            return
        except httpx.HTTPError as exc:
            run.errors += 1
            run.reasons.append(f"{type(exc).__name__}: {exc}"[:160])
            return
        run.tokens += count
        return


def load(proc: ServerProcess, concurrency: int, requests: int, max_tokens: int) -> Run:
    async def go() -> Run:
        run = Run()
        limits = httpx.Limits(max_connections=concurrency)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            queue = list(range(requests))

            async def worker() -> None:
                while queue:
                    i = queue.pop()
                    await _one(client, proc, PROMPTS[i % len(PROMPTS)], max_tokens, run)

            start = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            run.wall_s = time.perf_counter() - start
        return run

    return asyncio.run(go())


def bare_genai_itl(folder: Path, threads: int, max_tokens: int) -> float:
    """Median inter-token latency of onnxruntime-genai's own generate loop."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.clear_providers()
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(config)
    from terrace_runtime.hf_tokenizer import HFTokenizer

    tok = HFTokenizer(folder)
    gaps: list[float] = []
    for prompt in PROMPTS[:4]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=4096, do_sample=False)
        gen = og.Generator(model, params)
        gen.append_tokens(np.asarray(tok.encode(prompt), dtype=np.int32))
        last = time.perf_counter()
        for _ in range(max_tokens):
            gen.generate_next_token()
            now = time.perf_counter()
            gaps.append(now - last)
            last = now
        del gen
    del model
    return statistics.median(gaps[1:])


def servers(models: dict[str, Path], llama: Path, threads: int, slots: int) -> dict[str, list]:
    runtime = [sys.executable, "-m", "terrace_runtime.cli", "serve", "--host", "127.0.0.1"]
    return {
        "terrace onnx (ort-genai int4)": [
            *runtime, "--model", str(models["onnx"]), "--format", "onnx", "--name", "m",
            "--threads", str(threads), "--max-batch-size", str(slots), "--spinning",
        ],
        "terrace torch (transformers fp32)": [
            *runtime, "--model", str(models["torch"]), "--format", "torch", "--name", "m",
            "--device", "cpu", "--threads", str(threads), "--max-batch-size", str(slots),
        ],
        "llama-server (Q4_K_M)": [
            str(llama), "-m", str(models["gguf"]), "--host", "127.0.0.1", "-t", str(threads),
            "-c", str(1024 * slots), "-np", str(slots), "-a", "m",
        ],
    }  # fmt: skip


def run_llm_bench(
    max_tokens: int = 48, requests_c8: int = 16, rounds: int = 3
) -> tuple[list, dict]:
    """Rows for the table and the headline figures.

    All three servers stay up (an idle one costs no CPU) and are measured in
    alternating rounds, each round also timing the bare onnxruntime-genai
    loop, so every figure sees the same background load; tokens/s and
    inter-token latencies are medians over the rounds."""
    models, llama = prepare()
    threads = os.cpu_count() or 1
    procs: dict[str, ServerProcess] = {}
    runs: dict[str, dict[str, list[Run]]] = {}
    bare: list[float] = []
    try:
        for name, argv in servers(models, llama, threads, 8).items():
            port = free_port()
            ready = "/health" if name.startswith("llama") else "/v2/health/ready"
            procs[name] = ServerProcess(name, [*argv, "--port", str(port)], port, ready).wait(300)
            load(procs[name], 2, 2, 8)  # warm-up
            runs[name] = {"c1": [], "c8": []}
        for _ in range(rounds):
            for name, proc in procs.items():
                runs[name]["c1"].append(load(proc, 1, 4, max_tokens))
                runs[name]["c8"].append(load(proc, 8, requests_c8, max_tokens))
            bare.append(bare_genai_itl(models["onnx"], threads, max_tokens))
        rss = {name: proc.peak_rss_mb() for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            proc.stop()

    def tps(name: str, kind: str) -> float:
        return statistics.median(r.tps for r in runs[name][kind])

    def itl(name: str) -> float:
        return statistics.median(statistics.median(r.itl_s) for r in runs[name]["c1"])

    results = {
        name: {"c1": tps(name, "c1"), "c8": tps(name, "c8"), "itl": itl(name), "rss": rss[name]}
        for name in procs
    }
    bare_itl = statistics.median(bare)
    rows = []
    for name, r in results.items():
        ttft = sorted(t for run in runs[name]["c8"] for t in run.ttft_s) or [float("nan")]
        errors = sum(run.errors for kind in ("c1", "c8") for run in runs[name][kind])
        reasons = [x for kind in ("c1", "c8") for run in runs[name][kind] for x in run.reasons]
        rows.append(
            (
                name,
                f"{r['c1']:6.1f} / {r['c8']:6.1f} tok/s",
                f"TTFT c8 p50 {statistics.median(ttft) * 1e3:.0f} ms p99 "
                f"{ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] * 1e3:.0f} ms, ITL c1 p50 "
                f"{r['itl'] * 1e3:.1f} ms, peak RSS {r['rss']:.0f} MB, {errors} errors"
                + (f" (first: {reasons[0]})" if reasons else ""),
            )
        )
    ort = results["terrace onnx (ort-genai int4)"]
    lcpp = results["llama-server (Q4_K_M)"]
    rows.append(
        (
            "bare onnxruntime-genai loop, c1",
            f"ITL p50 {bare_itl * 1e3:.1f} ms",
            f"rounds: {', '.join(f'{b * 1e3:.1f}' for b in bare)} ms",
        )
    )
    ratio = ort["c8"] / lcpp["c8"]
    overhead = ort["itl"] / bare_itl - 1
    rows.append(
        (
            "terrace onnx vs llama-server, c8",
            f"{ratio:.2f}x tok/s",
            f"target >= 1.5x: {'met' if ratio >= 1.5 else 'MISSED'}",
        )
    )
    rows.append(
        (
            "terrace onnx ITL over bare loop, c1",
            f"{overhead:+.1%}",
            f"target <= +10%: {'met' if overhead <= 0.10 else 'MISSED'}",
        )
    )
    figures = {
        "ort_tps_c8": round(ort["c8"], 2),
        "llamacpp_tps_c8": round(lcpp["c8"], 2),
        "ratio_c8": round(ratio, 3),
        "itl_overhead_c1": round(overhead, 4),
        "torch_tps_c8": round(results["terrace torch (transformers fp32)"]["c8"], 2),
    }
    return rows, figures


if __name__ == "__main__":
    table, headline = run_llm_bench()
    width = max(len(r[0]) for r in table)
    for name, value, note in table:
        print(f"{name:{width}}  {value:>28}  {note}")
    print(json.dumps(headline))
