"""TextGenerate ("Generate Text") and SaveText: the CLIP's language model writing text, and a file for it.

TextGenerate follows ComfyUI's node (comfy_extras/nodes_textgen.py): the prompt goes through the
model's chat template, the model writes until an end token or ``max_length`` new tokens, and the
output is split into the answer and the reasoning before ``</think>``. Which encoders can do it and
their templates: nodes.text_lm; the decoding loop: nodes.text_sampling. Greedy output ("off")
equals transformers' ``generate(do_sample=False)``; sampled output ("on") is reproducible for a
seed but is not the text ComfyUI samples for that seed (a different generator draws it).

Inputs Kiln takes but cannot use are refused by name rather than ignored: video and audio, and
pictures for an encoder without a vision tower; a Qwen2.5-VL (Qwen-Image's file) or Qwen3-VL (Krea 2's)
loaded with its tower reads pictures (nodes.text_vision). ``mtp`` (speculative decoding with a
multi-token-prediction head) is accepted for ComfyUI's files and changes nothing, as in ComfyUI
for models without MTP weights. Templates saved by an older ComfyUI link a single ``image``
socket; newer ones grow ``images.image_0``...; both are declared.
"""
from __future__ import annotations

import json
from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Grow, Input, Output, Result, define_node
from nodes.handles import ClipHandle

AUDIO = "AUDIO"
MODES = ("on", "off")
#: the "on" option's sub-inputs, in ComfyUI's order (an editor file lists their values so)
SAMPLING = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "presence_penalty")
MTP = ["auto", "off", "2", "3", "4", "5"]
IMAGES = Grow("images", min=0, prefix="image_", count=9, template="image")


def _sub(name: str, type_: str, default: Any, lo: float, hi: float, step: float | None = None,
         tooltip: str = "") -> Input:
    return Input(f"sampling_mode.{name}", type_, default=default, min=lo, max=hi, step=step, optional=True,
                 tooltip=tooltip)


@define_node(
    "TextGenerate",
    category="text",
    display_name="Generate Text",
    inputs=[
        Input("clip", T.CLIP, tooltip="A CLIP whose text encoder is a chat model: Qwen3 (Z-Image, FLUX.2 klein), "
                                      "Qwen2.5-VL (Qwen-Image), Qwen3-VL (Krea 2) or Ministral 3 "
                                      "(ERNIE-Image's prompt enhancer)."),
        Input("prompt", T.STRING, default="", multiline=True),
        Input("image", T.IMAGE, optional=True, comfy_hidden=True,
              tooltip="The single picture socket of templates saved by an older ComfyUI."),
        *IMAGES.inputs(T.IMAGE),
        Input("video", T.IMAGE, optional=True, tooltip="Video frames as an image batch."),
        Input("audio", AUDIO, optional=True),
        Input("max_length", T.INT, default=512, min=1, max=32768,
              tooltip="The most tokens the model writes (the end token included)."),
        Input("sampling_mode", T.COMBO, default="on", choices=list(MODES), dynamic={"on": SAMPLING, "off": ()},
              tooltip="on: seeded sampling with the settings below; off: greedy (always the likeliest token)."),
        _sub("temperature", T.FLOAT, 0.7, 0.01, 2.0, 0.000001),
        _sub("top_k", T.INT, 64, 0, 1000, tooltip="Keep the k likeliest tokens (0: all)."),
        _sub("top_p", T.FLOAT, 0.95, 0.0, 1.0, 0.01),
        _sub("min_p", T.FLOAT, 0.05, 0.0, 1.0, 0.01),
        _sub("repetition_penalty", T.FLOAT, 1.05, 0.0, 5.0, 0.01),
        _sub("seed", T.INT, 0, 0, 0xFFFFFFFFFFFFFFFF,
             tooltip="The same seed writes the same text in Kiln (not the text ComfyUI samples for it)."),
        _sub("presence_penalty", T.FLOAT, 0.0, 0.0, 5.0, 0.01),
        Input("thinking", T.BOOLEAN, default=False, optional=True,
              tooltip="Let the model reason before answering, if it can (Qwen3)."),
        Input("use_default_template", T.BOOLEAN, default=True, optional=True,
              tooltip="Wrap the prompt in the model's chat template (and the system prompt)."),
        Input("mtp", T.COMBO, default="auto", choices=MTP, optional=True,
              tooltip="Speculative decoding with a multi-token-prediction head: no effect without MTP weights, "
                      "which no encoder Kiln loads has."),
        Input("system_prompt", T.STRING, default="", optional=True, force_input=True,
              tooltip="Replaces the system turn of the chat template; ignored without the default template."),
    ],
    outputs=[Output("generated_text", T.STRING), Output("thinking", T.STRING)],
)
def text_generate(ctx, clip: ClipHandle, prompt: str = "", max_length: int = 512, sampling_mode: str = "on",
                  image: Any = None, video: Any = None, audio: Any = None, thinking: bool = False,
                  use_default_template: bool = True, mtp: str = "auto", system_prompt: str = "",
                  **options: Any) -> tuple[str, str]:
    """Run the CLIP's language model on the prompt (in its chat template) and return what it writes,
    and separately its reasoning (the text before ``</think>``, when it reasoned).

    Sampling "on" draws each token at random among the likeliest (temperature, top-k, top-p,
    min-p, repetition and presence penalties, as ComfyUI applies them); the same seed writes the
    same text. "off" always takes the likeliest token."""
    from nodes.checkpoint.load import CheckpointError
    from nodes.text import _clip
    from nodes.text_lm import TOWER, NotALanguageModel, decode, language_model, prompt_ids, split_thinking, \
        stop_ids, templated
    from nodes.text_sampling import generate

    clip = _clip(clip)
    try:
        spec, lm = language_model(clip.family)
    except NotALanguageModel as exc:
        raise NodeError(f"TextGenerate: {exc}", input_name="clip") from None
    for name, value in (("video", video), ("audio", audio)):
        if value is not None:
            raise NodeError(f"this {lm.name} text encoder cannot read {name} in Kiln: leave {name} unconnected",
                            input_name=name)
    pictures = _pictures(image, options)
    if pictures and not lm.reads_pictures(clip.peek(spec.module)):
        raise NodeError(f"this {lm.name} text encoder has no vision part (its file holds no vision tower): it "
                        f"cannot read images; leave {pictures[0][0]} unconnected", input_name=pictures[0][0])
    if not isinstance(prompt, str):
        raise NodeError("must be a string", input_name="prompt")
    if sampling_mode not in MODES:
        raise NodeError(f"must be one of {', '.join(MODES)}, got {sampling_mode!r}", input_name="sampling_mode")
    settings = _settings(options) if sampling_mode == "on" else None
    _notes(ctx, lm, thinking, use_default_template, mtp, system_prompt)
    tokenizer = clip.tokenizers[spec.tokenizer]
    try:
        text = templated(lm, prompt, system_prompt or "", bool(thinking), bool(use_default_template),
                         len(pictures))
    except ValueError as exc:  # more picture slots in a raw prompt than pictures
        raise NodeError(str(exc), input_name="prompt") from None
    try:
        with clip.encoder(spec.module, (TOWER,) if pictures else ()) as encoder, \
                clip.lm_head(spec.module) as head:
            extra: dict[str, Any] = {}
            if pictures:
                built = lm.pictures(encoder, tokenizer, text, [p for _, p in pictures])
                decoder, ids, extra = encoder, built.ids, {"prefill": built.prefill, "position": built.position}
            else:
                decoder, ids = lm.decoder(encoder), prompt_ids(tokenizer, text, lm.empty)
            vocab = (head if head is not None else decoder.get_input_embeddings()).weight.shape[0]
            if max(ids) >= vocab:
                raise NodeError(f"the prompt holds token id {max(ids)}, but this {lm.name} has a vocabulary of "
                                f"{vocab}: the tokenizer and the model do not match", input_name="clip")
            tokens = generate(decoder, head, ids, int(max_length), stop_ids(tokenizer, lm), settings, ctx.progress,
                              **extra)
    except CheckpointError as exc:
        raise NodeError(str(exc), input_name="clip") from None
    ended = tokens[-1] in stop_ids(tokenizer, lm) if tokens else False
    ctx.message(f"{len(tokens)} tokens written from a {len(ids)}-token prompt"
                + ("" if ended else f"; stopped at max_length {max_length} before the model ended its answer"))
    return split_thinking(decode(tokenizer, tokens), prompt)


def _pictures(image: Any, options: dict[str, Any]) -> list[tuple[str, Any]]:
    """(socket, picture [1, H, W, C]) for every picture linked in, in order: the legacy ``image`` socket,
    then ``images.image_0``...; each item of an image batch is a picture of its own (ComfyUI's rule)."""
    found = []
    for name in ("image", *(i.name for i in IMAGES.inputs(T.IMAGE))):
        batch = image if name == "image" else options.get(name)
        if batch is None:
            continue
        if getattr(batch, "ndim", 0) != 4:
            raise NodeError(f"expected an IMAGE [B,H,W,C], got {type(batch).__name__}", input_name=name)
        found += [(name, batch[i:i + 1]) for i in range(batch.shape[0])]
    return found


def _settings(options: dict[str, Any]) -> Any:
    from nodes.text_sampling import Sampling

    defaults = Sampling()
    values = {name: options.get(f"sampling_mode.{name}", getattr(defaults, name)) for name in SAMPLING}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise NodeError(f"must be a number, got {value!r}", input_name=f"sampling_mode.{name}")
    if values["temperature"] <= 0:
        raise NodeError("must be above 0 (sampling off is greedy)", input_name="sampling_mode.temperature")
    return Sampling(temperature=float(values["temperature"]), top_k=int(values["top_k"]),
                    top_p=float(values["top_p"]), min_p=float(values["min_p"]),
                    repetition_penalty=float(values["repetition_penalty"]),
                    presence_penalty=float(values["presence_penalty"]), seed=int(values["seed"]))


def _notes(ctx, lm: Any, thinking: Any, use_template: Any, mtp: Any, system_prompt: Any) -> None:
    """Node messages for settings that change nothing here, so nobody waits for an effect."""
    if mtp not in ("off", "auto", None):  # "auto" is the default: say it only where a depth was pinned
        ctx.message(f"mtp {mtp}: no effect, this {lm.name} has no multi-token-prediction weights")
    if thinking and not lm.reasons:
        ctx.message(f"thinking: {lm.name} has no reasoning mode; the setting changes nothing")
    if system_prompt and not use_template:
        ctx.message("system_prompt is ignored: it goes into the default template, which is turned off")


# -- SaveText -----------------------------------------------------------------------------------

FORMATS = ["txt", "md", "json"]


def _save_validate(env: Any, inputs: Any) -> list[tuple[str, str]]:
    from nodes.image import save_validate

    return save_validate(env, inputs)


@define_node(
    "SaveText",
    category="text",
    display_name="Save Text",
    output_node=True,
    inputs=[
        Input("text", T.STRING, force_input=True),
        Input("filename_prefix", T.STRING, default="Kiln", comfy_default="ComfyUI",
              tooltip="File name start; may include a subfolder, always inside the output folder"),
        Input("format", T.COMBO, default="txt", choices=FORMATS),
    ],
    outputs=[Output("text", T.STRING)],
    validate=_save_validate,
)
def save_text(ctx, text: str, filename_prefix: str = "Kiln", format: str = "txt") -> Result:  # noqa: A002
    """Write the text to ``prefix_00001_.<format>`` in the output folder and pass it on. A json file
    holds the text re-indented when it parses as JSON, else the text as it is.

    The prefix follows SaveImage's rules (a subfolder allowed, nothing outside the output folder)
    and files are numbered as Kiln numbers every saved file (ComfyUI names text files
    ``prefix_00001.txt``, without the last underscore), written atomically, never overwritten."""
    from nodes.image import save_folder
    from nodes.image_io import write_numbered_atomic

    if not isinstance(text, str):
        raise NodeError(f"must be a string, got {type(text).__name__}", input_name="text")
    if format not in FORMATS:
        raise NodeError(f"must be one of {', '.join(FORMATS)}, got {format!r}", input_name="format")
    data = text
    if format == "json":
        try:
            data = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        except ValueError:
            pass
    folder, subfolder, base = save_folder(ctx.env, ctx.env.paths.output, filename_prefix, "output")
    name = write_numbered_atomic(folder, base, f".{format}", lambda f: f.write(data.encode("utf-8")))
    return Result(outputs=(text,), ui={"text": [text],
                                       "files": [{"filename": name, "subfolder": subfolder, "type": "output"}]})
