"""JoyImage Edit (JD's JoyAI-Image-Edit: a 16B double-stream DiT): flow matching on Wan 2.1's 16-channel VAE
latents, conditioned on Qwen3-VL 8B's last layer, the pictures to edit read by its vision tower and
handed to the transformer as reference latents.

What it shares and what differs, and where it lives:

* **Network.** diffusers' ``JoyImageEditTransformer3DModel``: 1x2x2 patches of [C, frames, h, w] latents,
  text and image streams in every block, the flow time x 1000. Reference pictures are more "frames":
  the image being made first, then reference k at frame k, each patch grid with its own rows and
  columns from 0 (ComfyUI's JoyImage, which lets references differ in size from the image; diffusers
  stacks them as one tensor, which needs equal sizes and gives the same positions then).
  :class:`JoyImageNetwork` runs the module's own layers that way; the text has no rotary positions.
* **Text.** As JoyImageEditPipeline encodes: the chat template (:data:`PREFIX` .. :data:`SUFFIX`; with
  pictures, one ``<|vision_start|><|image_pad|><|vision_end|>`` block per picture before the prompt),
  Qwen3-VL's last decoder layer *before* its final norm, the first :data:`TEMPLATE_TOKENS` tokens
  dropped. Pictures are read at the release's pixel bounds (:data:`PIXELS`).
* **Pictures.** TextEncodeJoyImageEdit (nodes.joyimage_nodes) gives each picture the size bucket of its
  aspect ratio (:data:`BUCKETS`), scaled to cover it and centre-cropped as the pipeline's image
  processor does (:func:`bucketed`); that picture is both what the vision tower reads and, given a
  VAE, the reference latent.
* **Guidance.** Real CFG; the pipeline rescales each latent pixel's guided velocity to the length of
  the conditional one over the channels (:meth:`JoyImage.combine_guidance`); Kiln does the same, so
  its images equal the pipeline's. ComfyUI's template adds CFGNorm (an x0-space rule), which Kiln's
  node applies on top as ComfyUI does.
* **Model sampling.** JD's own ComfyUI node builds FlowMatchEulerDiscreteScheduler with a fixed shift
  of 1.5 (:data:`SCHEDULER`) and samples through the pipeline, whose grid is the scheduler's default
  spacing (from 1 to the shifted least training sigma, as SD3's pipelines: nodes.samplers.flow's
  ``kiln_train_grid``); KSampler follows it, so its images are the pipeline's.
* **Latents.** Wan 2.1's statistics, which are Qwen-Image's (:data:`nodes.families.qwen_image.QWEN_LATENT`);
  the VAE file (``wan_2.1_vae.safetensors``) loads through Kiln's Qwen-Image VAE.
"""
from __future__ import annotations

import math
from typing import Any

from nodes.families import flux, flux_references, qwen_image
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.runtime import precision

UNET_PREFIX = flux.UNET_PREFIX
LABEL = "JoyImage"
#: JoyImageEditPipeline's template (its system turn has a literal backslash-n) and what it drops.
PREFIX = ("<|im_start|>system\n \\nDescribe the image by detailing the color, shape, size, texture, quantity, "
          "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE_TOKENS = 34
#: Prompt tokens the pipeline keeps at most (its text_token_max_length).
MAX_TOKENS = 2048
#: The pixel bounds the vision tower reads pictures within (the release's processor; ComfyUI's JoyImage).
PIXELS = (65536, 16777216)
#: The release's (height, width) buckets at base size 1024 (the pipeline's image processor, ComfyUI's node).
BUCKETS = [(512, 1792), (512, 1856), (512, 1920), (512, 1984), (512, 2048), (576, 1600), (576, 1664), (576, 1728),
           (576, 1792), (640, 1472), (640, 1536), (640, 1600), (704, 1344), (704, 1408), (704, 1472), (768, 1216),
           (768, 1280), (768, 1344), (832, 1152), (832, 1216), (896, 1088), (896, 1152), (960, 1024), (960, 1088),
           (1024, 960), (1024, 1024), (1088, 896), (1088, 960), (1152, 832), (1152, 896), (1216, 768), (1216, 832),
           (1280, 768), (1344, 704), (1344, 768), (1408, 704), (1472, 640), (1472, 704), (1536, 640), (1600, 576),
           (1600, 640), (1664, 576), (1728, 576), (1792, 512), (1792, 576), (1856, 512), (1920, 512), (1984, 512),
           (2048, 512)]
#: JD's scheduler for the model (its ComfyUI node's FlowMatchEulerDiscreteScheduler: a fixed shift of 1.5),
#: on the scheduler's default spacing, which JoyImageEditPipeline samples (``kiln_train_grid``).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.5,
             "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "time_shift_type": "exponential", "prediction_type": "flow",
             "kiln_train_grid": True}


def bucket(height: int, width: int) -> tuple[int, int]:
    """The (height, width) bucket whose aspect ratio is nearest the picture's (the first of equals)."""
    return min(BUCKETS, key=lambda hw: abs(hw[0] / hw[1] - height / width))


def bucketed(picture: Any) -> Any:
    """A PIL picture scaled to cover its bucket (sides rounded up, bilinear) and centre-cropped to it:
    JoyImageEditImageProcessor.resize_center_crop."""
    from PIL import Image

    w, h = picture.size
    bh, bw = bucket(h, w)
    scale = max(bh / h, bw / w)
    rw, rh = math.ceil(w * scale), math.ceil(h * scale)
    left, top = (rw - bw) // 2, (rh - bh) // 2
    return picture.convert("RGB").resize((rw, rh), Image.BILINEAR).crop((left, top, left + bw, top + bh))


def rotary(sizes: list[tuple[int, int, int]], dims: list[int], theta: float, device: Any) -> tuple:
    """(cos, sin) [tokens, head] of patch grids ``sizes`` (frames, rows, columns) in sequence order:
    frames counted on from grid to grid, rows and columns from 0 in each (module docstring); each
    angle repeated for its pair of channels, as the transformer's own table is laid out."""
    import torch

    angles = []
    start = 0
    for t, h, w in sizes:
        axes = [torch.arange(start, start + t), torch.arange(h), torch.arange(w)]
        grid = torch.stack(torch.meshgrid(*[a.float() for a in axes], indexing="ij")).reshape(3, -1)
        parts = []
        for axis, dim in enumerate(dims):
            freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32)[: dim // 2] / dim))
            parts.append(torch.outer(grid[axis], freqs).repeat_interleave(2, dim=1))
        angles.append(torch.cat(parts, dim=1))
        start += t
    angle = torch.cat(angles)
    return angle.cos().to(device), angle.sin().to(device)


class JoyImageNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def text_width(self) -> int:
        return int(self.transformer.config.text_dim)

    def __call__(self, *args: Any, **kwargs: Any) -> tuple:
        """:meth:`run` with the transformer's layers outside its blocks brought in when the model manager
        offloads or pages it (nodes.runtime.offload.outside_blocks): this calls those layers itself, so
        the hook on the transformer's own forward, which would bring them in, never runs."""
        from nodes.runtime.offload import outside_blocks

        with outside_blocks(self.transformer):
            return self.run(*args, **kwargs)

    def run(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
            reference_latents: "flux_references.References | None" = None, **kwargs: Any) -> tuple:
        import torch

        tr = self.transformer
        b, _, h, w = x.shape
        check_even_latent(LABEL, h, w)
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen3-VL 8B: CLIPLoader type joyimage")
        grids = [x] + list(reference_latents.latents if reference_latents is not None else ())
        _, ph, pw = tr.config.patch_size
        tokens, sizes = [], []
        for grid in grids:
            grid = grid.to(device=self.device, dtype=self.dtype)
            pad_h, pad_w = -grid.shape[-2] % ph, -grid.shape[-1] % pw
            if pad_h or pad_w:  # a reference of odd size: padded at the edge as ComfyUI pads
                grid = torch.nn.functional.pad(grid, (0, pad_w, 0, pad_h), mode="replicate")
            tokens.append(tr.img_in(grid.unsqueeze(2)).flatten(2).transpose(1, 2))
            sizes.append((1, grid.shape[-2] // ph, grid.shape[-1] // pw))
        img = torch.cat(tokens, dim=1)
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b)
        _, vec, txt = tr.condition_embedder(time, encoder_hidden_states.to(device=self.device, dtype=self.dtype))
        if vec.shape[-1] > tr.config.hidden_size:
            vec = vec.unflatten(1, (6, -1))
        freqs = rotary(sizes, list(tr.config.rope_dim_list), float(tr.config.theta), self.device)
        for block in tr.double_blocks:
            img, txt = block(hidden_states=img, encoder_hidden_states=txt, temb=vec, image_rotary_emb=(freqs, None))
        own = sizes[0][1] * sizes[0][2]
        out = tr.proj_out(tr.norm_out(img[:, :own]))
        out = tr.unpatchify(out, 1, sizes[0][1], sizes[0][2])  # [B, C, 1, h, w]
        return (out[:, :, 0],)


class JoyImage(FlowFamily):
    name = "joyimage"
    inference_dtypes = precision.NO_FP16
    latent = qwen_image.QWEN_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen3-vl", ""),)
    clip_types = ("joyimage",)
    guidance_note = "JoyImage has no distilled guidance (its guidance is real CFG: KSampler's cfg with a negative)"
    scheduler = SCHEDULER
    network_class = JoyImageNetwork
    dit_block_lists = {"double": "double_blocks"}
    #: JoyImage's double blocks return the picture, then the text (nodes.families.skip_layers)
    dit_block_returns = ("hidden_states", "encoder_hidden_states")
    takes_references = True
    #: Its Qwen3-VL is built with the vision tower (on the first picture read: nodes.checkpoint.split).
    text_vision = True
    text_kind_aliases = {"qwen3": "qwen3-vl"}

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import joyimage_keys

        return joyimage_keys.is_original(shapes)

    def combine_guidance(self, guided: "Any", cond: "Any") -> "Any":
        """Each latent pixel's guided velocity at the conditional one's length over the channels
        (JoyImageEditPipeline's rescale)."""
        import torch

        length = torch.linalg.vector_norm(cond.float(), dim=1, keepdim=True)
        mine = torch.linalg.vector_norm(guided.float(), dim=1, keepdim=True).clamp_min(1e-6)
        return (guided.float() * (length / mine)).to(guided.dtype)

    def original_names(self, network: Any) -> dict[str, str]:
        """ComfyUI's JoyImage keys are diffusers' own names."""
        return {name: name for name, _ in network.named_parameters()}

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The reference latents of the call: reference k at frame k whatever ``reference_latents_method``."""
        if not extras[0].get(flux_references.LATENTS):
            return {}
        plain = [{k: v for k, v in e.items() if k != flux_references.METHOD} for e in extras]
        return {"reference_latents": flux_references.for_call(plain, batch, self.latent, device, dtype)}

    def call_key(self, extra: dict) -> Any:
        return flux_references.call_key(extra)

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, tokens, width] of a prompt without pictures (the pipeline's text-only encode):
        ComfyUI's weight syntax is not read; a prompt starting with ``<|im_start|>`` is its own template."""
        text = (texts or {}).get("tokenizer", text)
        tok = clip.tokenizers["tokenizer"]
        templated = text if text.startswith("<|im_start|>") else PREFIX + text + SUFFIX
        ids = tok([templated], max_length=MAX_TOKENS + TEMPLATE_TOKENS, truncation=True, return_tensors="pt").input_ids
        return conditioning(clip, lambda qwen: {"input_ids": ids}, report)


def encode_pictures(clip: Any, prompt: str, pictures: list) -> list:
    """CONDITIONING of ``prompt`` with PIL ``pictures`` (already bucketed) read by Qwen3-VL's vision tower:
    one picture block each before the prompt (JoyImageEditPipeline.encode_prompt_multiple_images)."""
    from nodes.families import qwen3_vl

    if not pictures:
        return FAMILY.encode_text(clip, prompt)
    text = PREFIX + qwen3_vl.BLOCK * len(pictures) + prompt + SUFFIX
    tok = clip.tokenizers["tokenizer"]
    return conditioning(clip, lambda qwen: qwen3_vl.prompt_inputs(qwen, tok, text, pictures, bounds=PIXELS),
                        parts=(qwen3_vl.TOWER,))


def conditioning(clip: Any, inputs: Any, report: Any = None, parts: tuple[str, ...] = ()) -> list:
    """JoyImage's CONDITIONING from the encoder's inputs (``inputs(encoder) -> kwargs``; ``input_ids``
    alone, or with the pictures' inputs, when ``parts`` names the vision tower): the last decoder layer
    before the final norm (nodes.families.qwen_image21.states_unnormed), the template's first
    :data:`TEMPLATE_TOKENS` tokens dropped."""
    import torch

    from nodes.families.qwen_image21 import states_unnormed

    with torch.inference_mode(), clip.encoder("text_encoder", parts) as qwen:
        device = next(qwen.parameters()).device
        given = dict(inputs(qwen))
        ids = given.pop("input_ids")
        model = qwen if given else getattr(qwen, "language_model", qwen)
        states = states_unnormed(model, ids.to(device), "JoyImage", "qwen3vl_8b_joyimage_edit*.safetensors with "
                                 "CLIPLoader type joyimage", **{k: v.to(device) for k, v in given.items()})[-1]
    if states.shape[1] <= TEMPLATE_TOKENS:
        raise ConditioningError(f"the templated prompt has {states.shape[1]} tokens, not more than the "
                                f"{TEMPLATE_TOKENS} JoyImage drops: give a prompt that brings the template", "text")
    states = states[:, TEMPLATE_TOKENS:]
    if report is not None:
        report.tokens = max(report.tokens, int(states.shape[1]))
        report.windows = 1
    return [[states.to("cpu", torch.float32), {}]]


FAMILY = JoyImage()
