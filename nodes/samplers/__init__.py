"""Samplers for KSampler, in small modules with one job each.

* ``names``     the sampler/schedule tables (ComfyUI and Stability spellings)
* ``schedules`` sigma grids: diffusers' for strength/txt2img, ComfyUI's for ``denoise``
* ``steppers``  diffusers schedulers set up for a grid; Kiln's DPM++ 2S ancestral
* ``plan``      the strength/denoise rules: where sampling starts (documented there)
* ``velocity_rule`` a flow model's sampling rule (ModelSamplingAuraFlow's ``sampling``)
* ``loop``      the guided denoising loop with progress, previews, interruption
* ``preview``   latent -> RGB thumbnails

Importing this package does not import torch or diffusers; the functions do.
"""
