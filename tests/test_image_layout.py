"""ImageScaleToMaxDimension, ResizeAndPadImage, ImageStitch, ImageAddNoise (nodes/image_layout.py) and
ImageColorToMask, MaskPreview (nodes/masks.py) against sizes and pixels worked out by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from engine.context import Environment, NodeError
from engine.registry import default_registry
from node_call import Called, call
from nodes import image_layout as lay
from nodes import masks


@pytest.fixture
def env(tmp_path) -> Environment:
    return Environment.for_folder(tmp_path / "data")


def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def _error(fn, env, **inputs) -> str:
    with pytest.raises(NodeError) as err:
        call(fn, env, **inputs)
    return err.value.input_name


def test_declarations_read_as_comfyuis():
    info = {name: spec.object_info() for name, spec in ((s.type, s) for s in default_registry())
            if name in ("ImageScaleToMaxDimension", "ResizeAndPadImage", "ImageStitch", "ImageAddNoise",
                        "ImageColorToMask", "MaskPreview")}
    assert info["ImageStitch"]["input_order"] == {
        "required": ["image1", "direction", "match_image_size", "spacing_width", "spacing_color"],
        "optional": ["image2"]}
    assert info["ImageStitch"]["input"]["required"]["spacing_width"][1] | {"tooltip": ""} == \
        {"default": 0, "min": 0, "max": 1024, "step": 2, "tooltip": ""}
    assert info["ImageScaleToMaxDimension"]["input"]["required"]["upscale_method"][0] == \
        ["area", "lanczos", "bilinear", "nearest-exact", "bilinear", "bicubic"]
    assert info["ResizeAndPadImage"]["input_order"]["required"] == \
        ["image", "target_width", "target_height", "padding_color", "interpolation"]
    seed = info["ImageAddNoise"]["input"]["required"]["seed"][1]
    assert (seed["max"], seed["control_after_generate"]) == (2**64 - 1, True)
    assert info["ImageColorToMask"]["input"]["required"]["color"][1]["max"] == 0xFFFFFF
    # ComfyUI's newer MaskPreview passes the mask on (its SAM 3 and Anima inpainting templates link from it)
    assert info["MaskPreview"]["output_node"] and info["MaskPreview"]["output"] == ["MASK"]


# -- ImageScaleToMaxDimension ------------------------------------------------------------

def test_max_dimension_puts_the_longer_side_at_largest_size(env):
    fn = lay.image_scale_to_max_dimension
    (wide,) = call(fn, env, image=torch.full((2, 30, 60, 3), 0.25), upscale_method="area", largest_size=100)
    assert wide.shape == (2, 50, 100, 3) and torch.allclose(wide, torch.full_like(wide, 0.25))
    # 5/20 * 10 = 2.5: Python's round (ComfyUI's too) takes the even neighbour, 2
    (tall,) = call(fn, env, image=_random(1, 20, 5, 3), upscale_method="bilinear", largest_size=10)
    assert tall.shape == (1, 10, 2, 3)
    checker = torch.tensor([[0.0, 1.0], [1.0, 0.0]])[None, :, :, None].expand(1, 2, 2, 3)
    (square,) = call(fn, env, image=checker, upscale_method="nearest-exact", largest_size=4)
    assert torch.equal(square[0, :, :, 0], torch.tensor([[0.0, 0, 1, 1], [0, 0, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]))
    (down,) = call(fn, env, image=_random(1, 40, 32, 4), upscale_method="lanczos", largest_size=20)
    assert down.shape == (1, 20, 16, 4)


def test_max_dimension_refuses_zero_a_bad_method_and_an_image_over_budget(env):
    image = _random(1, 8, 8, 3)
    assert _error(lay.image_scale_to_max_dimension, env, image=image, upscale_method="area", largest_size=0) \
        == "largest_size"
    assert _error(lay.image_scale_to_max_dimension, env, image=image, upscale_method="bislerp",
                  largest_size=8) == "upscale_method"
    env.settings.max_image_pixels = 100
    assert _error(lay.image_scale_to_max_dimension, env, image=image, upscale_method="area", largest_size=11) \
        == "largest_size"


# -- ResizeAndPadImage -------------------------------------------------------------------

def test_resize_and_pad_centres_the_image_on_the_padding_colour(env):
    image = _random(1, 8, 16, 3)
    # scale min(16/16, 32/8) = 1: the image keeps its size, centred at row (32 - 8) // 2 = 12
    (out,) = call(lay.resize_and_pad_image, env, image=image, target_width=16, target_height=32,
                  padding_color="white", interpolation="bicubic")
    assert out.shape == (1, 32, 16, 3)
    assert torch.equal(out[:, 12:20], image)
    assert (out[:, :12] == 1.0).all() and (out[:, 20:] == 1.0).all()
    # 30x20 into 50x50: scale 50/30, heights int(20 * 5/3) = 33, top (50 - 33) // 2 = 8
    (black,) = call(lay.resize_and_pad_image, env, image=torch.full((2, 20, 30, 3), 0.6), target_width=50,
                    target_height=50, padding_color="black", interpolation="nearest-exact")
    assert black.shape == (2, 50, 50, 3)
    rows = black[0, :, 25, 0]
    assert (rows[:8] == 0).all() and torch.allclose(rows[8:41], torch.full((33,), 0.6)) and (rows[41:] == 0).all()
    rgba = torch.cat([torch.full((1, 4, 8, 3), 0.2), torch.full((1, 4, 8, 1), 0.5)], dim=-1)
    (padded,) = call(lay.resize_and_pad_image, env, image=rgba, target_width=8, target_height=8,
                     padding_color="white", interpolation="area")
    assert torch.equal(padded[0, 0, 0], torch.ones(4)) and torch.equal(padded[0, 4, 0], rgba[0, 0, 0])


def test_resize_and_pad_refuses_unknown_choices(env):
    image = _random(1, 8, 8, 3)
    assert _error(lay.resize_and_pad_image, env, image=image, target_width=8, target_height=8,
                  padding_color="grey", interpolation="area") == "padding_color"
    assert _error(lay.resize_and_pad_image, env, image=image, target_width=8, target_height=8,
                  padding_color="white", interpolation="bislerp") == "interpolation"


# -- ImageStitch -------------------------------------------------------------------------

def _stitch(env, image1, image2=None, direction="right", match=True, spacing=0, colour="white"):
    (out,) = call(lay.image_stitch, env, image1=image1, image2=image2, direction=direction, match_image_size=match,
                  spacing_width=spacing, spacing_color=colour)
    return out


def test_stitched_halves_equal_their_inputs_in_every_direction(env):
    a, b = _random(1, 8, 6, 3, seed=1), _random(1, 8, 4, 3, seed=2)
    right = _stitch(env, a, b)
    assert right.shape == (1, 8, 10, 3) and torch.equal(right[:, :, :6], a) and torch.equal(right[:, :, 6:], b)
    left = _stitch(env, a, b, direction="left")
    assert torch.equal(left[:, :, :4], b) and torch.equal(left[:, :, 4:], a)
    c = _random(1, 3, 6, 3, seed=3)
    down = _stitch(env, a, c, direction="down")
    assert down.shape == (1, 11, 6, 3) and torch.equal(down[:, :8], a) and torch.equal(down[:, 8:], c)
    up = _stitch(env, a, c, direction="up")
    assert torch.equal(up[:, :3], c) and torch.equal(up[:, 3:], a)
    assert _stitch(env, a) is a  # no image2: image1 unchanged


def test_match_image_size_scales_image2_to_image1s_side(env):
    a = _random(1, 6, 8, 3)
    # down: width 8, height int(8 / (4/3)) = 6
    down = _stitch(env, a, torch.full((1, 3, 4, 3), 0.4), direction="down")
    assert down.shape == (1, 12, 8, 3) and torch.equal(down[:, :6], a)
    assert torch.allclose(down[:, 6:], torch.full((1, 6, 8, 3), 0.4), atol=1 / 255)
    # right: height 6, width int(6 * 5/3) = 10
    right = _stitch(env, a, torch.full((1, 3, 5, 3), 0.7))
    assert right.shape == (1, 6, 18, 3) and torch.allclose(right[:, :, 8:], torch.full((1, 6, 10, 3), 0.7),
                                                           atol=1 / 255)


def test_unmatched_sizes_are_centred_on_padding_and_the_spacer_has_its_colour(env):
    a, b = _random(1, 8, 6, 3, seed=4), _random(1, 4, 6, 3, seed=5)
    white = _stitch(env, a, b, match=False)
    assert white.shape == (1, 8, 12, 3)
    assert (white[:, :2, 6:] == 1).all() and torch.equal(white[:, 2:6, 6:], b) and (white[:, 6:, 6:] == 1).all()
    red = _stitch(env, a, b, match=False, spacing=3, colour="red")  # 3 is raised to 4; red pads with black
    assert red.shape == (1, 8, 16, 3)
    assert torch.equal(red[0, :, 6:10], torch.tensor([1.0, 0.0, 0.0]).expand(8, 4, 3))
    assert (red[:, :2, 10:] == 0).all() and torch.equal(red[:, 2:6, 10:], b)
    wide = _stitch(env, b, _random(1, 2, 2, 3), direction="down", match=False, colour="black")
    assert wide.shape == (1, 6, 6, 3) and (wide[:, 4:, :2] == 0).all() and (wide[:, 4:, 4:] == 0).all()


def test_batches_and_alpha_are_matched_and_other_channel_counts_refused(env):
    a = _random(2, 4, 4, 3, seed=6)
    b = torch.cat([_random(1, 4, 4, 3, seed=7), torch.full((1, 4, 4, 1), 0.5)], dim=-1)
    out = _stitch(env, a, b, spacing=2, colour="blue")
    assert out.shape == (2, 4, 10, 4)
    assert torch.equal(out[1, :, 6:], b[0]) and torch.equal(out[:, :, :4, :3], a)
    assert (out[:, :, :4, 3] == 1).all()  # the RGB image is opaque
    assert torch.equal(out[0, 0, 4], torch.tensor([0.0, 0.0, 1.0, 1.0]))  # blue spacer, opaque
    assert _error(lay.image_stitch, env, image1=a, image2=_random(1, 4, 4, 1), direction="right",
                  match_image_size=True, spacing_width=0, spacing_color="white") == "image2"
    assert _error(lay.image_stitch, env, image1=a, image2=a, direction="right", match_image_size=True,
                  spacing_width=0, spacing_color="purple") == "spacing_color"
    assert _error(lay.image_stitch, env, image1=a, image2=a, direction="across", match_image_size=True,
                  spacing_width=0, spacing_color="white") == "direction"


# -- ImageAddNoise -----------------------------------------------------------------------

def _censored_std(strength: float, room: float) -> float:
    """Std of clip(strength * Z, -room, room) for a standard normal Z (the clip at 0 and 1 around 0.5)."""
    c = room / strength
    phi = math.exp(-c * c / 2) / math.sqrt(2 * math.pi)
    inside = math.erf(c / math.sqrt(2))  # P(|Z| < c)
    second = inside - 2 * c * phi + c * c * (1 - inside)  # E[Z^2; |Z|<c] + c^2 P(|Z|>c)
    return strength * math.sqrt(second)


def test_noise_has_comfyuis_spread_and_draw(env):
    grey = torch.full((1, 64, 64, 3), 0.5)
    (small,) = call(lay.image_add_noise, env, image=grey, seed=3, strength=0.1)
    assert abs(float(small.std()) - _censored_std(0.1, 0.5)) < 0.003 and abs(float(small.mean()) - 0.5) < 0.003
    (big,) = call(lay.image_add_noise, env, image=grey, seed=3, strength=0.5)
    assert abs(_censored_std(0.5, 0.5) - 0.359) < 0.001  # clipped at one sigma: 0.5 * 0.718
    assert abs(float(big.std()) - 0.359) < 0.006 and big.min() == 0 and big.max() == 1
    # ComfyUI: torch.manual_seed(seed), then randn of the image's size on the CPU, clipped
    state = torch.random.get_rng_state()
    expected = torch.clamp(grey + 0.5 * torch.randn(grey.size(), generator=torch.manual_seed(3)), 0, 1)
    torch.random.set_rng_state(state)
    assert torch.equal(big, expected)
    before = torch.random.get_rng_state()
    (again,) = call(lay.image_add_noise, env, image=grey, seed=3, strength=0.5)
    assert torch.equal(again, big) and torch.equal(torch.random.get_rng_state(), before)
    (other,) = call(lay.image_add_noise, env, image=grey, seed=4, strength=0.5)
    assert not torch.equal(other, big)
    (none,) = call(lay.image_add_noise, env, image=grey, seed=2**64 - 1, strength=0.0)
    assert torch.equal(none, grey)
    assert _error(lay.image_add_noise, env, image=grey, seed=-1, strength=0.5) == "seed"


# -- ImageColorToMask, MaskPreview --------------------------------------------------------

def test_colour_to_mask_picks_exactly_the_pixels_of_that_colour(env):
    image = torch.zeros(2, 4, 5, 4)
    orange = torch.tensor([255, 128, 0]) / 255
    image[0, 1, 2, :3] = orange
    image[1, 3, 4, :3] = orange + torch.tensor([0.0, 0.001, 0.0])  # rounds to the same 8-bit colour
    image[0, 0, 0, :3] = torch.tensor([255, 128, 1]) / 255  # one level off in blue
    image[1, 0, 0, :3] = torch.tensor([255, 127, 0]) / 255  # one level off in green
    image[..., 3] = 0.3  # alpha is not part of the colour
    (mask,) = call(masks.image_color_to_mask, env, image=image, color=0xFF8000)
    expected = torch.zeros(2, 4, 5)
    expected[0, 1, 2] = expected[1, 3, 4] = 1.0
    assert mask.dtype == torch.float32 and torch.equal(mask, expected)
    (black,) = call(masks.image_color_to_mask, env, image=image, color=0)
    assert int(black.sum()) == 2 * 4 * 5 - 4
    assert _error(masks.image_color_to_mask, env, image=image, color=0x1000000) == "color"
    assert _error(masks.image_color_to_mask, env, image=torch.zeros(1, 4, 4, 1), color=0) == "image"


def test_mask_preview_writes_grey_pngs_to_temp_and_passes_the_mask_on(env):
    mask = torch.zeros(2, 6, 8)
    mask[0, :, :4] = 1.0
    mask[1] = 0.5
    record = Called()
    (passed,) = call(masks.mask_preview, env, record, mask=mask)
    assert passed is mask
    items = record.ui["images"]
    assert [i["type"] for i in items] == ["temp", "temp"] and not list(env.paths.output.root.iterdir())
    first = np.asarray(Image.open(env.paths.temp.root / items[0]["filename"]).convert("RGB"))
    assert first.shape == (6, 8, 3) and (first[:, :4] == 255).all() and (first[:, 4:] == 0).all()
    second = np.asarray(Image.open(env.paths.temp.root / items[1]["filename"]).convert("RGB"))
    assert set(np.unique(second)) <= {127, 128}


def test_a_comfyui_api_prompt_with_the_new_nodes_validates_and_runs(env):
    from engine.executor import Executor
    from engine.workflow import parse

    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 40, "height": 20, "batch_size": 1, "color": 0xFF8000}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 10, "height": 10, "batch_size": 1, "color": 0x0000FF}},
        "3": {"class_type": "ImageStitch", "inputs": {"image1": ["1", 0], "image2": ["2", 0], "direction": "right",
                                                      "match_image_size": True, "spacing_width": 2,
                                                      "spacing_color": "white"}},
        "4": {"class_type": "ResizeAndPadImage",
              "inputs": {"image": ["3", 0], "target_width": 64, "target_height": 64, "padding_color": "black",
                         "interpolation": "nearest-exact"}},
        "5": {"class_type": "ImageColorToMask", "inputs": {"image": ["4", 0], "color": 0xFF8000}},
        "6": {"class_type": "MaskPreview", "inputs": {"mask": ["5", 0]}},
    }
    outcome = Executor(default_registry(), env).run(parse(prompt))
    assert outcome.status == "succeeded"
    assert outcome.results["3"][0].shape == (1, 20, 62, 3)  # 40 + a 2-pixel spacer + image2 scaled to 20x20
    # 62x20 into 64x64: scale 64/62, so 64x20 placed at row (64 - 20) // 2 = 22
    mask = outcome.results["5"][0]
    # nearest-exact maps output column x to source column floor((x + 0.5) * 62/64): orange (< 40) up to x = 40
    assert torch.equal(mask[0, 22:42, :41], torch.ones(20, 41)) and int(mask.sum()) == 20 * 41
    assert len(outcome.outputs["6"]["images"]) == 1
    assert outcome.results["6"][0] is mask  # the pass-through output
