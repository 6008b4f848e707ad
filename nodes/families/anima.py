"""Anima (circlestone-labs): Cosmos Predict2 2B's DiT with an LLM adapter in front of its cross-attention,
conditioned on Qwen3-0.6B and T5 token ids, on Qwen-Image's VAE (the Wan 2.1 VAE's latent space).

Everything after the context is Cosmos Predict2 (nodes.families.cosmos: the EDM ``rflow`` sampling on levels
0.002..80, real CFG, the Wan 2.1 latent statistics, the one-frame call with the zero padding mask). What
Anima adds, as ComfyUI runs it (there is no diffusers pipeline):

* **Text.** The prompt as typed goes through two tokenizers: Qwen3's (no template, no special tokens; an
  empty prompt is the one pad token 151643, ComfyUI's ``min_length`` 1) and T5's (the ids with the end
  token, unpadded). Qwen3-0.6B's last hidden state (after its final norm) is the CONDITIONING tensor; the
  T5 ids ride on it (:data:`T5_IDS`). ComfyUI's CLIPLoader loads ``qwen_3_06b_base.safetensors`` under type
  ``stable_diffusion``, the file deciding (a Qwen3 1024 wide is Anima's; SD's types read CLIP files).
* **Context.** Per conditioning row the MODEL's adapter (nodes.checkpoint.anima_adapter, a submodule of the
  loaded transformer) turns (Qwen3 states, T5 ids) into one 1024-wide row per T5 token, zero-padded to 512
  tokens, which the DiT attends to. The adapter runs in the network call because it belongs to the
  diffusion model's file, not the text encoder's.

* **Weights.** ComfyUI's prompt syntax (``(word:1.2)``) is read as its Anima encoder reads it: the Qwen3 side
  gets the text without the syntax (its weights are set to 1), the T5 side a weight per token (Kiln's T5 rule,
  nodes.families.t5_weights), and the adapter's row of each T5 token is multiplied by its weight before the
  padding (:data:`T5_WEIGHTS`).
"""
from __future__ import annotations

from typing import Any

from nodes.families.base import ConditioningError, Shapes, TextEncoderSpec
from nodes.families.cosmos import T5_TOKENS, CosmosNetwork, CosmosPredict2

#: The conditioning key of the prompt's T5 token ids ([1, tokens], int64).
T5_IDS = "anima_t5_ids"
#: The conditioning key of each T5 token's prompt weight ([1, tokens]; absent: all 1).
T5_WEIGHTS = "anima_t5_weights"
#: Qwen3's pad token, the whole of an empty prompt (ComfyUI's Qwen3Tokenizer min_length 1).
QWEN_PAD = 151643
#: Qwen3-0.6B's width: a Qwen3 this wide or narrower is Anima's (Qwen3-1.7B is 2048, Z-Image's 4B 2560 wide).
QWEN_WIDTH = 1024
QWEN3_PREFIX = "text_encoders.qwen3_06b.transformer."


class AnimaNetwork(CosmosNetwork):
    """Cosmos' call with the context made by the transformer's ``llm_adapter`` from each row's T5 ids."""

    label = "Anima"
    text_hint = "encode the prompt with Qwen3-0.6B: CLIPLoader type stable_diffusion with qwen_3_06b_base"

    @property
    def text_width(self) -> int:
        """The Qwen3 width the adapter's cross-attention reads."""
        return int(self.transformer.llm_adapter.blocks[0].cross_attn.k_proj.in_features)

    def context(self, encoder_hidden_states: Any, kwargs: dict) -> Any:
        """[B, max(512, T5 tokens), DiT text width]: each row's adapter output, zeros after it."""
        import torch

        ids = kwargs.get("t5_ids")
        if ids is None or len(ids) != encoder_hidden_states.shape[0]:
            raise ConditioningError("an Anima prompt needs its T5 token ids: encode it with this model's text encoder "
                                    "(CLIPLoader type stable_diffusion, qwen_3_06b_base)", "positive")
        adapter = self.transformer.llm_adapter
        weights = kwargs.get("t5_weights") or [None] * len(ids)
        rows = []
        for i, row in enumerate(ids):
            source = encoder_hidden_states[i:i + 1].to(self.device, self.dtype)
            out = adapter(source, row.to(self.device).reshape(1, -1))
            if weights[i] is not None:  # ComfyUI's prompt weights scale each T5 token's row
                out = out * weights[i].to(self.device, out.dtype).reshape(1, -1, 1)
            rows.append(out)
        length = max(T5_TOKENS, *(r.shape[1] for r in rows))
        return torch.cat([torch.nn.functional.pad(r, (0, 0, 0, length - r.shape[1])) for r in rows])


class Anima(CosmosPredict2):
    name = "anima"
    label = "Anima"
    text_encoders = (TextEncoderSpec("text_encoder", "tokenizer", "qwen3", QWEN3_PREFIX),)
    clip_types = ("stable_diffusion",)
    network_class = AnimaNetwork
    dit_blocks_unreached = "Anima (ComfyUI's Anima, a MiniTrainDIT)"

    def claims_unet(self, shapes: Shapes) -> bool:
        from nodes.checkpoint.cosmos_load import has_anima_transformer

        return has_anima_transformer(shapes)

    def accepts_text_files(self, files: list) -> bool:
        """A Qwen3 at most 1024 wide (0.6B), not Z-Image's or FLUX.2 [klein]'s wider ones."""
        from nodes.checkpoint.tensors import shapes_of

        for file in files:
            shapes = shapes_of(file.state)
            width = next((s[1] for k, s in shapes.items() if k.endswith("embed_tokens.weight")), 0)
            if not 0 < width <= QWEN_WIDTH:
                return False
        return True

    def network_kwargs(self, extras: list[dict], batch: int, image_size: tuple[int, int],
                       device: Any, dtype: Any) -> dict[str, Any]:
        """Each row's T5 ids and weights (lists: prompts of other T5 lengths may share a call)."""
        ids = [extra.get(T5_IDS) for extra in extras]
        if any(i is None for i in ids):
            return {}
        weights = [extra.get(T5_WEIGHTS) for extra in extras]
        return {"t5_ids": [i for i in ids for _ in range(batch)],
                "t5_weights": [w for w in weights for _ in range(batch)]}

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        """CONDITIONING: Qwen3's last hidden state of the prompt, its T5 ids beside it (module docstring)."""
        import torch

        from nodes.checkpoint.qwen3_text import hidden_states
        from nodes.checkpoint.t5_tokenizer import t5_tokenizer
        from nodes.families import t5_weights
        from nodes.families.text import prompt_pieces
        from nodes.prompt_syntax import parse

        parsed = parse((texts or {}).get("tokenizer", text))
        if report is not None:
            report.problems += [p for p in parsed.problems if p not in report.problems]
        qwen_tok, t5_tok = clip.tokenizers["tokenizer"], t5_tokenizer()
        pieces = prompt_pieces(parsed)[0] if parsed.weighted else [("".join(seg.text for seg in parsed.segments), 1.0)]
        ids = [i for piece, _ in pieces for i in qwen_tok(piece, add_special_tokens=False).input_ids] or [QWEN_PAD]
        ids = torch.tensor([ids])
        extra: dict[str, Any] = {}
        if parsed.weighted:
            tokens = t5_weights.tokenize(t5_tok, parsed, t5_weights.tokenize(t5_tok, parsed, 1).count + 1)
            t5 = torch.tensor([tokens.ids])
            extra[T5_WEIGHTS] = torch.tensor([tokens.weights], dtype=torch.float32)
        else:
            t5 = torch.tensor([t5_tok(pieces[0][0]).input_ids])
        extra[T5_IDS] = t5
        with torch.inference_mode(), clip.encoder("text_encoder") as qwen:
            states = hidden_states(qwen, ids, torch.ones_like(ids), -1)
        if report is not None:
            report.tokens = max(report.tokens, int(ids.shape[1]))
            report.windows = 1
        return [[states.to("cpu", torch.float32), extra]]


FAMILY = Anima()
