"""The Compare tab: the same greedy workload with settings A then B (one engine at a time), or A against an
OpenAI-compatible endpoint; the curves overlaid, then the lab's engine loaded again. Views: ui/compare.py."""

from __future__ import annotations

from dataclasses import replace

import gradio as gr

from backend.hosting import check_request
from ui import compare, images
from ui import endpoint as remote
from ui.common import Panel, progress_adapter, session_key, visitor_key
from ui.errors import status_errors
from ui.lab import follow
from ui.lab.loading import Loader
from ui.lab.run_inputs import max_new_value, prompts_from
from ui.lab.state import LabState
from ui.session import RunHandle
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
        dtype,
        device,
        kv_mb,
        block_size,
        max_batch,
        max_len,
        prompt,
        use_chat_template,
        mode,
        copies,
        max_new,
        ignore_eos,
        trust_remote_code=False,
        step_tokens=None,
        b_endpoint="",
        b_api_key="",
        image=None,
        request: gr.Request = None,
        progress=gr.Progress(),
    ):
        """Run the same greedy workload with settings A then B (one engine at a time); overlay the curves.
        With `b_endpoint`, B is that OpenAI-compatible endpoint (ui/endpoint.py), sent A's prompt token ids.

        The lab's engine (the left panel's) is loaded again at the end, so the panel still tells the truth.
        Yields (status, throughput, TTFT, memory, batch, summary table, agreement table, load status)."""
        from backend import SamplingParams

        state = self.state
        image = images.checked_image(image)  # both sides get the same image and prompts
        if (b_endpoint or "").strip():
            images.refuse_endpoint_image(image)
        prompts = prompts_from(prompt, mode, copies)
        params = SamplingParams(max_new_tokens=max_new_value(max_new), temperature=0.0, ignore_eos=bool(ignore_eos))
        check_request(state.policy, max_new_tokens=params.max_new_tokens)
        if (b_endpoint or "").strip():  # checked (host policy, it answers) before A loads anything
            sides_to_run = [
                ("A", a_impl, a_quant),
                ("B", "endpoint", remote.connect(b_endpoint, b_api_key, state.policy)),
            ]
        else:
            sides_to_run = compare.settings(a_impl, a_quant, b_impl, b_quant)
        panel = Panel(choice, a_impl, a_quant, dtype, device, kv_mb, block_size, max_batch, max_len, trust_remote_code,
                      step_tokens)  # fmt: skip
        key = session_key(request)
        state.refuse_if_others_run(key, "Comparing")
        with state.visitors.running(visitor_key(request, state.policy.hosted), len(prompts)):  # HostingError over cap
            yield from self._run_compare(
                key, sides_to_run, prompts, params, bool(use_chat_template), progress, panel, image
            )

    def _run_compare(
        self, key: str, sides_to_run, prompts, params, use_chat_template: bool, progress, panel: Panel, image=None
    ):
        state = self.state
        previous = state.session.spec
        previous_holder = state.model_holder
        restored = False
        claimed = False
        sides: dict[str, compare.Side] = {}
        warmed: list[str] = []
        decode = None
        skip = gr.skip()
        wl = endpoint_wl = None
        try:
            with state.run(key) as handle:
                for name, impl, quant in sides_to_run:
                    if handle.cancel.is_set():
                        break
                    if impl == "endpoint":  # `quant` is the RemoteEndpoint; A (our engine) ran first
                        endpoint_wl = remote.EndpointWorkload(
                            quant, prompts, [params] * len(prompts), wl._ids, wl.prompt_lens, cancel=handle.cancel
                        )
                        label = f"{name}: endpoint {quant.model}"
                        for update in self._run_side(name, label, f" at {quant.api}", endpoint_wl, handle, sides):
                            yield (update,) + compare.figures(sides) + (skip, skip, skip)
                        continue
                    yield (f"**Loading** {name}: {impl} / {quant}…",) + (skip,) * 7
                    spec = self.loader.spec(replace(panel, impl=impl, quant=quant))
                    if state.session.spec != spec:
                        claimed = state.claim_model(key, spec) or claimed
                    self.loader.check_new(spec)
                    engine, _ = state.session.load(spec, progress=progress_adapter(progress))
                    label = compare.label(name, engine.model_impl, impl, quant)
                    decode = engine.tokenizer.decode
                    ids = prompt_ids(engine, prompts, use_chat_template)
                    texts, lens = None, [len(i) for i in ids]
                    if image is not None:  # the processor's lengths (placeholders expanded); a text model refuses
                        texts, lens = images.image_requests(engine, prompts, use_chat_template, image)
                    check_request(state.policy, prompt_tokens=max(lens, default=0))
                    yield (f"**Warming up** {label}: {compare.WARMUP_TOKENS} untimed tokens a request…",) + (skip,) * 7
                    if image is None:
                        warm_up(engine, ids, key)
                    else:
                        warm_up_images(engine, texts, image, key)
                    warmed.append(name)
                    # made after the warm-up: the measured run's steps start here
                    each = [params] * len(prompts)
                    wl = Workload(engine, prompts, each, use_chat_template, handle.cancel, owner=key, image=image)
                    for update in self._run_side(name, label, "", wl, handle, sides):
                        yield (update,) + compare.figures(sides) + (skip, skip, skip)
                table, agree = compare.tables(sides, decode)
                if endpoint_wl is not None and len(sides) == 2:
                    agree = remote.text_agreement_rows(sides["A"].results, sides["B"].results, decode)
                    table = remote.compare_table(table, sides, endpoint_wl)
                verdict = compare.verdict(sides, agree, handle.cancel.is_set(), tuple(warmed))
                figures = compare.figures(sides)
                yield (f"{verdict}  \n_loading the lab's engine again…_",) + figures + (table, agree, skip)
                load_status = self.loader.restore(previous, "Compare")
                restored = True
                back = "  \nthe lab's engine (left panel) is loaded again" if load_status else ""
                yield (verdict + back,) + figures + (table, agree, load_status or skip)
        finally:
            if not restored:  # an error or the page went away: still give the lab its engine back
                self.loader.restore_quietly(previous, "Compare")
            if claimed and previous_holder != key:  # the compared model is gone again: so is its slot
                state.model_slots.release(key)

    def _run_side(self, name: str, label: str, where: str, wl, handle: RunHandle, sides: dict):
        """Run one side's workload `wl` (our engine's or an endpoint's), filling sides[name]; yields status lines."""
        with follow.started(wl, handle):
            for _, results, series in follow.updates(wl, self.state.update_s):
                sides[name] = compare.Side(label, results, series, wl.wall_s)
                yield f"**Running** {label}{where}: {sum(r.num_tokens for r in results)} tokens"
