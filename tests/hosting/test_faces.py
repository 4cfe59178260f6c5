"""The host's policy through the app's and the server's faces: one hosted app (`app.make_api_app`: the Gradio UI and
the OpenAI API on one loopback port over one engine) driven with gradio_client and httpx.

- a visitor sees no working remote-code toggle, cannot load a local path outside the allowed folders (existing or
  not, through `..` or a symlink: one message), cannot load a model needing remote code, nor ask over the caps;
  a second visitor cannot take a model slot that is in use;
- a bounded load test: one greedy API client at its parallel cap with long prompts, 8 gradio_client sessions (each
  from its own address, X-Forwarded-For from the loopback proxy the policy names: the app counts visitors by address)
  with one short request each: every short request's first token comes within a stated number of engine steps
  of its time alone (measured in steps, from each delta's StepStats; wall times are printed, never asserted),
  the owners reaching the engine are the visitors, and every block is free at the end;
- a storm (tests/test_storm.py's idea, smaller) through the server's HTTP API and through the app's API, ~20%
  aborted: every block free and no visitor slot held at the end.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from backend.hosting import HostPolicy
from backend.hosting.paths import PATH_REFUSED
from backend.hosting.remote_code import remote_code_status
from tests.server.conftest import free_port, wait_idle

gradio_client = pytest.importorskip("gradio_client")
pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

KEY = "sk-faces"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_NEW = 256  # the host's cap on new tokens
PER_VISITOR = 8  # the host's cap on one visitor's parallel sequences (also the scheduler's per-owner cap)
# the app's /load: the model, then the Model panel's options by name (ui/panel.py, in its controls' units)
MODEL = "tiny:llama"
PANEL = dict(
    model_impl="auto", quantization="as in checkpoint", dtype="float32", device="cpu", kv_cache_memory_gb=4,
    block_size=16, max_num_seqs=32, max_model_len=0, trust_remote_code=False, max_num_batched_tokens=32,
)  # fmt: skip
SHORT_BOUND_STEPS = 8  # a short request's first token: at most this many engine steps later than alone
STORM_HTTP = int(os.environ.get("FLAB_FACES_STORM_HTTP", "100"))
STORM_APP = int(os.environ.get("FLAB_FACES_STORM_APP", "16"))  # app events of 1-5 copies each (~50 requests)


def gen_args(prompt="Once upon a time", copies=1, max_new=4, chat=False):
    return [prompt, chat, "copies", copies, 0.0, 1.0, 0, max_new, 0, True, 0]


class StreamSpy:
    """Wraps engine.open_stream (the one path both faces use): records each request's owner, the engine step before
    it was added, and the step whose delta carried its first token (StreamDelta.stats.step)."""

    def __init__(self, engine) -> None:
        self.engine, self.real = engine, engine.open_stream
        self.lock = threading.Lock()
        self.records: list[dict] = []
        engine.open_stream = self

    def __call__(self, prompt=None, params=None, prompt_token_ids=None, owner=None, sink=None):
        rec = dict(owner=owner, added=self.engine.stats().num_steps, first=None, t0=time.perf_counter(), ttft=None)
        with self.lock:
            self.records.append(rec)
        if sink is not None:  # the server: the engine pushes the deltas to its sink
            return self.real(prompt, params, prompt_token_ids=prompt_token_ids, owner=owner, sink=_noting(sink, rec))
        return SpiedStream(self.real(prompt, params, prompt_token_ids=prompt_token_ids, owner=owner), rec)

    def steps(self, rec: dict) -> int:
        return rec["first"] - rec["added"]

    def by_owner(self, owner: str) -> list[dict]:
        with self.lock:
            return [r for r in self.records if r["owner"] == owner]

    def restore(self) -> None:
        self.engine.open_stream = self.real


def _note_first(rec: dict, delta) -> None:
    if rec["first"] is None and delta.token_ids and delta.stats is not None:
        rec["first"], rec["ttft"] = delta.stats.step, time.perf_counter() - rec["t0"]


def _noting(sink, rec: dict):
    """A sink that notes the step of the first token in `rec`, then hands the delta on."""

    def push(delta) -> None:
        _note_first(rec, delta)
        sink(delta)

    return push


class SpiedStream:
    """An engine RequestStream that notes the step of its first token in `rec`."""

    def __init__(self, handle, rec: dict) -> None:
        self.handle, self.rec = handle, rec

    def __getattr__(self, name: str):
        return getattr(self.handle, name)

    def __iter__(self) -> "SpiedStream":
        return self

    def __next__(self):
        delta = next(self.handle)
        _note_first(self.rec, delta)
        return delta

    def __enter__(self) -> "SpiedStream":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()


def start_app(asgi) -> tuple:
    """uvicorn on a free loopback port with the lifespan on (the mounted Gradio app starts its queue there)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            asgi,
            host="127.0.0.1",
            port=port,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=2,
            proxy_headers=False,  # like app.py --api: the policy's trusted proxies decide the client address
        )
    )
    thread = threading.Thread(target=server.run, name="uvicorn-faces", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def model_dir():
    from backend.loading.builtin import resolve_builtin

    return resolve_builtin(MODEL)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model_dir):
    """allowed/ (the host's model folder) holding a copy of the tiny model and one whose config asks for remote
    code; outside/ a copy the visitor must not reach; allowed/escape -> outside (a symlink)."""
    root = tmp_path_factory.mktemp("hosting-faces")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    shutil.copytree(model_dir, allowed / "mine")
    shutil.copytree(model_dir, allowed / "theirs")
    shutil.copytree(model_dir, outside / "model")
    remote = allowed / "remote"
    shutil.copytree(model_dir, remote)
    config = json.loads((remote / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (remote / "config.json").write_text(json.dumps(config))
    (allowed / "escape").symlink_to(outside / "model", target_is_directory=True)
    return dict(root=root, allowed=allowed, outside=outside)


@pytest.fixture(scope="module")
def faces(folders):
    """The hosted app with --api on a free loopback port, the host's model (tiny:llama) loaded."""
    import app as app_module

    policy = HostPolicy.hosted_defaults(
        allowed_dirs=(folders["allowed"],),
        api_key=KEY,
        max_new_tokens=MAX_NEW,
        max_parallel_per_visitor=PER_VISITOR,
        forwarded_allow_ips=("127.0.0.1",),  # the test's sessions' addresses come through this named proxy
    )
    asgi, lab = app_module.make_api_app(MODEL, policy, served_model_name="tiny")
    lab.update_s = 0.2
    server, thread, url = start_app(asgi)
    client = gradio_client.Client(url + "/", verbose=False)
    status, _, _ = client.predict(MODEL, api_name="/load", **PANEL)
    assert "random weights" in status, status
    yield dict(url=url, lab=lab, policy=policy, client=client)
    server.should_exit = True
    thread.join(timeout=30)
    lab.session.close()


def visitor_sessions(url: str, n: int = 8) -> tuple[list, list[str]]:
    """n gradio_client sessions, each from its own address (X-Forwarded-For written by the trusted proxy 127.0.0.1,
    the app's loopback peer): the app counts visitors by address when hosted. -> (clients, their owner tags)."""
    addresses = [f"10.0.0.{i + 1}" for i in range(n)]
    clients = [gradio_client.Client(url + "/", verbose=False, headers={"X-Forwarded-For": a}) for a in addresses]
    return clients, [f"client:{a}" for a in addresses]


def _status(client, choice, trust=False) -> str:
    return client.predict(choice, api_name="/load", **dict(PANEL, trust_remote_code=trust))[0]


def test_no_working_remote_code_toggle(faces, folders):
    client, policy = faces["client"], faces["policy"]
    toggle = [c for c in client.config["components"] if c.get("props", {}).get("elem_id") == "flab-remote-code"]
    assert len(toggle) == 1
    props = toggle[0]["props"]
    assert props["interactive"] is False and props["value"] is False
    assert props["label"] == remote_code_status(policy)
    assert (
        props["label"] == "Remote code: not allowed by the host (models that ship their own Python code are refused)."
    )
    # ticking it through the API changes nothing: the model that needs remote code is refused, with the reason
    remote = str((folders["allowed"] / "remote").resolve())
    status = _status(client, remote, trust=True)
    assert (
        f"{remote} needs remote code (it ships its own Python code in its repository) and the host has not "
        "allowed remote code on this host; pick another model" in status
    )
    assert faces["lab"].session.spec.model == MODEL  # the host's model is still the one loaded


def test_no_local_path_outside_the_allowed_folders(faces, folders):
    client = faces["client"]
    outside, allowed = folders["outside"], folders["allowed"]
    for path in (
        str(outside / "model"),  # exists, a real checkpoint
        str(outside / "missing"),  # does not exist
        f"{allowed}/../outside/model",  # `..` out of the allowed folder
        str(allowed / "escape"),  # a symlink out of it
        "/etc",
        "~/.cache/../.ssh",
    ):
        status = _status(client, path)
        assert PATH_REFUSED in status, (path, status)
        assert "No such file" not in status and "does not exist" not in status
    assert faces["lab"].session.spec.model == MODEL


def test_model_slots_and_caps(faces, folders):
    lab, first = faces["lab"], faces["client"]
    other = gradio_client.Client(faces["url"] + "/", verbose=False)
    mine = str((folders["allowed"] / "mine").resolve())
    try:
        assert "Load failed" not in _status(first, mine)  # a folder under the allowed one loads: takes the slot
        assert lab.session.spec.model == mine and lab.model_slots.holders() == 1
        status = _status(other, str(folders["allowed"] / "theirs"))
        assert (
            "this host lets 1 visitor(s) load their own model at a time and all are in use: use the host's model, "
            "or try again later" in status
        )
        assert lab.session.spec.model == mine
    finally:
        assert "Load failed" not in _status(first, MODEL)  # back to the host's model: the slot is free
    assert lab.model_slots.holders() == 0 and lab.model_holder is None
    out = first.predict(*gen_args(max_new=MAX_NEW + 1), api_name="/generate")
    assert f"max new tokens {MAX_NEW + 1} is over this host's cap of {MAX_NEW}" in out[2]
    out = first.predict(*gen_args(copies=PER_VISITOR, max_new=2), api_name="/generate")
    assert "done" in out[2]
    # the server: no key -> 401 on the API, /health too (hosted); over the cap -> 400; the UI stays open
    with httpx.Client(base_url=faces["url"], timeout=60) as http:
        assert http.post("/v1/completions", json={"model": "tiny", "prompt": "a"}).status_code == 401
        assert http.get("/health").status_code == 401
        assert http.get("/config").status_code == 200  # Gradio's own routes need no key
        r = http.post("/v1/completions", json={"model": "tiny", "prompt": "a", "max_tokens": MAX_NEW + 1}, headers=AUTH)
        assert r.status_code == 400 and f"cap of {MAX_NEW}" in r.json()["error"]["message"]
        body = {"model": "tiny", "prompt": "a", "max_tokens": 2, "n": PER_VISITOR + 1}
        r = http.post("/v1/completions", json=body, headers=AUTH)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"  # can never fit: not a 429 to retry
        assert f"at most {PER_VISITOR} per visitor" in r.json()["error"]["message"]


def _greedy(url: str, prompt_ids: list[int], max_tokens: int, started: threading.Event) -> int:
    body = {"model": "tiny", "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    with httpx.Client(base_url=url, timeout=120) as http:
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=AUTH) as r:
            status = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    started.set()
    return status


def test_a_greedy_client_does_not_starve_short_sessions(faces):
    """The greedy API client runs PER_VISITOR long requests (prompts of 300 tokens prefilled 32 tokens per step:
    ~75 steps of prefill, then 150 tokens each); meanwhile 8 gradio sessions each send one short request."""
    lab, url = faces["lab"], faces["url"]
    engine = lab.session.current()
    spy = StreamSpy(engine)
    sessions, owners = visitor_sessions(url)
    try:
        sessions[0].predict(*gen_args(), api_name="/generate")  # alone: the short request's steps to first token
        wait_idle(engine)
        alone = spy.by_owner(owners[0])[0]
        started = threading.Event()
        rng = random.Random(0)
        prompts = [[rng.randrange(3, 200) for _ in range(300)] for _ in range(PER_VISITOR)]
        with ThreadPoolExecutor(PER_VISITOR) as pool:
            greedy = [pool.submit(_greedy, url, p, 150, started) for p in prompts]
            deadline = time.monotonic() + 60
            while engine.stats().num_running + engine.stats().num_waiting < PER_VISITOR:
                assert time.monotonic() < deadline, "the greedy requests did not arrive"
                time.sleep(0.01)
            hog_busy = engine.stats()
            jobs = [s.submit(*gen_args(), api_name="/generate") for s in sessions]
            outs = [j.result(timeout=120) for j in jobs]
            statuses = [f.result(timeout=120) for f in greedy]
        wait_idle(engine)
    finally:
        spy.restore()
    assert statuses == [200] * PER_VISITOR
    assert all("done" in out[2] for out in outs)
    hogs = spy.by_owner("client:127.0.0.1")  # the API client is one visitor: its address (hosted)
    assert len(hogs) == PER_VISITOR
    shorts = [spy.by_owner(o)[-1] for o in owners]  # each visitor's own owner tag: its address
    assert len(set(owners)) == 8
    alone_steps = spy.steps(alone)
    steps = [spy.steps(r) for r in shorts]
    print(
        f"\nshort request alone: {alone_steps} step(s), {alone['ttft'] * 1000:.0f} ms; with the greedy client "
        f"running ({hog_busy.num_running} running, {hog_busy.num_waiting} waiting when they arrived): steps "
        f"{steps}, ms {[round(r['ttft'] * 1000) for r in shorts]}; greedy first tokens after "
        f"{[spy.steps(r) for r in hogs]} steps"
    )
    assert max(steps) <= alone_steps + SHORT_BOUND_STEPS
    s = engine.stats()
    assert s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0 and engine.num_requests == 0
    assert all(lab.visitors.in_use(o) == 0 for o in owners)


def _storm_http(url: str, i: int, rng: random.Random) -> str:
    prompt = [rng.randrange(3, 200) for _ in range(rng.randint(2, 40))]
    body = {"model": "tiny", "prompt": prompt, "max_tokens": rng.randint(1, 16), "temperature": 0, "ignore_eos": True}
    abort_after = rng.randint(0, 4) if rng.random() < 0.2 else None
    with httpx.Client(base_url=url, timeout=120) as http:
        if abort_after is None and i % 2:
            r = http.post("/v1/completions", json=body, headers=AUTH)
            return "ok" if r.status_code == 200 else str(r.status_code)
        with http.stream("POST", "/v1/completions", json={**body, "stream": True}, headers=AUTH) as r:
            if r.status_code != 200:
                return str(r.status_code)
            events = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events += 1
                    if abort_after is not None and events > abort_after:
                        return "aborted"  # leaving the block closes the connection mid-stream
    return "ok"


def test_storm_through_the_server_and_the_app(faces):
    lab, url = faces["lab"], faces["url"]
    engine = lab.session.current()
    rng = random.Random(18)
    seeds = [rng.random() for _ in range(STORM_HTTP)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(PER_VISITOR) as pool:  # one visitor (this address) at its parallel cap
        http = list(pool.map(lambda i: _storm_http(url, i, random.Random(seeds[i])), range(STORM_HTTP)))
    wait_idle(engine)
    http_s = time.perf_counter() - t0
    sessions, owners = visitor_sessions(url)
    t0 = time.perf_counter()
    jobs, stopped = [], 0
    for i in range(STORM_APP):
        session = sessions[i % 8]
        jobs.append(
            session.submit(
                *gen_args(prompt=f"storm {i}", copies=rng.randint(1, 5), max_new=rng.randint(1, 24)),
                api_name="/generate",
            )
        )
        if rng.random() < 0.2:  # the visitor presses Stop: their runs are aborted, their blocks freed
            time.sleep(rng.random() * 0.3)
            session.predict(api_name="/stop")
            stopped += 1
    outcomes = []
    for job in jobs:
        status = job.result(timeout=120)[2]
        outcomes.append(
            "done" if "done" in status else "stopped" if "stopp" in status
            else "refused" if "per visitor at once" in status else status
        )  # fmt: skip
    for s in sessions:  # a cancel that lands between two updates: Stop is what a visitor would press
        s.predict(api_name="/stop")
    wait_idle(engine, timeout=60)
    app_s = time.perf_counter() - t0
    counts = {k: http.count(k) for k in sorted(set(http))}
    print(
        f"\nstorm: HTTP {STORM_HTTP} requests {counts} in {http_s:.1f} s; app {STORM_APP} events "
        f"({stopped} Stop presses; outcomes {outcomes}) in {app_s:.1f} s"
    )
    assert set(http) <= {"ok", "aborted", "429"}, counts
    assert http.count("ok") >= STORM_HTTP // 2 and http.count("aborted") >= 1
    assert set(outcomes) <= {"done", "stopped", "refused"} and outcomes.count("done") >= len(outcomes) // 2, outcomes
    s = engine.stats()
    assert s.kv_blocks_used == 0 and s.num_running == 0 and s.num_waiting == 0 and engine.num_requests == 0
    assert lab.visitors.in_use("client:127.0.0.1") == 0  # every API lease released (aborted streams too)
    deadline = time.monotonic() + 30  # a cancelled event's generator is closed by gradio shortly after
    while any(lab.visitors.in_use(o) for o in owners) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(lab.visitors.in_use(o) == 0 for o in owners)
