"""HiDream-I1 (HiDream.ai's 17B text-to-image model): a sparse mixture-of-experts flow DiT on FLUX.1's
latents, conditioned on four text encoders.

* **Text.** As HiDreamImagePipeline's ``encode_prompt``, at its default ``max_sequence_length`` of 128
  (:data:`TOKENS`): CLIP-L's and CLIP-G's projected pooled outputs side by side (the pooled vector; the
  CLIPs read the prompt padded to 128 tokens, HiDream's CLIPs have 248 positions), T5-XXL's last states
  of the prompt padded to 128 tokens with its mask, and every layer's states of Llama 3.1 8B Instruct
  over the prompt after ``<|begin_of_text|>``, padded with ``<|eot_id|>`` to 128 tokens with its mask.
  CONDITIONING: [[T5 states [1, 128, 4096], {"pooled_output": [1, 2048], "conditioning_llama3":
  [1, layers, 128, 4096]}]] (the extra's key is ComfyUI's; Kiln keeps the batch first, the transformer
  gets the layers first). ComfyUI's weight syntax is not read: the text goes to the tokenizers as written.
* **Network.** diffusers' ``HiDreamImageTransformer2DModel`` (ComfyUI's files use its names:
  nodes.checkpoint.hidream_load) reads the latent as it is (it patches it itself), the time on the
  0..1000 scale, T5's states, the Llama layers (layers first), the pooled vector; it predicts the
  negative velocity (the pipeline negates it; so does :class:`HiDreamNetwork`).
* **Guidance.** Real CFG (Full: KSampler's cfg with a negative); Dev and Fast are distilled to cfg 1.
* **Editing (HiDream-E1-Full, E1.1).** The same transformer, files and family: a conditioning carrying
  InstructPixToPixConditioning's ``concat_latent_image`` sets the source picture's latent beside the one
  being made and the output is cropped back (nodes.families.hidream_edit, ComfyUI's rule).
* **Latents.** FLUX.1's 16-channel VAE (``ae.safetensors``) and latent format.
* **Model sampling.** Flow matching with a fixed shift (ComfyUI's default 3; the templates set it with
  ModelSamplingSD3: 3 for Full and Fast, 6 for Dev).
* **LoRAs.** Files, ComfyUI's model and diffusers' class share one set of names, so diffusers'
  ``transformer.``, ComfyUI's ``diffusion_model.``, kohya's ``lora_unet_`` and SimpleTuner's ``lycoris_``
  files address Kiln's module by its own names (nodes.lora_keys; no family table). The mixture of experts:
  every routed expert and the shared experts are plain linears, patched as any layer; the router
  (``ff_i.gate.weight``, a bare parameter) is patched as a weight where a file carries it, as ComfyUI does.
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux, hidream_edit
from nodes.families.base import ConditioningError, FlowFamily, Shapes, TextEncoderSpec, WrappedTransformer
from nodes.families.input_checks import check_text_width, pad_to_patches
from nodes.runtime import precision

LABEL = "HiDream-I1"
#: HiDreamImagePipeline's default max_sequence_length: every encoder's token count.
TOKENS = 128
LLAMA = "conditioning_llama3"
SHIFT = 3.0
SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": SHIFT,
             "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
             "max_image_seq_len": 4096, "prediction_type": "flow"}
MODULES = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")


def _pooled(clip: Any, spec: TextEncoderSpec, prompt: str) -> Any:
    """A CLIP's projected pooled output [1, width] of ``prompt`` padded to :data:`TOKENS` tokens, or to the
    CLIP's positions where it has fewer (a 77-position CLIP-L in place of HiDream's long one: the pooled
    output, read at the end token under a causal mask, is the same for a prompt that fits)."""
    from nodes.families.text import hidden_state

    tok = clip.tokenizers[spec.tokenizer]
    with clip.encoder(spec.module) as te:
        length = min(TOKENS, int(te.config.max_position_embeddings))
        ids = tok([prompt], padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        _, pooled = hidden_state(te, ids, spec, -1)
    return pooled


def _masked(tok: Any, prompt: str) -> tuple[Any, Any, int]:
    """Token ids and mask [1, TOKENS] of ``prompt`` as the pipeline pads them, and the real token count."""
    batch = tok([prompt], padding="max_length", max_length=TOKENS, truncation=True, add_special_tokens=True,
                return_tensors="pt")
    return batch.input_ids, batch.attention_mask, int(batch.attention_mask.sum())


class HiDreamNetwork(WrappedTransformer):
    """The transformer behind the UNet calling convention (see the module docstring)."""

    @property
    def text_width(self) -> int:
        """The T5 width it reads (4096 in the release)."""
        return int(self.transformer.config.caption_channels[0])

    def __call__(self, x: "Any", t: Any, encoder_hidden_states: "Any", return_dict: bool = False,
                 image_cond: "Any" = None, **kwargs: Any) -> tuple:
        """``image_cond``: an edit's source latent (model space, x's rows), read beside ``x``
        (nodes.families.hidream_edit); the output is ``x``'s size either way (an odd side padded to whole
        patches by wrapping around and cropped back, ComfyUI's rule)."""
        import torch

        b, _, h, w = x.shape
        check_text_width(LABEL, encoder_hidden_states.shape[-1], self.text_width,
                         "encode the prompt with HiDream's four text encoders: QuadrupleCLIPLoader")
        time = torch.as_tensor(t, dtype=torch.float32, device=self.device).reshape(-1).expand(b)
        patch = int(self.transformer.config.patch_size)
        picture: dict[str, Any] = {"hidden_states": pad_to_patches(x.to(self.dtype), patch)}
        if image_cond is not None:
            tokens, ids, sizes = hidream_edit.joined_tokens(x.to(self.dtype), image_cond, patch)
            picture = {"hidden_states": tokens, "img_ids": ids, "img_sizes": sizes,
                       "hidden_states_masks": tokens.new_ones(tokens.shape[:2])}
        out = self.transformer(timesteps=time.to(self.dtype),
                               encoder_hidden_states_t5=encoder_hidden_states.to(self.device, self.dtype),
                               return_dict=False, **picture, **kwargs)[0]
        return (-out[..., :h, :w],)


class HiDream(FlowFamily):
    name = "hidream"
    inference_dtypes = precision.NO_FP16
    latent = flux.FLUX_LATENT
    text_encoders = (
        TextEncoderSpec("text_encoder", "tokenizer", "openai", "", pooled=True),
        TextEncoderSpec("text_encoder_2", "tokenizer_2", "openclip", "", pooled=True),
        TextEncoderSpec("text_encoder_3", "tokenizer_3", "t5", ""),
        TextEncoderSpec("text_encoder_4", "tokenizer_4", "llama3", ""),
    )
    clip_types = ("hidream",)
    guidance_note = "HiDream-I1 has no distilled guidance embedder (Full uses real CFG; Dev and Fast run at cfg 1)"
    scheduler = SCHEDULER
    network_class = HiDreamNetwork
    dit_blocks_unreached = "HiDream-I1 (ComfyUI's HiDreamImageTransformer2DModel)"

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint.hidream_load import has_transformer

        return has_transformer(shapes)

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """The pooled vectors and the Llama layers of each conditioning, batched as the latents are."""
        import torch

        pooled, layers = [], []
        for extra in extras:
            p, llama = extra.get("pooled_output"), extra.get(LLAMA)
            if p is None or llama is None:
                raise ConditioningError("HiDream needs conditioning from its four text encoders (a pooled output and "
                                        "Llama's layers): load them with QuadrupleCLIPLoader",
                                        extra.get("_input", "positive"))
            pooled.append(p.reshape(1, -1).expand(batch, -1))
            layers.append(llama.expand(batch, -1, -1, -1))
        return {"pooled_embeds": torch.cat(pooled).to(device=device, dtype=dtype),
                "encoder_hidden_states_llama3": torch.cat(layers).movedim(1, 0).to(device=device, dtype=dtype),
                **hidream_edit.network_kwargs(extras, batch, self.latent, device, dtype)}

    def call_key(self, extra: dict) -> Any:
        """An edit's prompts with the source picture and without it are separate calls (hidream_edit)."""
        return hidream_edit.call_key(extra)

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING as HiDreamImagePipeline.encode_prompt gives it (module docstring). ``texts``: a prompt
        per tokenizer ("tokenizer" CLIP-L, "tokenizer_2" CLIP-G, "tokenizer_3" T5, "tokenizer_4" Llama)."""
        import torch

        from nodes.checkpoint.llama_text import all_hidden_states

        texts = texts or {}
        missing = [s.module for s in self.text_encoders if s.tokenizer not in clip.tokenizers]
        if missing:
            raise ConditioningError(f"clip ({clip.name}) lacks HiDream's {', '.join(missing)}: load CLIP-L, CLIP-G, "
                                    "T5-XXL and Llama 3.1 with QuadrupleCLIPLoader", "clip")
        prompt = {s.module: texts.get(s.tokenizer, text) for s in self.text_encoders}
        l_spec, g_spec, t5_spec, llama_spec = self.text_encoders
        with torch.inference_mode():
            pooled = torch.cat([_pooled(clip, l_spec, prompt["text_encoder"]),
                                _pooled(clip, g_spec, prompt["text_encoder_2"])], dim=-1)
            ids, mask, t5_count = _masked(clip.tokenizers["tokenizer_3"], prompt["text_encoder_3"])
            with clip.encoder("text_encoder_3") as t5:
                t5_states = t5(ids.to(t5.device), attention_mask=mask.to(t5.device))[0]
            ids, mask, llama_count = _masked(clip.tokenizers["tokenizer_4"], prompt["text_encoder_4"])
            with clip.encoder("text_encoder_4") as llama:
                layers = all_hidden_states(llama, ids, mask)
        if report is not None:
            report.tokens = max(report.tokens, t5_count - 1, llama_count - 1)
            report.windows = 1
        cpu = {"device": "cpu", "dtype": torch.float32}
        return [[t5_states.to(**cpu), {"pooled_output": pooled.to(**cpu), LLAMA: layers.movedim(0, 1).to(**cpu)}]]


FAMILY = HiDream()
