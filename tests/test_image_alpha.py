"""Alpha, Porter-Duff, morphology and YUV nodes (nodes/image_alpha.py): round trips, every Porter-Duff
mode at a pixel worked out by hand, morphology against a windowed reference, YUV at known colours."""
from __future__ import annotations

import itertools

import pytest
import torch

from engine.context import Environment, NodeError
from engine.executor import Executor
from engine.registry import default_registry
from engine.workflow import parse
from node_call import Called, call
from nodes import image_alpha as ia


def run(spec, record: Called | None = None, **inputs):
    return call(spec, None, record, **inputs)


def _random(shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def test_declarations_follow_comfyui():
    registry = default_registry()
    for name in ("JoinImageWithAlpha", "SplitImageWithAlpha", "PorterDuffImageComposite", "Morphology",
                 "ImageRGBToYUV", "ImageYUVToRGB"):
        assert registry.get(name) is not None and registry.get(name).signature_mismatches() == []
    pd = registry.get("PorterDuffImageComposite").object_info()
    assert pd["input_order"]["required"] == ["source", "source_alpha", "destination", "destination_alpha", "mode"]
    assert pd["input"]["required"]["mode"] == [
        ["ADD", "CLEAR", "DARKEN", "DST", "DST_ATOP", "DST_IN", "DST_OUT", "DST_OVER", "LIGHTEN", "MULTIPLY",
         "OVERLAY", "SCREEN", "SRC", "SRC_ATOP", "SRC_IN", "SRC_OUT", "SRC_OVER", "XOR"], {"default": "DST"}]
    assert pd["output"] == ["IMAGE", "MASK"] and pd["category"] == "mask/compositing"
    morph = registry.get("Morphology").object_info()
    assert morph["input"]["required"]["operation"][0] == ["erode", "dilate", "open", "close", "gradient",
                                                         "bottom_hat", "top_hat"]
    assert morph["input"]["required"]["kernel_size"] == ["INT", {"default": 3, "min": 3, "max": 999, "step": 1}]
    assert registry.get("ImageRGBToYUV").object_info()["output_name"] == ["Y", "U", "V"]
    assert registry.get("ImageYUVToRGB").object_info()["input_order"]["required"] == ["Y", "U", "V"]


def test_split_then_join_gives_the_image_back_and_join_then_split_the_mask():
    rgba = _random((2, 5, 7, 4))
    colour, mask = run(ia.split_image_with_alpha, image=rgba)
    assert colour.shape == (2, 5, 7, 3) and torch.allclose(mask, 1 - rgba[..., 3])
    (joined,) = run(ia.join_image_with_alpha, image=colour, alpha=mask)
    assert torch.allclose(joined, rgba, atol=1e-6)
    rgb, hole = _random((1, 4, 4, 3), 1), _random((1, 4, 4), 2)
    back_colour, back_mask = run(ia.split_image_with_alpha, image=run(ia.join_image_with_alpha, image=rgb,
                                                                      alpha=hole)[0])
    assert torch.equal(back_colour, rgb) and torch.allclose(back_mask, hole, atol=1e-6)
    _, opaque = run(ia.split_image_with_alpha, image=rgb)  # no alpha channel: nothing transparent
    assert torch.equal(opaque, torch.zeros(1, 4, 4))
    (grey,) = run(ia.join_image_with_alpha, image=torch.full((1, 4, 4, 1), 0.5), alpha=hole)
    assert grey.shape == (1, 4, 4, 4) and torch.equal(grey[..., 2], torch.full((1, 4, 4), 0.5))


def test_join_repeats_the_shorter_batch_and_fits_the_mask_by_kilns_rule():
    (out,) = run(ia.join_image_with_alpha, image=torch.zeros(3, 4, 4, 3), alpha=torch.tensor([[[0.25]]]))
    assert out.shape == (3, 4, 4, 4) and torch.allclose(out[..., 3], torch.full((3, 4, 4), 0.75))
    masks = torch.stack([torch.zeros(4, 4), torch.ones(4, 4)])
    (cycled,) = run(ia.join_image_with_alpha, image=torch.zeros(1, 4, 4, 3), alpha=masks)
    assert cycled.shape[0] == 2 and cycled[0, 0, 0, 3] == 1 and cycled[1, 0, 0, 3] == 0
    record = Called()
    half = torch.zeros(1, 2, 2)
    half[:, :, 1] = 1
    (scaled,) = run(ia.join_image_with_alpha, record, image=torch.zeros(1, 4, 4, 3), alpha=half)
    assert scaled.shape == (1, 4, 4, 4) and any("resized" in m for m in record.messages)
    with pytest.raises(NodeError) as err:  # another shape: ComfyUI would stretch it
        run(ia.join_image_with_alpha, image=torch.zeros(1, 4, 8, 3), alpha=torch.eye(4)[None])
    assert err.value.input_name == "alpha"


# source colour 0.8 at alpha 0.5, destination 0.4 at alpha 0.75 (premultiplied 0.4 and 0.3): each mode's
# (colour, alpha) worked out by hand from ComfyUI's formulas, the colour divided back by the alpha.
HAND = {
    "ADD": (0.7, 1.0), "CLEAR": (0.0, 0.0), "DARKEN": (0.55 / 0.875, 0.875), "DST": (0.4, 0.75),
    "DST_ATOP": (0.5, 0.5), "DST_IN": (0.4, 0.375), "DST_OUT": (0.4, 0.375), "DST_OVER": (0.4 / 0.875, 0.875),
    "LIGHTEN": (0.65 / 0.875, 0.875), "MULTIPLY": (0.32, 0.375), "OVERLAY": (0.24 / 0.875, 0.875),
    "SCREEN": (0.58 / 0.875, 0.875), "SRC": (0.8, 0.5), "SRC_ATOP": (0.6, 0.75), "SRC_IN": (0.8, 0.375),
    "SRC_OUT": (0.8, 0.125), "SRC_OVER": (0.55 / 0.875, 0.875), "XOR": (0.5, 0.5),
}


@pytest.mark.parametrize("mode", sorted(HAND))
def test_porter_duff_modes_at_a_known_pixel(mode):
    image, mask = run(ia.porter_duff_image_composite, source=torch.full((1, 2, 2, 3), 0.8),
                      source_alpha=torch.full((1, 2, 2), 0.5), destination=torch.full((1, 2, 2, 3), 0.4),
                      destination_alpha=torch.full((1, 2, 2), 0.25), mode=mode)
    colour, alpha = HAND[mode]
    assert image.shape == (1, 2, 2, 3) and mask.shape == (1, 2, 2)
    assert torch.allclose(image, torch.full_like(image, colour), atol=1e-6), (mode, float(image[0, 0, 0, 0]))
    assert torch.allclose(mask, torch.full_like(mask, 1 - alpha), atol=1e-6)


def test_porter_duff_overlay_light_branch_resizing_and_refusals():
    # destination 0.9 at alpha 0.75: 2 * 0.675 >= 0.75, so 0.375 - 2 (0.75 - 0.4)(0.5 - 0.675) = 0.4975
    image, _ = run(ia.porter_duff_image_composite, source=torch.full((1, 1, 1, 3), 0.8),
                   source_alpha=torch.full((1, 1, 1), 0.5), destination=torch.full((1, 1, 1, 3), 0.9),
                   destination_alpha=torch.full((1, 1, 1), 0.25), mode="OVERLAY")
    assert abs(float(image[0, 0, 0, 0]) - 0.4975 / 0.875) < 1e-6
    record = Called()
    image, mask = run(ia.porter_duff_image_composite, record, source=torch.full((3, 2, 2, 3), 1.0),
                      source_alpha=torch.zeros(3, 2, 2), destination=torch.zeros(2, 6, 6, 3),
                      destination_alpha=torch.zeros(2, 1, 1), mode="SRC_OVER")
    assert image.shape == (2, 6, 6, 3) and torch.allclose(image, torch.ones_like(image))
    assert torch.allclose(mask, torch.zeros(2, 6, 6), atol=1e-6)
    assert any("source scaled" in m for m in record.messages) and any("first 2" in m for m in record.messages)
    with pytest.raises(NodeError) as err:
        run(ia.porter_duff_image_composite, source=torch.zeros(1, 2, 2, 4), source_alpha=torch.zeros(1, 2, 2),
            destination=torch.zeros(1, 2, 2, 3), destination_alpha=torch.zeros(1, 2, 2), mode="SRC")
    assert err.value.input_name == "source"


def _reference(image, operation: str, k: int):
    """Morphology by its definition: min/max over each pixel's k x k window (inputs i - k//2 ..
    i - k//2 + k - 1), pixels outside the image ignored; openings etc. composed from those."""
    def extreme(x, pick):
        h, w = x.shape[1:3]
        out = torch.empty_like(x)
        for i, j in itertools.product(range(h), range(w)):
            rows = slice(max(i - k // 2, 0), min(i - k // 2 + k, h))
            cols = slice(max(j - k // 2, 0), min(j - k // 2 + k, w))
            window = x[:, rows, cols, :].reshape(x.shape[0], -1, x.shape[3])
            out[:, i, j, :] = pick(window)
        return out

    def dil(x):
        return extreme(x, lambda v: v.amax(dim=1))

    def ero(x):
        return extreme(x, lambda v: v.amin(dim=1))

    return {"erode": ero, "dilate": dil, "open": lambda x: dil(ero(x)), "close": lambda x: ero(dil(x)),
            "gradient": lambda x: dil(x) - ero(x), "top_hat": lambda x: x - dil(ero(x)),
            "bottom_hat": lambda x: ero(dil(x)) - x}[operation](image)


@pytest.mark.parametrize("k", [3, 4])
def test_morphology_matches_the_windowed_definition(k):
    image = _random((1, 6, 7, 3), 3)
    for operation in ia.MORPHOLOGY_OPERATIONS:
        (out,) = run(ia.morphology, image=image, operation=operation, kernel_size=k)
        assert torch.allclose(out, _reference(image, operation, k), atol=1e-6), (operation, k)


def test_morphology_on_shapes():
    dot = torch.zeros(1, 9, 9, 3)
    dot[0, 4, 4] = 1.0
    (grown,) = run(ia.morphology, image=dot, operation="dilate", kernel_size=3)
    assert torch.equal(grown[0, :, :, 0].nonzero().unique(dim=0), torch.tensor(list(itertools.product(range(3, 6),
                                                                                                   range(3, 6)))))
    (even,) = run(ia.morphology, image=dot, operation="dilate", kernel_size=4)  # window i-2..i+1: rows 3..6
    assert even[0, :, 4, 0].nonzero().flatten().tolist() == [3, 4, 5, 6]
    assert float(run(ia.morphology, image=dot, operation="erode", kernel_size=3)[0].max()) == 0.0
    assert torch.equal(run(ia.morphology, image=dot, operation="top_hat", kernel_size=3)[0], dot)
    white = torch.ones(1, 5, 5, 3)  # geodesic border: the edge is not darkened by erosion
    assert torch.equal(run(ia.morphology, image=white, operation="erode", kernel_size=5)[0], white)
    hole = white.clone()
    hole[0, 2, 2] = 0.0
    assert torch.equal(run(ia.morphology, image=hole, operation="close", kernel_size=3)[0], white)
    assert torch.equal(run(ia.morphology, image=hole, operation="bottom_hat", kernel_size=3)[0], white - hole)


def test_yuv_at_known_colours_and_the_round_trip():
    red = torch.zeros(1, 1, 1, 3)
    red[..., 0] = 1.0
    y, u, v = run(ia.image_rgb_to_yuv, image=red)
    assert y.shape == (1, 1, 1, 3) and torch.equal(y[..., 0], y[..., 2])  # grey images
    assert abs(float(y[0, 0, 0, 0]) - 0.299) < 1e-6
    assert abs(float(u[0, 0, 0, 0]) - (0.5 - 0.299 * 0.564)) < 1e-6
    assert abs(float(v[0, 0, 0, 0]) - (0.5 + 0.701 * 0.713)) < 1e-6
    grey = torch.full((1, 1, 1, 4), 0.3)  # alpha is dropped; grey has centred chroma
    y, u, v = run(ia.image_rgb_to_yuv, image=grey)
    assert y.shape[-1] == 3 and abs(float(y[0, 0, 0, 0]) - 0.3) < 1e-6 and abs(float(u[0, 0, 0, 0]) - 0.5) < 1e-6
    image = _random((2, 8, 8, 3), 4)
    (back,) = run(ia.image_yuv_to_rgb, **dict(zip("YUV", run(ia.image_rgb_to_yuv, image=image))))
    assert (back - image).abs().max() < 1 / 255
    planes = run(ia.image_rgb_to_yuv, image=image)
    (single,) = run(ia.image_yuv_to_rgb, **{n: p[..., :1] for n, p in zip("YUV", planes)})
    assert torch.allclose(single, back)
    with pytest.raises(NodeError) as err:
        run(ia.image_yuv_to_rgb, Y=planes[0], U=planes[1][:1], V=planes[2])
    assert err.value.input_name == "U"


def test_the_nodes_run_in_a_workflow(tmp_path):
    doc = {"version": 1, "nodes": {
        "1": {"type": "EmptyImage", "inputs": {"width": 8, "height": 6, "batch_size": 1, "color": 0xFF0000}},
        "2": {"type": "SplitImageWithAlpha", "inputs": {"image": ["1", 0]}},
        "3": {"type": "JoinImageWithAlpha", "inputs": {"image": ["2", 0], "alpha": ["2", 1]}},
        "4": {"type": "Morphology", "inputs": {"image": ["3", 0], "operation": "dilate", "kernel_size": 3}},
        "5": {"type": "ImageRGBToYUV", "inputs": {"image": ["4", 0]}},
        "6": {"type": "ImageYUVToRGB", "inputs": {"Y": ["5", 0], "U": ["5", 1], "V": ["5", 2]}},
        "7": {"type": "PorterDuffImageComposite", "inputs": {"source": ["6", 0], "source_alpha": ["2", 1],
                                                              "destination": ["2", 0], "destination_alpha": ["2", 1],
                                                              "mode": "SRC_OVER"}},
        "8": {"type": "GetImageSize", "inputs": {"image": ["7", 0]}},
        "9": {"type": "PreviewAny", "inputs": {"source": ["8", 0]}}}}
    outcome = Executor(default_registry(), Environment.for_folder(tmp_path)).run(parse(doc))
    assert outcome.status == "succeeded", outcome.error
    assert outcome.outputs["9"] == {"text": ["8"]}
