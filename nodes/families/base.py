"""The interface every model family implements, and the parts SD-style families share.

A family is what a checkpoint's weights do not say but inference must know: how to
recognise it from key names and shapes, the defaults of its networks, its latent
space (channels, scale and shift, a latent-to-RGB preview), its text encoding, its
training schedule and prediction type (model sampling), and how its network is
called (time ids, pooled embeddings, extra input channels). The sampling loop,
AddNoise, previews and the latent nodes ask the family object and never compare
family names, so a new family is one module here plus its parity test.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from nodes.runtime import precision

if TYPE_CHECKING:
    import torch

Shapes = Mapping[str, tuple[int, ...]]

#: Every released SD UNet/VAE uses 32 groups in its group norms.
NORM_GROUPS = 32
#: CLIP text transformers (OpenAI's and OpenCLIP's) all use 64-wide heads.
TEXT_HEAD_WIDTH = 64


class ConditioningError(ValueError):
    """Conditioning a family cannot use; ``input_name`` says which input it came on."""

    def __init__(self, message: str, input_name: str) -> None:
        super().__init__(message)
        self.input_name = input_name


@dataclass(frozen=True)
class LatentFormat:
    """A family's latent space: what the VAE makes and what the denoiser works in.

    LATENT sockets carry raw VAE latents (as ComfyUI does); the denoiser works on
    ``(raw - shift) * scale``. ``rgb`` maps each channel of a model-space latent to
    RGB for previews (fitted once against real decodes; ComfyUI and A1111 ship the
    same kind of table); ``rgb_bias`` is added after.
    """

    channels: int
    scale: float
    shift: float = 0.0
    rgb: tuple[tuple[float, float, float], ...] = ()
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Image pixels per latent cell (ComfyUI's ``spacial_downscale_ratio``): an empty 4-channel latent
    #: (EmptyLatentImage's, 8 pixels a cell) is resized to it when sampling (nodes.latent.widen_empty).
    downscale: int = 8

    def to_model(self, raw: "torch.Tensor") -> "torch.Tensor":
        return (raw - self.shift) * self.scale if self.shift else raw * self.scale

    def from_model(self, x: "torch.Tensor") -> "torch.Tensor":
        return x / self.scale + self.shift if self.shift else x / self.scale

    def preview_rgb(self, latent: "torch.Tensor") -> "torch.Tensor":
        """[C,h,w] model-space latent -> [h,w,3] uint8."""
        import torch

        lat = latent.detach().to("cpu", torch.float32)
        if len(self.rgb) != lat.shape[0]:  # an unknown layout: the first channel as grey
            grey = lat[:1].expand(3, -1, -1).permute(1, 2, 0)
            return ((grey + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)
        rgb = lat.permute(1, 2, 0) @ torch.tensor(self.rgb, dtype=torch.float32) + torch.tensor(self.rgb_bias)
        return ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8)


@dataclass(frozen=True)
class TextEncoderSpec:
    """One text encoder of a family.

    ``layer`` is the hidden layer the family conditions on by default, counted
    from the end of the *full* released encoder (-1 last, -2 penultimate), as
    ComfyUI's CLIPSetLastLayer counts. ``dropped`` is how many final blocks the
    built encoder lacks (SD 2.x is built without OpenCLIP's last block, as
    diffusers does, so its output already is the penultimate layer).
    ``norm_hidden``: apply the final layer norm to an inner layer's output (SD 1.x
    and 2.x do; SDXL conditions on the raw penultimate state).
    """

    module: str  # "text_encoder" | "text_encoder_2" (the pipeline's component name)
    tokenizer: str  # "tokenizer" | "tokenizer_2"
    kind: str  # "openai" | "openclip"
    prefix: str  # key prefix in the original single-file layout
    layer: int = -1
    dropped: int = 0
    norm_hidden: bool = True
    pooled: bool = False  # this encoder gives the pooled output (SDXL's second)
    pad: str = "<|endoftext|>"
    #: A file without the text projection loads with the identity in its place, so the pooled output
    #: is the unprojected one (SD3's CLIP-L: ComfyUI reads it unprojected, diffusers through its projection).
    projection_optional: bool = False


class WrappedTransformer:
    """A transformer family's network behind the UNet calling convention (Family.wrap_network):
    where it computes, and the module it wraps (``kiln_network``, where its placement is read)."""

    def __init__(self, transformer: Any) -> None:
        from nodes.runtime.fp8 import compute_dtype
        from nodes.runtime.offload import compute_device

        self.transformer = transformer
        self.device, self.dtype = compute_device(transformer), compute_dtype(transformer)

    #: Whether the network checks a prompt's width itself, in its call, after its family's other checks,
    #: rather than the denoiser before the first call (nodes.families.denoiser._check_width): FLUX's, so a
    #: prompt without the pooled output it needs is named for that first.
    checks_width_in_call: bool = False
    #: Whether each call takes ``sigma_next``, the noise level the sampler's step heads for (None where no
    #: schedule is known): a MeanFlow network's second time input. The denoiser finds it on the plan's
    #: sigmas (nodes.samplers.schedules.next_sigma), so every sampler node gives it alike.
    reads_next_sigma: bool = False

    @property
    def kiln_network(self) -> Any:
        return self.transformer

    @property
    def text_width(self) -> int | None:
        """The conditioning width the transformer reads, which the denoiser checks each prompt against:
        its config's ``joint_attention_dim`` (FLUX-style, Qwen-Image-style and SD3 transformers), None
        where it has none; families whose transformers name it otherwise override this."""
        width = getattr(self.transformer.config, "joint_attention_dim", None)
        return None if width is None else int(width)


@dataclass
class Detected:
    """What detection found in a single file: the family and every component config."""

    family: "Family"
    prediction_type: str
    unet: dict[str, Any]
    vae: dict[str, Any]
    #: encoder module name -> CLIPTextConfig kwargs
    text: dict[str, dict[str, Any]] = field(default_factory=dict)
    prediction_reason: str = ""
    #: A continuous-time (EDM) scheduler config the file asks for (CosXL's ``edm_vpred`` keys,
    #: nodes.samplers.edm), None for the family's DDPM schedule.
    sampling: dict[str, Any] | None = None
    #: The latent format the file asks for instead of the family's (Playground v2.5's), or None.
    latent: Any = None


class Family:
    """The base of every family; SD-style defaults, overridden where a family differs."""

    name: str = ""
    latent: LatentFormat
    text_encoders: tuple[TextEncoderSpec, ...] = ()
    #: The UNet's default sample size (latent pixels) for configs built from shapes.
    sample_size: int = 64
    vae_sample_size: int = 512
    default_prediction: str = "epsilon"
    #: ComfyUI's CLIPLoader / DualCLIPLoader ``type`` values that load this family's encoders.
    clip_types: tuple[str, ...] = ()
    #: Releases of the family differ in prediction type but not in shapes, so detection
    #: reads weight statistics (SD 2.x: ComfyUI's rule in nodes.checkpoint.detect).
    prediction_from_weights: bool = False
    #: diffusers' scheduler class the family's pipelines ship with (for configs).
    scheduler_class: str = "PNDMScheduler"
    #: Whether the network reads reference latents (ReferenceLatent: edit models such as FLUX.1
    #: Kontext, nodes.families.flux_references); a conditioning carrying them is refused otherwise.
    takes_references: bool = False
    #: Whether this family's ControlNets read the hint as VAE latents (FLUX), so the apply node needs
    #: its ``vae`` input; SD-style ControlNets encode the RGB hint themselves.
    controlnet_latent_hint: bool = False
    #: Whether some of this family's ControlNets use layers of the model they drive (SD3.5 Large's use the
    #: transformer's patch embedder), so :meth:`run_controlnet` is also handed the model's network.
    controlnet_borrows_layers: bool = False
    #: The control types a union ControlNet of this family takes (SetUnionControlNetType's names,
    #: ComfyUI's), each at the index the network was trained with; empty: the family has none.
    controlnet_union_types: tuple[str, ...] = ()
    #: Whether a prompt repeated k times conditions as the prompt once (attention over repeated keys),
    #: so a positive and negative whose lengths are small multiples may share a call repeated to one
    #: length (ComfyUI's rule for its UNet models' CONDCrossAttn, nodes.families.conditioning.match_tokens).
    #: Not on the transformer families (:attr:`FlowFamily.repeats_text`).
    repeats_text: bool = True
    #: Whether the network denoises latents with a frame axis [B, C, frames, h, w] (Qwen-Image-Layered's
    #: layers, nodes.latent_layers), which it then requires; every other family takes image latents only.
    layered_latents: bool = False
    #: The dtypes the network (and the same load's encoders) hold in on a GPU, preferred first: ``--precision
    #: auto`` takes the first the GPU computes natively (nodes.runtime.precision; ComfyUI's
    #: ``supported_inference_dtypes``). float16 first for the SD-era UNets.
    inference_dtypes: tuple[str, ...] = precision.DEFAULT_PREFERENCE
    #: Config entries a ControlNet must share with the model it drives (nodes.control.apply.mismatch).
    controlnet_shared_config: tuple[str, ...] = ("block_out_channels", "layers_per_block", "cross_attention_dim")

    def __repr__(self) -> str:
        return f"<family {self.name}>"

    # -- detection ---------------------------------------------------------------

    def accepts_text_files(self, files: list) -> bool:
        """Whether text-encoder files of the right kinds (nodes.checkpoint.split.TextFile) are this
        family's, where one kind serves several families (Qwen3-VL 4B and 8B): True unless a family says."""
        return True

    def claims(self, shapes: Shapes) -> bool:
        """Whether a single file in the original layout holds this family's model."""
        raise NotImplementedError

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        """Whether a diffusers folder with these component folders is this family's
        (``text_act``: the first text encoder's activation, which tells OpenAI CLIP from OpenCLIP)."""
        wanted = {s.module for s in self.text_encoders}
        first = self.text_encoders[0].kind if self.text_encoders else ""
        return wanted == {c for c in components if c.startswith("text_encoder")} and \
            (text_act == "gelu") == (first == "openclip")

    def claims_unet(self, shapes: Shapes) -> bool:
        """Whether a UNet-only file (original layout, ``model.diffusion_model.`` keys) is this family's."""
        return False

    def pooled_dim(self, shapes: Shapes) -> int | None:
        """Width of the pooled text the UNet's added conditioning takes (None: it takes none)."""
        return None

    # -- building ------------------------------------------------------------------

    def unet_defaults(self) -> dict[str, Any]:
        """UNet2DConditionModel arguments shared by every checkpoint of the family."""
        return dict(act_fn="silu", center_input_sample=False, downsample_padding=1, flip_sin_to_cos=True,
                    freq_shift=0, mid_block_scale_factor=1, norm_eps=1e-5, norm_num_groups=NORM_GROUPS,
                    sample_size=self.sample_size)

    def unet_heads(self, channels: list[int]) -> Any:
        """diffusers' ``attention_head_dim`` (a head *count* for SD configs)."""
        return tuple(max(1, c // 64) for c in channels)

    def vae_defaults(self) -> dict[str, Any]:
        return dict(act_fn="silu", norm_num_groups=NORM_GROUPS, in_channels=3, out_channels=3,
                    sample_size=self.vae_sample_size, scaling_factor=self.latent.scale, force_upcast=False)

    # -- model sampling ------------------------------------------------------------

    def scheduler_config(self, prediction_type: str | None = None) -> dict[str, Any]:
        """The diffusers scheduler config the family was trained with (1000-step DDPM betas).

        The sampler class is chosen by the sampling node; only the training
        schedule and the prediction type belong to the model.
        """
        return {
            "_class_name": self.scheduler_class, "num_train_timesteps": 1000, "beta_start": 0.00085,
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "trained_betas": None,
            "prediction_type": prediction_type or self.default_prediction, "set_alpha_to_one": False,
            "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False, "timestep_spacing": "leading",
        }

    def model_sampling(self, scheduler_config: dict[str, Any]) -> Any:
        """The object the custom-sampling nodes ask for sigmas, starting noise and steppers
        (nodes.samplers.model_sampling). DDPM-trained families share the discrete one;
        a flow-matching family returns its own with the same methods. A continuous-EDM
        config (CosXL, ModelSamplingContinuousEDM) samples in continuous time."""
        from nodes.samplers.edm import is_edm
        from nodes.samplers.model_sampling import ContinuousSampling, DiscreteSampling

        if is_edm(scheduler_config):
            return ContinuousSampling(scheduler_config)
        return DiscreteSampling(scheduler_config)

    # -- text encoding ---------------------------------------------------------------

    def encoder_layer(self, spec: TextEncoderSpec, clip_layer: int | None) -> int:
        """The built encoder's layer for a CLIPSetLastLayer value (None: the family's default)."""
        wanted = spec.layer if clip_layer is None else int(clip_layer)
        return wanted + spec.dropped

    def combine_text(self, states: list["torch.Tensor"]) -> "torch.Tensor":
        """One conditioning tensor from each encoder's hidden states (SDXL concatenates)."""
        import torch

        return torch.cat(states, dim=-1)

    # -- the denoiser's call signature ----------------------------------------------------

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """Extra keyword arguments of one network call, from each conditioning's extras.

        ``extras`` has one dict per conditioning in the call's batch order (each
        applies to ``batch`` consecutive rows). SD 1.x/2.x need nothing.
        """
        return {}

    #: The inputs a transformer block returning a pair of streams returns, in its order (diffusers'
    #: FLUX blocks: text, then picture; nodes.families.skip_layers hands a skipped block's inputs on so).
    dit_block_returns: tuple[str, ...] = ("encoder_hidden_states", "hidden_states")

    def dit_blocks(self, network: Any) -> dict[str, list]:
        """A transformer's blocks by ComfyUI's kind ("double", "single"), which skip-layer
        guidance addresses by number; a UNet has none (ConditioningError naming the model)."""
        raise ConditioningError(f"skip-layer guidance skips a transformer's blocks; this {self.name} model is a "
                                "UNet (use PerturbedAttentionGuidance or SelfAttentionGuidance)", "model")

    def combine_guidance(self, guided: "torch.Tensor", cond: "torch.Tensor") -> "torch.Tensor":
        """The classifier-free guided network output after the family's own rule (Qwen-Image
        renormalises it to the conditional output's norm, as its diffusers pipeline does); by
        default ``guided`` itself."""
        return guided

    def call_key(self, extra: dict) -> Any:
        """What conditionings must have in common, beyond their token count, to be evaluated in one
        network call (FLUX: the same reference latents); anything hashable."""
        return None

    def conditioning_notes(self, conditionings: list) -> list[str]:
        """Messages for the sampling node about conditioning this family ignores (none by default)."""
        return []

    def wrap_network(self, network: Any) -> Any:
        """The network in the UNet calling convention the denoiser uses:
        ``net(x [B, C, h, w], t, encoder_hidden_states=..., return_dict=False, **kwargs)`` with
        ``.device``/``.dtype``. SD UNets already are; a transformer family adapts its own here
        (patching, position ids, timestep units). A wrapper exposes the module it wraps as
        ``kiln_network``, where the runtime reads its placement (nodes.runtime.offload.offloaded)."""
        return network

    @property
    def controlnet_group(self) -> str:
        """Families whose ControlNets are interchangeable share this name (their network is one
        architecture); by default a family takes only its own."""
        return self.name

    def run_controlnet(self, network: Any, link: Any, x: "torch.Tensor", t: Any, context: "torch.Tensor",
                       kwargs: dict, model_config: Any) -> dict[str, list]:
        """One ControlNet's residuals for the rows ``x``, as lists of tensors by the network keyword
        they feed; :meth:`controlnet_inputs` turns their per-key sums into that call's keywords.
        SD-style families: the UNet's down and mid residuals (nodes.control.unet). A family with
        ``controlnet_borrows_layers`` takes a ``model`` keyword too: the model's unwrapped network."""
        from nodes.control import unet

        return unet.run(network, link, x, t, context, kwargs)

    def controlnet_reads_positive_prompt(self, config: Any) -> bool:
        """Whether the ControlNet of this ``config`` reads the positive prompt on both sides of guidance
        (Qwen-Image's InstantX ones: diffusers' pipeline calls them once, with the prompt, and adds the
        samples to both passes); otherwise each side's rows run it with their own prompt (ComfyUI's rule)."""
        return False

    def controlnet_inputs(self, totals: dict[str, list]) -> dict[str, Any]:
        """The network keywords from the summed residuals of every ControlNet in range."""
        from nodes.control import unet

        return unet.inputs(totals)

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """Module names LoRA files use for ``network``'s weights beyond its own parameter names
        (see nodes.lora_keys.module_names). SD UNets: none here (nodes.lora_keys derives their
        original-layout names itself)."""
        return {}

    def original_names(self, network: Any) -> dict[str, str]:
        """Each of ``network``'s parameter names in the original checkpoint layout, without
        ``model.diffusion_model.`` (``input_blocks.1.0.in_layers.0.weight``): the names ComfyUI's
        per-block merge nodes address. SD UNets: nodes.checkpoint.to_original's map."""
        from nodes.checkpoint.to_original import unet_to_original

        original = unet_to_original({name: name for name, _ in network.named_parameters()}, dict(network.config))
        return {param: key[len("model.diffusion_model."):] for key, param in original.items()}

    def merge_names(self, network: Any) -> dict[str, str]:
        """The names whose prefixes ComfyUI's per-block merge nodes (ModelMergeBlocks, ModelMerge<family>)
        match: the original layout's, where each parameter has one (``original_names``)."""
        return self.original_names(network)

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING for ``text``: CLIP families share nodes.families.text; others override."""
        from nodes.families.text import encode

        return encode(clip, text, report, texts)

    def extra_channels(self, x: "torch.Tensor", conditioning_extras: list[dict]) -> "torch.Tensor":
        """The network input: the latent plus any channels the family concatenates.

        SD-style families append an inpainting checkpoint's mask and masked-image
        latent (nodes.families.inpaint), which KSampler put on the extras."""
        from nodes.families import inpaint

        return inpaint.append(x, conditioning_extras)


class FlowFamily(Family):
    """A flow-matching transformer family (FLUX, Chroma, SD3, FLUX.2, Qwen-Image, Z-Image, Krea 2, ...):
    its scheduler config is diffusers' FlowMatchEulerDiscreteScheduler's, so the custom-sampling nodes
    sample it with FlowSampling, one rule for all of them.

    What these families repeat with only a constant changing is driven by class attributes here, so a
    family module states its constants (:attr:`scheduler`, :attr:`network_class`, :attr:`dit_block_lists`,
    :attr:`guidance_note`) and overrides a method only where its rule differs."""

    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    #: Read where a node asks for a flow model's text encoders (CLIPTextEncodeFlux, nodes.flux_nodes).
    flow = True
    #: A prompt repeated k times is another prompt to a transformer (joint attention weighs the text
    #: tokens against the image's; most give text tokens positions), and ComfyUI's transformer models
    #: take their text as CONDRegular, never repeated: prompts of other lengths are evaluated apart.
    repeats_text = False
    #: The family's one released scheduler config; :meth:`scheduler_config` hands a copy. A family whose
    #: config depends on arguments (FLUX [dev]/[schnell], SD3's shift) overrides the method instead.
    scheduler: Mapping[str, Any] = {}
    #: The family's WrappedTransformer subclass: :meth:`wrap_network` wraps the network in it.
    network_class: Callable[[Any], Any] | None = None
    #: ComfyUI's block kind ("double", "single") -> the transformer's attribute holding those blocks, in
    #: the order skip-layer guidance numbers them (:meth:`dit_blocks`); an empty string: the kind exists in
    #: ComfyUI's numbering but this transformer has none of it. Empty: the family lists none.
    dit_block_lists: Mapping[str, str] = {}
    #: A transformer whose blocks ComfyUI's skip-layer nodes never reach (its model runs every block
    #: whatever they set): there the nodes skip nothing (nodes.model_patches.skip_layers_patched) and
    #: :meth:`dit_blocks` names it. Empty: the family lists its blocks, or is refused as a UNet is.
    dit_blocks_unreached: str = ""
    #: Why a distilled-guidance value on the conditioning (FluxGuidance, CLIPTextEncodeFlux) does nothing here:
    #: the model has no guidance embedder (:meth:`conditioning_notes`). Empty: it reads the value, or says nothing.
    guidance_note: str = ""

    # -- detection ---------------------------------------------------------------------------

    def claims(self, shapes: Shapes) -> bool:
        """A flow family is told by its transformer's keys alone, whether the file holds the transformer
        only (UNETLoader's) or the text encoders and VAE beside it (FLUX's and SD3's all-in-one files)."""
        return self.claims_unet(shapes)

    def claims_folder(self, components: set[str], text_act: str) -> bool:
        """False: most flow families' diffusers folders are told by the class their transformer config
        names (their loaders' ``is_*_folder``), not by the component folders, which several share (a
        FLUX.2 folder has Chroma's). FLUX, Chroma and SD3 override this with their component rules."""
        return False

    # -- model sampling ------------------------------------------------------------------------

    def scheduler_config(self, prediction_type: str | None = None) -> dict[str, Any]:
        """A copy of :attr:`scheduler` (callers may change their copy)."""
        if not self.scheduler:
            raise NotImplementedError(f"{type(self).__name__} sets no scheduler config")
        return dict(self.scheduler)

    def model_sampling(self, scheduler_config: dict[str, Any]) -> Any:
        """Flow-matching sampling for the custom-sampling nodes (KSampler's grid and stepper)."""
        from nodes.samplers.model_sampling import FlowSampling

        return FlowSampling(scheduler_config)

    def conditioning_notes(self, conditionings: list) -> list[str]:
        """The sampling node's note when the conditioning carries a distilled-guidance value the family
        ignores (:attr:`guidance_note`, worded by :func:`guidance_ignored`)."""
        return guidance_ignored(conditionings, self.guidance_note) if self.guidance_note else []

    # -- the network -----------------------------------------------------------------------------

    def wrap_network(self, network: Any) -> Any:
        """``network`` inside :attr:`network_class` (the UNet calling convention, Family.wrap_network)."""
        if self.network_class is None:
            raise NotImplementedError(f"{type(self).__name__} sets no network_class")
        return self.network_class(network)

    def dit_blocks(self, network: Any) -> dict[str, list]:
        """The transformer's blocks by kind, as :attr:`dit_block_lists` names them (through a wrapper's
        ``kiln_network``); a family that lists none refuses as Family.dit_blocks does. Where ComfyUI's
        model never applies the block replacements (:attr:`dit_blocks_unreached`) there is no list to
        skip from: the skip-layer nodes skip nothing there without asking, and this names why."""
        if self.dit_blocks_unreached:
            raise ConditioningError(f"{self.dit_blocks_unreached} has no blocks to skip: ComfyUI's model runs every "
                                    "block whatever SkipLayerGuidanceDiT and SkipLayerGuidanceDiTSimple set, so "
                                    "they skip nothing there", "model")
        if not self.dit_block_lists:
            return super().dit_blocks(network)
        transformer = getattr(network, "kiln_network", network)
        return {kind: list(getattr(transformer, attr)) if attr else [] for kind, attr in self.dit_block_lists.items()}


def indices(shapes: Shapes, pattern: str) -> list[int]:
    """Sorted integers captured by ``pattern``'s first group over the keys (layer numbers)."""
    import re

    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in shapes for m in [rx.match(k)] if m})


def guidance_ignored(conditionings: list, why: str) -> list[str]:
    """The sampling node's note when conditioning carries a distilled-guidance value (FluxGuidance,
    CLIPTextEncodeFlux) for a model without a guidance embedder; ``why`` names the model and reason."""
    values = sorted({float(extra["guidance"]) for cond in conditionings if isinstance(cond, list)
                     for entry in cond if isinstance(entry, (list, tuple)) and len(entry) == 2
                     for extra in [entry[1]] if isinstance(extra, dict) and extra.get("guidance") is not None})
    if not values:
        return []
    shown = ", ".join(f"{v:g}" for v in values)
    return [f"guidance {shown} is ignored: {why}"]


def has_prefix(shapes: Shapes, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in shapes)


StdOf = Callable[[str], "float | None"]
