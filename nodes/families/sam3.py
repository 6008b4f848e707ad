"""SAM 3's text side: what a SAM 3 CLIP gives CLIPTextEncode, in ComfyUI's shape.

SAM 3 is a detector, not a diffusion model: this "family" exists so that the CLIP a
SAM 3 checkpoint loads with can encode prompts that SAM3_Detect (nodes.sam3_nodes)
reads. It is deliberately not in :data:`nodes.families.ALL` (no UNet to detect).

ComfyUI's rules (comfy/text_encoders/sam3_clip.py), reproduced here:

* CLIP BPE tokens, 32 per window: start, up to 30 tokens, end, then padding with
  token 0 and an attention mask; longer prompts take more windows, concatenated.
* the conditioning is the text tower's last hidden state after its final norm
  (1024 wide on the real model); the detector projects it itself.
* parentheses are dropped and commas separate prompts ("cat, dog"); "prompt:N" lets
  prompt find up to N objects (default 1). With more than one prompt or an N, every
  prompt is encoded on its own and listed under ``sam3_multi_cond``; the first is
  also the conditioning's main tensor, for nodes that read only that.
"""
from __future__ import annotations

import re
from typing import Any

from nodes.families.base import ConditioningError, Family, LatentFormat

WINDOW = 32
PAD_ID = 0


def parse_prompts(text: str) -> list[tuple[str, int]]:
    """[(prompt, max detections)] from ComfyUI's "a, b:3" syntax."""
    parts = [p.strip() for p in text.replace("(", "").replace(")", "").split(",")]
    out = []
    for part in filter(None, parts):
        m = re.match(r"^(.+?)\s*:\s*([\d.]+)\s*$", part)
        out.append((m.group(1).strip(), max(1, round(float(m.group(2))))) if m else (part, 1))
    return out


class Sam3Family(Family):
    name = "sam3"
    latent = LatentFormat(channels=0, scale=1.0)  # no latent space: SAM 3 reads pixels

    def windows(self, tokenizer: Any, text: str) -> list[tuple[list[int], list[int]]]:
        """(ids, attention mask) per 32-token window of ``text``."""
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        chunks = [ids[i:i + WINDOW - 2] for i in range(0, len(ids), WINDOW - 2)] or [[]]
        out = []
        for chunk in chunks:
            real = [bos, *chunk, eos]
            out.append((real + [PAD_ID] * (WINDOW - len(real)), [1] * len(real) + [0] * (WINDOW - len(real))))
        return out

    def encode_prompt(self, model: Any, tokenizer: Any, text: str) -> tuple[Any, Any, int]:
        """(hidden states [1, 32 * windows, width] float32 CPU, mask [1, same] int64, windows)."""
        import torch

        windows = self.windows(tokenizer, text)
        device = next(model.parameters()).device
        states, masks = [], []
        with torch.inference_mode():
            for ids, mask in windows:
                ids_t = torch.tensor([ids], device=device)
                mask_t = torch.tensor([mask], device=device)
                out = model.text_encoder(input_ids=ids_t, attention_mask=mask_t, return_dict=True)
                states.append(out.last_hidden_state.to("cpu", torch.float32))
                masks.append(mask_t.cpu())
        return torch.cat(states, dim=1), torch.cat(masks, dim=1).to(torch.int64), len(windows)

    def encode_text(self, clip: Any, text: str, report: Any = None, texts: dict[str, str] | None = None) -> list:
        parsed = parse_prompts(text)
        if not parsed:
            raise ConditioningError("SAM 3 needs something to look for: the prompt is empty (name an object, "
                                    "e.g. 'guitar', or several: 'cat, dog:3')", input_name="text")
        tokenizer = clip.tokenizers["tokenizer"]
        single = len(parsed) == 1 and parsed[0][1] == 1
        with clip.encoder("sam3") as model:
            if single:  # ComfyUI encodes the text as typed (weights disabled), not the parsed part
                cond, mask, _ = self.encode_prompt(model, tokenizer, text)
                return [[cond, {"pooled_output": None, "attention_mask": mask}]]
            multi = []
            for prompt, max_det in parsed:
                cond, mask, _ = self.encode_prompt(model, tokenizer, prompt)
                multi.append({"cond": cond, "attention_mask": mask, "max_detections": max_det})
        first = multi[0]
        return [[first["cond"], {"pooled_output": None, "attention_mask": first["attention_mask"],
                                 "sam3_multi_cond": multi}]]


FAMILY = Sam3Family()
