"""The Compare tab: the same greedy workload with settings A and B (both engines loaded, each warmed up, then measured
in alternated rounds A, B, A, B, ...), or A against an OpenAI-compatible endpoint; the curves overlaid, then the lab's
engine loaded again. Views: ui/compare.py."""

from __future__ import annotations

import gradio as gr

from backend.hosting import check_request
from ui import compare, images
from ui import endpoint as remote
from ui.common import describe, progress_adapter, session_key, visitor_key
from ui.errors import status_errors
from ui.lab import follow
from ui.lab.loading import Loader
from ui.lab.run_inputs import prompts_from
from ui.lab.state import LabState
from ui.numbers import checked
from ui.panel import Panel, check_panel_numbers
from ui.session import LoadSpec, RunHandle
from ui.workload import Workload, build_prompt_ids


def prompt_ids(engine, prompts: list[str], use_chat_template: bool) -> list[list[int]]:
    """The token ids each prompt is sent as (the chat template applied where the Workload applies it)."""
    return [build_prompt_ids(engine.tokenizer, p, use_chat_template) or engine.tokenizer.encode(p) for p in prompts]


def warm_up(engine, ids: list[list[int]], owner: str) -> None:
    """One untimed run of the same prompts, a few tokens each, on a freshly loaded engine (first-call costs: kernel
    and allocator set-up, page faults, lazy initialisation), then the prefix cache forgotten, so the measured run
    starts warm but finds no cached prompt."""
    from backend import SamplingParams

    params = SamplingParams(max_new_tokens=compare.WARMUP_TOKENS, temperature=0.0, ignore_eos=True)
    engine.generate(prompt_token_ids=[list(i) for i in ids], sampling_params=params, owner=owner)
    engine.reset_prefix_cache()


def warm_up_images(engine, texts: list[str], image, owner: str) -> None:
    """warm_up() of image requests (`texts` with their placeholder, one `image` each): the vision tower too."""
    from backend import SamplingParams

    params = SamplingParams(max_new_tokens=compare.WARMUP_TOKENS, temperature=0.0, ignore_eos=True)
    engine.generate(texts, params, owner=owner, images=[[image]] * len(texts))
    engine.reset_prefix_cache()


class CompareTab:
    """What the Compare button calls."""

    def __init__(self, state: LabState, loader: Loader) -> None:
        self.state = state
        self.loader = loader

    @status_errors("comparing", outputs=8, status=0)
    def compare(
        self,
        choice,
        a_impl,
        a_quant,
        b_impl,
        b_quant,
        prompt,
        use_chat_template,
        mode,
        copies,
        max_new,
        ignore_eos,
        b_endpoint="",
        b_api_key="",
        rounds=compare.DEFAULT_ROUNDS,
        a_kernels="auto",
        b_kernels="auto",
        image=None,
        request: gr.Request = None,
        progress=gr.Progress(),
        **options,
    ):
        """Load settings A and B (both held at once), warm each up, then run the same greedy workload in alternated
        rounds (A, B, A, B, ...); overlay the curves. With `b_endpoint`, B is that OpenAI-compatible endpoint
        (ui/endpoint.py), sent A's prompt token ids. `a_kernels` / `b_kernels`: each side's CPU kernel path
        (EngineConfig.cpu_kernels). `options`: the panel's engine options by name (ui/panel.py), A's and B's
        implementation, quantization and CPU kernels set by each side.

        The lab's engine (the left panel's) is loaded again at the end, so the panel still tells the truth.
        Yields (status, throughput, TTFT, memory, batch, summary table, agreement table, load status)."""
        from backend import SamplingParams

        state = self.state
        image = images.checked_image(image)  # both sides get the same image and prompts
        if (b_endpoint or "").strip():
            images.refuse_endpoint_image(image)
        runs = checked(copies=copies, max_new=max_new, rounds=rounds)  # every number first (ui/numbers.py)
        rounds = runs["rounds"]
        prompts = prompts_from(prompt, mode, runs["copies"])
        params = SamplingParams(max_new_tokens=runs["max_new"], temperature=0.0, ignore_eos=bool(ignore_eos))
        check_request(state.policy, max_new_tokens=params.max_new_tokens)
        if (b_endpoint or "").strip():  # checked (host policy, it answers) before A loads anything
            a = compare.settings(a_impl, a_quant, "endpoint", "", a_kernels, "auto")[0]
            sides_to_run = [
                a,
                compare.SideSettings("B", "endpoint", remote.connect(b_endpoint, b_api_key, state.policy)),
            ]
        else:
            sides_to_run = compare.settings(a_impl, a_quant, b_impl, b_quant, a_kernels, b_kernels)
        panel = Panel.of(choice, **options)
        check_panel_numbers(panel)
        key = session_key(request)
        state.refuse_if_others_run(key, "Comparing")
        with state.visitors.running(visitor_key(request, state.policy.hosted), len(prompts)):  # HostingError over cap
            yield from self._run_compare(
                key, sides_to_run, prompts, params, bool(use_chat_template), progress, panel, rounds, image
            )

    def side_spec(self, panel: Panel, side: compare.SideSettings) -> LoadSpec:
        """What one side loads: the panel's engine options with the side's implementation, quantization and CPU
        kernel path."""
        return self.loader.spec(panel.replace(model_impl=side.impl, quantization=side.quant, cpu_kernels=side.kernels))

    def _load_side(self, key: str, side: compare.SideSettings, panel: Panel, first: bool, progress):
        """Load one side: the first into the lab's session (other pages see it), the next beside it (the caller
        closes it). -> (engine, built apart, claimed a model slot)."""
        state = self.state
        spec = self.side_spec(panel, side)
        claimed = state.session.spec != spec and state.claim_model(key, spec)
        self.loader.check_new(spec)  # against the memory free now: the other side already holds its share
        if first:
            engine, _ = state.session.load(spec, progress=progress_adapter(progress))
            return engine, False, claimed
        return state.session.build_apart(spec, progress=progress_adapter(progress)), True, claimed

    def _run_compare(
        self,
        key: str,
        sides_to_run,
        prompts,
        params,
        use_chat_template: bool,
        progress,
        panel: Panel,
        rounds: int,
        image=None,
    ):
        state = self.state
        previous = state.session.spec
        previous_holder = state.model_holder
        restored = False
        claimed = False
        sides: dict[str, compare.Side] = {}
        engines: dict[str, object] = {}
        apart: list = []  # engines built beside the session's: closed before the lab's engine comes back
        warmed: list[str] = []
        order: list[str] = []
        decode = None
        skip = gr.skip()
        endpoint_wl = None
        try:
            with state.run(key) as handle:
                for side in sides_to_run:  # 1. every engine side loaded, all held at once
                    if handle.cancel.is_set() or side.impl == "endpoint":
                        continue
                    yield (f"**Loading** {side.name}: {side.impl} / {side.quant}…",) + (skip,) * 7
                    engine, built_apart, took = self._load_side(key, side, panel, not engines, progress)
                    claimed = claimed or took
                    if built_apart:
                        apart.append(engine)
                    engines[side.name] = engine
                labels = self._labels(sides_to_run, engines)
                ids: dict[str, list[list[int]]] = {}
                for name, engine in engines.items():  # 2. each warmed up, untimed
                    if handle.cancel.is_set():
                        break
                    ids[name] = prompt_ids(engine, prompts, use_chat_template)
                    lens = [len(i) for i in ids[name]]
                    if image is not None:  # the processor's lengths (placeholders expanded); a text model refuses
                        texts, lens = images.image_requests(engine, prompts, use_chat_template, image)
                    check_request(state.policy, prompt_tokens=max(lens, default=0))
                    decode = decode or engine.tokenizer.decode
                    yield (f"**Warming up** {labels[name]}: {compare.WARMUP_TOKENS} untimed tokens a request…",) + (
                        skip,
                    ) * 7
                    if image is None:
                        warm_up(engine, ids[name], key)
                    else:
                        warm_up_images(engine, texts, image, key)
                    warmed.append(name)
                names = [s.name for s in sides_to_run]
                ours = None  # our engine's last Workload: an endpoint side is sent its prompt token ids
                for i, name in enumerate(compare.run_order(names, rounds)):  # 3. the measured rounds, alternated
                    if handle.cancel.is_set():
                        break
                    side = sides.setdefault(name, compare.Side(labels[name]))
                    where = f" (round {i // len(names) + 1} of {rounds})"
                    if name in engines:
                        # made after the warm-up: the measured run's steps start here
                        each = [params] * len(prompts)
                        wl = Workload(
                            engines[name], prompts, each, use_chat_template, handle.cancel, owner=key, image=image
                        )
                        ours = wl
                    else:  # the endpoint; our engine (A) ran first in this round
                        endpoint = next(s.quant for s in sides_to_run if s.name == name)
                        wl = endpoint_wl = remote.EndpointWorkload(
                            endpoint,
                            prompts,
                            [params] * len(prompts),
                            ours._ids,
                            ours.prompt_lens,
                            cancel=handle.cancel,
                        )
                        where = f" at {endpoint.api}" + where
                    order.append(name)
                    for update in self._run_side(side, where, wl, handle):
                        yield (update,) + compare.figures(sides) + (skip, skip, skip)
                ran = {n: s for n, s in sides.items() if s.rounds}
                table, agree = compare.tables(ran, decode)
                if endpoint_wl is not None and len(ran) == 2:
                    agree = remote.text_agreement_rows(ran["A"].rounds[0].results, ran["B"].rounds[0].results, decode)
                    table = remote.compare_table(table, ran, endpoint_wl)
                verdict = compare.verdict(ran, agree, handle.cancel.is_set(), tuple(warmed), tuple(order))
                figures = compare.figures(ran)
                yield (f"{verdict}  \n_loading the lab's engine again…_",) + figures + (table, agree, skip)
                self._close(apart)
                load_status = self.loader.restore(previous, "Compare")
                restored = True
                back = "  \nthe lab's engine (left panel) is loaded again" if load_status else ""
                yield (verdict + back,) + figures + (table, agree, load_status or skip)
        finally:
            self._close(apart)
            if not restored:  # an error or the page went away: still give the lab its engine back
                self.loader.restore_quietly(previous, "Compare")
            if claimed and previous_holder != key:  # the compared model is gone again: so is its slot
                state.model_slots.release(key)

    @staticmethod
    def _labels(sides_to_run, engines: dict) -> dict[str, str]:
        """Each side's label; the CPU kernel path that ran is named when a side asked for one or the paths differ."""
        ran = {name: describe(engine).get("cpu_kernels") for name, engine in engines.items()}
        show = any(s.kernels != "auto" for s in sides_to_run) or len(set(ran.values())) > 1
        labels = {}
        for s in sides_to_run:
            if s.name in engines:
                engine = engines[s.name]
                labels[s.name] = compare.label(
                    s.name, engine.model_impl, s.impl, s.quant, ran[s.name] if show else None
                )
            else:
                labels[s.name] = f"{s.name}: endpoint {s.quant.model}"
        return labels

    @staticmethod
    def _close(engines: list) -> None:
        while engines:
            engines.pop().close()

    def _run_side(self, side: compare.Side, where: str, wl, handle: RunHandle):
        """Run one measured round of a side (our engine's workload or an endpoint's), appended to `side.rounds` and
        updated as it goes; yields status lines."""
        current = None
        with follow.started(wl, handle):
            for _, results, series in follow.updates(wl, self.state.update_s):
                if current is None:
                    current = compare.Round(results, series, wl.wall_s)
                    side.rounds.append(current)
                else:
                    current.results, current.series, current.wall_s = results, series, wl.wall_s
                yield f"**Running** {side.label}{where}: {sum(r.num_tokens for r in results)} tokens"
