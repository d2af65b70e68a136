"""The baseline for the runtime's serving overhead: the least an HTTP server
can do around the same model. asyncio streams on 127.0.0.1, HTTP/1.1
keep-alive, one POST shape (an Open Inference Protocol v2 infer request with
one FP32 input), `InferenceSession.run` handed to one worker thread with the
runtime's session options, a JSON reply. No routing, validation, batching or
metrics: what is left over this is what Terrace's server adds.

    python bench/bare_server.py MODEL.onnx PORT THREADS [--spinning]
"""

from __future__ import annotations

import asyncio
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import orjson
from terrace_runtime.models import session_options


async def serve(model: str, port: int, threads: int, spinning: bool) -> None:
    session = ort.InferenceSession(
        model, session_options(threads, spinning), providers=["CPUExecutionProvider"]
    )
    name = session.get_inputs()[0].name
    outputs = [o.name for o in session.get_outputs()]
    pool = ThreadPoolExecutor(1)
    loop = asyncio.get_running_loop()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                request = orjson.loads(await reader.readexactly(length))
                tensor = request["inputs"][0]
                x = np.asarray(tensor["data"], dtype=np.float32).reshape(tensor["shape"])
                result = await loop.run_in_executor(pool, session.run, outputs, {name: x})
                body = orjson.dumps(
                    {
                        "model_name": "mlp",
                        "outputs": [
                            {"name": n, "shape": list(r.shape), "datatype": "FP32",
                             "data": r.ravel().tolist()}
                            for n, r in zip(outputs, result, strict=True)
                        ],
                    }
                )  # fmt: skip
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                    + str(len(body)).encode()
                    + b"\r\n\r\n"
                    + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    model_path, port_arg, threads_arg = sys.argv[1:4]
    asyncio.run(serve(model_path, int(port_arg), int(threads_arg), "--spinning" in sys.argv))
