"""The reconcile work queue: de-duplication, one worker per key, backoff."""

from __future__ import annotations

import asyncio

from terrace_operator.workqueue import WorkQueue


def run(coro):
    return asyncio.run(coro)


def test_many_adds_collapse_into_one_pending_key() -> None:
    async def go() -> list[str]:
        q = WorkQueue()
        for _ in range(5):
            q.add("a")
        q.add("b")
        assert len(q) == 2
        return [await q.get(), await q.get()]

    assert run(go()) == ["a", "b"]


def test_a_key_added_while_processing_waits_for_done() -> None:
    async def go() -> None:
        q = WorkQueue()
        q.add("a")
        key = await q.get()
        q.add("a")  # an event arrives mid-reconcile
        # Not handed to a second worker while the first still holds it.
        getter = asyncio.create_task(q.get())
        # Turns on the loop, not wall time: a key that could be handed out
        # would be taken on the getter's first turn.
        for _ in range(5):
            await asyncio.sleep(0)
        assert not getter.done()
        assert len(q) == 1  # still pending, for whoever gets it after done()
        q.done(key)
        assert await asyncio.wait_for(getter, 1) == "a"

    run(go())


def test_retry_backs_off_exponentially_and_forget_resets() -> None:
    async def go() -> None:
        q = WorkQueue(base_delay=0.01, max_delay=0.04)
        assert [q.retry("a") for _ in range(4)] == [0.01, 0.02, 0.04, 0.04]
        assert q.failures("a") == 4
        q.forget("a")
        assert q.failures("a") == 0
        assert await asyncio.wait_for(q.get(), 1) == "a"
        q.done("a")
        q.shutdown()

    run(go())


def test_add_after_keeps_the_earliest_timer() -> None:
    async def go() -> None:
        q = WorkQueue()
        q.add_after("a", 0.02)
        q.add_after("a", 10)  # later: ignored
        assert await asyncio.wait_for(q.get(), 1) == "a"
        q.done("a")
        q.add_after("b", 10)
        q.add_after("b", 0.01)  # earlier: replaces
        assert await asyncio.wait_for(q.get(), 1) == "b"
        q.shutdown()

    run(go())
