"""A tiny random Qwen3 causal LM, saved as ComfyUI's ``qwen_3_4b*.safetensors`` files are.

head_dim (16) differs from hidden / heads (48 / 4 = 12) and there are fewer key/value heads than
query heads, as in Qwen3-4B, so a config guessed from the hidden size alone would not fit.
"""
from __future__ import annotations

from functools import lru_cache

#: a vocabulary that covers the Qwen3 tokenizer's ids (151,643 tokens + 26 specials), for prompt tests
FULL_VOCAB = 151936


@lru_cache(maxsize=4)
def model(vocab: int = 512, layers: int = 3, seed: int = 0):
    """Qwen3ForCausalLM with random weights (float32, eval)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=vocab, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                         max_position_embeddings=40960, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})
    lm = Qwen3ForCausalLM(config).eval()
    with torch.no_grad():  # q_norm / k_norm / layer norms start at ones: make them matter
        for name, p in lm.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return lm


def file_state(vocab: int = 512, layers: int = 3, seed: int = 0, lm_head: bool = True) -> dict:
    """The causal LM's tensors under the file's names (``model.*``, with or without ``lm_head.weight``)."""
    state = {k: v.detach().clone() for k, v in model(vocab, layers, seed).state_dict().items()}
    if not lm_head:
        state.pop("lm_head.weight")
    return state
