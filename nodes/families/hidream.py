"""HiDream-I1 (HiDream.ai's 17B text-to-image model): a sparse mixture-of-experts flow DiT on FLUX.1's
latents, conditioned on four text encoders.

* **Text.** As HiDreamImagePipeline's ``encode_prompt``, at its default ``max_sequence_length`` of 128
  (:data:`TOKENS`): CLIP-L's and CLIP-G's projected pooled outputs side by side (the pooled vector; the
  CLIPs read the prompt padded to 128 tokens, HiDream's CLIPs have 248 positions), T5-XXL's last states
  of the prompt padded to 128 tokens with its mask, and every layer's states of Llama 3.1 8B Instruct
  over the prompt after ``<|begin_of_text|>``, padded with ``<|eot_id|>`` to 128 tokens with its mask.
  CONDITIONING: [[T5 states [1, 128, 4096], {"pooled_output": [1, 2048], "conditioning_llama3":
  [1, layers, 128, 4096]}]] (ComfyUI's keys; its Llama layers come batch first, as here). ComfyUI's
  weight syntax is not read: the text goes to the tokenizers as written.
* **Latents.** FLUX.1's 16-channel VAE (``ae.safetensors``) and latent format.
* **Model sampling.** Flow matching with a fixed shift (ComfyUI's default 3; the templates set it with
  ModelSamplingSD3: 3 for Full and Fast, 6 for Dev).
"""
from __future__ import annotations

from typing import Any

from nodes.families import flux
from nodes.families.base import ConditioningError, FlowFamily, TextEncoderSpec

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
    """A CLIP's projected pooled output [1, width] of ``prompt`` padded to :data:`TOKENS` tokens."""
    from nodes.families.text import hidden_state

    tok = clip.tokenizers[spec.tokenizer]
    ids = tok([prompt], padding="max_length", max_length=TOKENS, truncation=True, return_tensors="pt").input_ids
    with clip.encoder(spec.module) as te:
        positions = int(te.config.max_position_embeddings)
        if positions < TOKENS:
            raise ConditioningError(f"{clip.name}: {spec.module} has {positions} positions; HiDream's CLIPs read "
                                    f"{TOKENS} tokens (clip_l_hidream / clip_g_hidream have 248)", "clip")
        _, pooled = hidden_state(te, ids, spec, -1)
    return pooled


def _masked(tok: Any, prompt: str) -> tuple[Any, Any, int]:
    """Token ids and mask [1, TOKENS] of ``prompt`` as the pipeline pads them, and the real token count."""
    batch = tok([prompt], padding="max_length", max_length=TOKENS, truncation=True, add_special_tokens=True,
                return_tensors="pt")
    return batch.input_ids, batch.attention_mask, int(batch.attention_mask.sum())


class HiDream(FlowFamily):
    name = "hidream"
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
    repeats_text = False

    def claims_unet(self, shapes: Any) -> bool:
        return False  # the transformer's loader is not written yet

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
