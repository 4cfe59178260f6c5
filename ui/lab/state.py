"""What every part of the Lab shares: the engine session, the runs in flight, the host's policy and its model slots.

Also the few operations on that state that several buttons need: the Hub probe, the loaded engine, the refusal
to replace the engine under another visitor's run, Stop, and a closed page (`unload_visitor`)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from backend.hosting import HostingError, HostPolicy, ModelSlots, RemoteCodeDecision, VisitorLimiter
from ui import defaults
from ui.common import LOAD_WAIT_S, hub_module, session_key
from ui.panel import Panel, host_panel
from ui.session import LoadSpec, RunHandle, Runs, Session


class LabState:
    """One engine session per process, the runs in flight per browser session, the host's policy.

    `host_model`: the model the host serves (the app's default; loading it needs no model slot). A visitor who
    loads another model holds one of the policy's `max_visitor_models` slots until the host's model is loaded
    again, their page closes (`unload_visitor`), or another visitor's load replaces it."""

    def __init__(
        self,
        session: Session | None = None,
        update_s: float = 0.3,
        policy: HostPolicy | None = None,
        host_model: str | None = None,
    ) -> None:
        self.session = session or Session()
        self.runs = Runs()
        self.update_s = update_s  # seconds between live updates of a run
        self._connectivity = None  # hub.HubConnectivity, probed at most once a minute
        self.policy = policy or HostPolicy()
        self.visitors = VisitorLimiter(self.policy)
        self.model_slots = ModelSlots(self.policy)
        self.host_model = defaults.resolve_choice(host_model) if host_model else None
        # the host's model with the host's settings: set by its first load (the start-up load, app.py); the same
        # model with other settings (batch, context, KV budget, step budget) is a visitor's model, with a slot
        self.host_spec: LoadSpec | None = None
        self.model_holder: str | None = None  # the visitor whose own model is loaded now
        self.last_remote_code: RemoteCodeDecision | None = None  # of the last spec() (loads run one at a time)
        self.startup_load = None  # ui/lab/startup.StartupLoad while the host's model loads at start-up

    def offline(self) -> bool:
        hub = hub_module()
        if self._connectivity is None:
            self._connectivity = hub.HubConnectivity()
        return hub.is_offline(self._connectivity)

    def engine(self):
        """The loaded engine; a load in progress (e.g. at page load) finishes first. gr.Error when none is."""
        engine = self.session.current(wait=LOAD_WAIT_S)
        if engine is None:
            raise gr.Error("No model is loaded: pick one in the Model panel and press Load.", title="No model")
        return engine

    def refuse_if_others_run(self, key: str, what: str) -> None:
        """The engine is shared by every browser session: never close it under another user's run."""
        others = self.runs.active_elsewhere(key)
        if others:
            raise gr.Error(
                f"{what} would replace the loaded engine, which {others} run(s) of other users are "
                "using right now. Try again when they have finished.",
                title="Engine busy",
            )

    @contextmanager
    def run(self, key: str) -> Iterator[RunHandle]:
        """A run of browser session `key` while the block runs: Stop (and a closed page) cancel it."""
        handle = self.runs.start(key)
        try:
            yield handle
        finally:
            self.runs.finish(key, handle)

    def stop(self, request: gr.Request = None):
        """The Stop buttons: stop this browser session's runs. With nothing running the status keeps what it shows
        (a run that has just ended keeps its result) and a toast says so."""
        n = self.runs.stop(session_key(request))
        if n:
            return "**stopping**: requests aborted, their KV blocks are freed."
        gr.Info("Nothing is running.")
        return gr.skip()

    # --- the host's model slots -----------------------------------------------------------------

    def host_panel(self) -> Panel:
        """The panel values of the host's model and settings (what the app loads at start-up)."""
        return host_panel(self.host_model or defaults.DEFAULT_CHOICE, self.policy.allow_remote_code)

    def is_host_spec(self, spec: LoadSpec) -> bool:
        """True for the host's model with the host's settings (before its first load: the host's model name)."""
        if self.host_spec is not None:
            return spec == self.host_spec
        return self.host_model is not None and spec.model == self.host_model

    def claim_model(self, key: str, spec: LoadSpec) -> bool:
        """Before loading `spec` for visitor `key`: anything but the host's model with the host's settings takes one
        of the host's visitor model slots (HostingError when none is free). -> True when this call took a new slot."""
        if self.is_host_spec(spec) or self.model_holder == key:
            return False
        try:
            self.model_slots.claim(key)
        except HostingError as e:
            if self.host_model is not None and spec.model == self.host_model:
                raise HostingError(
                    "the host's model runs with the host's engine settings (batch, context, KV budget, step budget) "
                    f"for every visitor; other settings make it a model of your own, and {e}"
                ) from None
            raise
        return True

    def loaded_for(self, key: str, spec: LoadSpec) -> None:
        """After `spec` loaded for `key`: the previous holder's model is gone, so is their slot. The host model's
        first load sets the host's settings."""
        if self.host_spec is None and self.host_model is not None and spec.model == self.host_model:
            self.host_spec = spec
        own = not self.is_host_spec(spec)
        if self.model_holder is not None and (self.model_holder != key or not own):
            self.model_slots.release(self.model_holder)
        self.model_holder = key if own else None

    def unload_visitor(self, request: gr.Request = None) -> None:
        """demo.unload: a visitor's page closed; their runs stop and their model slot is free again (their model
        stays loaded for whoever uses it until someone loads another)."""
        key = session_key(request)
        self.runs.stop(key)
        if self.model_holder == key:
            self.model_holder = None
        self.model_slots.release(key)
