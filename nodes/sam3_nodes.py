"""SAM3_Detect: ComfyUI's text-prompted SAM 3 segmentation, on transformers' Sam3Model.

Inputs, defaults and outputs are ComfyUI's (comfy_extras/nodes_sam3.py), and so is what
it does with them: each image is resized to the model's square input (1008 px on the real
model, bilinear) and normalised to -1..1; each prompt of the conditioning is detected on
its own; a query is kept when the sigmoid of its score is above ``threshold`` (ComfyUI
does not multiply in the presence score, so neither does this), the best ``max_detections``
of them (1 unless the prompt said "name:N"); boxes come back in pixels as
{x, y, width, height, score}; a mask is the detector's mask logits resized to the image
(bilinear) and taken where they are above 0; ``individual_masks`` gives one mask per object
instead of their union.

Pixels: Kiln normalises them to -1..1 (mean 0.5, std 0.5), as Meta's and transformers' SAM 3
processors do. ComfyUI, as read (comfy_extras/nodes_sam3.py, comfy/ldm/sam3/detector.py and sam.py),
hands its ViT the 0..1 pixels: neither the node, SAM3Model.forward / forward_segment, the vision
backbone nor ViTDet.forward (a bias-free patch conv, then the position table) normalises. Kiln keeps
Meta's input because Comfy-Org's file is Meta's checkpoint in Meta's names and layout (class-token row,
fused qkv, RoPE tables), whose weights expect what Meta's processors give; a normalisation folded into
the file (only the position table could hold its offset) cannot be ruled out without the file.

``refine_iterations`` above 0 runs SAM 3's interactive decoder as ComfyUI does (nodes.sam3_refine):
on a crop around each box, seeded with the detector's logits, OR-ed with the coarse mask. The decoder
is loaded into transformers' Sam3TrackerModel (SAM 3's tracker SAM heads, SAM 3.1's interactive
ones); a file without it gives the coarse masks and a node message. Point prompts
(positive_coords / negative_coords) go through the same decoder on the whole image, one mask for
all points, and so do boxes without text, one mask per box (no box dicts come back for them, as in
ComfyUI); boxes together with text are geometry prompts of the detector (its box pooling needs
torchvision).
"""
from __future__ import annotations

from typing import Any

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.handles import ModelHandle

TRACKER_NOTE = ("refine_iterations={n}: the file has no SAM 3 tracker / interactive decoder weights, so these "
                "are the detector's coarse masks (ComfyUI's refine_iterations=0 result)")


def _model(model: Any) -> ModelHandle:
    if not isinstance(model, ModelHandle) or model.family.name != "sam3":
        what = model.family.name if isinstance(model, ModelHandle) else type(model).__name__
        raise NodeError(f"model must be a SAM 3 model (load sam3.1_multiplex_fp16.safetensors or another SAM 3 "
                        f"file with CheckpointLoaderSimple), got a {what} model", input_name="model")
    return model


def text_prompts(conditioning: Any, width: int) -> list[tuple[Any, Any, int]]:
    """[(hidden states [1, T, width], attention mask [1, T], max detections)] from a SAM 3 CLIP's
    conditioning; a conditioning from any other CLIP is an error on ``conditioning``."""
    if not isinstance(conditioning, list) or not conditioning:
        raise NodeError("conditioning is empty: encode a prompt with CLIPTextEncode and the SAM 3 "
                        "checkpoint's CLIP", input_name="conditioning")
    cond, extra = conditioning[0][0], conditioning[0][1]
    entries = extra.get("sam3_multi_cond") or [{"cond": cond, "attention_mask": extra.get("attention_mask"),
                                                "max_detections": 1}]
    out = []
    for entry in entries:
        emb, mask = entry["cond"], entry.get("attention_mask")
        if mask is None or emb.ndim != 3 or emb.shape[-1] != width:
            raise NodeError(f"conditioning must come from the SAM 3 checkpoint's own CLIP (its text is "
                            f"{width} wide, with an attention mask); this one is {emb.shape[-1]} wide"
                            f"{'' if mask is not None else ' without a mask'}: from another CLIP",
                            input_name="conditioning")
        out.append((emb, mask, int(entry.get("max_detections", 1))))
    return out


def _boxes(bboxes: Any, width: int, height: int, frames: int) -> list[Any] | None:
    """Per frame [1, N, 4] normalised (cx, cy, w, h) from ComfyUI's box dicts, as its node accepts them."""
    import torch

    if bboxes is None:
        return None

    def tensor(items: list) -> Any:
        return torch.tensor([[[(d["x"] + d["width"] / 2) / width, (d["y"] + d["height"] / 2) / height,
                               d["width"] / width, d["height"] / height] for d in items]], dtype=torch.float32)

    if isinstance(bboxes, dict):
        return [tensor([bboxes])] * frames
    if isinstance(bboxes, list) and bboxes and isinstance(bboxes[0], list):
        per = [tensor(f) if f else None for f in bboxes]
        return (per + [per[-1]] * frames)[:frames]
    if isinstance(bboxes, list) and bboxes:
        return [tensor(bboxes)] * frames
    return None


def _place(tracker: Any, device: Any) -> None:
    """The interactive decoder's own weights onto ``device``; its ViT is the detector's, which the model
    manager places (moving it here would undo an offload the manager chose)."""
    backbone = tracker.vision_encoder.backbone
    try:
        tracker.vision_encoder.backbone = None
        tracker.to(device=device)
    finally:
        tracker.vision_encoder.backbone = backbone


def _points(positive: Any, negative: Any) -> list[tuple[float, float, int]]:
    """[(x, y, label)] from ComfyUI's JSON point lists (KJNodes' PointsEditor: [{"x": .., "y": ..}]),
    positives (label 1) first, as ComfyUI orders them."""
    import json

    out = []
    for name, value, label in (("positive_coords", positive, 1), ("negative_coords", negative, 0)):
        if value in (None, ""):
            continue
        try:
            items = json.loads(value)
            out += [(float(p["x"]), float(p["y"]), label) for p in items]
        except (ValueError, TypeError, KeyError) as exc:
            raise NodeError(f"{name} must be JSON like [{{\"x\": 10, \"y\": 20}}] ({exc})", input_name=name) from None
    return out


def pixel_values(image: Any, size: int) -> Any:
    """[B, 3, size, size] in -1..1 from IMAGE [B, H, W, C] 0..1: bilinear resize, then SAM 3's
    normalisation (mean 0.5, std 0.5)."""
    import torch.nn.functional as F

    x = image[..., :3].movedim(-1, 1).float()
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


class _Text:
    """What Sam3Model.forward reads from ``text_embeds``: the projected text as ``pooler_output``."""

    def __init__(self, projected: Any) -> None:
        self.pooler_output = projected


def detect_frame(net: Any, frame: Any, prompts: list, threshold: float, size: tuple[int, int],
                 boxes: Any = None) -> tuple[list[dict], list[Any]]:
    """(box dicts, mask logits [H, W]) of one image [1, 3, S, S] for every prompt, ComfyUI's order."""
    import torch
    import torch.nn.functional as F

    height, width = size
    device, dtype = frame.device, next(net.parameters()).dtype
    vision = net.get_vision_features(pixel_values=frame.to(dtype))
    found, masks = [], []
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    for emb, mask, max_det in prompts:
        text = _Text(net.text_projection(emb.to(device=device, dtype=dtype)))
        kwargs = {} if boxes is None else {"input_boxes": boxes.to(device=device, dtype=dtype)}
        out = net(vision_embeds=vision, text_embeds=text, attention_mask=mask.to(device), **kwargs)
        probs = out.pred_logits[0].float().sigmoid().cpu()
        keep = probs > threshold
        kept = probs[keep]
        order = kept.argsort(descending=True)[:max_det]
        chosen = keep.nonzero().flatten()[order]
        for i in chosen.tolist():
            x1, y1, x2, y2 = (out.pred_boxes[0, i].float().cpu() * scale).tolist()
            found.append({"x": x1, "y": y1, "width": x2 - x1, "height": y2 - y1, "score": float(probs[i])})
            logits = F.interpolate(out.pred_masks[0, i][None, None].float(), size=(height, width),
                                   mode="bilinear", align_corners=False)
            masks.append(logits[0, 0].cpu())
    return found, masks


@define_node(
    "SAM3_Detect",
    category="detection",
    display_name="SAM3 Detect",
    inputs=[
        Input("model", T.MODEL, tooltip="A SAM 3 / 3.1 checkpoint's MODEL (CheckpointLoaderSimple)."),
        Input("image", T.IMAGE),
        Input("conditioning", T.CONDITIONING, optional=True,
              tooltip="Text conditioning from CLIPTextEncode with the SAM 3 checkpoint's CLIP: 'guitar', several "
                      "objects 'cat, dog', up to N of one kind 'person:3'."),
        Input("bboxes", T.BOUNDING_BOX, optional=True, tooltip="Bounding boxes to segment within"),
        Input("positive_coords", T.STRING, optional=True, force_input=True,
              tooltip="Positive point prompts as JSON [{\"x\": int, \"y\": int}, ...] (pixel coords)"),
        Input("negative_coords", T.STRING, optional=True, force_input=True,
              tooltip="Negative point prompts as JSON [{\"x\": int, \"y\": int}, ...] (pixel coords)"),
        Input("threshold", T.FLOAT, default=0.5, min=0.0, max=1.0, step=0.01),
        Input("refine_iterations", T.INT, default=2, min=0, max=5,
              tooltip="SAM decoder refinement passes (0=use raw detector masks)"),
        Input("individual_masks", T.BOOLEAN, default=False, tooltip="Output per-object masks instead of union"),
    ],
    outputs=[Output("masks", T.MASK), Output("bboxes", T.BOUNDING_BOX)],
)
def sam3_detect(ctx, model, image, conditioning=None, bboxes=None, positive_coords=None, negative_coords=None,
                threshold: float = 0.5, refine_iterations: int = 2, individual_masks: bool = False):
    """Find and segment what the text names (and what points or text-less boxes mark): masks (union, or one
    per object) and, for the text's detections, boxes per image."""
    import torch

    from nodes.masking import as_image
    from nodes.sam3_refine import prompt_mask, refine

    handle = _model(model)
    image = as_image(image)
    frames, height, width = image.shape[0], image.shape[1], image.shape[2]
    points = _points(positive_coords, negative_coords)
    if conditioning is None and not points and bboxes is None:
        raise NodeError("SAM3_Detect needs something to look for: a text conditioning, boxes or points",
                        input_name="conditioning")
    if not 0.0 <= float(threshold) <= 1.0:
        raise NodeError("threshold must be between 0 and 1", input_name="threshold")
    per_frame_boxes = _boxes(bboxes, width, height, frames)
    if per_frame_boxes is not None and conditioning is not None:
        import importlib.util

        if importlib.util.find_spec("torchvision") is None:
            raise NodeError("box prompts need torchvision (Sam3Model pools the boxes with its roi_align), which "
                            "is not installed here; leave bboxes unconnected", input_name="bboxes")
    iterations = int(refine_iterations)
    all_boxes, all_masks = [], []
    with torch.inference_mode(), handle.unet() as net:
        tracker = getattr(net, "kiln_tracker", None)
        if (points or conditioning is None) and tracker is None:
            what = "point prompts" if points else "boxes without text"
            raise NodeError(f"{what} go through SAM 3's interactive decoder, and this file has none (no "
                            "tracker / interactive decoder weights); describe the object in text instead",
                            input_name=("positive_coords" if positive_coords not in (None, "", "[]")
                                        else "negative_coords") if points else "bboxes")
        if tracker is not None:
            _place(tracker, next(net.parameters()).device)
        elif iterations > 0:
            ctx.message(TRACKER_NOTE.format(n=iterations))
        prompts = text_prompts(conditioning, int(net.config.text_config.hidden_size)) if conditioning is not None else []
        size = int(net.config.vision_config.backbone_config.image_size)
        device = next(net.parameters()).device
        pixels = pixel_values(image, size)
        for b in range(frames):
            frame_boxes = per_frame_boxes[b] if per_frame_boxes is not None else None
            masks = []
            if points:
                masks.append(prompt_mask(tracker, pixels[b:b + 1], (height, width), iterations, points=points))
            if frame_boxes is not None and not prompts:  # ComfyUI: boxes without text are the decoder's
                for cx, cy, bw, bh in frame_boxes[0].tolist():
                    xyxy = ((cx - bw / 2) * width, (cy - bh / 2) * height, (cx + bw / 2) * width,
                            (cy + bh / 2) * height)
                    masks.append(prompt_mask(tracker, pixels[b:b + 1], (height, width), iterations, box=xyxy))
            found = []
            if prompts:
                found, logits = detect_frame(net, pixels[b:b + 1].to(device), prompts, float(threshold),
                                             (height, width), frame_boxes)
                for box, coarse in zip(found, logits):
                    if tracker is None or iterations <= 0:
                        masks.append((coarse > 0).float())
                        continue
                    xyxy = (box["x"], box["y"], box["x"] + box["width"], box["y"] + box["height"])
                    masks.append(refine(tracker, image[b], coarse, xyxy, iterations,
                                        lambda crop: pixel_values(crop, size)))
            all_boxes.append(found)
            if masks:
                stacked = torch.stack(masks)
                all_masks.append(stacked if individual_masks else (stacked > 0).any(dim=0).float())
            else:
                all_masks.append(torch.zeros(0, height, width) if individual_masks else torch.zeros(height, width))
    out = torch.cat(all_masks, dim=0) if individual_masks else torch.stack(all_masks)
    return (out, all_boxes)
