"""The Gradio Blocks: components and event wiring only (logic: the Lab's parts, listed in ui/callbacks.py)."""

from __future__ import annotations

import functools
from dataclasses import replace

import gradio as gr

from backend.hosting.remote_code import remote_code_status
from ui import defaults, numbers, panel
from ui.benchmark import SYSTEM_CHOICES, WORKLOAD_CHOICES
from ui.benchmark import TABLE_HEADERS as BENCH_HEADERS
from ui.benchmark import TABLE_WIDTHS as BENCH_WIDTHS
from ui.callbacks import Lab
from ui.common import (
    AGREEMENT_HEADERS,
    IMPL_CHOICES,
    MODE_CHOICES,
    QUANT_CHOICES,
    SUMMARY_HEADERS,
)
from ui.compare import AGREEMENT_WIDTHS, DEFAULT_ROUNDS, KERNEL_CHOICES, SUMMARY_WIDTHS
from ui.images import UPLOAD_INFO
from ui.inside import TRACE_HEADERS, TRACE_WIDTHS
from ui.lab.image_panel import INSIDE_PROMPT
from ui.numbers import RUN_NUMBERS
from ui.panel import KERNELS_INFO
from ui.plots import (
    PLOT_MIN_WIDTH,
    batch_figure,
    bench_figure,
    kv_cache_figure,
    memory_figure,
    throughput_figure,
    ttft_figure,
)
from ui.presets import PRESETS
from ui.views import RESULT_HEADERS, RESULT_WIDTHS, SEARCH_HEADERS

CSS = """
.flab-status p { margin: 0.2em 0; }
.flab-intro p { margin: 0.15em 0; color: #374151; }
#flab-output textarea { font-family: ui-monospace, monospace; }
.flab-tree { font-family: ui-monospace, monospace; font-size: 13px; line-height: 1.45; }
.flab-node code { color: #6b7280; background: none; }
.flab-hit { background: #fef3c7; border-left: 3px solid #d97706; }
.flab-role { color: #b45309; font-weight: 600; }
.flab-repeat { color: #2563eb; }
#flab-bench-table, #flab-results { overflow-x: auto; }
"""
ENDPOINT_INFO = (
    "streams from its /v1/completions; the plots come from its stream timings, memory and KV from its /metrics "
    "(vLLM / SGLang / this project's gauges, else 'not exposed')"
)
ENDPOINT_HOSTED = "host only on a hosted app: this server would send requests wherever a visitor says"
INTRO = {
    "generate": (
        "**What you are seeing.** Every request streams through one engine loop. **Continuous batching**: each "
        "step runs every active request together, new ones join as soon as they arrive and finished ones leave "
        "(batch plot). A step either **prefills** prompt tokens (long, compute-bound) or **decodes** one token "
        "per request (throughput plot). Try a preset to make one mechanism show."
    ),
    "compare": (
        "**What you are seeing.** The same greedy workload run twice, one engine at a time: e.g. our **native** "
        "modules against the HF modeling code with **our attention injected** (transformers). Greedy tokens "
        "must agree token for token (the table at the bottom); the curves show what each costs. Both sides are "
        "loaded and warmed up (an untimed run), then measured in **alternated rounds** (A, B, A, B, …): the table "
        "shows each side's median round and the ratios B / A over the rounds. Engine options come from the left "
        "panel; the lab's engine is loaded again afterwards."
    ),
    "benchmark": (
        "**What you are seeing.** Output tokens/s of our engine against transformers' own `generate()` (a "
        "padded batch: every row waits for the longest) and `generate_batch()` (its continuous batching), same "
        "seeded prompts, one run each, as ratios to HF `generate()` on the bars: the harness of "
        "`python -m backend.tools.bench`. Each system loads the model itself, so the lab's engine is closed first "
        "and loaded again after. Model, dtype, device, max context and quantization come from the left panel "
        "(quantization: our engine only)."
    ),
    "inside": (
        "**What you are seeing.** The **KV cache** is cut into blocks of a few tokens; each request holds a "
        "list of blocks (its block table), so memory grows with the sequence and is freed when it ends. "
        "**Prefix caching**: a full block is keyed by its tokens, and a later prompt with the same start reuses "
        "it (shared, ref_count > 1). Below: the module tree with where our code runs, and one traced step."
    ),
}
KV_LEGEND = (
    "_One cell = one block (or a group of blocks on large caches: the cell takes the busiest state of its "
    "group). Colour = owner request (number in the cell, hover for the block range and ref_count); yellow = "
    "shared by several requests (prefix hit); green = free but still holding a cached prefix (reusable); "
    "light grey = free; pink = one request's block holding image features (an image-text model)._"
)
IMAGE_INSIDE_TITLE = "An image request, inside: its image tokens, the KV blocks holding them, the vision tower's time"
THEME = gr.themes.Soft(primary_hue="blue")
GENERATE_CONCURRENCY = 8  # streams from several users share the engine's batch (continuous batching)
COMPARE_PROMPT = "Once upon a time\nThe quick brown fox\nA paged KV cache splits memory into blocks."


def _empty_plots():
    return throughput_figure({}), ttft_figure({}), batch_figure({}), memory_figure({})


CACHE_CLEANUP_S = (3600, 86400)  # (how often, how old) in seconds: Blocks(delete_cache=...)


def build_demo(lab: Lab | None = None, default_model: str = defaults.DEFAULT_CHOICE) -> gr.Blocks:
    """The app's Blocks over `lab` (its policy: what visitors may do; `default_model` is the host's model)."""
    lab = lab or Lab(host_model=default_model)
    if lab.host_model is None:
        lab.host_model = defaults.resolve_choice(default_model)
    policy = lab.policy
    host = lab.host_panel()  # the host's model and engine settings: what the app loads at start-up
    copies_field = RUN_NUMBERS["copies"]
    if policy.max_parallel_per_visitor:  # the host's cap narrows the slider; the run's check says the cap
        copies_field = replace(copies_field, allowed=replace(copies_field.allowed, high=min(
            copies_field.maximum, policy.max_parallel_per_visitor)))  # fmt: skip
    max_copies = copies_field.maximum
    # the cap is said in the label and checked by the callback (a status line naming the cap), not by the
    # component's maximum (Gradio's own error would mark every output)
    cap_note = f" (at most {policy.max_new_tokens} here)" if policy.max_new_tokens is not None else ""
    thr0, ttft0, batch0, mem0 = _empty_plots()
    # Gradio copies every file it serves (the benchmark's JSON downloads) into its cache: on a long-running
    # Space, delete the copies older than a day, checked every hour
    with gr.Blocks(title="Fallback Lab", delete_cache=CACHE_CLEANUP_S) as demo:
        gr.Markdown(
            "# Fallback Lab\nA small real inference engine — paged KV cache, continuous batching, paged "
            "attention — running **native** models or **any transformers model** with our attention "
            "injected. Load a model, generate, and watch what the engine does."
        )
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                with gr.Accordion("Model", open=True):
                    picker_note = gr.Markdown(elem_classes="flab-status")
                    model = gr.Dropdown(
                        choices=[(defaults.DEFAULT_LABEL, defaults.DEFAULT_CHOICE)],
                        value=default_model,
                        allow_custom_value=True,
                        label="Model",
                        elem_id="flab-model",
                        info="pick one, or type a Hub id or a local folder path",
                    )
                    with gr.Row():
                        search_box = gr.Textbox(
                            placeholder="search the Hub (e.g. qwen, smollm)", show_label=False, scale=3, container=False
                        )
                        search_btn = gr.Button("Search", scale=1, size="sm")
                    search_results = gr.Dataframe(
                        headers=SEARCH_HEADERS,
                        label="Hub results (click a row to pick)",
                        interactive=False,
                        max_height=240,
                        wrap=True,
                        visible=False,
                    )
                    estimate_md = gr.Markdown(elem_classes="flab-status")
                with gr.Accordion("Engine", open=True):
                    # one control per EngineConfig option marked for the app (ui/panel.py: kind, choices, range,
                    # default and help from the declaration); the load's own check names a box, its value and range
                    remote_code = dict(
                        label=remote_code_status(policy),
                        info="set by whoever runs the app (--allow-remote-code), not from this page",
                        interactive=False,
                        elem_id="flab-remote-code",
                    )
                    controls = panel.build_controls(host, {"trust_remote_code": remote_code})
                    c = controls  # the panel's controls by option name
                    load_btn = gr.Button("Load", variant="primary")
                with gr.Accordion("This host", open=policy.hosted):
                    gr.Markdown("\n".join(f"- {line}" for line in policy.summary()), elem_id="flab-host-policy")

            with gr.Column(scale=3):
                load_status = gr.Markdown(elem_classes="flab-status", elem_id="flab-load-status")
                with gr.Tabs():
                    with gr.Tab("Generate", id="generate"):
                        gr.Markdown(INTRO["generate"], elem_classes="flab-intro")
                        with gr.Row():
                            preset_btns = {
                                p.key: gr.Button(p.label, size="sm", elem_id=f"flab-preset-{p.key}") for p in PRESETS
                            }
                        prompt = gr.Textbox(
                            "\n".join(defaults.DEFAULT_PROMPTS),
                            lines=3,
                            max_lines=8,
                            label="Prompt",
                            info=defaults.PROMPT_INFO,
                            elem_id="flab-prompt",
                        )
                        with gr.Row():
                            mode = gr.Radio(
                                MODE_CHOICES,
                                value=defaults.DEFAULT_MODE,
                                label="Parallel requests",
                                elem_id="flab-mode",
                            )
                            copies = numbers.slider(
                                copies_field, min(4, max_copies), label="copies", elem_id="flab-copies"
                            )
                            chat = gr.Checkbox(True, label="apply chat template (when the tokenizer has one)")
                        gen_image_box, gen_image, gen_image_note, gen_sample = image_input("flab-image")
                        with gr.Accordion("Sampling", open=False):
                            with gr.Row():
                                temperature = numbers.slider(
                                    RUN_NUMBERS["temperature"], 0.7, step=0.05, label="temperature (0 = greedy)"
                                )
                                top_p = numbers.slider(RUN_NUMBERS["top_p"], 1.0, step=0.05, label="top-p")
                                top_k = numbers.slider(RUN_NUMBERS["top_k"], 0, label="top-k (0 = off)")
                            with gr.Row():
                                max_new = numbers.number(
                                    RUN_NUMBERS["max_new"],
                                    min(64, policy.max_new_tokens or 64),
                                    label="max new tokens" + cap_note,
                                    elem_id="flab-max-new",
                                )
                                gap = numbers.slider(
                                    RUN_NUMBERS["gap_s"], 0, step=0.05, label="arrival gap (s between requests)"
                                )
                                seed = numbers.number(RUN_NUMBERS["seed"], 0, label="seed (-1 = random)")
                                ignore_eos = gr.Checkbox(False, label="ignore EOS (always max new tokens)")
                        with gr.Accordion("Target: an OpenAI-compatible endpoint instead of our engine", open=False):
                            with gr.Row():
                                gen_url = gr.Textbox(
                                    "",
                                    label="endpoint base URL (empty = our engine)",
                                    placeholder="http://127.0.0.1:8000/v1 (vLLM, SGLang, transformers serve, ours)",
                                    info=ENDPOINT_INFO if not policy.hosted else ENDPOINT_HOSTED,
                                    interactive=not policy.hosted,
                                    elem_id="flab-gen-endpoint",
                                )
                                gen_key = gr.Textbox("", label="API key (optional)", type="password")
                        with gr.Row():
                            gen_btn = gr.Button("Generate", variant="primary", elem_id="flab-generate")
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="flab-stop")
                        run_status = gr.Markdown(elem_classes="flab-status")
                        output = gr.Textbox(label="Output of request #0 (streaming)", lines=4, elem_id="flab-output")
                        results = gr.Dataframe(
                            headers=RESULT_HEADERS,
                            label="All requests",
                            elem_id="flab-results",
                            wrap=True,
                            max_height=300,
                            column_widths=RESULT_WIDTHS,
                        )
                        with gr.Row():
                            thr_plot = gr.Plot(
                                thr0, show_label=False, min_width=PLOT_MIN_WIDTH, elem_id="flab-throughput"
                            )
                            ttft_plot = gr.Plot(ttft0, show_label=False, min_width=PLOT_MIN_WIDTH)
                        with gr.Row():
                            batch_plot = gr.Plot(batch0, show_label=False, min_width=PLOT_MIN_WIDTH)
                            mem_plot = gr.Plot(mem0, show_label=False, min_width=PLOT_MIN_WIDTH)
                        summary = gr.Dataframe(headers=SUMMARY_HEADERS, label="Summary")

                    with gr.Tab("Compare", id="compare"):
                        gr.Markdown(INTRO["compare"], elem_classes="flab-intro")
                        with gr.Row():
                            with gr.Column():
                                a_impl = gr.Radio(IMPL_CHOICES, value="native", label="A: implementation")
                                a_quant = gr.Dropdown(QUANT_CHOICES, value="as in checkpoint", label="A: quantization")
                                a_kernels = gr.Radio(
                                    KERNEL_CHOICES, value="auto", label="A: CPU kernels", info=KERNELS_INFO
                                )
                            with gr.Column():
                                b_impl = gr.Radio(IMPL_CHOICES, value="transformers", label="B: implementation")
                                b_quant = gr.Dropdown(QUANT_CHOICES, value="as in checkpoint", label="B: quantization")
                                b_kernels = gr.Radio(
                                    KERNEL_CHOICES, value="auto", label="B: CPU kernels", info=KERNELS_INFO
                                )
                        with gr.Accordion("B: an OpenAI-compatible endpoint instead", open=False):
                            with gr.Row():
                                cmp_url = gr.Textbox(
                                    "",
                                    label="B: endpoint base URL (empty = B's settings above)",
                                    placeholder="http://127.0.0.1:8000/v1, serving the same weights for agreement",
                                    info=ENDPOINT_INFO if not policy.hosted else ENDPOINT_HOSTED,
                                    interactive=not policy.hosted,
                                    elem_id="flab-cmp-endpoint",
                                )
                                cmp_key = gr.Textbox("", label="B: API key (optional)", type="password")
                        cmp_prompt = gr.Textbox(COMPARE_PROMPT, lines=3, label="Workload prompt(s)")
                        cmp_image_box, cmp_image, cmp_image_note, cmp_sample = image_input("flab-cmp-image")
                        with gr.Row():
                            cmp_mode = gr.Radio(MODE_CHOICES, value="lines", label="Parallel requests")
                            cmp_copies = numbers.slider(copies_field, min(2, max_copies), label="copies")
                            cmp_max_new = numbers.number(
                                RUN_NUMBERS["max_new"],
                                min(32, policy.max_new_tokens or 32),
                                label="max new tokens (greedy)" + cap_note,
                            )
                            cmp_ignore_eos = gr.Checkbox(True, label="ignore EOS")
                            cmp_rounds = numbers.slider(
                                RUN_NUMBERS["rounds"],
                                DEFAULT_ROUNDS,
                                label="rounds (A, B alternated)",
                                elem_id="flab-cmp-rounds",
                            )
                        with gr.Row():
                            cmp_btn = gr.Button("Compare", variant="primary", elem_id="flab-compare")
                            cmp_stop = gr.Button("Stop", variant="stop")
                        cmp_status = gr.Markdown(elem_classes="flab-status")
                        with gr.Row():
                            cmp_thr = gr.Plot(throughput_figure({}), show_label=False, min_width=PLOT_MIN_WIDTH)
                            cmp_ttft = gr.Plot(ttft_figure({}), show_label=False, min_width=PLOT_MIN_WIDTH)
                        with gr.Row():
                            cmp_mem = gr.Plot(memory_figure({}), show_label=False, min_width=PLOT_MIN_WIDTH)
                            cmp_batch = gr.Plot(batch_figure({}), show_label=False, min_width=PLOT_MIN_WIDTH)
                        cmp_summary = gr.Dataframe(
                            headers=["metric", "A", "B"],
                            label="Side by side",
                            wrap=True,
                            column_widths=SUMMARY_WIDTHS,
                            elem_id="flab-cmp-summary",
                        )
                        cmp_agree = gr.Dataframe(
                            headers=AGREEMENT_HEADERS,
                            label="Greedy agreement",
                            wrap=True,
                            column_widths=AGREEMENT_WIDTHS,
                            elem_id="flab-cmp-agree",
                        )

                    with gr.Tab("Benchmark", id="benchmark"):
                        gr.Markdown(INTRO["benchmark"], elem_classes="flab-intro")
                        if not policy.allow_benchmark:
                            gr.Markdown(
                                f"**Not available here**: {benchmark_refusal(policy)}.", elem_id="flab-bench-off"
                            )
                        with gr.Row():
                            bench_workloads = gr.CheckboxGroup(
                                WORKLOAD_CHOICES, value=["throughput", "latency"], label="Workloads"
                            )
                            bench_systems = gr.CheckboxGroup(
                                SYSTEM_CHOICES, value=[v for _, v in SYSTEM_CHOICES], label="Systems"
                            )
                        with gr.Row():
                            bench_n = numbers.slider(
                                RUN_NUMBERS["num_requests"], 16, label="requests (throughput and shared prefix)"
                            )
                            bench_repeat = numbers.slider(
                                RUN_NUMBERS["repeat"], 1, label="repeats (round robin; the median run is reported)"
                            )
                        with gr.Row():
                            bench_btn = gr.Button(
                                "Run benchmark",
                                variant="primary",
                                elem_id="flab-bench",
                                interactive=policy.allow_benchmark,
                            )
                            bench_stop = gr.Button("Stop", variant="stop")
                        bench_status = gr.Markdown(elem_classes="flab-status", elem_id="flab-bench-status")
                        bench_plot = gr.Plot(bench_figure([]), show_label=False, elem_id="flab-bench-plot")
                        bench_table = gr.Dataframe(
                            headers=BENCH_HEADERS,
                            label="Results (same rows as the CLI)",
                            wrap=True,
                            column_widths=BENCH_WIDTHS,
                            elem_id="flab-bench-table",
                        )
                        bench_json = gr.File(label="Every number (JSON, as `--json` writes it)", interactive=False)

                    with gr.Tab("Inside the engine", id="inside"):
                        gr.Markdown(INTRO["inside"], elem_classes="flab-intro")
                        with gr.Row():
                            refresh_btn = gr.Button("Refresh", size="sm")
                            live = gr.Checkbox(False, label="live block view (1 s)")
                        kv_plot = gr.Plot(kv_cache_figure([]), show_label=False, elem_id="flab-kv")
                        gr.Markdown(KV_LEGEND, elem_classes="flab-intro")
                        with gr.Accordion(IMAGE_INSIDE_TITLE, open=False, elem_id="flab-image-inside"):
                            with gr.Row():
                                img_prompt = gr.Textbox(
                                    INSIDE_PROMPT,
                                    label="prompt of the image request (the Generate tab's image, else the sample)",
                                    scale=3,
                                )
                                img_btn = gr.Button("Prefill an image request", scale=1, elem_id="flab-image-prefill")
                            img_md = gr.Markdown(elem_classes="flab-status", elem_id="flab-image-status")
                            img_tokens = gr.HTML(elem_id="flab-image-tokens")
                        with gr.Accordion("The injection, shown: one traced step", open=True):
                            with gr.Row():
                                trace_prompt = gr.Textbox(
                                    "The capital of France is", label="prompt prefilled in the traced step", scale=3
                                )
                                trace_btn = gr.Button("Trace one step", scale=1, elem_id="flab-trace")
                            trace_md = gr.Markdown(elem_classes="flab-status", elem_id="flab-trace-status")
                            trace_table = gr.Dataframe(
                                headers=TRACE_HEADERS,
                                label="What our attention received, per layer",
                                wrap=True,
                                column_widths=TRACE_WIDTHS,
                                elem_id="flab-trace-table",
                            )
                            tree_html = gr.HTML(elem_id="flab-tree")
                        with gr.Accordion("Engine and model properties (every option, the model's shape)", open=False):
                            describe_md = gr.Markdown(elem_id="flab-describe")
                        timer = gr.Timer(1.0, active=False)

        # the panel's values go to the callbacks as keyword arguments by option name (Gradio's inputs_kwargs)
        panel_inputs = dict(inputs=[model], inputs_kwargs=controls)
        kv_mb, max_len, max_batch = c["kv_cache_memory_gb"], c["max_model_len"], c["max_num_seqs"]
        estimate_inputs = [model, c["dtype"], c["quantization"], kv_mb, max_len, max_batch]

        image_outputs = [gen_image_note, cmp_image_note, gen_image_box, cmp_image_box, gen_image, cmp_image]
        image_outputs += [gen_sample, cmp_sample]
        startup_outputs = [picker_note, model, load_status, describe_md, kv_plot]
        startup_outputs += [controls[name] for name in panel.app_options()]  # Panel.values()' order
        # no spinner on every panel control: the start-up load's one progress line is in the load status
        demo.load(
            lab.page.startup,
            **panel_inputs,
            outputs=startup_outputs + [search_box, search_btn],
            api_name="startup",
            show_progress="hidden",
        ).then(lab.inside_tab.tree, None, tree_html, api_name=False).then(
            lab.images.note, None, image_outputs, api_name=False
        )
        demo.load(lab.picker.estimate, estimate_inputs, estimate_md, api_name=False)
        gr.on(
            [search_btn.click, search_box.submit],
            lab.picker.search_table,
            search_box,
            search_results,
            api_name="search",
        )
        search_results.select(lab.picker.pick_search_result, None, model, api_name=False)
        model.input(lab.picker.suggest_kv_mb, model, kv_mb, api_name=False)  # a user's pick, not the page-load restore
        gr.on(
            [
                model.change,
                c["dtype"].change,
                c["quantization"].change,
                kv_mb.change,
                max_len.change,
                max_batch.release,
            ],
            lab.picker.estimate,
            estimate_inputs,
            estimate_md,
            api_name="estimate",
            trigger_mode="always_last",
        )
        load_btn.click(
            lab.loader.load,
            **panel_inputs,
            outputs=[load_status, describe_md, kv_plot],
            api_name="load",
            concurrency_id="engine",
            concurrency_limit=1,
        ).then(lab.inside_tab.tree, None, tree_html, api_name=False).then(
            lab.images.note, None, image_outputs, api_name=False
        )
        for sample_btn, image_file in ((gen_sample, gen_image), (cmp_sample, cmp_image)):
            sample_btn.click(lab.images.sample, None, image_file, api_name=False)

        gen_inputs = [prompt, chat, mode, copies, temperature, top_p, top_k, max_new, seed, ignore_eos, gap]
        gen_inputs += [gen_url, gen_key]
        gen_outputs = [output, results, run_status, thr_plot, ttft_plot, batch_plot, mem_plot, summary, kv_plot]
        gr.on(
            [gen_btn.click, prompt.submit],
            lab.generate_tab.generate,
            gen_inputs + [gen_image],
            gen_outputs,
            api_name="generate",
            concurrency_limit=GENERATE_CONCURRENCY,
        )
        stop_btn.click(lab.stop, None, run_status, api_name="stop", concurrency_limit=None)
        preset_settings = [kv_mb, max_batch, c["max_num_batched_tokens"], max_len]
        preset_settings += [max_new, temperature, ignore_eos, gap, chat]
        preset_saved = gr.State(None)  # while a preset runs: the panel's settings before it (ui/presets.py PresetRun)
        preset_outputs = preset_settings + [prompt, mode, copies, run_status, preset_saved]
        for key, btn in preset_btns.items():
            btn.click(
                functools.partial(lab.presets.preset, key),
                [model] + preset_settings,
                preset_outputs,
                api_name=f"preset_{key}",
            ).then(
                lab.loader.load,
                **panel_inputs,
                outputs=[load_status, describe_md, kv_plot],
                api_name=False,
                concurrency_id="engine",
                concurrency_limit=1,
            ).then(
                lab.generate_tab.generate,
                gen_inputs[:-2],
                gen_outputs,
                api_name=False,
                concurrency_limit=GENERATE_CONCURRENCY,
            ).then(
                lab.presets.restore,
                [preset_saved, run_status],
                preset_settings + [run_status, preset_saved],
                api_name=False,
            ).then(
                lab.presets.reload,
                **panel_inputs,
                outputs=[load_status, describe_md],
                api_name=False,
                concurrency_id="engine",
                concurrency_limit=1,
            )

        cmp_inputs = [
            model,
            a_impl,
            a_quant,
            b_impl,
            b_quant,
            cmp_prompt,
            chat,
            cmp_mode,
            cmp_copies,
            cmp_max_new,
            cmp_ignore_eos,
            cmp_url,
            cmp_key,
            cmp_rounds,
            a_kernels,
            b_kernels,
            cmp_image,
        ]
        cmp_outputs = [cmp_status, cmp_thr, cmp_ttft, cmp_mem, cmp_batch, cmp_summary, cmp_agree, load_status]
        cmp_btn.click(
            lab.compare_tab.compare,
            inputs=cmp_inputs,
            inputs_kwargs=controls,
            outputs=cmp_outputs,
            api_name="compare",
            concurrency_id="engine",
            concurrency_limit=1,
        )
        cmp_stop.click(lab.stop, None, cmp_status, api_name="stop_compare", concurrency_limit=None)

        bench_inputs = [
            model,
            c["dtype"],
            c["device"],
            c["quantization"],
            max_len,
            c["trust_remote_code"],
            bench_workloads,
            bench_systems,
            bench_n,
            bench_repeat,
        ]
        bench_btn.click(
            lab.benchmark_tab.benchmark,
            bench_inputs,
            [bench_status, bench_plot, bench_table, bench_json, load_status],
            api_name="benchmark",
            concurrency_id="engine",
            concurrency_limit=1,
        )
        bench_stop.click(lab.stop, None, bench_status, api_name="stop_benchmark", concurrency_limit=None)

        refresh_btn.click(lab.inside_tab.inspect, None, [describe_md, kv_plot], api_name="inspect")
        trace_btn.click(
            lab.inside_tab.trace,
            trace_prompt,
            [trace_md, trace_table, tree_html],
            api_name="trace",
            concurrency_id="engine",
        )
        img_btn.click(
            lab.images.prefill,
            [img_prompt, gen_image, chat],
            [img_md, img_tokens, kv_plot],
            api_name="image_prefill",
            concurrency_id="engine",
        )
        live.change(lambda on: gr.Timer(active=bool(on)), live, timer, api_name=False)
        timer.tick(lab.inside_tab.kv_view, None, kv_plot, api_name=False, show_progress="hidden")
        demo.unload(lab.unload_visitor)  # a closed page frees its model slot and stops its runs
    return demo


def image_input(elem_id: str):
    """An image input of the Generate / Compare tab: -> (its accordion, the file input, the one-line note of what the
    loaded model takes, the sample button). The file goes to the callback undecoded: ui/images.checked_image decodes
    it (a clear error for a file too large or that does not decode, also when sent without the page)."""
    with gr.Accordion("Image (image-text models)", open=False, elem_id=f"{elem_id}-box") as box:
        note = gr.Markdown(elem_classes="flab-status", elem_id=f"{elem_id}-note")
        with gr.Row(equal_height=False):
            file = gr.File(
                label="image sent with every request",
                file_types=["image"],
                type="filepath",
                height=110,
                scale=3,
                elem_id=elem_id,
            )
            sample = gr.Button("Use the sample image", size="sm", scale=1, min_width=140)
        gr.Markdown(f"_{UPLOAD_INFO}; the prompt gets the model's image placeholder (or type it yourself)._")
    return box, file, note, sample


def benchmark_refusal(policy) -> str:
    from backend.hosting import HostingError, check_benchmark

    try:
        check_benchmark(policy)
    except HostingError as e:
        return str(e)
    return
