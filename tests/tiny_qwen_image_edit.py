"""The tiny Qwen-Image (tests/tiny_qwen_image.py) as Qwen-Image-Edit pipelines.

Its Qwen2.5-VL already has a vision tower (one block, two heads, 14-pixel patches, 2x2 merge). The
pipelines read pictures through transformers' Qwen2VLProcessor, whose constructor wants a video
processor (torchvision, not installed): :func:`processor` assembles one for pictures alone, with
the release's pixel bounds.
"""
from __future__ import annotations

from typing import Any

import tiny_qwen_image


def processor() -> Any:
    from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor

    from nodes.families.qwen_image_edit import MAX_PIXELS, MIN_PIXELS

    tok = tiny_qwen_image.components()["tokenizer"]
    proc = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    proc.image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS})
    proc.tokenizer, proc.video_processor, proc.chat_template = tok, None, None
    proc.image_token, proc.video_token = "<|image_pad|>", "<|video_pad|>"
    proc.image_token_id = tok.convert_tokens_to_ids(proc.image_token)
    proc.video_token_id = tok.convert_tokens_to_ids(proc.video_token)
    return proc


def pipeline(plus: bool = False) -> Any:
    """QwenImageEditPipeline (or QwenImageEditPlusPipeline) over the tiny components."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(processor=processor(), **dict(tiny_qwen_image.components()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: The tests' picture area, in place of the release's 1024x1024 (:func:`shrink_picture_area`).
SMALL_AREA = 256 * 256


def shrink_picture_area(monkeypatch: Any, area: int = SMALL_AREA) -> None:
    """Kiln's Edit nodes and both diffusers Edit pipelines resize pictures to about ``area`` pixels
    instead of 1024x1024. A 1024x1024 VAE encode and its 4096 reference tokens were most of these
    tests' time on a CPU, while the rules under test (rounding to 32, Lanczos, where the latents and
    vision tokens go) are the same at any area; tests/test_qwen_image_edit.py checks the release's
    areas themselves once."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    from nodes.families import qwen_image_edit

    release = qwen_image_edit.AREA
    real = edit.calculate_dimensions  # Edit's __call__ passes the release area as a literal
    monkeypatch.setattr(qwen_image_edit, "AREA", area)
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", area)
    monkeypatch.setattr(edit, "calculate_dimensions",
                        lambda target, ratio: real(area if target == release else target, ratio))


def picture(seed: int, width: int, height: int) -> Any:
    """A random 8-bit RGB picture, smooth enough that resizing keeps it recognisable."""
    import numpy as np
    from PIL import Image

    g = np.random.default_rng(seed)
    small = g.integers(0, 256, (max(2, height // 16), max(2, width // 16), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def save_folder(path: Any) -> Any:
    """QwenImageEditPlusPipeline.save_pretrained's folder at ``path``. The processor, which cannot save
    without its video processor, is written as its parts (the image processor's config, the tokenizer)."""
    import json
    from pathlib import Path

    path = Path(path)
    pipe = pipeline(plus=True)
    proc = pipe.processor
    pipe.register_modules(processor=None)
    pipe.save_pretrained(str(path), safe_serialization=True)
    proc.image_processor.save_pretrained(str(path / "processor"))
    proc.tokenizer.save_pretrained(str(path / "processor"))
    index = json.loads((path / "model_index.json").read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    (path / "model_index.json").write_text(json.dumps(index, indent=2))
    return path
