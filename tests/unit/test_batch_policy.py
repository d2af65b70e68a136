"""The batch release policy and the input-file rules, pure."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from terrace_router.batch.jsonl import MAX_LINES, BatchFileError, check_for_batch, parse
from terrace_router.batch.policy import Grid, Pace, Slots, release, seconds_needed


def pace(**kw) -> Pace:
    base = dict(now=0.0, expires_at=3600.0, pending=100, in_flight=0, seconds_per_line=1.0,
                slots=8)  # fmt: skip
    return Pace(**(base | kw))


def test_a_dirty_grid_holds_lines_until_the_deadline_says_go():
    dirty = Grid(signal=450, threshold=300)
    assert release(pace(), dirty).lines == 0
    assert "waiting: grid 450 > threshold 300" in release(pace(), dirty).reason
    # 100 lines on 8 slots at 1 s: 13 rounds, x2 safety = 26 s; at 25 s left it must go.
    assert seconds_needed(pace(), 2.0) == 26
    late = release(pace(now=3575.0), dirty)
    assert late.lines == 8 and late.reason.startswith("deadline")


def test_a_clean_grid_fills_the_free_slots_only():
    clean = Grid(signal=120, threshold=300)
    assert release(pace(in_flight=5), clean).lines == 3
    assert release(pace(in_flight=8), clean).lines == 0
    assert release(pace(pending=2), clean).lines == 2


def test_an_unknown_signal_is_not_zero():
    assert release(pace(), Grid(signal=None, threshold=300)).lines == 0
    assert release(pace(), Grid(signal=None, threshold=None)).lines == 0  # configured, no data
    assert release(pace(), Grid(None, configured=False)).lines == 8  # no signal set up


# Yesterday at a solar grid's pace: clean midday, dirty night (24 points, 1 h apart).
DAY_CURVE = (250, 255, 258, 260, 262, 262, 250, 215, 170, 130, 105, 95, 90, 90, 95, 105, 130,
             180, 240, 280, 285, 280, 270, 260)  # fmt: skip


def test_lines_go_in_the_cleanest_hours_of_the_outlook_that_suffice():
    day = pace(expires_at=86_400.0)  # 26 s needed of a day: the least share, 10 %
    assert release(day, Grid(90, outlook=DAY_CURVE)).lines == 8
    assert "cleanest 10%" in release(day, Grid(90, outlook=DAY_CURVE)).reason
    held = release(day, Grid(130, outlook=DAY_CURVE))
    assert held.lines == 0 and held.reason.startswith("waiting: grid 130 >")
    # A batch that needs half the time left takes the cleaner half of it.
    big = pace(pending=8 * 1000, expires_at=4 * 3600.0)  # 1000 rounds x 2 s = 2000 s of 14400
    assert release(big, Grid(256, outlook=(250, 255, 258, 260))).lines == 0  # 14 %: <= 252.8
    half = pace(pending=8 * 3600, expires_at=4 * 3600.0)  # 7200 s: 50 %
    assert release(half, Grid(256, outlook=(250, 255, 258, 260))).lines == 8
    assert release(half, Grid(259, outlook=(250, 255, 258, 260))).lines == 0
    # A threshold still releases under it; with no outlook it is the whole rule.
    assert release(day, Grid(120, threshold=150, outlook=DAY_CURVE)).lines == 8
    assert release(day, Grid(120)).lines == 8  # nothing to compare with: capacity decides
    # The deadline beats the outlook.
    assert release(pace(now=3575.0), Grid(285, outlook=DAY_CURVE)).lines == 8


@given(
    signal=st.floats(0, 1000),
    outlook=st.lists(st.floats(0, 1000), min_size=1, max_size=50),
    pending=st.integers(1, 5000),
)
def test_the_outlook_rule_never_holds_the_cleanest_moment(signal, outlook, pending):
    p = pace(pending=pending, expires_at=86_400.0)
    r = release(p, Grid(signal, outlook=tuple(outlook)))
    if signal <= min(outlook):
        assert r.lines == min(8, pending)


@given(
    now=st.floats(0, 10_000),
    pending=st.integers(0, 5000),
    in_flight=st.integers(0, 64),
    slots=st.integers(1, 64),
    spl=st.floats(0.01, 100),
    signal=st.one_of(st.none(), st.floats(0, 1000)),
)
def test_never_over_the_slots_and_always_going_at_the_deadline(
    now, pending, in_flight, slots, spl, signal
):
    p = Pace(now, 10_000.0, pending, in_flight, spl, slots)
    r = release(p, Grid(signal, 300.0))
    assert 0 <= r.lines <= max(0, slots - in_flight) and r.lines <= pending
    if pending and in_flight < slots and 10_000.0 - now <= seconds_needed(p, 2.0):
        assert r.lines > 0


def test_concurrency_halves_when_shed_and_grows_back_slowly():
    s = Slots(8.0, 8)
    assert s.shed().value == 4 and s.shed().shed().shed().shed().value == 1
    grown = s.shed()
    for _ in range(4):  # one round of answers at 4 slots: about one slot more
        grown = grown.served()
    assert 4.8 < grown.current < 5.0 and grown.value == 4
    for _ in range(6):
        grown = grown.served()
    assert grown.value == 6
    assert Slots(8.0, 8).served().value == 8  # never past the ceiling


def line(custom_id="a", url="/v1/chat/completions", **body) -> str:
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]} | body
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


@pytest.mark.parametrize(
    ("content", "param", "where"),
    [
        (b"not json\n", None, "line 1: not JSON"),
        (line().encode() + b"\n[1]\n", None, "line 2: a request must be a JSON object"),
        (json.dumps({"method": "POST"}).encode(), "custom_id", "line 1"),
        ((line("x") + "\n" + line("x")).encode(), "custom_id", "also on line 1"),
        (line(url="/v1/embeddings").encode(), "url", "url must be one of"),
        (line(model="").encode(), "body.model", "body.model"),
        (line(stream=True).encode(), "body.stream", "streaming"),
        (b"\xff\xfe", None, "not UTF-8"),
        (b"\n\n", None, "no request"),
    ],
)
def test_bad_files_name_the_line_and_the_parameter(content, param, where):
    with pytest.raises(BatchFileError) as e:
        parse(content)
    assert e.value.param == param and where in str(e.value)


def test_limits_and_the_batch_checks():
    too_many = "\n".join(line(f"c{i}") for i in range(MAX_LINES + 1)).encode()
    with pytest.raises(BatchFileError, match=f"more than {MAX_LINES}"):
        parse(too_many)
    requests = parse((line("a") + "\n" + line("b", model="nope")).encode())
    with pytest.raises(BatchFileError, match="does not match the batch's endpoint"):
        check_for_batch(requests, "/v1/completions", None)
    with pytest.raises(BatchFileError, match="'nope' is not served here") as e:
        check_for_batch(requests, "/v1/chat/completions", {"auto", "small"})
    assert e.value.line == 2 and e.value.param == "body.model"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "router"),
        (["--router", "http://r", "--signal", "up"], "needs a Prometheus URL"),
        (["--router", "http://r", "--forecast", "up"], "needs a Prometheus URL"),
        (["--router", "http://r", "--slots", "0"], "slots"),
    ],
)
def test_bad_settings_exit_with_a_message_and_touch_nothing(tmp_path, args, says):
    out = subprocess.run(
        [sys.executable, "-m", "terrace_router.batch.cli", *args],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert out.returncode == 2 and "invalid settings" in out.stderr and says in out.stderr
    assert "Traceback" not in out.stderr and list(tmp_path.iterdir()) == []  # no store created
