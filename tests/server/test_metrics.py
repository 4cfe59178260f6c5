"""/metrics parsed with prometheus_client's own parser: names, labels, and counters that move by exactly
the tokens served."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import SERVED, wait_idle


def scrape(http) -> dict[str, dict[tuple, float]]:
    """-> {sample name: {labels as sorted tuple: value}}."""
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    key = tuple(sorted({"model_name": SERVED, **labels}.items()))
    return samples.get(name, {}).get(key, 0.0)


def test_metric_names_follow_the_conventions(http):
    http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    samples = scrape(http)
    for name in (
        "flab:num_requests_running", "flab:num_requests_waiting", "flab:kv_cache_usage_perc",
        "flab:prefix_cache_hit_rate", "flab:prefix_cache_queries_total", "flab:prefix_cache_hits_total",
        "flab:num_preemptions_total", "flab:prompt_tokens_total", "flab:generation_tokens_total",
        "flab:time_to_first_token_seconds_count", "flab:inter_token_latency_seconds_count",
        "flab:e2e_request_latency_seconds_count", "flab:request_success_total",
    ):  # fmt: skip
        assert name in samples, name
        assert all(dict(labels)["model_name"] == SERVED for labels in samples[name])


def test_counters_move_by_exactly_the_tokens_served(http, live):
    wait_idle(live.engine)
    before = scrape(http)
    usage = [0, 0]
    bodies = [
        ("/v1/completions", {"prompt": "one two three", "max_tokens": 5, "ignore_eos": True}),
        ("/v1/completions", {"prompt": ["a b", "c d e"], "max_tokens": 3, "n": 2, "ignore_eos": True}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hey"}], "max_tokens": 4, "ignore_eos": True},
        ),
    ]
    for path, body in bodies:
        u = http.post(path, json=body).json()["usage"]
        usage[0] += u["prompt_tokens"]
        usage[1] += u["completion_tokens"]
    streamed = http.post(
        "/v1/completions",
        json={"prompt": "stream me", "max_tokens": 6, "stream": True, "ignore_eos": True,
              "stream_options": {"include_usage": True}},
    ).text  # fmt: skip
    assert streamed.rstrip().endswith("[DONE]")
    import json

    last = json.loads(streamed.split("data: ")[-2])
    usage[0] += last["usage"]["prompt_tokens"]
    usage[1] += last["usage"]["completion_tokens"]
    after = scrape(http)
    assert usage[1] == 5 + 3 * 4 + 4 + 6
    assert value(after, "flab:prompt_tokens_total") - value(before, "flab:prompt_tokens_total") == usage[0]
    assert value(after, "flab:generation_tokens_total") - value(before, "flab:generation_tokens_total") == usage[1]
    # the engine sampled exactly these tokens too (no other caller in between)
    engine_gen = value(after, "flab:engine_generation_tokens_total") - value(
        before, "flab:engine_generation_tokens_total"
    )
    assert engine_gen == usage[1]
    done = value(after, "flab:request_success_total", finished_reason="length") - value(
        before, "flab:request_success_total", finished_reason="length"
    )
    assert done == 1 + 4 + 1 + 1  # one per choice
    ttft = value(after, "flab:time_to_first_token_seconds_count") - value(
        before, "flab:time_to_first_token_seconds_count"
    )
    assert ttft == done
    itl = value(after, "flab:inter_token_latency_seconds_count") - value(
        before, "flab:inter_token_latency_seconds_count"
    )
    assert itl == usage[1] - done  # every token after each choice's first
    assert value(after, "flab:num_requests_running") == 0 and value(after, "flab:kv_cache_usage_perc") == 0


def test_prefix_cache_counters(http, live):
    wait_idle(live.engine)
    prompt = list(range(10, 10 + 3 * live.engine.stats().block_size + 1))  # three full blocks
    before = scrape(http)
    http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 2, "n": 3})
    after = scrape(http)
    hits = value(after, "flab:prefix_cache_hits_total") - value(before, "flab:prefix_cache_hits_total")
    assert hits >= 2 * 3  # the two later choices took the first one's three blocks
    assert 0 < value(after, "flab:prefix_cache_hit_rate") <= 1
