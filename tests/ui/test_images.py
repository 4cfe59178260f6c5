"""Images in the app (issue 28, the app's part), called as plain functions on tiny:llava (a random-weight image-text
model built locally with its processor): the upload's check, the Generate and Compare tabs with an image, the Inside
tab's image request (its image tokens, the KV blocks holding them, the vision tower's time), and a text model's
refusal. Each image request is compared with the engine's own answer for the same image and prompt."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from backend import SamplingParams
from backend.core.errors import RequestError
from backend.core.metrics import KVBlock
from backend.models import vlm
from tests.ui.conftest import LOAD_ARGS
from tests.ui.test_callbacks import COMPARE, GEN
from ui import images, inside, plots
from ui.callbacks import Lab

pytestmark = pytest.mark.filterwarnings("ignore:.*no_silent_downcasting", "ignore:The copy keyword")

VLM_LOAD = dict(LOAD_ARGS, choice="tiny:llava", block_size=4)


@pytest.fixture(scope="module")
def vlm_lab():
    """A Lab with tiny:llava loaded (block size 4: an image's 16 tokens fill several blocks)."""
    lab = Lab(update_s=0.1)
    lab.loader.load(**VLM_LOAD)
    yield lab
    lab.session.close()


def _png(tmp_path, colour=(200, 30, 30), size=(40, 40), name="red.png") -> str:
    path = tmp_path / name
    Image.new("RGB", size, colour).save(path)
    return str(path)


# --- the upload's check ------------------------------------------------------------------------------------------


def test_checked_image_decodes_an_upload_and_refuses_bad_ones(tmp_path, monkeypatch):
    assert images.checked_image(None) is None and images.checked_image("") is None
    good = images.checked_image(_png(tmp_path))
    assert good.mode == "RGB" and good.size == (40, 40)
    assert images.checked_image({"path": _png(tmp_path)}).size == (40, 40)  # a file dict, as a client may send
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    with pytest.raises(RequestError, match="image: cannot decode the image") as e:
        images.checked_image(str(corrupt))
    assert e.value.param == "image" and str(tmp_path) not in str(e.value)  # no server path in the message
    truncated = tmp_path / "truncated.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, format="PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    with pytest.raises(RequestError, match="cannot decode"):
        images.checked_image(str(truncated))
    monkeypatch.setattr(images, "MAX_UPLOAD_BYTES", 100)
    big = _png(tmp_path, size=(300, 300), name="noise.png")
    Image.frombytes("RGB", (300, 300), bytes(range(256)) * 1055).save(big)
    with pytest.raises(RequestError, match="at most 0 MB here"):
        images.checked_image(big)
    monkeypatch.setattr(images, "MAX_UPLOAD_BYTES", 2**20)
    monkeypatch.setattr(images, "MAX_UPLOAD_PIXELS", 1000)
    with pytest.raises(RequestError, match="40x40 pixels; at most 1,000 here"):
        images.checked_image(_png(tmp_path))
    with pytest.raises(RequestError, match="the uploaded file is gone"):
        images.checked_image(str(tmp_path / "missing.png"))


def test_the_sample_image_is_small_and_decodes(tmp_path, lab):
    assert images.SAMPLE_IMAGE.stat().st_size < 4096
    assert images.sample_image().size == (96, 96)
    copy = images.sample_copy(tmp_path)
    assert copy.read_bytes() == images.SAMPLE_IMAGE.read_bytes() and images.sample_copy(tmp_path) == copy
    from gradio.utils import get_upload_folder

    assert lab.images.sample().startswith(get_upload_folder())  # where Gradio serves it from, whatever the cwd


# --- prompts and placeholders ------------------------------------------------------------------------------------


def test_image_prompt_puts_the_models_placeholder(vlm_lab):
    engine = vlm_lab.engine()
    assert images.image_refusal(engine) is None
    assert vlm.placeholder_text(engine.processor) == "<image>"
    assert images.image_prompt(engine, "Describe.", False) == "<image>Describe."
    assert images.image_prompt(engine, "Describe.", True) == "<|user|><image>Describe.<|eos|><|assistant|>"
    assert images.image_prompt(engine, "A <image> here", True) == "A <image> here"  # the user's own placeholder


def test_a_text_model_refuses_an_image_with_the_reason(lab, tmp_path):
    why = images.image_refusal(lab.engine())
    assert "language model: it takes text only" in why
    text, _, box, _, file, *_ = lab.images.note()
    assert why in text and box["open"] is False and file["interactive"] is False
    updates = list(lab.generate_tab.generate(**GEN, image=_png(tmp_path)))
    assert "takes text only" in updates[-1][2] and "RequestError" in updates[-1][2]
    assert lab.engine().num_requests == 0  # nothing was queued


# --- Generate and Compare with an image --------------------------------------------------------------------------


def test_generate_with_an_image_equals_the_engines_answer(vlm_lab, tmp_path):
    text, _, box, _, file, *_ = vlm_lab.images.note()
    assert "takes images" in text
    assert box["open"] is True and file["interactive"] is True
    red, blue = _png(tmp_path), _png(tmp_path, (20, 40, 220), name="blue.png")
    args = dict(GEN, prompt="What is in the picture?", copies=2, max_new=8, ignore_eos=True)
    last = list(vlm_lab.generate_tab.generate(**args, image=red))[-1]
    assert "**done**" in last[2], last[2]
    rows = last[1]
    engine = vlm_lab.engine()
    prompt = images.image_prompt(engine, args["prompt"], True)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    expected = engine.generate(prompt, greedy, images=[[images.checked_image(red)]])[0]
    assert last[0] == expected.text and len(rows) == 2
    other = engine.generate(prompt, greedy, images=[[images.checked_image(blue)]])[0]
    assert other.token_ids != expected.token_ids  # the image reached the model: another image, another answer


def test_generate_refuses_an_image_for_an_endpoint_and_a_corrupt_upload(vlm_lab, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    last = list(vlm_lab.generate_tab.generate(**GEN, image=str(bad)))[-1]
    assert "image: cannot decode the image" in last[2]
    last = list(vlm_lab.generate_tab.generate(**GEN, endpoint_url="http://127.0.0.1:9/v1", image=_png(tmp_path)))[-1]
    assert "images go to this app's engine only" in last[2]


def test_compare_takes_the_same_image_on_both_sides(vlm_lab, tmp_path):
    args = dict(COMPARE, choice="tiny:llava", a_impl="auto", b_impl="transformers", block_size=4, max_new=6)
    updates = list(vlm_lab.compare_tab.compare(**args, image=_png(tmp_path)))
    status, agree = updates[-1][0], updates[-1][6]
    assert "agree token for token" in status, status
    assert len(agree) == 2  # both prompts, each with the image, agree across the two sides


# --- Inside: the image request -----------------------------------------------------------------------------------


def test_inside_prefill_marks_image_tokens_blocks_and_the_vision_time(vlm_lab):
    engine = vlm_lab.engine()
    engine.reset_prefix_cache()
    summary, tokens_html, figure = list(vlm_lab.images.prefill("Describe the image.", None, True))[-1]
    done = images.prefill_image_request  # the same path, called again below: the prefix cache now holds it
    ids = engine.processor(
        text=[images.image_prompt(engine, "Describe the image.", True)], images=[images.sample_image()]
    )["input_ids"][0]
    n_image = sum(1 for i in ids if i == images.image_token_id(engine))
    assert n_image == 16
    assert f"**{n_image} image placeholder(s)**" in summary and "Vision tower**: " in summary and "%" in summary
    assert f"&lt;image&gt; × {n_image}" in tokens_html and "&lt;|assistant|&gt;" in tokens_html
    heat = figure.data[0]
    cells = [v for row in heat.z for v in row if v is not None]
    # 16 image tokens from position 1 in blocks of 4: blocks 0..4 hold some
    assert sum(1 for v in cells if int(v) == plots.KV_IMAGE) == 5
    assert any("holds image features (5)" in (t.name or "") for t in figure.data[1:])
    assert engine.stats().kv_blocks_used == 0  # the request was aborted: its blocks are free again
    again = done(engine, images.image_prompt(engine, "Describe the image.", True), images.sample_image())
    assert sum(s.vision_s for s in again.steps) == 0.0 and again.cached_tokens > 0  # features from the cache
    assert "did not run" in inside.image_prefill_summary(again, 4)


def test_vision_time_is_in_the_step_stats(vlm_lab):
    engine = vlm_lab.engine()
    engine.reset_prefix_cache()
    since = engine.stats().num_steps - 1
    engine.generate("<image>Hi", SamplingParams(max_new_tokens=3, temperature=0.0), images=[[images.sample_image()]])
    steps = engine.step_history(since)
    assert steps[0].vision_s > 0 and steps[0].vision_s <= steps[0].duration
    assert all(s.vision_s == 0.0 for s in steps[1:])  # once per request, at its prefill


# --- pure views --------------------------------------------------------------------------------------------------


def test_token_chips_collapse_long_image_runs():
    chips = inside.token_chips(["<s>", "<im>", "<im>", "a", "<im>"] + ["<im>"] * 6, [0, 1, 1, 0] + [1] * 7)
    assert len(chips) == 5  # <s>, two short-run chips, a, one collapsed chip
    assert "&lt;im&gt; × 7" in chips[-1] and "positions 4–10" in chips[-1]
    assert "No image request" in inside.token_view_html([], [])


def test_kv_map_colours_image_blocks_only_when_one_request_owns_them():
    view = [
        KVBlock(0, [1], 1, False, image_tokens=3),
        KVBlock(1, [1], 1, False),
        KVBlock(2, [1, 2], 2, True, image_tokens=4),  # shared: stays yellow (a prefix hit)
        KVBlock(3, [], 0, True, image_tokens=4),  # free: no image colour
    ]
    z = [int(v) for v in plots.kv_cache_figure(view).data[0].z[0][:4]]
    assert z == [plots.KV_IMAGE, plots.KV_OWNER0 + 1, plots.KV_SHARED, plots.KV_CACHED]
    names = [t.name for t in plots.kv_cache_figure(view).data[1:]]
    assert "holds image features (1)" in names
    assert not any("image" in (n or "") for n in (t.name for t in plots.kv_cache_figure(view[1:2]).data[1:]))


def test_tiny_qwen2_vl_is_built_in_and_takes_the_sample(ui_cache):
    """The second built-in image-text model (M-RoPE positions): its placeholder wraps the image pad in vision tokens,
    and the Inside tab's prefill marks its image tokens and times its vision tower."""
    from backend import Engine
    from backend.loading.builtin import builtin_names

    assert {"tiny:llava", "tiny:qwen2_vl"} <= set(builtin_names())
    with Engine("tiny:qwen2_vl", dtype="float32", device="cpu", kv_cache_memory_gb=0.004, block_size=4) as engine:
        assert vlm.placeholder_text(engine.processor) == "<|vision_start|><|image_pad|><|vision_end|>"
        done = images.prefill_image_request(engine, images.image_prompt(engine, "Hi", True), images.sample_image())
        assert sum(done.image_mask) >= 1 and done.tokens[done.image_mask.index(True)] == "<|image_pad|>"
        assert inside.image_blocks(done.kv_view, done.request_id) and done.steps[0].vision_s > 0
