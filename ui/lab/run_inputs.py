"""What a run asks for, from the Generate / Compare panels: the prompts, max new tokens, sampling parameters,
and where the context (not max new tokens) ends a request."""

from __future__ import annotations

import gradio as gr

from ui.workload import split_prompts


def prompts_from(prompt: str, mode: str, copies) -> list[str]:
    prompts = split_prompts(prompt, mode, int(copies or 1))
    if not prompts:
        raise gr.Error("Type a prompt first (one per line in 'one prompt per line' mode).", title="No prompt")
    return prompts


def sampling_params(n: int, temperature, top_p, top_k, max_new: int, seed, ignore_eos) -> list:
    """One SamplingParams per prompt; with a seed, copy i gets seed + i (copies differ when sampling)."""
    from backend import SamplingParams

    base = None if seed is None or seed < 0 else int(seed)
    return [
        SamplingParams(
            max_new_tokens=int(max_new),
            temperature=float(temperature),
            top_p=float(top_p),
            top_k=int(top_k),
            ignore_eos=bool(ignore_eos),
            seed=None if base is None else base + i,
        )
        for i in range(n)
    ]


def cap_notes(max_model_len: int, prompt_lens: list[int], max_new: int) -> list[str]:
    """Where the context (not max new tokens) will end a request: said before the run starts."""
    longest = max(prompt_lens, default=0)
    room = max_model_len - longest
    if max_new <= room or room <= 0:  # room <= 0: the engine refuses the prompt itself, with the numbers
        return []
    return [
        f"max new tokens {max_new} is more than the context leaves: {max_model_len} tokens − {longest} "
        f"prompt tokens = {room}, so requests stop at the context limit (finish reason `length`)."
    ]


def context_stops(max_model_len: int, results) -> list[str]:
    """Requests that the context (not max new tokens) ended."""
    hit = [r.index for r in results if r.finish_reason == "length" and r.max_new and r.num_tokens < r.max_new]
    if not hit:
        return []
    shown = ", ".join(f"#{i}" for i in hit[:8]) + (" …" if len(hit) > 8 else "")
    return [f"request(s) {shown} stopped at the context limit ({max_model_len} tokens) before max new tokens."]
