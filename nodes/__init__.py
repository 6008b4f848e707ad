"""Kiln's built-in node library, registered through the ``kiln.nodes`` entry point."""
from __future__ import annotations

import importlib

#: One module per family. Every one must import: a typo here or a deleted module
#: fails registration loudly instead of silently dropping a family's nodes.
FAMILIES = ("image", "latent", "sampling", "loaders", "split_loaders", "text", "conditioning_nodes", "vae", "grid", "lora",
            "safety", "primitives", "utility",
            "masks", "image_ops", "latent_ops", "vae_tiled", "upscale", "flux_nodes",
            "controlnet", "canny", "custom_sampling", "sampler_settings", "custom_schedulers", "inpaint",
            "image_filters", "model_patches", "guidance_patches", "model_merging", "model_saving", "lora_extract",
            "attention_multiply", "latent_math", "image_layout", "latent_files", "string_nodes", "image_alpha",
            "gits_scheduler", "kontext", "style_model", "torch_compile", "latent_operations", "image_animation", "logic",
            "sd3_nodes", "flux2_nodes", "fibo2_nodes", "qwen_edit_nodes", "newer_utility", "image_outputs",
            "math_expression", "resize_batch", "speed_patches", "unclip_nodes", "gligen", "model_patch_nodes", "camera_angle",
            "text_generate", "qwen21_nodes", "conditioning_files", "marigold", "dual_model_nodes",
            "latent_layers", "joyimage_nodes", "sam3_nodes", "hidream_nodes", "lumina2_nodes", "wan_nodes", "painter",
            "hypernetwork", "uso", "hunyuan_image_nodes", "hunyuan_video15_nodes", "anima_nodes",
            "chroma_radiance_nodes")

#: Kiln's modules a model job imports on its first run: the checkpoint loaders, the text and
#: denoiser wrappers and the sampling loop (they import the model libraries only when used).
WARM_MODULES = ("nodes.checkpoint.detect", "nodes.families.text", "nodes.families.denoiser",
                "nodes.prompt_syntax", "nodes.samplers.loop")


def warm_up() -> None:
    """Import what a model job needs before it runs (about 7 s on a 2-core CPU): ``kiln serve``
    does it while it waits for its first job instead of making that job wait. The model classes
    named here bring in the model libraries' shared machinery every family's loader uses."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTokenizer  # noqa: F401

    for name in WARM_MODULES:
        importlib.import_module(name)


def register(registry) -> None:
    from nodes.runtime.models import ModelManager

    for family in FAMILIES:
        registry.add_module(importlib.import_module(f"nodes.{family}"))
    registry.model_host_factory = ModelManager.for_settings
    registry.output_guard_factory = importlib.import_module("nodes.safety.guard").build_guard
    registry.warm_up = warm_up
    from nodes import model_folders

    registry.model_folders = model_folders.FOLDERS
    registry.model_folder_aliases = model_folders.ALIASES
