"""Image-text requests: time to first token and output tok/s, our engine vs HF generate() on the same weights.

    python -m backend.tools.bench_vlm                         # Qwen2-VL-shaped model, 224x224 images (built once)
    python -m backend.tools.bench_vlm --shape tiny --rounds 1 # the test's sizes
    python -m backend.tools.bench_vlm --json out.json

A random-weight Qwen2-VL-shaped checkpoint is built with backend/loading/tiny_vlms.py's family (its tokenizer, config
and processor) at the chosen shape. Each round sends one image-text request (a fresh image, so no prefix-cache hit)
to our engine and to HF `generate()` on the same checkpoint, in alternating order, batch 1, greedy, fp32. Measured:
time to first token (the request's arrival to its first new token: processor, vision tower, prefill), output tok/s
after the first token, and the vision tower's time (the model's own `get_image_features`, timed around each call)
and its share of the first-token time. Medians over the rounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from backend import Engine, SamplingParams
from backend.paths import cache_dir


@dataclass(frozen=True)
class Shape:
    """A Qwen2-VL-shaped model and its image size."""

    image_size: int  # square images, resized by the processor to exactly this (min = max pixels)
    vision_depth: int
    vision_dim: int
    vision_heads: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int


SHAPES = {
    # 224x224 -> 16x16 patches of 14 -> 64 merged image tokens; a ~30M-parameter language model
    "bench": Shape(224, vision_depth=8, vision_dim=384, vision_heads=6, hidden=512, layers=8, heads=8, kv_heads=2,
                   intermediate=1408),
    "tiny": Shape(56, vision_depth=1, vision_dim=32, vision_heads=2, hidden=64, layers=2, heads=4, kv_heads=2,
                  intermediate=128),
}  # fmt: skip


@dataclass
class Side:
    """One implementation's medians over the rounds."""

    ttft_ms: float
    decode_tok_s: float  # new tokens after the first / the time after the first
    e2e_tok_s: float  # new tokens / (arrival to last token)
    vision_ms: float  # the vision tower (get_image_features) per request
    vision_share: float  # vision_ms / ttft_ms
    ttft_all_ms: list[float] = field(default_factory=list)


@dataclass
class Report:
    shape: str
    image_size: int
    image_tokens: int
    prompt_tokens: int
    new_tokens: int
    rounds: int
    ours: Side
    hf: Side
    same_tokens: bool  # greedy tokens of every round equal between the two
    ttft_speedup: float  # hf ttft / ours
    decode_speedup: float  # ours decode tok/s / hf
    machine: str
    torch_threads: int
    command: str = ""


def build_bench_vlm(path: Path, shape: Shape, seed: int = 0) -> Path:
    """A random-weight Qwen2-VL-shaped checkpoint at `shape` (tiny_vlms' family: tokenizer, config, processor)."""
    import transformers
    from transformers import AutoModelForImageTextToText

    from backend.loading.processor import without_video
    from backend.loading.tiny_models import build_tokenizer
    from backend.loading.tiny_vlms import CHAT_TEMPLATE, FAMILIES

    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    family = FAMILIES["qwen2_vl"]
    tok = build_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": list(family.tokens)})
    config = family.config(tok)
    head_dim = shape.hidden // shape.heads
    text = config.get_text_config()
    for name, value in dict(
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        head_dim=head_dim,
        intermediate_size=shape.intermediate,
        max_position_embeddings=4096,
    ).items():
        setattr(text, name, value)
    text.layer_types = ["full_attention"] * shape.layers
    text.max_window_layers = shape.layers
    quarter = head_dim // 2 // 4  # M-RoPE sections over head_dim / 2: time, height, width
    text.rope_parameters = dict(text.rope_parameters, mrope_section=[head_dim // 2 - 2 * quarter, quarter, quarter])
    vision = config.vision_config
    vision.depth, vision.embed_dim, vision.num_heads = shape.vision_depth, shape.vision_dim, shape.vision_heads
    vision.hidden_size = shape.hidden  # the merger's output: the language model's width
    config.initializer_range = text.initializer_range = 0.05
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    pixels = shape.image_size * shape.image_size
    images = transformers.Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2)
    template = CHAT_TEMPLATE.replace("IMAGE", repr(family.image_text))
    processor = without_video(transformers.Qwen2VLProcessor)(
        image_processor=images, tokenizer=tok, chat_template=template
    )
    processor.save_pretrained(path)
    return path


class VisionTimer:
    """Times each call of a model's own get_image_features (the vision tower and its merger): the base model's,
    which both the engine (through the outer model's) and generate() (through forward) reach."""

    def __init__(self, hf) -> None:
        self.seconds: list[float] = []
        owner = hf.model if callable(getattr(getattr(hf, "model", None), "get_image_features", None)) else hf
        inner = owner.get_image_features

        @functools.wraps(inner)  # keeps its signature: the engine passes only the arguments it names
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds.append(time.perf_counter() - start)

        owner.get_image_features = timed

    def take(self) -> float:
        total = sum(self.seconds)
        self.seconds.clear()
        return total


def random_image(size: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8"))


def messages(image: Image.Image) -> list[dict]:
    text = "Describe this picture in a few words, then tell a short story about it."
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def run_ours(engine: Engine, timer: VisionTimer, image, new_tokens: int) -> tuple[list[int], float, float, float]:
    """(tokens, ttft s, total s, vision s) of one request through the engine's stream (background loop)."""
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    prompt = engine.chat_prompt(messages(image))  # the chat template and the image decode count, as for HF
    first = None
    tokens: list[int] = []
    for delta in engine.stream(**prompt.request_kwargs(), params=params):
        if delta.token_ids and first is None:
            first = time.perf_counter()
        tokens.extend(delta.token_ids)
    return tokens, first - start, time.perf_counter() - start, timer.take()


class FirstTokenStreamer:
    """generate()'s streamer: the prompt comes first, then each new token; the time of the first new token."""

    def __init__(self) -> None:
        self.calls = 0
        self.first: float | None = None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def run_hf(model, processor, timer: VisionTimer, image, new_tokens: int) -> tuple[list[int], float, float, float]:
    start = time.perf_counter()
    inputs = processor.apply_chat_template(
        messages(image), add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    streamer = FirstTokenStreamer()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            streamer=streamer,
        )
    end = time.perf_counter()
    return out[0, inputs["input_ids"].shape[1] :].tolist(), streamer.first - start, end - start, timer.take()


def summarize(runs: list[tuple[list[int], float, float, float]], new_tokens: int) -> Side:
    ttft = [r[1] * 1000 for r in runs]
    decode = [(new_tokens - 1) / (r[2] - r[1]) if r[2] > r[1] and new_tokens > 1 else 0.0 for r in runs]
    e2e = [new_tokens / r[2] for r in runs]
    vision = [r[3] * 1000 for r in runs]
    med = statistics.median
    return Side(
        ttft_ms=round(med(ttft), 2),
        decode_tok_s=round(med(decode), 1),
        e2e_tok_s=round(med(e2e), 1),
        vision_ms=round(med(vision), 2),
        vision_share=round(med(v / t for v, t in zip(vision, ttft)), 3),
        ttft_all_ms=[round(t, 2) for t in ttft],
    )


def bench(shape_name: str = "bench", rounds: int = 5, new_tokens: int = 32, path: Path | None = None) -> Report:
    from transformers import AutoConfig, AutoModelForImageTextToText

    from backend.loading.processor import load_processor

    shape = SHAPES[shape_name]
    path = build_bench_vlm(path or cache_dir() / "bench_vlm" / shape_name, shape)
    hf = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    processor = load_processor(path, AutoConfig.from_pretrained(path), False).processor
    hf_timer = VisionTimer(hf)
    with Engine(str(path), dtype="float32", device="cpu", kv_cache_memory_gb=0.25, enable_prefix_caching=False) as e:
        ours_timer = VisionTimer(e.model.hf)
        run_ours(e, ours_timer, random_image(shape.image_size, 10_000), 2)  # warm-up: both sides, not measured
        run_hf(hf, processor, hf_timer, random_image(shape.image_size, 10_001), 2)
        ours, theirs, same = [], [], True
        for r in range(rounds):  # alternating order: neither side always runs first
            image = random_image(shape.image_size, r)
            sides = [("ours", lambda: run_ours(e, ours_timer, image, new_tokens))]
            sides.append(("hf", lambda: run_hf(hf, processor, hf_timer, image, new_tokens)))
            results = dict((name, fn()) for name, fn in (sides if r % 2 == 0 else sides[::-1]))
            ours.append(results["ours"])
            theirs.append(results["hf"])
            same &= results["ours"][0] == results["hf"][0]
        prompt = e.chat_prompt(messages(random_image(shape.image_size, 0)))
        ids = processor(text=[prompt.text], images=prompt.images, return_tensors="pt")["input_ids"][0]
    image_tokens = int((ids == hf.config.image_token_id).sum())
    a, b = summarize(ours, new_tokens), summarize(theirs, new_tokens)
    return Report(
        shape=shape_name,
        image_size=shape.image_size,
        image_tokens=image_tokens,
        prompt_tokens=len(ids),
        new_tokens=new_tokens,
        rounds=rounds,
        ours=a,
        hf=b,
        same_tokens=same,
        ttft_speedup=round(b.ttft_ms / a.ttft_ms, 2) if a.ttft_ms else 0.0,
        decode_speedup=round(a.decode_tok_s / b.decode_tok_s, 2) if b.decode_tok_s else 0.0,
        machine=f"{platform.processor() or platform.machine()}, torch {torch.__version__}",
        torch_threads=torch.get_num_threads(),
    )


def format_report(report: Report) -> str:
    lines = [
        f"Qwen2-VL-shaped ({report.shape}), {report.image_size}x{report.image_size} image = {report.image_tokens} "
        f"image tokens, {report.prompt_tokens} prompt tokens, {report.new_tokens} new, {report.rounds} rounds "
        f"(medians), {report.machine}, {report.torch_threads} threads",
        f"{'':6} {'TTFT ms':>9} {'decode tok/s':>13} {'e2e tok/s':>10} {'vision ms':>10} {'vision/TTFT':>12}",
    ]
    for name, side in (("ours", report.ours), ("HF", report.hf)):
        lines.append(
            f"{name:6} {side.ttft_ms:9.1f} {side.decode_tok_s:13.1f} {side.e2e_tok_s:10.1f} {side.vision_ms:10.1f} "
            f"{side.vision_share:12.1%}"
        )
    lines.append(
        f"TTFT {report.ttft_speedup}x faster, decode {report.decode_speedup}x; same greedy tokens: {report.same_tokens}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Report:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="bench")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--path", type=Path, default=None, help="where the checkpoint is built (default: the cache)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.new_tokens < 2:
        parser.error("--rounds must be at least 1 and --new-tokens at least 2")
    report = bench(args.shape, args.rounds, args.new_tokens, args.path)
    report.command = " ".join(["python -m backend.tools.bench_vlm", *(argv if argv is not None else sys.argv[1:])])
    print(format_report(report), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(asdict(report), indent=2))
    return report


if __name__ == "__main__":
    main()
