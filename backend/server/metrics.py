"""Prometheus metrics of one server (`/metrics`), written with prometheus_client into the app's own registry.

Names follow vLLM / SGLang with the `flab:` prefix, every series labelled `model_name`:

- read from `engine.stats()` at scrape time (a custom collector): `flab:num_requests_running`,
  `flab:num_requests_waiting`, `flab:kv_cache_usage_perc` (0..1), `flab:prefix_cache_queries_total` and
  `flab:prefix_cache_hits_total` (prompt blocks looked up / found), `flab:prefix_cache_hit_rate`,
  `flab:num_preemptions_total`, `flab:engine_prompt_tokens_total` and `flab:engine_generation_tokens_total`
  (tokens the engine computed for every caller: the API, the app's UI, aborted requests; prompt tokens served
  from the prefix cache are not computed, preempted requests' prompts are computed again);
- observed by the server per API request: `flab:prompt_tokens_total` and `flab:generation_tokens_total`
  (exactly the `usage` counts the API returned), `flab:request_success_total{finished_reason}`,
  `flab:request_failure_total`, histograms `flab:time_to_first_token_seconds`,
  `flab:inter_token_latency_seconds`, `flab:e2e_request_latency_seconds`, `flab:request_prompt_tokens`,
  `flab:request_generation_tokens`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)


class EngineCollector(Collector):
    """Gauges and counters read from `engine.stats()` when Prometheus scrapes (nothing when no engine)."""

    def __init__(self, get_engine: Callable, model_name: Callable[[], str]) -> None:
        self._get_engine = get_engine
        self._model_name = model_name

    def collect(self) -> Iterable:
        engine = self._get_engine()
        if engine is None or engine.closed:
            return []
        s = engine.stats()
        name = self._model_name()

        def gauge(metric: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            return family

        def counter(metric: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(metric, doc, labels=["model_name"])
            family.add_metric([name], value)
            return family

        return [
            gauge("flab:num_requests_running", "Requests in the running batch.", s.num_running),
            gauge("flab:num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting),
            gauge("flab:kv_cache_usage_perc", "Fraction of KV cache blocks held by requests (0..1).", s.kv_usage),
            gauge("flab:kv_cache_blocks_total", "KV cache blocks.", s.kv_blocks_total),
            gauge(
                "flab:prefix_cache_hit_rate", "Prompt blocks found in the prefix cache / looked up.", s.prefix_hit_rate
            ),
            counter(
                "flab:prefix_cache_queries",
                "Full prompt blocks looked up in the prefix cache.",
                s.prefix_queried_blocks,
            ),
            counter("flab:prefix_cache_hits", "Full prompt blocks found in the prefix cache.", s.prefix_hit_blocks),
            counter(
                "flab:num_preemptions", "Requests preempted (blocks taken back, recomputed later).", s.num_preemptions
            ),
            counter("flab:engine_prompt_tokens", "Prompt tokens the engine computed (all callers).", s.prompt_tokens),
            counter("flab:engine_generation_tokens", "Tokens the engine sampled (all callers).", s.generation_tokens),
            counter("flab:engine_steps", "Engine steps run.", s.num_steps),
        ]


class ServerMetrics:
    """The registry behind `/metrics` and the series the request handlers observe."""

    def __init__(self, get_engine: Callable, model_name: Callable[[], str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._model_name = model_name
        reg = self.registry
        label = ["model_name"]
        self.prompt_tokens = Counter(
            "flab:prompt_tokens", "Prompt tokens of API requests (usage).", label, registry=reg
        )
        self.generation_tokens = Counter(
            "flab:generation_tokens", "Completion tokens returned by the API (usage).", label, registry=reg
        )
        self.request_success = Counter(
            "flab:request_success",
            "API requests finished, by finish reason.",
            label + ["finished_reason"],
            registry=reg,
        )
        self.request_failure = Counter(
            "flab:request_failure", "API requests that failed while running (5xx).", label, registry=reg
        )
        self.ttft = Histogram(
            "flab:time_to_first_token_seconds", "Seconds from arrival to the first token.", label,
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.itl = Histogram(
            "flab:inter_token_latency_seconds", "Seconds between consecutive tokens of a request.", label,
            buckets=LATENCY_BUCKETS, registry=reg,
        )  # fmt: skip
        self.e2e = Histogram(
            "flab:e2e_request_latency_seconds", "Seconds from arrival to the last token.", label,
            buckets=E2E_BUCKETS, registry=reg,
        )  # fmt: skip
        self.request_prompt_tokens = Histogram(
            "flab:request_prompt_tokens", "Prompt tokens per request.", label, buckets=TOKEN_BUCKETS, registry=reg
        )
        self.request_generation_tokens = Histogram(
            "flab:request_generation_tokens",
            "Generated tokens per request.",
            label,
            buckets=TOKEN_BUCKETS,
            registry=reg,
        )
        reg.register(EngineCollector(get_engine, model_name))

    def observe_first_token(self, seconds: float) -> None:
        self.ttft.labels(self._model_name()).observe(seconds)

    def observe_token_gap(self, seconds: float) -> None:
        self.itl.labels(self._model_name()).observe(seconds)

    def observe_finished(self, reason: str, generation_tokens: int, seconds: float) -> None:
        """One engine request (one choice) that finished normally."""
        name = self._model_name()
        self.request_success.labels(name, reason).inc()
        self.request_generation_tokens.labels(name).observe(generation_tokens)
        self.e2e.labels(name).observe(seconds)

    def observe_usage(self, prompt_tokens: list[int], completion_tokens: int) -> None:
        """One API response delivered: its `usage` (each prompt counted once, however many choices `n` asks)."""
        name = self._model_name()
        for n in prompt_tokens:
            self.request_prompt_tokens.labels(name).observe(n)
        self.prompt_tokens.labels(name).inc(sum(prompt_tokens))
        self.generation_tokens.labels(name).inc(completion_tokens)

    def observe_failure(self) -> None:
        self.request_failure.labels(self._model_name()).inc()
