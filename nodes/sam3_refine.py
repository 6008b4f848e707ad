"""SAM3_Detect's second stage: SAM 3's interactive decoder (transformers' Sam3TrackerModel, loaded by
nodes.checkpoint.sam3_tracker) run as ComfyUI's ``SAM3Model.forward_segment`` and node run it.

One decoder pass (:func:`segment`) is ComfyUI's ``forward_sam_heads``: the mask prompt (logits at the
model's input size) is resized to 4x the feature grid (bilinear, antialiased), points get SAM's
padding point; without points the single-mask token is read (with one point, the best of the three
multimask outputs by predicted IoU); a mask whose object score is not above 0 becomes -1024
everywhere; the low-resolution logits are resized to the input size (bilinear).

:func:`refine` is ComfyUI's ``_refine_mask``: a crop around the detection box (10 % of the box's size
added on each side, clipped to the image), resized to the input size; the coarse logits (the
detector's, at image size) cropped alike are the first mask prompt, each pass's output the next;
the last output, resized back into the crop, is OR-ed with the coarse mask. :func:`prompt_mask` is
ComfyUI's point and box paths (prompts without text) on the whole image.
"""
from __future__ import annotations

from typing import Any

NO_OBJECT = -1024.0  # ComfyUI's (and SAM 2's) NO_OBJ_SCORE
PAD = 0.1


class Decoder:
    """One image's features for repeated decoder passes (ComfyUI recomputes them on every pass; they
    are the same each time, so they are computed once)."""

    def __init__(self, tracker: Any, pixels: Any) -> None:
        self.tracker, self.pixels, self.embeddings = tracker, pixels, None
        self.size = int(tracker.config.prompt_encoder_config.image_size)

    def segment(self, mask: Any = None, points: Any = None, labels: Any = None, box: Any = None) -> Any:
        """[1, 1, size, size] mask logits for the prompts: ``mask`` [1, 1, h, w] logits, ``points``
        [1, N, 2] in input-size pixels with ``labels`` [1, N] (1 positive, 0 negative), ``box`` [1, 4]
        x1, y1, x2, y2 in input-size pixels. (A box's tokens come in another order than in ComfyUI's
        prompt encoder, the padding point last instead of first; the decoder's attention does not
        depend on the order of the prompt tokens.)"""
        import torch
        import torch.nn.functional as F

        tracker = self.tracker
        dtype = next(tracker.mask_decoder.parameters()).dtype
        kwargs: dict[str, Any] = {"multimask_output": points is not None and points.shape[1] == 1}
        if self.embeddings is None:
            kwargs["pixel_values"] = self.pixels.to(dtype)
        else:
            kwargs["image_embeddings"] = self.embeddings
        if mask is not None:
            grid = tracker.prompt_encoder.mask_input_size
            if tuple(mask.shape[-2:]) != tuple(grid):
                mask = F.interpolate(mask.float(), size=grid, mode="bilinear", align_corners=False, antialias=True)
            kwargs["input_masks"] = mask.to(dtype)
        if points is not None:
            kwargs["input_points"] = points[:, None].to(dtype)
            kwargs["input_labels"] = labels[:, None].to(torch.int32)
        if box is not None:
            kwargs["input_boxes"] = box[:, None].to(dtype)
        out = tracker(**kwargs)
        if self.embeddings is None:
            self.embeddings = out.image_embeddings
        masks = out.pred_masks[:, 0].float()  # [1, 1 or 3, h, w]
        if kwargs["multimask_output"]:
            best = out.iou_scores[:, 0].float().argmax(dim=-1)
            masks = masks[torch.arange(masks.shape[0]), best][:, None]
        present = out.object_score_logits[:, 0].float() > 0  # [1, 1]
        masks = torch.where(present[:, :, None, None], masks, torch.full_like(masks, NO_OBJECT))
        return F.interpolate(masks, size=(self.size, self.size), mode="bilinear", align_corners=False)


def crop_box(box: tuple[float, float, float, float], height: int, width: int) -> tuple[int, int, int, int] | None:
    """ComfyUI's crop around a detection box (x1, y1, x2, y2) in pixels; None where it is empty."""
    x1, y1, x2, y2 = box
    bw, bh = x2 - x1, y2 - y1
    cx1, cy1 = max(0, int(x1 - bw * PAD)), max(0, int(y1 - bh * PAD))
    cx2, cy2 = min(width, int(x2 + bw * PAD)), min(height, int(y2 + bh * PAD))
    return None if cx2 <= cx1 or cy2 <= cy1 else (cx1, cy1, cx2, cy2)


def refine(tracker: Any, image: Any, coarse: Any, box: tuple[float, float, float, float], iterations: int,
           to_pixels: Any) -> Any:
    """[H, W] 0/1: the coarse logits ``coarse`` [H, W] refined in a crop of ``image`` [H, W, C] 0..1
    around ``box`` by ``iterations`` decoder passes, OR-ed with the coarse mask. ``to_pixels``
    (IMAGE [1, h, w, C] -> [1, 3, S, S]) makes the decoder's input, as for the detector."""
    import torch.nn.functional as F

    height, width = coarse.shape
    base = (coarse > 0).float()
    crop = crop_box(box, height, width) if iterations > 0 else None
    if crop is None:
        return base
    cx1, cy1, cx2, cy2 = crop
    # ComfyUI maps the crop into the coarse mask's grid; at image size this is the same rectangle
    mx1, my1, mx2, my2 = int(cx1 / width * width), int(cy1 / height * height), \
        int(cx2 / width * width), int(cy2 / height * height)
    if mx2 <= mx1 or my2 <= my1:
        return base
    device = next(tracker.mask_decoder.parameters()).device
    decoder = Decoder(tracker, to_pixels(image[None, cy1:cy2, cx1:cx2]).to(device))
    logits = coarse[my1:my2, mx1:mx2][None, None].float().to(device)
    for _ in range(iterations):
        prompt = F.interpolate(logits, size=(decoder.size, decoder.size), mode="bilinear", align_corners=False)
        logits = decoder.segment(mask=prompt)
    inside = F.interpolate(logits, size=(cy2 - cy1, cx2 - cx1), mode="bilinear", align_corners=False)[0, 0].cpu()
    out = base.clone()
    out[cy1:cy2, cx1:cx2] = ((inside > 0) | (base[cy1:cy2, cx1:cx2] > 0)).float()
    return out


def prompt_mask(tracker: Any, pixels: Any, size: tuple[int, int], iterations: int,
                points: list[tuple[float, float, int]] | None = None,
                box: tuple[float, float, float, float] | None = None) -> Any:
    """[H, W] 0/1 from point prompts (x, y in image pixels, label) or one box (x1, y1, x2, y2 in image
    pixels) on the whole image ``pixels`` [1, 3, S, S]: one pass with the prompt, then
    ``iterations - 1`` passes on the mask alone (ComfyUI's point and box paths)."""
    import torch
    import torch.nn.functional as F

    height, width = size
    device = next(tracker.mask_decoder.parameters()).device
    decoder = Decoder(tracker, pixels.to(device))
    s = decoder.size
    if points:
        coords = torch.tensor([[[x / width * s, y / height * s] for x, y, _ in points]], device=device)
        labels = torch.tensor([[lab for _, _, lab in points]], device=device)
        logits = decoder.segment(points=coords, labels=labels)
    else:
        x1, y1, x2, y2 = box
        logits = decoder.segment(box=torch.tensor([[x1 / width * s, y1 / height * s, x2 / width * s,
                                                    y2 / height * s]], device=device))
    for _ in range(max(0, iterations - 1)):
        logits = decoder.segment(mask=logits)
    return (F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)[0, 0] > 0).float().cpu()
