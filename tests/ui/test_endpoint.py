"""An OpenAI-compatible endpoint as a target in the app (ui/endpoint.py through the Lab callbacks): this project's own
server on loopback, serving the same tiny:llama weights as the lab, stands in for vLLM / SGLang."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from backend import Engine
from backend.hosting import HostPolicy
from backend.server import build_app
from tests.server.conftest import free_port, start_server
from tests.ui.test_callbacks import COMPARE, GEN
from ui import endpoint as remote
from ui.callbacks import Lab
from ui.plots import Series
from ui.summary import RequestResult


@pytest.fixture(scope="module")
def served(ui_cache):
    """tiny:llama (the lab's model, same weights) served on a free loopback port, with an API key."""
    engine = Engine(str(ui_cache), dtype="float32", num_kv_blocks=256)
    server, thread, url = start_server(build_app(engine, served_model_name="tiny", api_key="sk-test"))
    yield url + "/v1"
    server.should_exit = True
    thread.join(timeout=30)
    engine.close()


def _last(gen):
    out = None
    for out in gen:
        pass
    return out


def _fig_text(fig: go.Figure) -> str:
    return " ".join(a.text for a in fig.layout.annotations) + " " + str(fig.layout.title.text)


def test_generate_streams_from_the_endpoint(served):
    lab = Lab(update_s=0.05)  # no engine of ours needed
    updates = list(lab.generate_tab.generate(**GEN, endpoint_url=served, endpoint_key="sk-test"))
    text, rows, status, thr, ttft, batch, mem, summary, kv = updates[-1]
    assert "**done**" in status and "3 request(s)" in status and "36 tokens" in status and "failed" not in status
    assert text and [r[2] for r in rows] == [12, 12, 12]  # token counts from the stream
    assert any(len(t.x) for t in thr.data) and sum(len(t.y) for t in ttft.data) == 3
    values = dict((r[0], r[1]) for r in summary)
    assert values["generated tokens"] == "36" and values["TTFT mean / max"] != "—"
    assert values["decode tok/s (decode-only steps)"] != "—" and "stream bursts (client side)" in values
    assert "flab" in _fig_text(mem) and any(t.name == "KV usage %" for t in mem.data)  # from its /metrics
    assert values["KV usage peak (/metrics)"].endswith("(flab)")


def test_compare_our_engine_with_the_endpoint(lab, served):
    args = dict(COMPARE, a_impl="native", b_endpoint=served, b_api_key="sk-test")
    status, thr, ttft, mem, batch, table, agree, load_status = _last(lab.compare_tab.compare(**args))
    assert "agree token for token" in status, (status, agree)
    assert [r[2] for r in agree] == ["identical (10 tokens)"] * 2
    assert "B: endpoint tiny" in list(table.columns)
    kv = table[table["metric"].str.startswith("KV usage peak")].iloc[0].tolist()
    assert kv[1].endswith("%") and kv[2].endswith("(flab)")
    assert {n.split(":")[0] for t in thr.data for n in [t.name]} == {"A", "B"}


def test_a_url_that_does_not_answer_is_a_clear_status(lab):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    update = _last(lab.generate_tab.generate(**GEN, endpoint_url=dead))
    assert "does not answer" in update[2] and "Traceback" not in update[2] and update[2].startswith("**EndpointError")
    update = _last(lab.compare_tab.compare(**dict(COMPARE, b_endpoint=dead)))
    assert "does not answer" in update[0] and update[-1] is not None
    assert lab.session.current() is not None  # the lab's engine untouched


def test_wrong_key_and_hosted_refusal(served):
    update = _last(Lab().generate_tab.generate(**GEN, endpoint_url=served, endpoint_key="wrong"))
    assert "HTTP 401" in update[2]
    hosted = Lab(policy=HostPolicy.hosted_defaults())
    update = _last(hosted.generate_tab.generate(**GEN, endpoint_url=served, endpoint_key="sk-test"))
    assert "host only" in update[2] and update[2].startswith("**HostingError")


def test_metrics_not_exposed_and_text_agreement():
    fig = remote.metrics_figure(None, [], "B")
    assert "not exposed" in _fig_text(fig) and not fig.data
    assert remote.kv_peak(None, []) == "not exposed"
    decode = lambda ids: "".join(chr(96 + i) for i in ids)  # noqa: E731 - 1 -> "a", 2 -> "b"
    ours = [
        RequestResult(0, "p", text="abc", token_ids=[1, 2, 3]),
        RequestResult(1, "q", text="abd", token_ids=[1, 2, 4]),
    ]
    theirs = [remote.EndpointResult(0, "p", text="abc", count=3), remote.EndpointResult(1, "q", text="abx", count=3)]
    rows = remote.text_agreement_rows(ours, theirs, decode)
    assert rows[0][2:] == ["identical (3 tokens)", ""]
    assert rows[1][2] == "differ at token 2 of 3" and "'d' (id 4) vs B 'x'" in rows[1][3]


def test_series_from_arrivals_counts_prefill_and_decode():
    a = remote._Arrival
    arrivals = [a(0.10, 0, 1, True), a(0.1005, 1, 1, True), a(0.20, 0, 1, False), a(0.30, 1, 2, False)]
    s: Series = remote.series_from_arrivals(arrivals, [5, 7], {0: 0.2, 1: 0.3})
    assert s.time == [0.1005, 0.2, 0.3]  # the two first tokens within MERGE_S are one burst
    assert s.prefill_tokens == [12, 0, 0] and s.decode_tokens == [0, 1, 2]
    assert s.batch_size == [2, 2, 1] and s.waiting == [0, 0, 0]
    assert s.duration[0] == pytest.approx(0.1005) and s.duration[1] == pytest.approx(0.0995)
