"""Images in requests: decode them, run the processor, keep per request what the language model needs (the
placeholder positions, the image features once computed, M-RoPE positions), and hand each step its part."""

from backend.multimodal.inputs import ImageInputs, prepare_image_request
from backend.multimodal.step import ensure_image_features, step_embeddings, step_mrope_positions

__all__ = [
    "ImageInputs",
    "ensure_image_features",
    "prepare_image_request",
    "step_embeddings",
    "step_mrope_positions",
]
