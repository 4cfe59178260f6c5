"""A running OpenAI-compatible server (vLLM, SGLang, `transformers serve`, this project's launch_server) as a
target: stream completions from it with the engine's StreamDelta / RequestOutput, read its /metrics.

    endpoint = RemoteEndpoint("http://127.0.0.1:8000")          # or ".../v1"; api_key= for a guarded server
    for delta in endpoint.stream(prompt_token_ids=[1, 2, 3], params=SamplingParams(max_new_tokens=16)):
        print(delta.text, end="")
    outs = endpoint.generate(prompt_token_ids=[[1, 2], [3, 4]], sampling_params=SamplingParams(max_new_tokens=8))

The OpenAI API returns text, not token ids: a delta's `token_ids` stays empty and `extra["num_tokens"]` counts
its tokens (from the chunk's logprobs tokens, which the client asks for; one per non-empty chunk if the server
sends none); the final RequestOutput carries the full text, `num_tokens` in the delta's extra, TTFT and latency.
`ignore_eos` and `stop_token_ids` are sent as the vLLM / SGLang / this project's extensions.
A URL that does not answer, or an error status, is an `EndpointError` with the server's own message.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from backend.core.errors import EngineError, RequestFailedError
from backend.core.outputs import RequestOutput, StreamDelta
from backend.core.sampling import SamplingParams

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 300.0  # longest silence between two streamed chunks

# Prometheus names of the KV usage (0..1), running and waiting requests, per engine family
METRIC_NAMES = {
    "vllm": (
        "vllm:kv_cache_usage_perc|vllm:gpu_cache_usage_perc",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
    ),
    "sglang": ("sglang:token_usage", "sglang:num_running_reqs", "sglang:num_queue_reqs"),
    "flab": ("flab:kv_cache_usage_perc", "flab:num_requests_running", "flab:num_requests_waiting"),
}
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


class EndpointError(EngineError):
    """The endpoint does not answer, refused the request, or sent something that is not the OpenAI API."""


@dataclass
class EndpointMetrics:
    """What the endpoint's /metrics exposes (None: not exposed)."""

    source: str | None  # "vllm" | "sglang" | "flab" | None
    kv_usage: float | None = None  # 0..1
    num_running: float | None = None
    num_waiting: float | None = None

    def describe(self) -> dict[str, str]:
        def show(v: float | None, percent: bool = False) -> str:
            if v is None:
                return "not exposed"
            return f"{100 * v:.1f}%" if percent else f"{v:g}"

        return dict(
            source=self.source or "not exposed",
            kv_usage=show(self.kv_usage, percent=True),
            num_running=show(self.num_running),
            num_waiting=show(self.num_waiting),
        )


def parse_metrics(text: str) -> EndpointMetrics:
    """vLLM-, SGLang- or flab-style gauges from a Prometheus text exposition (summed over label sets)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            try:
                values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                continue
    for source, (kv, running, waiting) in METRIC_NAMES.items():
        found = [next((values[n] for n in names.split("|") if n in values), None) for names in (kv, running, waiting)]
        if any(v is not None for v in found):
            return EndpointMetrics(source, *found)
    return EndpointMetrics(None)


@dataclass
class RemoteEndpoint:
    base_url: str
    api_key: str | None = None
    model: str | None = None  # None: the first model the server lists
    timeout_s: float = READ_TIMEOUT_S
    _next_id: int = field(default=0, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        url = (self.base_url or "").strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", url):
            raise EndpointError(
                f"the endpoint must be an http(s) base URL such as http://127.0.0.1:8000/v1, got {url!r}"
            )
        self.root = url[: -len("/v1")] if url.endswith("/v1") else url
        self.api = self.root + "/v1"

    # --- plumbing -------------------------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _timeout(self) -> httpx.Timeout:
        return httpx.Timeout(self.timeout_s, connect=CONNECT_TIMEOUT_S)

    def _unreachable(self, e: Exception) -> EndpointError:
        return EndpointError(
            f"{self.api} does not answer ({type(e).__name__}: {e}); check that the server runs and the base URL "
            "(e.g. http://127.0.0.1:8000/v1)"
        )

    @staticmethod
    def _status_error(response: httpx.Response, what: str) -> EndpointError:
        try:
            body = json.loads(response.read())
            message = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
            message = message or body.get("detail") or body
        except (ValueError, AttributeError):
            message = response.text[:300]
        return EndpointError(f"{what}: HTTP {response.status_code}: {message}")

    def _get(self, url: str) -> httpx.Response:
        try:
            response = httpx.get(url, headers=self._headers(), timeout=self._timeout())
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if response.status_code != 200:
            raise self._status_error(response, f"GET {url}")
        return response

    # --- API ------------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """The model ids the server serves (GET /v1/models)."""
        try:
            data = self._get(self.api + "/models").json()["data"]
            return [m["id"] for m in data]
        except EndpointError:  # does not answer / an error status: already the clear message
            raise
        except (ValueError, KeyError, TypeError) as e:
            raise EndpointError(f"{self.api}/models did not answer with an OpenAI model list ({e})") from None

    def resolve_model(self) -> str:
        if self.model is None:
            ids = self.models()
            if not ids:
                raise EndpointError(f"{self.api} serves no model")
            self.model = ids[0]
        return self.model

    def metrics(self) -> EndpointMetrics:
        """The endpoint's KV usage and queue gauges from its /metrics (vLLM / SGLang / flab names); a server
        without /metrics gives EndpointMetrics(None) (every field "not exposed")."""
        try:
            response = httpx.get(self.root + "/metrics", headers=self._headers(), timeout=self._timeout())
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if response.status_code != 200:
            return EndpointMetrics(None)
        return parse_metrics(response.text)

    def request_body(self, prompt, params: SamplingParams) -> dict:
        body = dict(
            model=self.resolve_model(),
            prompt=prompt,
            max_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stream=True,
            stream_options={"include_usage": True},
            logprobs=1,
        )
        if params.top_k:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        if params.stop_token_ids:
            body["stop_token_ids"] = list(params.stop_token_ids)
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.presence_penalty:
            body["presence_penalty"] = params.presence_penalty
        if params.frequency_penalty:
            body["frequency_penalty"] = params.frequency_penalty
        return body

    def open_stream(
        self, prompt: str | None = None, params: SamplingParams | None = None, prompt_token_ids: list[int] | None = None
    ) -> "RemoteStream":
        """One streaming POST /v1/completions as a handle: iterate it for its deltas; `abort()` from any thread ends
        it at once, before its first chunk too (the engine's `open_stream`, over HTTP)."""
        params = params or SamplingParams()
        if (prompt is None) == (prompt_token_ids is None):
            raise EndpointError("give a prompt or prompt_token_ids (one of them)")
        body = self.request_body(prompt if prompt is not None else list(prompt_token_ids), params)
        with self._lock:
            rid = self._next_id
            self._next_id += 1
        return RemoteStream(self, rid, prompt, list(prompt_token_ids or []), body)

    def stream(
        self, prompt: str | None = None, params: SamplingParams | None = None, prompt_token_ids: list[int] | None = None
    ) -> Iterator[StreamDelta]:
        """POST /v1/completions with stream=True; one StreamDelta per chunk (see the module docstring)."""
        with self.open_stream(prompt, params, prompt_token_ids) as handle:
            yield from handle

    def generate(
        self,
        prompts: list[str] | None = None,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        prompt_token_ids: list[list[int]] | None = None,
    ) -> list[tuple[RequestOutput, int]]:
        """All prompts at once (one streaming request each, in threads); (output, completion tokens) per prompt,
        in prompt order. The first failure is raised after every request ended."""
        items = [(p, None) for p in prompts] if prompts is not None else [(None, ids) for ids in prompt_token_ids or []]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(items)
        results: list[tuple[RequestOutput, int] | BaseException | None] = [None] * len(items)

        def run(i: int) -> None:
            try:
                last = None
                for delta in self.stream(items[i][0], params[i], items[i][1]):
                    last = delta
                results[i] = (last.output, last.extra["total_tokens"])
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
                results[i] = e

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(items))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]


class RemoteStream:
    """One streaming request to an endpoint (RemoteEndpoint.open_stream), used like the engine's RequestStream:
    iterate for its deltas (in one thread), `abort()` from any other. Aborting shuts the connection down, which
    wakes a read still waiting for the first chunk (closing the response would not: the reading thread would wait
    for the server's next chunk); the server sees its client go and aborts the request; the iteration ends with a
    finished delta whose finish_reason is "abort". Leaving a `with` block aborts an unfinished request."""

    def __init__(self, endpoint: RemoteEndpoint, rid: int, prompt: str | None, prompt_ids: list[int], body: dict):
        self.endpoint, self.request_id, self.body = endpoint, rid, body
        self.prompt, self.prompt_ids = prompt, prompt_ids
        self.finished = False
        self._aborted = False
        self._response: httpx.Response | None = None
        self._lock = threading.Lock()
        self._deltas = self._run()

    def __iter__(self) -> "RemoteStream":
        return self

    def __next__(self) -> StreamDelta:
        return next(self._deltas)

    def abort(self) -> None:
        with self._lock:
            self._aborted = True
            response = self._response
        if response is not None and not self.finished:
            _shut_down(response)

    def close(self) -> None:
        """Abort unless finished, and end the iteration (the iterating thread's call; others use `abort`)."""
        if not self.finished:
            self.abort()
        try:
            self._deltas.close()
        except ValueError:  # another thread is inside next(): the abort ends its read, and so the iteration
            pass

    def __enter__(self) -> "RemoteStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _final(self, text: str, reason: str, ttft: float | None, start: float, num_tokens: int) -> StreamDelta:
        self.finished = True
        final = RequestOutput(
            self.request_id,
            self.prompt,
            self.prompt_ids,
            [],
            text,
            True,
            reason,
            ttft=ttft,
            latency=time.perf_counter() - start,
        )
        return StreamDelta(
            self.request_id, "", [], True, reason, final, extra={"num_tokens": 0, "total_tokens": num_tokens}
        )

    def _run(self) -> Iterator[StreamDelta]:
        ep, rid = self.endpoint, self.request_id
        start = time.perf_counter()
        text, num_tokens, ttft, reason = "", 0, None, None
        try:
            with httpx.stream(
                "POST", ep.api + "/completions", json=self.body, headers=ep._headers(), timeout=ep._timeout()
            ) as response:
                with self._lock:
                    self._response = response
                    aborted = self._aborted
                if aborted:
                    _shut_down(response)
                    yield self._final(text, "abort", ttft, start, num_tokens)
                    return
                if response.status_code != 200:
                    raise ep._status_error(response, f"POST {ep.api}/completions")
                for chunk in _events(response):
                    if "error" in chunk:
                        raise RequestFailedError(f"request {rid} failed at the endpoint: {chunk['error']}", rid)
                    for choice in chunk.get("choices") or []:
                        piece = choice.get("text") or ""
                        lp = choice.get("logprobs") or {}
                        count = len(lp.get("tokens") or lp.get("token_logprobs") or []) or (1 if piece else 0)
                        reason = choice.get("finish_reason") or reason
                        if not (piece or count or reason):
                            continue
                        if ttft is None and (piece or count):
                            ttft = time.perf_counter() - start
                        text += piece
                        num_tokens += count
                        output = RequestOutput(rid, self.prompt, self.prompt_ids, [], text, False, None, ttft=ttft)
                        yield StreamDelta(rid, piece, [], False, None, output, extra={"num_tokens": count})
                    usage = chunk.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        num_tokens = int(usage["completion_tokens"])
        except httpx.HTTPError as e:
            if self._aborted:  # our own shutdown ended the read
                yield self._final(text, "abort", ttft, start, num_tokens)
                return
            raise ep._unreachable(e) from None
        yield self._final(
            text, "abort" if self._aborted and reason is None else reason or "stop", ttft, start, num_tokens
        )


def _shut_down(response: httpx.Response) -> None:
    """End the connection under `response` now, also for a thread blocked reading it (httpx's documented
    `network_stream` extension gives the socket; shutdown wakes the read, close alone does not)."""
    stream = response.extensions.get("network_stream")
    sock = stream.get_extra_info("socket") if stream is not None else None
    try:
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed
        pass
    response.close()


def _events(response: httpx.Response) -> Iterator[dict]:
    """The JSON objects of a server-sent event stream, up to `data: [DONE]`."""
    for line in response.iter_lines():
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            yield json.loads(data)
        except ValueError:
            raise EndpointError(f"the endpoint streamed something that is not JSON: {data[:120]!r}") from None
