"""Ideogram 4 (Ideogram's DiT with asymmetric guidance): flow matching on FLUX.2's 128-channel latents,
conditioned on 13 Qwen3-VL 8B hidden layers, with a second, text-free "unconditional" transformer.

What it shares and what differs, and where it lives:

* **Network.** diffusers' ``Ideogram4Transformer2DModel`` reads one packed sequence: the text tokens
  then the image's (each latent cell a token, its 128 channels in (row, column, channel) patch order:
  :func:`to_tokens`), told apart by per-token indicators, with 3-axis rotary ids (text at (i, i, i),
  image cells at (0, row, column) + 65536) and time ``1 - sigma``. It predicts the velocity towards
  the data; Kiln's flow convention is the opposite sign, so :class:`Ideogram4Network` negates it.
* **The unconditional side.** Ideogram4Pipeline runs the unconditional transformer on the image
  tokens alone (no text, zero text features). ComfyUI's templates hand it a ConditioningZeroOut of the
  prompt; Kiln reads an all-zero conditioning as that image-only pass (:class:`Ideogram4Network`), so
  the template's graph and the pipeline compute the same thing. Either transformer file may run either
  side; DualModelGuider (nodes.families.dual_model) puts the second one on the negative.
* **Text.** As Ideogram4Pipeline encodes: the prompt in Qwen3-VL's chat template (a user turn and the
  assistant's opening, no system turn), the outputs of decoder layers 0, 3, ..., 33, 35
  (:data:`TEXT_LAYERS`; the last before the final norm) interleaved per token, width-major (the
  pipeline's stack/permute: feature ``w * 13 + k`` is layer k's channel w). Kiln tokenizes without
  the pipeline's left padding, which gives the same states for every real token.
* **Guidance.** ``cond_scale * cond + (1 - cond_scale) * uncond``, plain CFG, the pipeline's per-step
  ``guidance_schedule`` being CFGOverride's cfg over a sigma window (nodes.families.dual_model).
* **Model sampling.** Plain flow matching (shift 1): the schedule is Ideogram4Scheduler's logit-normal
  sigmas (nodes.dual_model_nodes.ideogram4_sigmas).
* **Latents.** FLUX.2's (:data:`nodes.families.flux2.FLUX2_LATENT`, its VAE flux2-vae). The pipeline
  denormalises its packed tokens with the VAE's batch-norm statistics indexed in token order; Kiln's
  (and ComfyUI's) FLUX.2 VAE reads them in the latent's channel order, so the same picture comes from a
  pipeline VAE whose statistics are the FLUX.2 file's permuted to token order (tests/tiny_ideogram4.py).
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux2, qwen_image
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width
from nodes.runtime import precision

LABEL = "Ideogram 4"
#: Decoder layers whose outputs Ideogram4Pipeline reads (its QWEN3_VL_ACTIVATION_LAYERS).
TEXT_LAYERS = (0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 35)
#: Qwen3-VL's chat template for one user text turn with the generation prompt (the pipeline's).
TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
MASK = qwen_image.MASK
PATCH = 2
IMAGE_OFFSET = 65536
TEXT_ROLE, IMAGE_ROLE = 3, 2
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": False, "prediction_type": "flow"}


def to_tokens(x: "Any") -> "Any":
    """[B, 128, h, w] (FLUX.2's channel order: channel, row, column of each 2x2 patch) -> [B, h*w, 128]
    in the transformer's order (row, column, channel)."""
    b, c, h, w = x.shape
    return x.reshape(b, c // (PATCH * PATCH), PATCH, PATCH, h, w).permute(0, 4, 5, 2, 3, 1).reshape(b, h * w, c)


def from_tokens(tokens: "Any", h: int, w: int) -> "Any":
    b, _, c = tokens.shape
    return tokens.reshape(b, h, w, PATCH, PATCH, c // (PATCH * PATCH)).permute(0, 5, 3, 4, 1, 2).reshape(b, c, h, w)


def image_ids(h: int, w: int) -> "Any":
    """Rotary ids [h*w, 3] of the image cells: (0, row, column) + the pipeline's offset."""
    import torch

    rows = torch.arange(h).view(-1, 1).expand(h, w).reshape(-1)
    cols = torch.arange(w).view(1, -1).expand(h, w).reshape(-1)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1) + IMAGE_OFFSET


class Ideogram4Network(WrappedTransformer):
    """The transformer behind the UNet calling convention (module docstring): a batch entry whose
    conditioning is all zeros runs image-only, as the pipeline's unconditional pass."""

    @property
    def text_width(self) -> int:
        return int(self.transformer.config.llm_features_dim)

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 **kwargs: Any) -> tuple:
        import torch

        b, _, h, w = x.shape  # each latent cell is one token (the 128 channels already are 2x2 patches)
        text = encoder_hidden_states
        check_text_width(LABEL, text.shape[-1], self.text_width,
                         "encode the prompt with Qwen3-VL 8B: CLIPLoader type ideogram4")
        sigma = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        time = (1.0 - sigma).to(self.dtype)
        tokens = to_tokens(x.to(self.device, torch.float32)).to(self.dtype)
        empty = (text.reshape(b, -1) == 0).all(dim=1).tolist()
        out = torch.empty_like(tokens)
        for blank in (True, False):
            rows = [i for i in range(b) if empty[i] == blank]
            if rows:
                pick = torch.tensor(rows, device=self.device)
                run = self._image_only if blank else self._with_text
                out[pick] = run(tokens[pick], time[pick], text[rows].to(self.device, self.dtype), h, w, kwargs)
        return (-from_tokens(out.float(), h, w),)

    def _image_only(self, tokens: "Any", time: "Any", text: "Any", h: int, w: int, kwargs: dict) -> "Any":
        import torch

        b, n, _ = tokens.shape
        dev = self.device
        return self.transformer(
            hidden_states=tokens, timestep=time,
            encoder_hidden_states=torch.zeros(b, n, self.text_width, device=dev, dtype=self.dtype),
            position_ids=image_ids(h, w).to(dev).expand(b, n, 3),
            segment_ids=torch.ones(b, n, dtype=torch.long, device=dev),
            indicator=torch.full((b, n), IMAGE_ROLE, dtype=torch.long, device=dev), return_dict=False, **kwargs)[0]

    def _with_text(self, tokens: "Any", time: "Any", text: "Any", h: int, w: int, kwargs: dict) -> "Any":
        import torch

        b, n, c = tokens.shape
        m = text.shape[1]
        dev = self.device
        words = torch.arange(m).view(-1, 1).expand(m, 3)
        ids = torch.cat([words, image_ids(h, w)]).to(dev).expand(b, m + n, 3)
        role = torch.cat([torch.full((m,), TEXT_ROLE), torch.full((n,), IMAGE_ROLE)]).to(dev).expand(b, m + n)
        out = self.transformer(
            hidden_states=torch.cat([torch.zeros(b, m, c, device=dev, dtype=self.dtype), tokens], dim=1),
            timestep=time, encoder_hidden_states=torch.cat(
                [text, torch.zeros(b, n, text.shape[-1], device=dev, dtype=self.dtype)], dim=1),
            position_ids=ids, segment_ids=torch.ones(b, m + n, dtype=torch.long, device=dev), indicator=role,
            return_dict=False, **kwargs)[0]
        return out[:, m:]


class Ideogram4(FlowFamily):
    name = "ideogram4"
    inference_dtypes = precision.NO_FP16
    latent = flux2.FLUX2_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen3-vl", ""),)
    clip_types = ("ideogram4",)
    guidance_note = "Ideogram 4 has no distilled guidance (DualModelGuider runs its unconditional model)"
    scheduler = SCHEDULER
    network_class = Ideogram4Network
    dit_blocks_unreached = "Ideogram 4 (ComfyUI's Ideogram4Transformer2DModel)"
    #: A Qwen3-VL file without its vision tower has a Qwen3's keys: under type ideogram4 it is read as Qwen3-VL.
    text_kind_aliases = {"qwen3": "qwen3-vl"}

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import ideogram4_keys

        return ideogram4_keys.is_original(shapes) or ideogram4_keys.is_diffusers(shapes)

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import ideogram4_keys

        return ideogram4_keys.original_names([name for name, _ in network.named_parameters()])

    def lora_modules(self, network: Any) -> dict[str, Any]:
        from nodes.checkpoint import ideogram4_keys

        return ideogram4_keys.lora_modules({name: tuple(p.shape) for name, p in network.named_parameters()})

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, tokens, 13 x width] (module docstring). ComfyUI's weight syntax is not read;
        a prompt that starts with ``<|im_start|>`` is its own template."""
        import torch

        from nodes.families.qwen_image21 import states_unnormed

        text = (texts or {}).get("tokenizer", text)
        templated = text if text.startswith("<|im_start|>") else TEMPLATE.format(text)
        ids = clip.tokenizers["tokenizer"]([templated], return_tensors="pt").input_ids
        with torch.inference_mode(), clip.encoder("text_encoder") as qwen:
            model = getattr(qwen, "language_model", qwen)
            layers = int(model.config.num_hidden_layers)
            if layers <= max(TEXT_LAYERS):
                raise ConditioningError(f"{LABEL} reads Qwen3-VL's layers {TEXT_LAYERS} but this text encoder has "
                                        f"{layers} (load qwen3vl_8b*.safetensors with CLIPLoader type ideogram4)",
                                        "clip")
            device = next(qwen.parameters()).device
            hidden = states_unnormed(model, ids.to(device), LABEL)
            states = torch.stack([hidden[k + 1] for k in TEXT_LAYERS], dim=-1).reshape(1, ids.shape[1], -1)
        if report is not None:
            report.tokens = max(report.tokens, int(states.shape[1]))
            report.windows = 1
        return [[states.to("cpu", torch.float32), {MASK: torch.ones(1, states.shape[1])}]]


FAMILY = Ideogram4()
