"""Which CLIPs can write text, and how: the causal-LM text encoders behind TextGenerate.

Some image models encode prompts with an instruction-tuned language model (Z-Image and FLUX.2
klein with Qwen3, Qwen-Image with Qwen2.5-VL, Krea 2 with Qwen3-VL, ERNIE-Image with Ministral 3,
whose prompt enhancer is a Ministral 3 with its own head). ComfyUI's TextGenerate runs
that same model as a chat model to write or expand a prompt. What differs between such encoders is gathered here, one
:class:`LanguageModel` per encoder kind (nodes.checkpoint.split's kinds) in :data:`KINDS`, so a
new one is one more entry; everything else (the node, the decoding loop in
nodes.text_sampling) is shared:

* the chat template as ComfyUI's tokenizers apply it for TextGenerate: an optional system turn,
  the user turn and the assistant's opening; for Qwen3 an empty think block after it when
  thinking is off (Qwen3's convention for "answer without reasoning"). A prompt that already
  starts with ``<|im_start|>``, or ``use_default_template`` off, is taken as written;
* the tokens that end the answer (``<|endoftext|>``, ``<|im_end|>``, as ComfyUI's Qwen configs);
* where the decoder sits in the loaded module (Qwen2.5-VL with its vision tower nests it).

The output head: a file's own ``lm_head.weight`` where it has one (nodes.checkpoint.lm_head),
else the token embedding, which Qwen3-4B ties to its head. (ComfyUI uses the embedding for every
Qwen3-4B and Qwen2.5-VL, even where the file has a head: Qwen2.5-VL-7B does not tie them, so on
such a file Kiln's scores are the model's own and ComfyUI's are not.)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from nodes.checkpoint import qwen_vision
from nodes.checkpoint.qwen_tokenizer import ENDOFTEXT

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
#: Mistral's (Tekken's) control tokens that open a prompt written in its own template.
BOS, MISTRAL_SYSTEM, MISTRAL_INST = "<s>", "[SYSTEM_PROMPT]", "[INST]"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
#: The vision tower's submodule in a Qwen-VL built with it; a use with pictures names it (its weights may
#: load on that first use: nodes.runtime.deferred).
TOWER = qwen_vision.TOWER
#: Qwen3's empty reasoning block: after the assistant's opening it asks for an answer without reasoning.
NO_THINKING = f"{THINK_OPEN}\n\n{THINK_CLOSE}\n\n"


class NotALanguageModel(Exception):
    """A CLIP TextGenerate cannot run (its text encoder is not a causal LM Kiln can decode with)."""


def chatml(prompt: str, system: str, think_block: str) -> str:
    """One ChatML exchange as Qwen's templates render it: [system turn], user turn, assistant opening."""
    head = f"{IM_START}system\n{system}{IM_END}\n" if system else ""
    return f"{head}{IM_START}user\n{prompt}{IM_END}\n{IM_START}assistant\n{think_block}"


def qwen3_chat(prompt: str, system: str, thinking: bool) -> str:
    return chatml(prompt, system, "" if thinking else NO_THINKING)


def qwen25_chat(prompt: str, system: str, thinking: bool) -> str:
    return chatml(prompt, system, "")  # Qwen2.5 has no reasoning mode: ``thinking`` changes nothing


def mistral_chat(prompt: str, system: str, thinking: bool) -> str:
    """One exchange as Ministral 3's chat template renders it: ``<s>``, [system turn], the user's instruction.
    (The ERNIE-Image templates write this themselves for the prompt enhancer.)"""
    from nodes.checkpoint.tekken_tokenizer import instruction

    return BOS + instruction(prompt, system)


def own_decoder(module: Any) -> Any:
    return module


def nested_decoder(module: Any) -> Any:
    """The language model of a Qwen-VL built with its vision tower (``Qwen2_5_VLModel``, ``Qwen3VLModel``),
    else itself."""
    return getattr(module, "language_model", module)


@dataclass(frozen=True)
class LanguageModel:
    """How TextGenerate runs one kind of text encoder as a chat model."""

    name: str
    #: ``chat(prompt, system_prompt, thinking) -> text``: the templated prompt.
    chat: Callable[[str, str, bool], str]
    #: the decoder (``forward(input_ids=, past_key_values=, use_cache=)``, ``embed_tokens``) in the loaded module
    decoder: Callable[[Any], Any] = own_decoder
    stops: tuple[str, ...] = (ENDOFTEXT, IM_END)
    #: whether ``thinking`` means anything to it (said in a node message when not)
    reasons: bool = False
    #: ``pictures(module, tokenizer, text, pictures) -> nodes.text_vision.PicturePrompt`` for a module
    #: with a vision tower (:data:`TOWER`); None: this kind reads no pictures.
    pictures: Callable[[Any, Any, str, list], Any] | None = None
    #: a prompt that starts with one of these is already in this model's template (taken as written)
    own_template: tuple[str, ...] = (IM_START,)
    #: the token an empty prompt is read as (ComfyUI's tokenizers pad to a minimum of one)
    empty: str = ENDOFTEXT

    def reads_pictures(self, module: Any) -> bool:
        """Whether ``module`` (as loaded) reads pictures: this kind can, and it has its vision tower, built or
        left to build on the first picture read (nodes.runtime.deferred)."""
        from nodes.runtime.deferred import has_part

        return self.pictures is not None and has_part(module, TOWER)


def qwen25_pictures(module: Any, tokenizer: Any, text: str, pictures: list) -> Any:
    from nodes.text_vision import qwen25_pictures as build

    return build(module, tokenizer, text, pictures)


def qwen3_vl_pictures(module: Any, tokenizer: Any, text: str, pictures: list) -> Any:
    from nodes.text_vision import qwen3_pictures

    return qwen3_pictures(module, tokenizer, text, pictures)


#: encoder kind (nodes.checkpoint.split) -> how it writes text.
KINDS: dict[str, LanguageModel] = {
    "qwen3": LanguageModel("Qwen3", qwen3_chat, reasons=True),
    "qwen2.5-vl": LanguageModel("Qwen2.5-VL", qwen25_chat, nested_decoder, pictures=qwen25_pictures),
    # Krea 2's Qwen3-VL 4B (with its vision tower where the file has one: nodes.checkpoint.krea2_load);
    # ComfyUI's Qwen3-VL tokenizer writes Qwen3's empty think block when thinking is off
    "qwen3-vl": LanguageModel("Qwen3-VL", qwen3_chat, nested_decoder, reasons=True, pictures=qwen3_vl_pictures),
    # ERNIE-Image's Ministral 3 (its prompt enhancer is one with its own head): Mistral's template, </s> ends
    "ministral3": LanguageModel("Ministral 3", mistral_chat, stops=("</s>",),
                                own_template=(BOS, MISTRAL_SYSTEM, MISTRAL_INST), empty=BOS),
}


def language_model(family: Any) -> tuple[Any, LanguageModel]:
    """(the encoder spec, its :class:`LanguageModel`) of a CLIP's family; NotALanguageModel says why not."""
    from nodes.checkpoint.split import KIND_NAMES

    specs = family.text_encoders
    lms = [(spec, KINDS[spec.kind]) for spec in specs if spec.kind in KINDS]
    kinds = " + ".join(KIND_NAMES.get(s.kind, s.kind) for s in specs) or "no text encoder"
    if len(lms) != 1 or len(specs) != 1:
        known = ", ".join(lm.name for lm in KINDS.values())
        raise NotALanguageModel(f"this {family.name} CLIP ({kinds}) cannot generate text: that needs a single "
                                f"causal language model as its text encoder ({known}); CLIP and T5 "
                                "encoders have no next-token head")
    return lms[0]


def templated(lm: LanguageModel, prompt: str, system_prompt: str, thinking: bool, use_template: bool,
              pictures: int = 0) -> str:
    """The text the model continues, as ComfyUI builds it: a prompt already in ChatML (it starts with
    ``<|im_start|>``) or ``use_template`` off is taken as written, and the system prompt only goes
    into the default template. ``pictures``: that many picture blocks before the text in the user turn
    (in a raw prompt: those it lacks; nodes.text_vision)."""
    from nodes.text_vision import BLOCK, with_blocks

    if not use_template or prompt.startswith(lm.own_template):
        return with_blocks(prompt, pictures)
    return lm.chat(BLOCK * pictures + prompt, system_prompt, thinking)


def prompt_ids(tokenizer: Any, text: str, empty: str = ENDOFTEXT) -> list[int]:
    """The token ids of ``text`` (special tokens written in it read as themselves); at least one
    token, ``empty`` (the model's :attr:`LanguageModel.empty`) for an empty text, as ComfyUI's
    tokenizers pad to a minimum of one."""
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    return ids or [tokenizer.convert_tokens_to_ids(empty)]


def stop_ids(tokenizer: Any, lm: LanguageModel) -> frozenset[int]:
    return frozenset(tokenizer.convert_tokens_to_ids(t) for t in lm.stops)


def decode(tokenizer: Any, ids: list[int]) -> str:
    """The generated text: control tokens (turn markers, end tokens) left out, the reasoning markers
    ``<think>`` / ``</think>`` kept, since the thinking split reads them."""
    keep = {THINK_OPEN, THINK_CLOSE}
    control = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special and tok.content not in keep}
    return tokenizer.decode([i for i in ids if i not in control], skip_special_tokens=False)


def split_thinking(generated: str, prompt: str) -> tuple[str, str]:
    """(answer, reasoning) as ComfyUI splits them: reasoning is what comes before ``</think>`` when the
    output opens with ``<think>`` or the raw prompt ends with it (the model was put in its reasoning
    turn); a reasoning that ``max_length`` cut short has no close and is all there is. Otherwise all
    of it is the answer. Both are stripped."""
    before, found, after = generated.partition(THINK_CLOSE)
    opened = before.lstrip().startswith(THINK_OPEN) or prompt.rstrip().endswith(THINK_OPEN)
    if not opened:
        return generated.strip(), ""
    reasoning = before.replace(THINK_OPEN, "", 1).strip()
    return after.strip(), reasoning
