"""A tiny random StableDiffusionSafetyChecker whose concepts flag every image but one.

The real checker's concept embeddings and thresholds were fitted to unwanted
content; a random CLIP tower knows nothing of the kind, so the test checker's
concepts are placed by hand: all 17 point away from the embedding of a chosen
"safe" image (B), with a threshold that flags any image whose embedding is not
almost B's. So B passes and everything else (image A, sampler previews) is
flagged: a deterministic stand-in for "this image is unwanted".

    build_checker() -> StableDiffusionSafetyChecker (float32, CPU, thresholds set)
    image_a(), image_b() -> 64x64 RGB PIL images (A: detailed, flagged; B: passes)
    processor() -> the CLIPImageProcessor the checker's pipeline would use
    save_models(models_root) -> writes safety_checker/tiny-checker.safetensors,
        safety_checker/tiny-checker-diffusers/ and two foreign files
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_SIZE = 32  # the tiny tower's input size (4x4 patches of 8)
#: B's own score is -MARGIN; an image is flagged when cos(its embedding, B's) < 1 - MARGIN (about).
MARGIN = 0.002


def image_a() -> Image.Image:
    """Detailed: a 4-pixel checkerboard over a colour gradient (blurring it is measurable)."""
    y, x = np.mgrid[0:64, 0:64]
    board = ((x // 4 + y // 4) % 2).astype(np.float32)
    rgb = np.stack([x / 63.0, 0.3 + 0.5 * board, 1.0 - y / 63.0], axis=-1)
    return Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), "RGB")


def image_b() -> Image.Image:
    """Smooth: concentric rings."""
    y, x = np.mgrid[0:64, 0:64]
    r = np.sqrt((x - 32.0) ** 2 + (y - 32.0) ** 2)
    rgb = np.stack([0.5 + 0.5 * np.sin(r / 3), 0.5 + 0.5 * np.cos(r / 5), np.full_like(r, 0.4)], axis=-1)
    return Image.fromarray(np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8), "RGB")


def processor() -> Any:
    """The feature extractor a Stable Diffusion 1.x repository ships (its preprocessor_config.json,
    written out here independently of Kiln's copy), at the tiny tower's input size."""
    from transformers import CLIPImageProcessorPil

    return CLIPImageProcessorPil.from_dict({
        "crop_size": {"height": IMAGE_SIZE, "width": IMAGE_SIZE}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_resize": True, "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3, "size": {"shortest_edge": IMAGE_SIZE}})


def _embed(checker: Any, image: Image.Image) -> Any:
    import torch

    with torch.no_grad():
        pixels = processor()([image], return_tensors="pt").pixel_values
        return torch.nn.functional.normalize(checker.visual_projection(checker.vision_model(pixels)[1]))[0]


@functools.lru_cache(maxsize=None)
def build_checker() -> Any:
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    # 64-wide heads, as CLIP's and as Kiln infers for single files.
    vision = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
              "patch_size": 8, "image_size": IMAGE_SIZE, "projection_dim": 32}
    config = CLIPConfig(vision_config=vision, projection_dim=32)
    torch.manual_seed(0)
    checker = StableDiffusionSafetyChecker(config).eval()
    safe = _embed(checker, image_b())
    with torch.no_grad():
        checker.concept_embeds.copy_(-safe.expand(17, -1))
        checker.concept_embeds_weights.fill_(-1.0 + MARGIN)
        checker.special_care_embeds.copy_(safe.expand(3, -1))
        checker.special_care_embeds_weights.fill_(2.0)  # never fires: a cosine is at most 1
    return checker


def save_models(root: Path) -> Path:
    """``root/safety_checker/`` with the checker as one file and as a folder, plus foreign files."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = root / "safety_checker"
    folder.mkdir(parents=True, exist_ok=True)
    checker = build_checker()
    # The single file in the layout every Stable Diffusion repository's checker has (older
    # transformers nested the vision tower once more); the folder as today's save_pretrained writes it.
    legacy = {("vision_model." + k if k.startswith("vision_model.") else k): v.contiguous()
              for k, v in checker.state_dict().items()}
    save_file(legacy, str(folder / "tiny-checker.safetensors"))
    checker.save_pretrained(str(folder / "tiny-checker-diffusers"), safe_serialization=True)
    torch.manual_seed(1)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                        num_attention_heads=2, vocab_size=100))
    save_file({k: v.contiguous() for k, v in text.state_dict().items()}, str(folder / "clip-text.safetensors"))
    text.save_pretrained(str(folder / "clip-text-diffusers"), safe_serialization=True)
    return folder
