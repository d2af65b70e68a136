"""The router's pure parts: tier order, confidence, pool, cache, validation,
keys, the routing table and the CLI's quick mode. No network."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from terrace_router import policy
from terrace_router.auth import ApiKeys
from terrace_router.cache import CachedAnswer, ResponseCache, cache_key
from terrace_router.cli import config_from_flags, main
from terrace_router.config import AuthConfig, EscalationConfig, RouterConfig, load
from terrace_router.errors import RouterError
from terrace_router.pool import Endpoint, Pick, TierPool, normalize_base_url
from terrace_router.schemas import is_deterministic, prompt_text, validate
from terrace_router.state import ShareTracker

# -- tier order ---------------------------------------------------------------


def test_attempt_order_goes_up_then_down_and_is_bounded():
    kw = dict(pinned=False, fallback_to_smaller=True, max_attempts=10)
    assert policy.attempt_order(0, 3, **kw) == [0, 1, 2]
    assert policy.attempt_order(1, 3, **kw) == [1, 2, 0]
    assert policy.attempt_order(2, 3, **kw) == [2, 1, 0]
    assert policy.attempt_order(1, 3, **{**kw, "fallback_to_smaller": False}) == [1, 2]
    assert policy.attempt_order(0, 3, **{**kw, "max_attempts": 2}) == [0, 1]
    assert policy.attempt_order(1, 3, **{**kw, "pinned": True}) == [1]


@given(st.integers(0, 5), st.integers(1, 6), st.booleans(), st.integers(1, 8))
def test_attempt_order_never_repeats_a_tier(start, n, down, attempts):
    start = min(start, n - 1)
    order = policy.attempt_order(
        start, n, pinned=False, fallback_to_smaller=down, max_attempts=attempts
    )
    assert order[0] == start
    assert len(order) == len(set(order)) <= attempts
    assert all(0 <= i < n for i in order)


def test_fixed_thresholds_split_scores():
    assert policy.tier_for_score(0.1, [0.5]) == 0
    assert policy.tier_for_score(0.5, [0.5]) == 1  # at the threshold goes up
    assert policy.tier_for_score(0.7, [0.3, 0.6]) == 2
    assert policy.tier_for_score(0.4, [0.3, 0.6]) == 1


# -- confidence ---------------------------------------------------------------


def _chat(*lps):
    return {"choices": [{"logprobs": {"content": [{"token": "t", "logprob": v} for v in lps]}}]}


def test_mean_token_logprob_chat_and_completions():
    assert policy.mean_token_logprob(_chat(-1.0, -3.0), "chat") == pytest.approx(-2.0)
    comp = {"choices": [{"logprobs": {"token_logprobs": [None, -0.5, -1.5]}}]}
    assert policy.mean_token_logprob(comp, "completions") == pytest.approx(-1.0)
    assert policy.mean_token_logprob({"choices": [{"logprobs": None}]}, "chat") is None
    assert policy.mean_token_logprob({"choices": []}, "chat") is None
    # llama.cpp's server answers /v1/completions in the chat shape, legacy fields null.
    llama = {
        "choices": [
            {"logprobs": {"token_logprobs": None, **_chat(-2.0, -4.0)["choices"][0]["logprobs"]}}
        ]
    }
    assert policy.mean_token_logprob(llama, "completions") == pytest.approx(-3.0)


def test_low_confidence_threshold_and_no_signal_keeps_the_answer():
    assert policy.is_low_confidence(_chat(-4.0, -3.0), "chat", -2.5)
    assert not policy.is_low_confidence(_chat(-0.1, -0.2), "chat", -2.5)
    assert not policy.is_low_confidence({"choices": [{"message": {}}]}, "chat", -2.5)


def test_logprobs_are_requested_only_when_missing_and_stripped():
    p = {"model": "x"}
    asked = policy.with_logprobs(p, "chat")
    assert asked == {"model": "x", "logprobs": True} and p == {"model": "x"}  # a copy
    assert policy.with_logprobs({"model": "x", "logprobs": True}, "chat") is None
    assert policy.with_logprobs({"model": "x"}, "completions") == {"model": "x", "logprobs": 1}
    assert policy.with_logprobs({"model": "x", "logprobs": 0}, "completions") is None
    resp = _chat(-1.0)
    policy.strip_logprobs(resp)
    assert resp["choices"][0]["logprobs"] is None


def test_decisions_say_where_and_why():
    esc = EscalationConfig()
    auto = policy.decide_auto(0.42, 1, 3, esc)
    assert auto.order == (1, 2, 0) and auto.why == "complexity 0.4200" and auto.check_confidence
    assert auto.escalates(policy.ERROR, esc) and auto.escalates(policy.OVERLOAD, esc)
    off = EscalationConfig(on_overload=False, on_error=False, on_low_confidence=False)
    quiet = policy.decide_auto(0.42, 1, 3, off)
    assert not quiet.check_confidence and not quiet.escalates(policy.OVERLOAD, off)
    pinned = policy.decide_pinned(2, "pinned to large")
    assert pinned.order == (2,) and not pinned.check_confidence
    assert not pinned.escalates(policy.ERROR, esc)  # the client chose the model


def test_retry_after_is_whole_seconds_at_least_one():
    assert policy.retry_after_seconds(0) == 1
    assert policy.retry_after_seconds(2.2) == 3


# -- pool ---------------------------------------------------------------------


def _pool(n=3, limit=2, eject_after=2, eject_seconds=10.0):
    return TierPool(
        [Endpoint(f"http://e{i}:80") for i in range(n)],
        max_inflight=limit,
        eject_after=eject_after,
        eject_seconds=eject_seconds,
    )


def test_least_inflight_wins_and_ties_rotate():
    pool = _pool()
    a, b, c = pool.endpoints
    a.inflight, b.inflight, c.inflight = 1, 0, 1
    assert pool.pick(0.0) is b
    b.inflight = 1
    picks = {pool.pick(0.0).base for _ in range(6)}
    assert picks == {"http://e0:80", "http://e1:80", "http://e2:80"}


def test_inflight_limit_means_overloaded():
    pool = _pool(n=2, limit=1)
    for ep in pool.endpoints:
        ep.inflight = 1
    assert pool.pick(0.0) is Pick.OVERLOADED


def test_ejection_after_consecutive_failures_and_probe_after_cooldown():
    pool = _pool(n=2, eject_after=2, eject_seconds=10.0)
    bad, good = pool.endpoints
    pool.failed(bad, 0.0)
    pool.succeeded(bad)  # a success in between resets the streak
    pool.failed(bad, 11.0)
    assert bad.ejected_until == 0.0
    pool.failed(bad, 12.0)
    assert bad.ejected_until == 22.0
    assert {pool.pick(15.0) for _ in range(4)} == {good}
    assert pool.pick(15.0, exclude={good}) is Pick.UNAVAILABLE
    assert pool.seconds_until_available(15.0) == 0.0
    good.ejected_until = 30.0
    assert pool.seconds_until_available(15.0) == pytest.approx(7.0)
    assert pool.pick(23.0, exclude={good}) is bad  # the cooldown is over: probe it
    pool.failed(bad, 23.0)  # the probe failed: out again at once
    assert bad.ejected_until == 33.0


def test_failures_a_request_can_cause_only_make_an_endpoint_a_suspect():
    pool = _pool(n=1, eject_after=2, eject_seconds=10.0)
    (ep,) = pool.endpoints
    assert not pool.suspect(ep)  # a 500 or a read timeout: one is nothing
    assert pool.suspect(ep)  # enough in a row: ask the endpoint itself
    assert not pool.suspect(ep)  # one health check at a time
    assert ep.ejected_until == 0.0 and ep.failures == 0  # still serving meanwhile
    ep.checking = False
    pool.succeeded(ep)  # the check passed: the requests were at fault
    assert ep.suspicions == 0 and ep.ejected_until == 0.0
    pool.suspect(ep)
    assert pool.suspect(ep)
    ep.checking = False
    pool.check_failed(ep, 100.0)  # the check failed too: the endpoint is at fault
    assert ep.ejected_until == 110.0
    # Endpoint faults (refused, reset, 502/503/504) count at once.
    pool.succeeded(ep)
    pool.failed(ep, 200.5)
    pool.failed(ep, 201.0)
    assert ep.ejected_until == 211.0


def test_base_urls_are_normalized():
    assert normalize_base_url("http://h:8080/v1/") == "http://h:8080"
    assert Endpoint("http://h:8080/").base == "http://h:8080"


# -- cache --------------------------------------------------------------------


def _ans(tag="a"):
    return CachedAnswer(tag.encode(), "application/json", "small", "0.1000", None)


def test_cache_key_ignores_key_order_and_user():
    a = cache_key("chat", {"model": "auto", "messages": [], "temperature": 0, "user": "u1"})
    b = cache_key("chat", {"temperature": 0, "messages": [], "model": "auto"})
    assert a == b
    assert a != cache_key("completions", {"temperature": 0, "messages": [], "model": "auto"})
    assert a != cache_key("chat", {"temperature": 0, "messages": [], "model": "large"})


def test_cache_ttl_and_lru_bound():
    cache = ResponseCache(max_entries=2, ttl_seconds=10)
    cache.put("a", _ans("a"), now=0)
    cache.put("b", _ans("b"), now=0)
    assert cache.get("a", now=1).body == b"a"  # a is now most recent
    cache.put("c", _ans("c"), now=1)  # evicts b
    assert cache.get("b", now=1) is None and len(cache) == 2
    assert cache.get("a", now=10) is None  # expired
    assert cache.get("c", now=10.5).body == b"c"


def test_deterministic_means_temperature_zero():
    assert is_deterministic({"temperature": 0})
    assert not is_deterministic({"temperature": 0.2})
    assert not is_deterministic({})  # the upstream default is 1.0


# -- validation ---------------------------------------------------------------


def _param(kind, payload):
    with pytest.raises(RouterError) as exc:
        validate(kind, payload)
    assert exc.value.status == 400
    return exc.value.param


def test_validation_names_the_param_like_openai():
    msgs = [{"role": "user", "content": "hi"}]
    assert _param("chat", {"messages": msgs}) == "model"
    assert (
        _param("chat", {"model": "auto", "messages": [{"role": "x", "content": "a"}]})
        == "messages.[0].role"
    )
    assert (
        _param("chat", {"model": "auto", "messages": [{"role": "user", "content": 5}]})
        == "messages.[0].content"
    )
    assert _param("chat", {"model": "auto", "messages": msgs, "top_p": 3}) == "top_p"
    assert _param("chat", {"model": "auto", "messages": msgs, "stream": "yes"}) == "stream"
    assert _param("completions", {"model": "auto"}) == "prompt"
    assert _param("chat", ["not", "an", "object"]) is None
    validate("chat", {"model": "auto", "messages": msgs, "vendor_extension": {"x": 1}})


def test_prompt_text_is_the_last_user_turn_whole():
    payload = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first"},
            {"role": "assistant", "content": "ok"},
            {"role": "user", "content": [{"type": "text", "text": "second"}]},
        ]
    }
    assert prompt_text("chat", payload) == "second"
    assert prompt_text("completions", {"prompt": ["one", "two"]}) == "one"
    assert prompt_text("completions", {"prompt": [1, 2, 3]}) == ""
    # Whole: the classifier owns clipping, so the router and the CLI agree.
    long = "a" * 3000 + "b" * 30000
    assert prompt_text("completions", {"prompt": long}) is long


# -- keys ---------------------------------------------------------------------


def test_keys_from_file_and_env(tmp_path, monkeypatch):
    keyfile = tmp_path / "keys"
    keyfile.write_text("# router keys\nsk-one\n\n  sk-two  \n")
    monkeypatch.setenv("ROUTER_KEYS", "sk-three, sk-four")
    keys = ApiKeys.from_config(AuthConfig(api_keys_file=str(keyfile), api_keys_env="ROUTER_KEYS"))
    for k in ("sk-one", "sk-two", "sk-three", "sk-four"):
        keys.check(f"Bearer {k}")
    for header in (None, "", "Bearer", "Basic sk-one", "Bearer sk-five", "Bearer # router keys"):
        with pytest.raises(RouterError) as exc:
            keys.check(header)
        assert exc.value.status == 401
    ApiKeys.from_config(AuthConfig()).check(None)  # no keys configured: open


# -- share --------------------------------------------------------------------


def test_share_tracker_is_a_rolling_window():
    share = ShareTracker(["small", "large"], window=4)
    assert share.shares() == {"small": 0.0, "large": 0.0}
    for i in (0, 0, 0, 1):
        share.record(i)
    assert share.shares() == {"small": 0.75, "large": 0.25}
    for _ in range(4):
        share.record(1)
    assert share.shares() == {"small": 0.0, "large": 1.0}


# -- routing table and CLI ----------------------------------------------------


def test_thresholds_must_match_the_tiers():
    tiers = [{"name": "a", "endpoints": ["http://a"]}, {"name": "b", "endpoints": ["http://b"]}]
    RouterConfig.model_validate({"tiers": tiers, "calibration": {"thresholds": [0.4]}})
    with pytest.raises(ValueError, match="needs 1 value"):
        RouterConfig.model_validate({"tiers": tiers, "calibration": {"thresholds": [0.4, 0.6]}})
    with pytest.raises(ValueError, match="ascending"):
        RouterConfig.model_validate(
            {
                "tiers": tiers * 1 + [{"name": "c", "endpoints": ["http://c"]}],
                "calibration": {"thresholds": [0.6, 0.4]},
            }
        )
    with pytest.raises(ValueError, match="collides"):
        RouterConfig.model_validate(
            {"tiers": [{"name": "auto", "endpoints": ["http://a"]}], "name": "router"}
        )


def test_quick_mode_flags_build_the_same_table(tmp_path):
    cfg = config_from_flags(["small=http://127.0.0.1:9001", "large=http://h1:1,http://h2:2"], 0.2)
    assert [t.name for t in cfg.tiers] == ["small", "large"]
    assert cfg.tiers[1].endpoints == ["http://h1:1", "http://h2:2"]
    assert cfg.calibration.target_large_share == 0.2
    assert cfg.classifier.model == "builtin"
    path = tmp_path / "router.yaml"
    path.write_text(cfg.dump())
    assert load(path) == cfg
    with pytest.raises(ValueError, match="NAME=URL"):
        config_from_flags(["small"], None)


def test_check_command_validates_a_file(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("tiers:\n- name: small\n  endpoints: [http://s:8080]\n")
    assert main(["check", "--config", str(good)]) == 0
    assert "maxInflightPerEndpoint: 64" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers: []\n")
    assert main(["check", "--config", str(bad)]) == 2
    assert "invalid routing table" in capsys.readouterr().err


def test_two_tiers_on_one_url_keep_their_own_endpoints_across_a_reload():
    """A reload carries each endpoint's in-flight count and health over, per
    tier: two tiers served by one URL never start sharing one count."""
    from terrace_router.config import RouterConfig
    from terrace_router.state import RouterState

    cfg = RouterConfig.model_validate(
        {
            "tiers": [
                {"name": "a", "endpoints": ["http://127.0.0.1:1"]},
                {"name": "b", "endpoints": ["http://127.0.0.1:1"]},
            ],
            "calibration": {"thresholds": [0.5]},
        }
    )
    first = RouterState.build(cfg)
    (ea,), (eb,) = (t.pool.endpoints for t in first.tiers)
    assert ea is not eb
    ea.inflight = 3
    again = RouterState.build(cfg, previous=first)
    assert [t.pool.endpoints[0] for t in again.tiers] == [ea, eb]
    assert [t.pool.load() for t in again.tiers] == [3 / 64, 0.0]
