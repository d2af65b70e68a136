"""The router's lean HTTP/1.1 transport under httpx, against scripted raw TCP
servers on 127.0.0.1: framing (length, chunked, close), keep-alive reuse,
the stale keep-alive retry, timeouts, errors and incremental streaming."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from terrace_router.transport import FastTransport

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    body = await reader.readexactly(length) if length else b""
    return head + body


class Scripted:
    """A TCP server whose per-connection behaviour is a coroutine."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self) -> Scripted:
        async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(reader, writer, self.connections)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                writer.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()


def serve_forever(response: bytes, split: int | None = None) -> Handler:
    async def handler(reader, writer, n):
        while await read_request(reader) is not None:
            if split:
                for i in range(0, len(response), split):
                    writer.write(response[i : i + split])
                    await writer.drain()
                    await asyncio.sleep(0)
            else:
                writer.write(response)
                await writer.drain()

    return handler


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=FastTransport(), timeout=5, trust_env=False)


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))  # type: ignore[arg-type]


def test_content_length_body_split_byte_by_byte_and_connection_reused():
    resp = (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b'content-length: 11\r\n\r\n{"ok": 123}'
    )

    async def main():
        async with Scripted(serve_forever(resp, split=1)) as srv, client() as c:
            for _ in range(3):
                r = await c.post(srv.url + "/v1/x", content=b'{"a": 1}')
                assert r.status_code == 200 and r.json() == {"ok": 123}
                assert r.headers["content-type"] == "application/json"
            assert srv.connections == 1

    run(main())


def test_chunked_body_with_extensions_and_trailers():
    resp = (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
        b"5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nx-trailer: t\r\n\r\n"
    )

    async def main():
        async with Scripted(serve_forever(resp, split=3)) as srv, client() as c:
            for _ in range(2):
                r = await c.get(srv.url + "/")
                assert r.text == "hello world"
            assert srv.connections == 1

    run(main())


def test_connection_close_and_read_until_close_are_not_reused():
    async def close_each(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()

    async def until_close(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nall of it")
        await writer.drain()

    async def main():
        for handler, body in ((close_each, "ok"), (until_close, "all of it")):
            async with Scripted(handler) as srv, client() as c:
                for _ in range(2):
                    assert (await c.get(srv.url + "/")).text == body
                assert srv.connections == 2

    run(main())


def test_interim_100_and_bodyless_204():
    async def handler(reader, writer, n):
        while await read_request(reader) is not None:
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    async def main():
        async with Scripted(handler) as srv, client() as c:
            for _ in range(2):
                r = await c.post(srv.url + "/", content=b"x")
                assert r.status_code == 204 and r.content == b""
            assert srv.connections == 1

    run(main())


def test_stale_keepalive_connection_is_retried_once_on_a_fresh_one():
    async def handler(reader, writer, n):
        # Answers the first request of each connection; on the second it
        # closes without a byte, like a server whose idle timeout just fired.
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n" + str(n).encode())
        await writer.drain()
        await read_request(reader)

    async def main():
        async with Scripted(handler) as srv, client() as c:
            assert (await c.post(srv.url + "/", content=b"a")).text == "1"
            assert (await c.post(srv.url + "/", content=b"b")).text == "2"
            assert srv.connections == 2

    run(main())


def test_refused_connection_is_a_connect_error():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused

    async def main():
        async with client() as c:
            with pytest.raises(httpx.ConnectError):
                await c.get(f"http://127.0.0.1:{port}/")

    run(main())


def test_silent_server_is_a_read_timeout_and_truncation_a_read_error():
    async def silent(reader, writer, n):
        await read_request(reader)
        await asyncio.sleep(5)

    async def truncated(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part")
        await writer.drain()

    async def main():
        async with Scripted(silent) as srv, client() as c:
            with pytest.raises(httpx.ReadTimeout):
                await c.get(srv.url + "/", timeout=httpx.Timeout(5, read=0.2))
        async with Scripted(truncated) as srv, client() as c:
            with pytest.raises(httpx.ReadError):
                await c.get(srv.url + "/")

    run(main())


def test_malformed_response_is_a_protocol_error():
    async def garbage(reader, writer, n):
        await read_request(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def main():
        async with Scripted(garbage) as srv, client() as c:
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(srv.url + "/")

    run(main())


def test_stream_pieces_arrive_before_the_response_ends():
    release = asyncio.Event()

    async def handler(reader, writer, n):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n6\r\nfirst \r\n")
        await writer.drain()
        await release.wait()  # the rest only once the client has seen the first piece
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        await read_request(reader)

    async def main():
        async with Scripted(handler) as srv, client() as c:
            pieces = []
            async with c.stream("POST", srv.url + "/", content=b"{}") as r:
                async for piece in r.aiter_raw():
                    pieces.append(piece)
                    release.set()
            assert pieces == [b"first ", b"second"]

    run(main())


def test_request_is_sent_in_one_piece_with_host_and_length():
    seen = []

    async def handler(reader, writer, n):
        req = await read_request(reader)
        seen.append(req)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()

    async def main():
        async with Scripted(handler) as srv, client() as c:
            await c.post(
                srv.url + "/v1/chat/completions?x=1",
                content=b'{"m": 1}',
                headers={"content-type": "application/json"},
            )

    run(main())
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0] == b"post /v1/chat/completions?x=1 http/1.1"
    assert b"content-length: 8" in lines and any(h.startswith(b"host: 127.0.0.1:") for h in lines)
    assert body == b'{"m": 1}'


class _NoPool:
    def discard(self, conn):
        pass

    def release(self, conn):
        pass


@given(
    body=st.binary(max_size=3000),
    chunk=st.integers(1, 700),
    cuts=st.lists(st.integers(1, 50), min_size=1, max_size=60),
    chunked=st.booleans(),
)
@settings(max_examples=200, deadline=None)
def test_parser_reassembles_any_split_of_any_framing(body, chunk, cuts, chunked):
    from terrace_router.transport import _DONE, _Connection

    if chunked:
        wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        for i in range(0, len(body), chunk):
            piece = body[i : i + chunk]
            wire += f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        wire += b"0\r\n\r\n"
    else:
        wire = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    conn = _Connection(_NoPool())  # type: ignore[arg-type]
    pos, i = 0, 0
    while pos < len(wire):
        step = cuts[i % len(cuts)]
        conn.data_received(wire[pos : pos + step])
        pos += step
        i += 1
    assert conn.error is None
    assert conn.head is not None and conn.head[0] == 200
    assert conn.state == _DONE and conn.keep_alive
    assert b"".join(conn.chunks) == body
