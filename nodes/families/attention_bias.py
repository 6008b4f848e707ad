"""An additive attention bias on some prompt tokens (StyleModelApply's ``attn_bias`` strength).

FLUX.1 Redux appends image tokens to the prompt. Scaling them (``multiply``) weakens
them little, so ComfyUI offers a second way: every other token attends to them with
its attention logits shifted by log(strength), while the appended tokens themselves
attend as usual. A bias is kept per prompt as two pieces that cover FLUX's joint
sequence (text tokens first, then the image's):

* ``text`` [T, T]: the bias of each text token (row, query) on each text token
  (column, key);
* ``image`` [T]: the bias of every image token on each text token.

Nothing biases attention *to* image tokens. Appending n more tokens with bias b (a
second StyleModelApply) adds b to the new columns for every older row and every image
row, and nothing to the new rows: ComfyUI's rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: The conditioning key (Kiln's own; ComfyUI keeps a mask under "attention_mask").
KEY = "attention_bias"


@dataclass(frozen=True)
class TextBias:
    text: Any
    image: Any

    @property
    def tokens(self) -> int:
        return int(self.image.shape[0])

    def __kiln_nbytes__(self) -> int:
        return int(self.text.nbytes + self.image.nbytes)


def none(tokens: int) -> TextBias:
    import torch

    return TextBias(torch.zeros(tokens, tokens), torch.zeros(tokens))


def append(bias: TextBias | None, tokens: int, added: int, value: float) -> TextBias:
    """The bias after ``added`` tokens with bias ``value`` follow a prompt of ``tokens`` tokens."""
    import torch

    old = bias if bias is not None else none(tokens)
    if old.tokens != tokens:
        raise ValueError(f"the attention bias covers {old.tokens} tokens but the prompt has {tokens}")
    text = torch.zeros(tokens + added, tokens + added)
    text[:tokens, :tokens] = old.text
    text[:tokens, tokens:] = value
    image = torch.cat([old.image, torch.full((added,), float(value))])
    return TextBias(text, image)


def joint_mask(biases: list[TextBias], image_tokens: int, dtype: Any, device: Any) -> Any:
    """The additive mask [rows, 1, T + image_tokens, T + image_tokens] of one call, a bias per row."""
    import torch

    t = biases[0].tokens
    # made where the attention runs: at a megapixel the mask is (T + 4096)^2 per row, built each call
    mask = torch.zeros(len(biases), 1, t + image_tokens, t + image_tokens, device=device, dtype=dtype)
    for row, bias in enumerate(biases):
        mask[row, 0, :t, :t] = bias.text.to(device, dtype)
        mask[row, 0, t:, :t] = bias.image.to(device, dtype)
    return mask
