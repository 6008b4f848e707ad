"""FLUX.3 [klein] from a diffusers folder (the modular pipelines' ``save_pretrained``) through
CheckpointLoaderSimple, against Flux3ModularPipeline and Flux3DistilledModularPipeline on the same weights.

The folder is what diffusers itself writes (``modular_model_index.json``, not ``model_index.json``), so the
folder test, the distilled/base choice (the transformer config's ``flow_map``), the Qwen3-VL build and the
tokenizer read from ``tokenizer/`` are all the real paths.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_flux3
from engine.workflow import parse
from flow_family_files import env, models_root, registry, run  # noqa: F401 (fixtures)
from nodes.checkpoint.load import load_checkpoint
from nodes.families import flux3, flux3_distilled
from test_flux3 import PIXEL_TOL, PROMPT, SIZE, _reference


def _make(root: Path) -> Path:
    for distilled, name in ((False, "flux3-klein-tiny-diffusers"), (True, "flux3-klein-distilled-tiny-diffusers")):
        tiny_flux3.save_folder(root / "checkpoints" / name, distilled)
    return root


root = models_root(_make, "flux3-folders")


def _graph(ckpt: str, prompt: str, seed: int, steps: int, cfg: float) -> dict:
    """ComfyUI's klein graph with the three loaders replaced by CheckpointLoaderSimple."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "flux3"}},
    }


def test_a_modular_pipeline_folder_loads_as_flux3_with_the_weights_as_saved(root):
    for name, family, distilled in (("flux3-klein-tiny-diffusers", flux3.FAMILY, False),
                                    ("flux3-klein-distilled-tiny-diffusers", flux3_distilled.FAMILY, True)):
        loaded = load_checkpoint(root / "checkpoints" / name, torch.float32)
        assert loaded.family is family, name
        theirs = tiny_flux3.components(distilled)["transformer"].state_dict()
        ours = loaded.modules["unet"].state_dict()
        assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs), name
        assert loaded.scheduler_config["shift"] == flux3.SHIFT  # no scheduler/ saved: the family's constant shift


@pytest.mark.parametrize("distilled", [False, True])
def test_a_folder_graph_equals_the_modular_pipeline(registry, env, distilled):
    ckpt, cfg, seed = ("flux3-klein-distilled-tiny-diffusers", 1.0, 3) if distilled else \
        ("flux3-klein-tiny-diffusers", 3.5, 5)
    ours = run(registry, env, parse(_graph(ckpt, PROMPT, seed, 3, cfg))).results["6"][0].numpy()
    theirs = _reference(PROMPT, seed, 3, cfg, distilled=distilled)
    print(f"distilled={distilled}: max |kiln - pipeline| = {np.abs(ours - theirs).max():.2e}")
    assert np.abs(ours - theirs).max() <= PIXEL_TOL
    other = run(registry, env, parse(_graph(ckpt, "a blue car on a road", seed, 3, cfg))).results["6"][0].numpy()
    assert np.abs(ours - other).max() > 0.02  # the folder's text encoder and tokenizer are really read
