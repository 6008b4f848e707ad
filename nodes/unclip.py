"""unCLIP's image conditioning: the noise augmentor of an SD 2.1 unCLIP checkpoint, and the ADM
vector (image embedding + noise-level embedding) each conditioning entry gives the UNet.

ComfyUI's rule, which this follows: unCLIPConditioning only records (clip_vision_output,
strength, noise_augmentation) on each entry; the vector is made when sampling starts, from
the model's augmentor and the sampler's seed. For one image embedding: the noise level is
round(999 * noise_augmentation); the embedding is normalised by the augmentor's statistics,
noised to that level of the augmentor's own 1000-step cosine schedule with noise drawn from
``seed - 10`` on the CPU, un-normalised, put beside the level's sinusoidal embedding and scaled
by ``strength``. Several embeddings (several unCLIP nodes, or a batch of images) are summed,
and their summed image half is noised once more at ComfyUI's merge level (0.05). An entry
without any has a zero vector.

The statistics: the released checkpoints carry none (their augmentor keeps them outside its
saved state), so normalising is the identity there, as in ComfyUI; a file that does carry
``noise_augmentor.data_mean`` / ``data_std`` (diffusers' image normaliser written back) has
them used.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from nodes.families.base import ConditioningError

PREFIX = "noise_augmentor."
ENCODER_PREFIX = "embedder.model.visual."
#: The list unCLIPConditioning appends to (ComfyUI's key).
KEY = "unclip_conditioning"
#: ComfyUI's level for re-noising the sum of several embeddings (unclip_noise_augment_merge).
MERGE_AUGMENTATION = 0.05
#: ComfyUI draws the augmentor's noise from the sampler's seed minus this.
SEED_OFFSET = 10
LEVELS = 1000


def cosine_schedule(steps: int = LEVELS) -> tuple[Any, Any]:
    """(sqrt(alpha_bar), sqrt(1 - alpha_bar)) of the "squaredcos_cap_v2" schedule the augmentor
    was trained with: betas from the squared cosine, capped at 0.999, in float64 then float32."""
    import torch

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = torch.tensor([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), 0.999) for i in range(steps)],
                         dtype=torch.float64)
    cumprod = torch.cumprod(1 - betas, 0)
    return cumprod.sqrt().float(), (1 - cumprod).sqrt().float()


@dataclass(eq=False)
class NoiseAugmentor:
    """The augmentor of one unCLIP model: its schedule and the embedding statistics."""

    dim: int
    mean: Any  # [1, dim]
    std: Any  # [1, dim]
    max_level: int = LEVELS

    def __post_init__(self) -> None:
        self.signal, self.noise = cosine_schedule(self.max_level)

    def level(self, augmentation: float) -> int:
        return round((self.max_level - 1) * float(augmentation))

    def __call__(self, embed: Any, level: int, generator: Any) -> Any:
        """[1, dim] embedding -> [1, 2 * dim]: the noised embedding and the level's embedding."""
        import torch
        from diffusers.models.embeddings import get_timestep_embedding

        x = (embed - self.mean) / self.std
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype)
        x = self.signal[level] * x + self.noise[level] * noise
        x = x * self.std + self.mean
        t = get_timestep_embedding(torch.tensor([level]), self.dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        return torch.cat([x, t.to(x.dtype)], dim=1)

    def __kiln_nbytes__(self) -> int:
        return 0


def augmentor_from(state: Any, adm_width: int) -> NoiseAugmentor:
    """The augmentor for a UNet whose class embedding takes ``adm_width`` (twice the image
    embedding's width), with the file's statistics where it has them."""
    import torch

    dim = adm_width // 2
    mean, std = state.get(PREFIX + "data_mean"), state.get(PREFIX + "data_std")
    mean = torch.zeros(1, dim) if mean is None else mean.float().reshape(1, dim)
    std = torch.ones(1, dim) if std is None else std.float().reshape(1, dim)
    return NoiseAugmentor(dim, mean, std)


def image_parts(state: Any, unet_config: dict, dtype: Any) -> tuple[Any, NoiseAugmentor]:
    """An unCLIP checkpoint's image encoder (OpenCLIP's layout under ``embedder.model.visual.``, as a
    transformers CLIPVisionModelWithProjection) and its noise augmentor."""
    from nodes import clip_vit
    from nodes.checkpoint.load import CheckpointError

    if not any(k.startswith(ENCODER_PREFIX) for k in state):
        raise CheckpointError(f"an unCLIP checkpoint (its UNet takes an image embedding) without its image encoder "
                              f"('{ENCODER_PREFIX}*')")
    encoder = clip_vit.build(clip_vit.openclip_to_transformers(state, ENCODER_PREFIX), "the unCLIP image encoder",
                             dtype)
    adm = int(unet_config["projection_class_embeddings_input_dim"])
    if adm != 2 * encoder.config.projection_dim:
        raise CheckpointError(f"the UNet's image input ({adm} wide) is not twice its image encoder's embedding "
                              f"({encoder.config.projection_dim})")
    return encoder, augmentor_from(state, adm)


def adm_vector(augmentor: NoiseAugmentor, records: list[dict], seed: int, input_name: str) -> Any:
    """The [1, 2 * dim] vector of one entry's unCLIP records (ComfyUI's unclip_adm)."""
    import torch

    generator = torch.Generator().manual_seed(int(seed) - SEED_OFFSET)
    parts = []
    for record in records:
        embeds = record["clip_vision_output"].image_embeds.to(torch.float32)
        if embeds.ndim != 2 or embeds.shape[-1] != augmentor.dim:
            raise ConditioningError(f"its unCLIP image embedding is {tuple(embeds.shape)} but this model takes "
                                    f"{augmentor.dim}-wide embeddings (encode the image with the model's own "
                                    "CLIP_VISION)", input_name)
        level = augmentor.level(record["noise_augmentation"])
        for row in embeds:
            generator.manual_seed(int(seed) - SEED_OFFSET)  # ComfyUI reseeds for every embedding
            parts.append(augmentor(row.reshape(1, -1), level, generator) * float(record["strength"]))
    if len(parts) == 1:
        return parts[0]
    total = torch.stack(parts).sum(0)
    return augmentor(total[:, :augmentor.dim], augmentor.level(MERGE_AUGMENTATION), generator)


def _side(side: Any, augmentor: NoiseAugmentor | None, pooled: bool, seeds: list[int], input_name: str) -> Any:
    """A copy of a CONDITIONING side with each entry's image vector in its extras: the ADM vector of an
    unCLIP model, or (``pooled``: SDXL, ComfyUI's Revision) the noised embedding as the pooled text."""
    import torch

    from nodes.families.conditioning import PerJob
    from nodes.families.sd2_unclip import ADM_EXTRA

    if not isinstance(side, list):
        return side
    per_job = isinstance(side, PerJob)
    out = []
    for j, item in enumerate(side):
        embeds, extra = item[0], dict(item[1] or {})
        records = extra.get(KEY) or []
        seed = seeds[j] if per_job and j < len(seeds) else seeds[0]
        if pooled and records:
            width = int(records[0]["clip_vision_output"].image_embeds.shape[-1])
            text = extra.get("pooled_output")
            if text is not None and text.shape[-1] != width:
                raise ConditioningError(f"its unCLIP image embedding is {width} wide but the model's pooled text is "
                                        f"{text.shape[-1]} (SDXL takes a ViT-bigG embedding)", input_name)
            extra["pooled_output"] = adm_vector(NoiseAugmentor(width, torch.zeros(1, width), torch.ones(1, width)),
                                                records, seed, input_name)[:, :width]
        elif augmentor is None and records and not pooled:
            raise ConditioningError("carries an unCLIP image embedding (unCLIPConditioning) but the model has no "
                                    "image (ADM) input: load an SD 2.1 unCLIP checkpoint with unCLIPCheckpointLoader "
                                    "(or use an SDXL model, whose pooled text it replaces)", input_name)
        elif augmentor is not None:
            extra[ADM_EXTRA] = adm_vector(augmentor, records, seed, input_name) if records else \
                torch.zeros(1, 2 * augmentor.dim)
        else:
            out.append(item)
            continue
        out.append([embeds, extra])
    if all(a is b for a, b in zip(out, side)):
        return side  # nothing to add: the very conditioning, so nothing downstream sees a copy
    return PerJob(out) if per_job else out


def prepare(model: Any, positive: Any, negative: Any, seeds: list[int], middle: Any = None,
            middle_name: str = "cond2") -> tuple[Any, Any, Any]:
    """(positive, negative, middle) with each entry's image vector for an unCLIP model (and, on
    SDXL, unCLIP records turned into pooled text as ComfyUI does); for any other model they are
    returned as they are, unless they carry unCLIP records, which is an error naming the input
    (ComfyUI would drop them silently)."""
    augmentor = getattr(model, "extra", {}).get("noise_augmentor")
    pooled = bool(getattr(model.family, "unclip_replaces_pooled", False))
    return tuple(_side(side, augmentor, pooled, seeds, name)
                 for side, name in ((positive, "positive"), (negative, "negative"), (middle, middle_name)))


def for_sampling(model: Any, positive: Any, negative: Any, seeds: list[int], dual: Any) -> tuple[Any, Any, Any]:
    """:func:`prepare` for a sampling node: ``dual`` is a patch or guider whose ``middle`` prompt
    (PerpNeg's empty prompt, DualCFGGuider's cond2) gets the same; errors become the node's,
    naming the input."""
    import dataclasses

    from engine.context import NodeError

    middle_name = getattr(dual, "middle_input", "cond2")
    try:
        positive, negative, middle = prepare(model, positive, negative, seeds,
                                             None if dual is None else dual.middle, middle_name)
    except ConditioningError as exc:
        raise NodeError(str(exc), exc.input_name) from None
    return positive, negative, dual if dual is None else dataclasses.replace(dual, middle=middle)
