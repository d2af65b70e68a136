"""Leader election's pure rules (terrace_operator.leader), without a cluster.

The elector against a real apiserver: tests/integration/test_leader_election.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from terrace_operator.leader import (
    LeaderElector,
    LeaseRecord,
    default_identity,
    leases_path,
    may_take,
    micro_time,
    next_record,
    observe,
    released_record,
)

T0 = datetime(2026, 11, 30, 16, 0, 0, tzinfo=UTC)
HELD = LeaseRecord("other", 15, "2026-11-30T15:59:00.000000Z", "2026-11-30T15:59:50.000000Z", 3)


# -- may_take: expired vs not, own lease, empty holder --------------------


def test_a_lease_another_holder_renewed_recently_may_not_be_taken() -> None:
    # Observed changing at t=100 (monotonic); 15 s duration.
    assert not may_take(HELD, "me", observed_at=100.0, now=100.0)
    assert not may_take(HELD, "me", observed_at=100.0, now=114.999)


def test_a_lease_unchanged_for_its_duration_may_be_taken() -> None:
    assert may_take(HELD, "me", observed_at=100.0, now=115.0)
    assert may_take(HELD, "me", observed_at=100.0, now=1000.0)


def test_expiry_follows_the_records_duration_not_the_candidates() -> None:
    short = LeaseRecord("other", 1, None, None, 0)
    assert not may_take(short, "me", observed_at=100.0, now=100.5)
    assert may_take(short, "me", observed_at=100.0, now=101.0)


def test_remote_timestamps_do_not_decide_expiry() -> None:
    # A renewTime from a year ago (a holder whose clock is wrong) does not
    # make the lease expired: only the local observation time counts.
    skewed = LeaseRecord("other", 15, "2025-01-01T00:00:00.000000Z", "2025-01-01T00:00:00.000000Z")
    assert not may_take(skewed, "me", observed_at=100.0, now=101.0)
    # ...and one from the future does not keep it alive past local expiry.
    future = replace_times(HELD, "2030-01-01T00:00:00.000000Z")
    assert may_take(future, "me", observed_at=100.0, now=116.0)


def replace_times(record: LeaseRecord, stamp: str) -> LeaseRecord:
    return LeaseRecord(record.holder, record.lease_duration_seconds, stamp, stamp, 0)


def test_the_holder_may_always_renew_its_own_lease() -> None:
    mine = LeaseRecord("me", 15, None, None, 0)
    assert may_take(mine, "me", observed_at=100.0, now=100.0)
    assert may_take(mine, "me", observed_at=100.0, now=200.0)


def test_a_released_lease_may_be_taken_at_once() -> None:
    free = released_record(HELD, T0)
    assert free.holder == ""
    assert may_take(free, "me", observed_at=100.0, now=100.0)
    # An empty record (a Lease with no spec fields) too.
    assert may_take(LeaseRecord(), "me", observed_at=100.0, now=100.0)


# -- observe: expiry counts from the last change seen locally ---------------


def test_observation_time_moves_only_when_the_record_changes() -> None:
    first = observe(None, 0.0, HELD, now=10.0)
    assert first == 10.0
    assert observe(HELD, first, HELD, now=20.0) == 10.0  # same record: unchanged
    renewed = replace_times(HELD, "2026-11-30T16:00:01.000000Z")
    assert observe(HELD, first, renewed, now=20.0) == 20.0


def test_a_holder_that_keeps_renewing_never_expires_for_its_peers() -> None:
    seen, at = None, 0.0
    for t in range(0, 60, 2):  # renewed every 2 s, read every 2 s
        record = replace_times(HELD, micro_time(T0 + timedelta(seconds=t)))
        at = observe(seen, at, record, now=float(t))
        seen = record
        assert not may_take(record, "me", at, now=float(t) + 1.9)


# -- next_record / released_record ------------------------------------------


def test_creating_the_lease_starts_at_zero_transitions() -> None:
    rec = next_record(None, "me", 15, T0)
    assert rec == LeaseRecord(
        "me", 15, "2026-11-30T16:00:00.000000Z", "2026-11-30T16:00:00.000000Z", 0
    )


def test_renewal_keeps_acquire_time_and_transitions() -> None:
    mine = LeaseRecord("me", 15, "2026-11-30T15:00:00.000000Z", "2026-11-30T15:59:58.000000Z", 4)
    rec = next_record(mine, "me", 15, T0)
    assert rec.acquire_time == "2026-11-30T15:00:00.000000Z"
    assert rec.renew_time == "2026-11-30T16:00:00.000000Z"
    assert rec.transitions == 4


def test_taking_over_counts_a_transition_and_stamps_acquire_time() -> None:
    rec = next_record(HELD, "me", 15, T0)
    assert rec.holder == "me"
    assert rec.transitions == HELD.transitions + 1
    assert rec.acquire_time == rec.renew_time == "2026-11-30T16:00:00.000000Z"
    # After a release too (the released record keeps the count).
    again = next_record(released_record(rec, T0), "other", 15, T0 + timedelta(seconds=1))
    assert again.transitions == HELD.transitions + 2


def test_release_clears_the_holder_with_a_one_second_duration() -> None:
    mine = LeaseRecord("me", 15, "2026-11-30T15:00:00.000000Z", "2026-11-30T15:59:58.000000Z", 4)
    rec = released_record(mine, T0)
    assert rec == LeaseRecord(
        "", 1, "2026-11-30T16:00:00.000000Z", "2026-11-30T16:00:00.000000Z", 4
    )
    assert rec.spec()["holderIdentity"] == ""  # written, not omitted


def test_record_round_trips_through_a_lease_spec() -> None:
    lease = {"metadata": {"name": "x"}, "spec": HELD.spec()}
    assert LeaseRecord.from_lease(lease) == HELD
    assert LeaseRecord.from_lease({"metadata": {"name": "x"}}) == LeaseRecord()


def test_micro_time_is_utc_with_microseconds() -> None:
    cet = timezone(timedelta(hours=1))
    when = datetime(2026, 11, 30, 17, 0, 0, 123456, tzinfo=cet)
    assert micro_time(when) == "2026-11-30T16:00:00.123456Z"


# -- construction -----------------------------------------------------------


@pytest.mark.parametrize(
    ("lease", "renew", "retry"), [(10, 10, 2), (15, 16, 2), (15, 10, 10), (15, 10, 0)]
)
def test_durations_must_nest(lease: float, renew: float, retry: float) -> None:
    with pytest.raises(ValueError, match="retry_period_seconds < renew_deadline_seconds"):
        LeaderElector(None, "ns", "n", "me", lease, renew, retry)  # type: ignore[arg-type]


def test_defaults_are_client_gos_and_identities_are_unique() -> None:
    e = LeaderElector(None, "ns", "n")  # type: ignore[arg-type]
    assert (e.lease_duration_seconds, e.renew_deadline_seconds, e.retry_period_seconds) == (
        15,
        10,
        2,
    )
    assert e.identity.count("_") >= 1
    assert default_identity() != default_identity()
    assert not e.is_leader
    assert leases_path("ns", "n") == "/apis/coordination.k8s.io/v1/namespaces/ns/leases/n"
