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
  optional keys}. The MODEL's ``latent_scale`` is applied inside sampling.
  AddNoise adds {"noise": tensor like samples, "strength": float, "seed": int}.
* CONDITIONING: list of [embeds tensor [1, tokens, dim], {"pooled_output": tensor | None, ...}].
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator

if TYPE_CHECKING:  # node modules stay importable without torch, so `kiln serve` starts fast
    import torch


@dataclass(eq=False)
class ModelHandle:
    """MODEL: a denoiser (UNet) plus what sampling must know about it."""

    family: str  # "sd1" | "sd2" | "sdxl"
    #: diffusers scheduler config of the checkpoint (betas, prediction_type, ...).
    scheduler_config: dict[str, Any]
    #: VAE latent scaling factor (0.18215 for SD1/SD2, 0.13025 for SDXL).
    latent_scale: float
    latent_channels: int = 4
    #: Returns a context manager yielding the UNet on the compute device and dtype.
    _use_unet: Callable[[], contextlib.AbstractContextManager] | None = None
    name: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")

    @contextlib.contextmanager
    def unet(self) -> Iterator["torch.nn.Module"]:
        assert self._use_unet is not None, "model handle has no loader"
        with self._use_unet() as unet:
            yield unet

    def __kiln_nbytes__(self) -> int:
        return 0  # the model manager owns the weights


ConditioningValue = list  # [[embeds, {"pooled_output": ...}], ...]


@dataclass(eq=False)
class ClipHandle:
    """CLIP: the text encoder(s) and tokenizer(s) of a checkpoint.

    ``encode`` matches diffusers' pipelines token for token: 77 tokens padded to the
    maximum and truncated (as ``encode_prompt`` does; ComfyUI's >77-token chunking
    is not done). SD 1.x and SD 2.x give the encoder's last hidden state (the SD 2.x
    encoder is built without OpenCLIP's last block, i.e. its penultimate layer
    with the final norm, as diffusers' SD 2 configs do). SDXL concatenates both
    encoders' penultimate hidden states and pools with text_encoder_2's projection.
    """

    family: str
    tokenizers: dict[str, Any]
    #: encoder name ("text_encoder", "text_encoder_2") -> context manager yielding it on the device
    _use: Callable[[str], contextlib.AbstractContextManager] | None = None
    name: str = ""

    def tokenize(self, text: str, which: str = "tokenizer") -> tuple[list[int], bool]:
        """Token ids (77, padded) and whether the text had to be truncated."""
        tok = self.tokenizers[which]
        ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        return list(ids), len(tok.tokenize(text)) + 2 > tok.model_max_length  # + start and end tokens

    def encode(self, text: str) -> list:
        """CONDITIONING for ``text``: [[embeds [1, 77, dim] float32 CPU, {"pooled_output": ...}]]."""
        import torch

        assert self._use is not None, "clip handle has no loader"
        names = ["text_encoder", "text_encoder_2"] if self.family == "sdxl" else ["text_encoder"]
        states, pooled = [], None
        with torch.inference_mode():
            for enc, tok in zip(names, ["tokenizer", "tokenizer_2"]):
                ids, _ = self.tokenize(text, tok)
                with self._use(enc) as te:
                    out = te(torch.tensor([ids], device=te.device), output_hidden_states=self.family == "sdxl")
                if self.family == "sdxl":
                    states.append(out.hidden_states[-2])
                    if enc == "text_encoder_2":
                        pooled = out.text_embeds.to("cpu", torch.float32)
                else:
                    states.append(out.last_hidden_state)
        embeds = torch.cat([s.to("cpu", torch.float32) for s in states], dim=-1)
        return [[embeds, {"pooled_output": pooled}]]

    def __kiln_nbytes__(self) -> int:
        return 0


@dataclass(eq=False)
class VaeHandle:
    """VAE: IMAGE <-> unscaled latents (the MODEL's latent_scale is applied by sampling)."""

    latent_scale: float
    downscale: int = 8
    latent_channels: int = 4
    #: Returns a context manager yielding the AutoencoderKL on the compute device.
    _use_vae: Callable[[], contextlib.AbstractContextManager] | None = None
    name: str = ""

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

    def __kiln_nbytes__(self) -> int:
        return 0
