"""The image inputs of the Generate and Compare tabs (what the loaded model takes, the bundled sample) and the Inside
tab's image request: its prompt tokens with the image placeholders marked, the KV blocks that hold image features
and the vision tower's share of the step time (views: ui/inside.py, ui/plots.py; the checks: ui/images.py)."""

from __future__ import annotations

import gradio as gr

from backend.hosting import check_request
from ui import images, inside
from ui.common import visitor_key
from ui.errors import status_errors
from ui.lab.state import LabState
from ui.plots import kv_cache_figure

TAKES_IMAGES = "The loaded model takes images: each request carries this one (upload, or the sample)."
INSIDE_PROMPT = "Describe the image."


class ImagePanel:
    """What the image inputs and the Inside tab's image request call."""

    def __init__(self, state: LabState) -> None:
        self.state = state

    def note(self) -> tuple:
        """After a load: -> (Generate's note, Compare's note, their two accordions, their two image inputs, their two
        sample buttons): open and enabled for an image-text model; for a language model closed, disabled, and the
        note says why."""
        why = images.image_refusal(self.state.session.current())
        text = TAKES_IMAGES if why is None else f"_No image input: {why}._"
        on = why is None
        return (text, text) + (gr.update(open=on),) * 2 + (gr.update(interactive=on),) * 4

    def sample(self) -> str:
        """The bundled sample image, for an image input: a copy in Gradio's upload folder (which Gradio serves
        wherever the app was started from)."""
        from gradio.utils import get_upload_folder

        return str(images.sample_copy(get_upload_folder()))

    @status_errors("prefilling an image request", outputs=3, status=0)
    def prefill(self, prompt, image, use_chat_template=True, request: gr.Request = None):
        """One image request prefilled and stopped (ui/images.prefill_image_request): the Generate tab's image, or
        the sample when it has none. Yields (summary markdown, token view html, KV map with its image blocks)."""
        engine = self.state.engine()
        picture = images.checked_image(image)
        picture = picture if picture is not None else images.sample_image()
        text = images.image_prompt(engine, (prompt or "").strip() or INSIDE_PROMPT, bool(use_chat_template))
        _, lens = images.image_requests(engine, [text], False, picture)
        check_request(self.state.policy, prompt_tokens=lens[0])
        owner = visitor_key(request, self.state.policy.hosted)
        done = images.prefill_image_request(engine, text, picture, owner=owner)
        note = f"image request #{done.request_id} right after its prefill (pink: its blocks that hold image features)"
        yield (
            inside.image_prefill_summary(done, engine.stats().block_size),
            inside.token_view_html(done.tokens, done.image_mask),
            kv_cache_figure(done.kv_view, note=note),
        )
