"""The values that travel on MODEL, CLIP, VAE, CONDITIONING and LATENT sockets.

Loaders produce these; the sampling and latent nodes consume them. They are light
handles: the weights belong to the model manager (nodes.runtime.models), which places
them on a device when a node uses them and may offload them in between. Cache
entries therefore hold handles, never a second copy of a model.

Conventions (ComfyUI's, so LATENT and CONDITIONING values look the same to
custom-node authors):

* IMAGE: float32 tensor [B, H, W, C] in 0..1, on the CPU.
* MASK: float32 tensor [B, H, W] in 0..1.
* LATENT: dict {"samples": tensor [B, C, h, w] *unscaled* (raw VAE space), plus
  optional keys}. The MODEL's latent format (scale, shift) is applied inside sampling.
  AddNoise adds {"noise": tensor like samples, "strength": float, "seed": int}.
* CONDITIONING: list of [embeds tensor [1, tokens, dim], {"pooled_output": tensor | None, ...}].
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

from nodes.families.base import Family, LatentFormat

if TYPE_CHECKING:  # node modules stay importable without torch, so `kiln serve` starts fast
    import torch

    from nodes.runtime.patches import LoraStack


@dataclass(frozen=True)
class SamplingPatches:
    """What ComfyUI's model-patch nodes change in how a MODEL samples, each node returning a
    handle with one field set (the handle it was given, and every cached result built on it,
    sample as before). The sampling loop hands them on: the denoiser applies the guidance
    ones, the noise-mask hold differential diffusion, the UNet hooks FreeU and Deep Shrink."""

    #: RescaleCFG's multiplier (0: plain classifier-free guidance), see nodes.families.denoiser.
    cfg_rescale: float = 0.0
    #: PerturbedAttentionGuidance's scale (0: none), see nodes.families.perturbed.
    pag_scale: float = 0.0
    #: DifferentialDiffusion's strength (None: a soft noise mask blends as it is), see nodes.samplers.hold.
    differential_diffusion: float | None = None
    #: FreeU's settings (None: off), see nodes.families.freeu.
    freeu: "FreeUSettings | None" = None
    #: ComfyUI's CFG-changing patches (CFGZeroStar, APG, CFGNorm, TCFG, Mahiro, RenormCFG, Epsilon
    #: Scaling, FreSca, LatentApplyOperationCFG) in the
    #: order they were applied, see nodes.families.guidance_rules.
    guidance: tuple = ()
    #: SelfAttentionGuidance's scale and blur (None: off), see nodes.families.self_attention.
    self_attention: Any = None
    #: SkipLayerGuidanceDiT(Simple)/SD3's blocks, window and scale (None: off), see nodes.families.skip_layers.
    skip_layers: Any = None
    #: PatchModelAddDownscale's (Kohya's Deep Shrink) settings (None: off), see nodes.families.deep_shrink.
    deep_shrink: "DeepShrinkSettings | None" = None
    #: The deprecated PerpNeg node's empty prompt and neg_scale (nodes.families.perp_neg.PerpNeg),
    #: which replaces the CFG combination as PerpNegGuider does; None: off.
    perp_neg: Any = None
    #: EasyCache's or LazyCache's settings (nodes.families.step_cache.StepCacheSettings); None: off.
    step_cache: Any = None
    #: HyperTile's settings (nodes.families.hypertile.HyperTileSettings); None: off.
    hypertile: Any = None
    #: TomePatchModel's ratio (nodes.families.tome.TomeSettings); None: off.
    tome: Any = None
    #: ControlNets applied to the model itself (QwenImageDiffsynthControlnet: nodes.control.apply.ControlLink,
    #: a chain), which the denoiser stacks on every conditioning's own; None: none.
    model_control: Any = None
    #: DiffSynth's blockwise ControlNets on the model (QwenImageDiffsynthControlnet on Qwen-Image: a ControlLink
    #: chain), hooked after the transformer's blocks while sampling runs (nodes.control.blockwise); None: none.
    blockwise: Any = None
    #: FluxKVCache: FLUX.2 reference images' keys and values computed once per run
    #: (nodes.families.reference_kv); False: every call runs them.
    reference_kv: bool = False
    #: ScaleROPE's six (name, number) pairs (nodes.checkpoint.wan_rope: scale and shift per axis), set on
    #: the network's rotary table while sampling runs; None: plain positions.
    rope: Any = None
    #: CFGOverride's windows (nodes.families.dual_model.CFGWindow), in the order they were applied.
    cfg_overrides: tuple = ()
    #: HypernetworkLoader's (nodes.hypernetwork.Hypernetwork, strength) pairs, in the order they were loaded,
    #: on the UNet's attention inputs while sampling runs.
    hypernetworks: tuple = ()
    #: USOStyleReference's pictures (nodes.uso.StyleReference), in the order they were applied: their style
    #: tokens go in front of the embedded prompt while sampling runs.
    style_references: tuple = ()
    #: AnimaLLLiteApply's controls (nodes.control.anima_lllite.LLLiteControl), in the order they were applied: their
    #: corrections go on the DiT's linear inputs while sampling runs.
    lllite: tuple = ()


@dataclass(frozen=True)
class FreeUSettings:
    """FreeU (``v1``) or FreeU_V2 (``v2``): backbone factors b1, b2 and skip factors s1, s2 for
    the decoder levels with 4x and 2x the base channel count."""

    version: str
    b1: float
    b2: float
    s1: float
    s2: float


@dataclass(frozen=True)
class DeepShrinkSettings:
    """Deep Shrink: encoder block ``block_number``'s output resized by 1 / ``downscale_factor``
    (before its skip is taken, or after it with ``after_skip``) while the noise level lies in
    [``sigma_end``, ``sigma_start``]; the decoder resizes back with ``upscale_method``."""

    block_number: int
    downscale_factor: float
    sigma_start: float
    sigma_end: float
    after_skip: bool
    downscale_method: str
    upscale_method: str


@dataclass(eq=False)
class ModelHandle:
    """MODEL: a denoiser network plus what sampling must know about it.

    ``loras`` is the LoRA stack of this handle: LoraLoader returns a new handle
    with one more entry, so the base handle (and every cache entry holding it)
    keeps sampling without it. The weights are patched only inside :meth:`unet`.
    """

    family: Family
    #: diffusers scheduler config of the checkpoint (betas, prediction_type, ...).
    scheduler_config: dict[str, Any]
    latent: LatentFormat
    #: Returns a context manager yielding the network on the compute device and dtype.
    _use_unet: Callable[[], contextlib.AbstractContextManager] | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    loras: "LoraStack" = ()
    #: Returns the network wherever it is, to read its names and shapes (LoRA matching).
    _peek: Callable[[], Any] | None = None
    #: Returns a note when the next use compiles the network (compiled mode), else None.
    _compile_note: Callable[[], str | None] | None = None
    #: How it is sampled beyond its weights (ComfyUI's model-patch nodes, nodes/model_patches.py).
    patches: SamplingPatches = field(default_factory=SamplingPatches)

    def compile_note(self) -> str | None:
        return self._compile_note() if self._compile_note is not None else None

    def peek(self) -> "torch.nn.Module":
        if self._peek is not None:
            return self._peek()
        with self.unet() as unet:  # handles built without a peek (tests) place it once
            return unet

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @property
    def latent_channels(self) -> int:
        return self.latent.channels

    @contextlib.contextmanager
    def unet(self) -> Iterator["torch.nn.Module"]:
        """The network on the compute device with this handle's LoRAs applied; they are
        removed exactly (the saved weights copied back) when the block ends."""
        from nodes.runtime.patches import patched

        assert self._use_unet is not None, "model handle has no loader"
        with self._use_unet() as unet, patched(unet, self.loras, "unet"):
            yield unet

    @contextlib.contextmanager
    def unet_beside(self, held: Any) -> Iterator[tuple["torch.nn.Module", bool]]:
        """(network, shared): :meth:`unet` while another handle holds ``held`` with its own LoRAs. Where
        the two are one module (two handles of one loaded model), it is yielded as it is, ``shared``
        True, and this handle's LoRAs are not applied on top of the other's (twice, or stacked): the
        caller decides whether the two handles agree."""
        from nodes.runtime.patches import patched

        assert self._use_unet is not None, "model handle has no loader"
        with self._use_unet() as unet:
            if unet is held:
                yield unet, True
                return
            with patched(unet, self.loras, "unet"):
                yield unet, False

    def __kiln_nbytes__(self) -> int:
        return 0  # the model manager owns the weights


ConditioningValue = list  # [[embeds, {"pooled_output": ...}], ...]


@dataclass(eq=False)
class ClipHandle:
    """CLIP: the text encoder(s) and tokenizer(s) of a family; encoding is in nodes.families.text.

    ``layer`` is CLIPSetLastLayer's value (None: the family's default layer);
    ``loras`` the text-encoder side of the LoRA stack; ``t5_padding`` T5TokenizerOptions'
    (min_padding, min_length), None: the family's own T5 length (see nodes.families.flux).
    """

    family: Family
    tokenizers: dict[str, Any]
    #: ``(encoder name, parts=())`` -> context manager yielding that encoder on the device (``parts``: see
    #: :meth:`encoder`; loaders that defer none may take the name alone)
    _use: Callable[..., contextlib.AbstractContextManager] | None = None
    name: str = ""
    layer: int | None = None
    loras: "LoraStack" = ()
    #: module name -> that encoder wherever it is, to read its names and shapes.
    _peek: Callable[[str], Any] | None = None
    t5_padding: tuple[int, int] | None = None
    #: module name -> context manager yielding the file's own output head (``lm_head``) on the device,
    #: or None where the file has none (TextGenerate then uses the tied token embedding: nodes.text_lm).
    _use_head: Callable[[str], contextlib.AbstractContextManager] | None = None

    def peek(self, module: str) -> "torch.nn.Module":
        assert self._peek is not None, "clip handle has no loader"
        return self._peek(module)

    @contextlib.contextmanager
    def lm_head(self, module: str) -> Iterator["torch.nn.Module | None"]:
        """The causal-LM output head stored beside encoder ``module`` in its file, on the device while
        in use; None when the file holds none (or the CLIP came from a loader that does not look)."""
        if self._use_head is None:
            yield None
            return
        with self._use_head(module) as head:
            yield head

    def peek_whole(self, module: str) -> "torch.nn.Module":
        """:meth:`peek` with every part the loader left to build on first use built (nodes.runtime.deferred:
        a Qwen-VL's vision tower), for what must see all of the encoder's weights: a merge, a LoRA that patches
        such a part. Built through the model manager, which counts it (:meth:`encoder`'s ``parts``)."""
        from nodes.runtime.deferred import pending

        parts = pending(self.peek(module))
        if parts:
            assert self._use is not None, "clip handle has no loader"
            with self._use(module, parts):
                pass
        return self.peek(module)

    def patched_parts(self, module: str) -> tuple[str, ...]:
        """The parts of encoder ``module`` still waiting to be built (nodes.runtime.deferred) that this
        handle's LoRAs or merges patch. The LoRA or merge built them when it was made, but the model manager
        may have dropped and reloaded the encoder since, the part waiting again: :meth:`encoder` builds
        these first, so the patches always find their weights (and LoraSave reads their difference)."""
        if not self.loras or self._peek is None:  # a handle over an in-memory encoder (tests) defers nothing
            return ()
        from nodes.runtime.deferred import pending

        waiting = pending(self.peek(module))
        names = [name for entry in self.loras for name in entry.tables.get(module, ())] if waiting else []
        return tuple(part for part in waiting if any(name.startswith(f"{part}.") for name in names))

    def whole_encoder(self, module: str) -> contextlib.AbstractContextManager:
        """:meth:`encoder` with every part it leaves to build on first use built (a Qwen-VL's vision tower),
        for what reads the whole model: a saved file holds all of it, as the file it was loaded from did."""
        from nodes.runtime.deferred import pending

        return self.encoder(module, pending(self.peek(module)))

    @contextlib.contextmanager
    def encoder(self, module: str, parts: tuple[str, ...] = ()) -> Iterator["torch.nn.Module"]:
        """Text encoder ``module`` on the device, with this handle's LoRAs applied while in use. ``parts``:
        its submodules loaded only when a job needs them (a Qwen-VL's vision tower, ``"visual"``: the
        picture-reading nodes name it), built and placed with it now if not yet (nodes.runtime.deferred);
        the parts this handle's LoRAs patch are built too (:meth:`patched_parts`)."""
        from nodes.runtime.patches import patched

        assert self._use is not None, "clip handle has no loader"
        parts = tuple(dict.fromkeys((*parts, *self.patched_parts(module))))
        with (self._use(module, parts) if parts else self._use(module)) as te, patched(te, self.loras, module):
            yield te

    def encode(self, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING for ``text`` with ComfyUI's prompt syntax (see nodes.families.text.encode;
        ``report``, a nodes.families.text.Report, collects token counts and notes; ``texts``
        gives encoders their own prompts by tokenizer name)."""
        return self.family.encode_text(self, text, report, texts)

    def __kiln_nbytes__(self) -> int:
        return 0


@dataclass(eq=False)
class VaeHandle:
    """VAE: IMAGE <-> unscaled latents (the MODEL's latent format is applied by sampling)."""

    latent_scale: float
    downscale: int = 8
    latent_channels: int = 4
    #: Returns a context manager yielding the AutoencoderKL on the compute device.
    _use_vae: Callable[[], contextlib.AbstractContextManager] | None = None
    name: str = ""
    #: Returns a note when the next use compiles the decoder (compiled mode), else None.
    _compile_note: Callable[[], str | None] | None = None

    def compile_note(self) -> str | None:
        return self._compile_note() if self._compile_note is not None else None

    @contextlib.contextmanager
    def module(self) -> Iterator["torch.nn.Module"]:
        """The AutoencoderKL on the compute device (to read its weights, e.g. CheckpointSave)."""
        assert self._use_vae is not None, "vae handle has no loader"
        with self._use_vae() as vae:
            yield vae

    def _pixels_in(self, pixels: "torch.Tensor", vae: Any) -> "torch.Tensor":
        x = pixels[..., :3].permute(0, 3, 1, 2) * 2.0 - 1.0
        return x.to(device=vae.device, dtype=vae.dtype)

    def encode_dist(self, pixels: "torch.Tensor") -> tuple["torch.Tensor", "torch.Tensor"]:
        """Posterior (mean, std) of ``pixels`` [B,H,W,C] 0..1, float32 on the CPU."""
        import torch

        assert self._use_vae is not None, "vae handle has no loader"
        with torch.inference_mode(), self._use_vae() as vae:
            dist = vae.encode(self._pixels_in(pixels, vae)).latent_dist
            return dist.mean.to("cpu", torch.float32), dist.std.to("cpu", torch.float32)

    def encode(self, pixels: "torch.Tensor") -> "torch.Tensor":
        """The posterior mean [B, C, H/8, W/8] (deterministic), unscaled, float32 CPU."""
        return self.encode_dist(pixels)[0]

    def decode(self, samples: "torch.Tensor") -> "torch.Tensor":
        """IMAGE [B,H,W,3] float32 CPU in 0..1 from unscaled latents."""
        import torch

        assert self._use_vae is not None, "vae handle has no loader"
        with torch.inference_mode(), self._use_vae() as vae:
            image = vae.decode(samples.to(device=vae.device, dtype=vae.dtype)).sample
            image = (image / 2 + 0.5).clamp(0, 1)  # in the VAE's dtype, as diffusers' postprocess does
        return image.to("cpu", torch.float32).permute(0, 2, 3, 1).contiguous()

    def encode_video(self, frames: "torch.Tensor") -> "torch.Tensor":
        """IMAGE frames [T, H, W, C] 0..1 as one video -> the posterior mean [1, C, latent frames, h, w]
        (a video VAE's: Wan 2.1's; nodes.checkpoint.qwen_image_vae.FrameVAE), float32 CPU."""
        import torch

        assert self._use_vae is not None, "vae handle has no loader"
        with torch.inference_mode(), self._use_vae() as vae:
            if not getattr(vae, "video", False):
                raise ValueError("this VAE codes images only; a video needs Wan 2.1's VAE (wan_2.1_vae)")
            x = self._pixels_in(frames, vae).permute(1, 0, 2, 3).unsqueeze(0)
            return vae.encode_video(x).to("cpu", torch.float32)

    def decode_video(self, samples: "torch.Tensor") -> "torch.Tensor":
        """IMAGE [B * frames, H, W, 3] 0..1 from video latents [B, C, latent frames, h, w] (each video's
        frames in order, as ComfyUI's VAEDecode gives them)."""
        import torch

        assert self._use_vae is not None, "vae handle has no loader"
        with torch.inference_mode(), self._use_vae() as vae:
            if not getattr(vae, "video", False):
                raise ValueError("this VAE decodes images only; a video latent needs Wan 2.1's VAE (wan_2.1_vae)")
            video = vae.decode_video(samples.to(device=vae.device, dtype=vae.dtype))
            video = (video / 2 + 0.5).clamp(0, 1)
        return video.to("cpu", torch.float32).permute(0, 2, 3, 4, 1).flatten(0, 1).contiguous()

    def __kiln_nbytes__(self) -> int:
        return 0
