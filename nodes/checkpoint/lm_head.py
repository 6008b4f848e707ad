"""The output head (``lm_head.weight``) some causal-LM text-encoder files carry beside the decoder.

The image models read hidden states only, so the text-encoder builders drop the head unread
(nodes.checkpoint.qwen3_text, nodes.checkpoint.qwen_image_load), from files and diffusers folders
alike. TextGenerate needs it to turn the last hidden state into token scores: this module finds it
in the encoder's file (or the weights of a folder's ``text_encoder/``) and builds it
as a separate bias-free ``Linear``, which the model manager then holds beside (not inside) the
encoder, so a workflow that only encodes prompts never pays for a head it does not use.

A file without one (Qwen3-4B, whose word embeddings are tied) is answered with None and the
caller uses the token embedding as the head (nodes.text_lm). An fp8 head is widened to the
compute dtype, times its scale where the file stores one (ComfyUI's ``scale_weight`` or
``weight_scale``: one number or one per output row).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nodes.checkpoint.load import CheckpointError, open_state

WEIGHT = "lm_head.weight"
SCALES = ("lm_head.scale_weight", "lm_head.weight_scale")


def head_key(keys: Iterable[str]) -> str | None:
    """The key of a file's output head (``lm_head.weight``, also under a prefix), or None."""
    return next((k for k in keys if k == WEIGHT or k.endswith("." + WEIGHT)), None)


def file_with_head(paths: Iterable[Path], kind: str) -> Path | None:
    """Which of a CLIP's files holds the ``kind`` encoder (nodes.checkpoint.split's kinds) with its own
    head; None when that file has none (only the headers are read)."""
    from nodes.checkpoint.split import TextFile

    for path in paths:
        file = TextFile.read(path)
        if file.kind == kind:
            return path if head_key(file.state.keys()) is not None else None
    return None


def folder_state_with_head(folder: Path, dtype: Any) -> Mapping[str, Any] | None:
    """The tensors of a diffusers folder's encoder subfolder (``text_encoder/``) when they hold the
    language model's head: the weights file (variant, shards) the folder loaders read for ``dtype``
    (nodes.checkpoint.folders.folder_state), so the head comes from the same file as the encoder; None when
    they hold none (a head tied to the embedding) or there are none. Only the headers are read."""
    from nodes.checkpoint.folders import folder_state

    found = folder_state(folder, dtype)
    return found[1] if found is not None and head_key(found[1].keys()) is not None else None


def build_head(path: Path, dtype: Any) -> Any:
    """The head of ``path`` as a ``torch.nn.Linear`` (no bias) in ``dtype`` on the CPU."""
    return head_from_state(open_state(path), path.name, dtype)


def head_from_state(state: Mapping[str, Any], name: str, dtype: Any) -> Any:
    """The head among ``state``'s tensors (``name`` says whose, in errors) as :func:`build_head` builds it."""
    import torch

    key = head_key(state.keys())
    if key is None:
        raise CheckpointError(f"{name} holds no {WEIGHT}")
    weight = state[key]
    if weight.ndim != 2:
        raise CheckpointError(f"{name}: {key} has shape {tuple(weight.shape)}, expected [vocabulary, width]")
    prefix = key[: -len(WEIGHT)]
    scale = next((state[prefix + s] for s in SCALES if prefix + s in state), None)
    if scale is not None:
        scale = scale.float().reshape(-1)
        if scale.numel() not in (1, weight.shape[0]):
            raise CheckpointError(f"{name}: the head's scale has {scale.numel()} values for "
                                  f"{weight.shape[0]} rows")
        weight = weight.float() * (scale if scale.numel() == 1 else scale[:, None])
    head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = torch.nn.Parameter(weight.to(dtype).contiguous(), requires_grad=False)
    return head.eval()
