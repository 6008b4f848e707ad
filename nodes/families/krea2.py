"""Krea 2 (Krea's 12B single-stream DiT, Turbo and Raw): flow matching on Qwen-Image's 16-channel VAE
latents, conditioned on a stack of Qwen3-VL 4B hidden layers.

What it shares and what differs, and where it lives:

* **Network.** diffusers' ``Krea2Transformer2DModel`` reads FLUX's packed 2x2 patch tokens
  (:func:`nodes.families.flux.pack`), the flow time (0..1) and 3-axis rotary ids: text tokens at the
  origin, image patches at (0, row, column) (Krea2Pipeline's ``prepare_position_ids``). Its text
  fusion stage takes the tapped layers per token, [B, tokens, layers, width]; Kiln's CONDITIONING is
  3-D as ComfyUI's is, the layers flattened into the width (layer-major, ComfyUI's layout), and
  :class:`Krea2Network` unflattens them.
* **Text.** As Krea2Pipeline encodes: the Qwen-Image chat template, Qwen3-VL's hidden states after
  layers 2, 5, ..., 35 (``hidden_states`` indices, :data:`TEXT_LAYERS`) stacked per token, the
  template's first 34 tokens (up to and including ``<|im_start|>user\\n``) dropped. The pipeline pads
  a fixed-length block in the middle of the template and gives padding no position and no attention;
  Kiln (as ComfyUI) tokenizes without padding, which gives the pipeline's states for every real
  token. The prompt is cut where the pipeline cuts it (512 tokens after the prefix, suffix included).
  A positive and negative of other lengths are evaluated apart (text keys weigh in the image's
  attention, so a repeated prompt would be another prompt).
* **Guidance.** Real CFG (KSampler's ``cfg``; Krea2Pipeline's ``guidance_scale`` g is cfg = 1 + g).
  Turbo runs cfg 1 with a ConditioningZeroOut negative, which KSampler then never evaluates.
* **Model sampling.** ComfyUI's Krea 2 model sampling is FLUX's with ``mu`` fixed at 1.15 whatever the
  size (Krea2Pipeline's Turbo rule), so the config fixes it (:data:`SCHEDULER`: base and max shift
  both 1.15). ComfyUI's Raw template shifts by size with ModelSamplingFlux (max 1.15, base 0.5), which
  Kiln's node does the same way.
* **Latents.** Qwen-Image's (:data:`nodes.families.qwen_image.QWEN_LATENT`), its VAE the Qwen-Image one.
"""
from __future__ import annotations

from typing import Any, Callable

from nodes.families import flux, qwen_image
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_even_latent, check_text_width
from nodes.families.text import without_logits
from nodes.runtime import precision

UNET_PREFIX = flux.UNET_PREFIX
LABEL = "Krea 2"
#: Qwen3-VL ``hidden_states`` indices (0 is the embedding) stacked per token (Krea2Pipeline's default).
TEXT_LAYERS = (2, 5, 8, 11, 14, 17, 20, 23, 26, 29, 32, 35)
#: Krea2Pipeline's template, split where it pads, and what it drops from the front.
PREFIX = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
          "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n")
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n"
TEMPLATE_TOKENS = 34
#: Tokens the pipeline keeps after the prefix (its max_sequence_length), the 5 suffix tokens included.
MAX_TOKENS = 512
#: ``<|im_start|>user\n``: the cut ends after the last of these in the prompt (ComfyUI's rule for a raw template).
USER_TURN = (151644, 872, 198)
MASK = qwen_image.MASK
#: Turbo's shift (Krea2Pipeline's ``is_distilled``; ComfyUI's Krea 2 sampling settings).
TURBO_MU = 1.15
#: The scheduler: FlowMatchEuler with the exponential shift at a fixed mu of 1.15 (module docstring).
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
             "use_dynamic_shifting": True, "base_shift": TURBO_MU, "max_shift": TURBO_MU, "base_image_seq_len": 256,
             "max_image_seq_len": 6400, "time_shift_type": "exponential", "prediction_type": "flow"}


def position_ids(text: int, h: int, w: int, device: Any) -> "Any":
    """Rotary ids [text + (h/2)(w/2), 3]: text at the origin, then each patch's (0, row, column)."""
    import torch

    return torch.cat([torch.zeros(text, 3), flux.image_ids(h, w, "cpu", torch.float32)]).to(device)


class Krea2Network(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def text_layers(self) -> int:
        return int(self.transformer.config.num_text_layers)

    @property
    def text_width(self) -> int:
        """The flattened conditioning width it reads: tapped layers x the text encoder's width."""
        return self.text_layers * int(self.transformer.config.text_hidden_dim)

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 text_mask: "Any" = None, **kwargs: Any) -> tuple:
        """``text_mask``: [B, text tokens] of 0/1 where some prompt of the call is padded, else None."""
        import torch

        b, _, h, w = x.shape
        check_even_latent(LABEL, h, w)
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with Qwen3-VL 4B: CLIPLoader type krea2")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b) / 1000.0
        tokens = encoder_hidden_states.shape[1]
        text = encoder_hidden_states.reshape(b, tokens, self.text_layers, -1).to(self.dtype)
        mask = None if text_mask is None else text_mask.to(self.device).bool()
        out = self.transformer(hidden_states=flux.pack(x).to(self.dtype), encoder_hidden_states=text,
                               timestep=time.to(self.dtype), position_ids=position_ids(tokens, h, w, self.device),
                               encoder_attention_mask=mask, return_dict=False, **kwargs)[0]
        return (flux.unpack(out, h, w),)


class Krea2(FlowFamily):
    name = "krea2"
    inference_dtypes = precision.BF16_THEN_FP16
    latent = qwen_image.QWEN_LATENT
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen3-vl", ""),)
    clip_types = ("krea2",)
    guidance_note = "Krea 2 has no distilled guidance (Turbo runs cfg 1, Raw real CFG with a negative prompt)"
    scheduler = SCHEDULER
    network_class = Krea2Network
    dit_block_lists = {"single": "transformer_blocks"}
    #: Its Qwen3-VL is built with the vision tower (nodes.checkpoint.split; the tower's weights on the first
    #: picture read): the Qwen-Image Edit nodes and TextGenerate hand it pictures (nodes.families.qwen3_vl).
    #: Families without it get the text model alone.
    text_vision = True
    #: A Qwen3-VL file without its vision tower has a Qwen3's keys: under type krea2 it is read as Qwen3-VL.
    text_kind_aliases = {"qwen3": "qwen3-vl"}

    # -- detection: by the transformer's keys (FlowFamily.claims and claims_folder) ----------

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint import krea2_keys

        return krea2_keys.is_original(shapes) or krea2_keys.is_diffusers(shapes)

    # -- the network -----------------------------------------------------------------------------

    def original_names(self, network: Any) -> dict[str, str]:
        from nodes.checkpoint import krea2_keys

        return krea2_keys.original_names([name for name, _ in network.named_parameters()])

    def lora_modules(self, network: Any) -> dict[str, Any]:
        """The original layout's module names (Krea's and ComfyUI's LoRAs), one to one."""
        from nodes.checkpoint import krea2_keys

        return krea2_keys.lora_modules([name for name, _ in network.named_parameters()])

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        mask = qwen_image.text_mask(extras, batch, device)
        return {} if mask is None else {"text_mask": mask}

    # -- text ------------------------------------------------------------------------------------

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING [1, tokens, 12 x width]: Qwen3-VL's tapped layers of the templated prompt,
        the template's prefix dropped (module docstring). ComfyUI's weight syntax is not read (its
        Krea 2 tokenizer disables weights); a prompt that starts with ``<|im_start|>`` is its own template."""
        text = (texts or {}).get("tokenizer", text)
        ids = prompt_ids(clip.tokenizers["tokenizer"], text)
        return conditioning(clip, lambda qwen: {"input_ids": ids}, report)


def encode_pictures(clip: Any, prompt: str, pictures: list, plus: bool) -> list:
    """CONDITIONING of ``prompt`` with PIL ``pictures`` (already sized) read by Qwen3-VL's vision tower, as
    ComfyUI's Krea 2 text encoder takes them from the Qwen-Image Edit nodes: TextEncodeQwenImageEditPlus
    (``plus``) hands it the Edit template with ``Picture k: <block>`` before the prompt (thinking off adds
    nothing: Krea 2 encodes without a think block); TextEncodeQwenImageEdit hands it the pictures alone,
    which go as blocks before the prompt in Krea 2's own template. Either way the states of everything
    after the user turn's opening are kept, picture tokens included (:func:`template_end`)."""
    from nodes.families import qwen3_vl
    from nodes.families.qwen_image_edit import EDIT_TEMPLATE

    if plus:
        text = EDIT_TEMPLATE.format("".join(f"Picture {k + 1}: {qwen3_vl.BLOCK}" for k in range(len(pictures)))
                                    + prompt)
    else:
        text = PREFIX + qwen3_vl.BLOCK * len(pictures) + prompt + SUFFIX
    tok = clip.tokenizers["tokenizer"]
    if not pictures:
        return conditioning(clip, lambda qwen: {"input_ids": tok([text], return_tensors="pt").input_ids})
    return conditioning(clip, lambda qwen: qwen3_vl.prompt_inputs(qwen, tok, text, pictures),
                        parts=(qwen3_vl.TOWER,))


def conditioning(clip: Any, inputs: Callable[[Any], dict[str, Any]], report: Any = None,
                 parts: tuple[str, ...] = ()) -> list:
    """Krea 2's CONDITIONING from the encoder's inputs (``inputs(encoder) -> kwargs``): ``input_ids`` [1, n]
    alone (the language model runs as the text-only path always ran it), or with pictures'
    ``pixel_values``, ``image_grid_thw`` and ``mm_token_type_ids`` (nodes.families.qwen3_vl.prompt_inputs:
    the whole Qwen3-VL runs, tower included: ``parts`` names it, so the first such use loads it).
    The tapped layers are ``hidden_states`` as transformers records them (each layer's output, before the
    DeepStack features are added at the picture tokens; ComfyUI taps after adding them, which differs at
    taps up to the number of DeepStack mergers: tap 2 of Qwen3-VL 4B)."""
    import torch

    with torch.inference_mode(), clip.encoder("text_encoder", parts) as qwen:
        text_model = getattr(qwen, "language_model", qwen)
        layers = int(text_model.config.num_hidden_layers)
        if layers < max(TEXT_LAYERS):
            raise ConditioningError(f"Krea 2 reads Qwen3-VL's layers {TEXT_LAYERS} but this text encoder has "
                                    f"{layers} (load qwen3vl_4b*.safetensors with CLIPLoader type krea2)", "clip")
        device = next(qwen.parameters()).device
        given = inputs(qwen)
        ids = given["input_ids"]
        model = qwen if "pixel_values" in given else text_model
        out = model(**{k: v.to(device) for k, v in given.items()}, output_hidden_states=True, use_cache=False,
                    **without_logits(model))
        states = torch.stack([out.hidden_states[k] for k in TEXT_LAYERS], dim=2)
    states = states[:, template_end(ids[0].tolist()):]
    states = states.reshape(1, states.shape[1], -1)
    if report is not None:
        report.tokens = max(report.tokens, int(states.shape[1]))
        report.windows = 1
    return [[states.to("cpu", torch.float32), {MASK: torch.ones(1, states.shape[1])}]]


def prompt_ids(tok: Any, text: str) -> "Any":
    """Token ids [1, n] of the templated prompt, cut as Krea2Pipeline cuts it: the prefix and prompt
    to ``TEMPLATE_TOKENS + MAX_TOKENS - 5`` tokens, then the five suffix tokens."""
    import torch

    if text.startswith("<|im_start|>"):
        return tok([text], return_tensors="pt").input_ids
    head = tok([PREFIX + text], truncation=True, max_length=TEMPLATE_TOKENS + MAX_TOKENS - 5,
               return_tensors="pt").input_ids
    return torch.cat([head, tok([SUFFIX], return_tensors="pt").input_ids], dim=1)


def template_end(ids: list[int]) -> int:
    """Where the prompt's tokens start: after the last ``<|im_start|>user\\n`` (34 for the template)."""
    ends = [i + 3 for i in range(len(ids) - 2) if tuple(ids[i:i + 3]) == USER_TURN]
    if not ends:
        raise ConditioningError("a prompt that brings its own chat template must have a user turn "
                                "('<|im_start|>user\\n'): Krea 2 conditions on what follows it", "text")
    return ends[-1]


FAMILY = Krea2()
