"""Skip-layer guidance on the flow families whose blocks are called by position or return their
streams in an order of their own (Krea 2, Qwen-Image 2.1, Kandinsky 5, Wan: one stream; JoyImage:
picture then text; FLUX.2's single blocks: one stream when no text is passed). Skipping a block means the
network as if that block were not in its list, so the reference for each evaluation is a copy of the
tiny transformer with that block deleted (these transformers give their blocks nothing that depends
on the block's number). On the families whose ComfyUI model never applies the nodes' block
replacements (Z-Image, Lumina 2, ERNIE-Image, Ideogram 4, HiDream-I1) nothing is skipped, as in ComfyUI:
only SkipLayerGuidanceDiT's rescaling acts, and the node says so.
"""
from __future__ import annotations

import contextlib
import copy
import importlib

import pytest
import torch

from engine.context import NodeError
from nodes.families.denoiser import Denoiser
from nodes.families.skip_layers import SkipLayers, skipping
from nodes.handles import ModelHandle
from nodes.model_patches import skip_layer_guidance_dit, skip_layer_guidance_dit_simple
from nodes.samplers.schedules import training_schedule
from test_flux import Recorder

T = torch.tensor([500.0])
#: family module -> its tiny model module (tests/tiny_*.py); each has two blocks of a kind, or one
#: of each (FLUX.2)
FAMILIES = {"krea2": "tiny_krea2", "qwen_image21": "tiny_qwen_image21", "joyimage": "tiny_joyimage",
            "flux2": "tiny_flux2", "kandinsky5": "tiny_kandinsky5", "wan": "tiny_wan"}


def _family(name: str):
    return importlib.import_module(f"nodes.families.{name}").FAMILY


def _network(name: str, transformer=None):
    family = _family(name)
    return family.wrap_network(transformer or importlib.import_module(FAMILIES[name]).components()["transformer"])


def _inputs(name: str, net) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """A latent, a prompt's states and the network's other inputs for one call (Kandinsky 5 reads a
    pooled vector; Wan 2.1 image-to-video a folded two-frame latent and CLIP vision states)."""
    def noise(*shape, seed):
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))

    config = net.kiln_network.config
    if name == "wan":
        from nodes.families.wan import TEXT_TOKENS

        return (noise(1, config.in_channels, 2 * 8, 8, seed=3), noise(1, TEXT_TOKENS, net.text_width, seed=4),
                {"frames": 2, "image_embeds": noise(1, 4, config.image_dim, seed=5)})
    extra = {"pooled_projections": noise(1, config.in_text_dim2, seed=5)} if name == "kandinsky5" else {}
    return noise(1, _family(name).latent.channels, 8, 8, seed=3), noise(1, 6, net.text_width, seed=4), extra


def _without(name: str, kind: str, number: int):
    """The family's tiny network with block ``number`` of ``kind`` deleted from its list."""
    family = _family(name)
    transformer = copy.deepcopy(_network(name).kiln_network)
    del getattr(transformer, family.dit_block_lists[kind])[number]
    return _network(name, transformer)


def _run(net, x, text, extra) -> torch.Tensor:
    with torch.inference_mode():
        return net(x, T, text, **extra)[0]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_a_skipped_block_is_the_network_without_it(name):
    family, net = _family(name), _network(name)
    x, text, extra = _inputs(name, net)
    plain = _run(net, x, text, extra)
    blocks = family.dit_blocks(net)
    skipped = {}
    for kind, numbers in blocks.items():
        for number in range(len(numbers)):
            with skipping(blocks, ((kind, (number,)),), family.dit_block_returns):
                skipped[kind, number] = _run(net, x, text, extra)
            reference = _run(_without(name, kind, number), x, text, extra)
            assert (skipped[kind, number] - reference).abs().max() <= 1e-5, (kind, number)
            assert (skipped[kind, number] - plain).abs().max() > 1e-3, (kind, number)  # the block matters
    assert len(skipped) == 2
    first, second = skipped.values()
    assert (first - second).abs().max() > 1e-3  # the block named is the one skipped
    assert torch.equal(_run(net, x, text, extra), plain)  # the hooks are gone afterwards


def _model(name: str) -> ModelHandle:
    family, net = _family(name), _network(name)
    return ModelHandle(family, scheduler_config=family.scheduler_config(), latent=family.latent,
                       _use_unet=lambda: contextlib.nullcontext(net), _peek=lambda: net)


def test_through_the_denoiser_joyimage_guides_by_comfyuis_formula():
    """JoyImage's blocks return (picture, text): the denoiser hands the family's order to the skip, and
    one evaluation at cfg 1 reads v + s (v - v_skipped) (flow outputs are affine in the clean prediction)."""
    name = "joyimage"
    family, net = _family(name), _network(name)
    x, text, _ = _inputs(name, net)
    schedule = training_schedule(family.scheduler_config())

    def output(network, skip=None):
        with torch.inference_mode():  # the Denoiser wraps the transformer itself
            return Denoiser(network, family, positive=[[text, {}]], negative=None, cfg=1.0, image_size=(64, 64),
                            batch=1, schedule=schedule, skip_layers=skip).model_output(x, T)

    settings = SkipLayers(layers=(("double", (1,)), ("single", ())), start_percent=0.0, end_percent=1.0, scale=2.0)
    plain, without = output(net.kiln_network), output(_without(name, "double", 1).kiln_network)
    assert (output(net.kiln_network, settings) - (plain + 2.0 * (plain - without))).abs().max() <= 1e-4
    assert (plain - without).abs().max() > 1e-3


@pytest.mark.parametrize("name, double, single, field, says", [
    ("krea2", "", "2", "single_layers", "2 single blocks"),
    ("krea2", "0", "1", "double_layers", "no double blocks"),
    ("joyimage", "0, 5", "", "double_layers", "block 5 does not exist"),
    ("joyimage", "1", "0", "single_layers", "no single blocks"),
])
def test_layers_past_the_last_block_name_the_input(name, double, single, field, says):
    with pytest.raises(NodeError) as err:
        skip_layer_guidance_dit(Recorder().ctx, _model(name), double, single, 3.0, 0.0, 1.0, 0.0)
    assert err.value.input_name == field and says in str(err.value)
    (slg,) = skip_layer_guidance_dit_simple(Recorder().ctx, _model(name), "" if name == "krea2" else "1",
                                            "1" if name == "krea2" else "", 0.0, 1.0)
    kind = "single" if name == "krea2" else "double"
    assert dict(slg.patches.skip_layers.layers)[kind] == (1,)


@pytest.mark.parametrize("name, says", [("z_image", "Z-Image"), ("lumina2", "Lumina 2"),
                                        ("ernie_image", "ERNIE-Image"), ("ideogram4", "Ideogram 4"),
                                        ("hidream", "HiDream-I1")])
def test_families_comfyui_never_skips_run_as_there_and_say_so(name, says):
    """ComfyUI's NextDiT (Z-Image, Lumina 2), ErnieImageModel, Ideogram4Transformer2DModel and HiDream's
    model run every block whatever the nodes set, so there the nodes skip nothing: the workflow runs, the
    model comes back unchanged unless SkipLayerGuidanceDiT rescales (then it skips nothing and rescales),
    and the node says so."""
    family = _family(name)
    model = ModelHandle(family, scheduler_config=family.scheduler_config(), latent=family.latent,
                        _use_unet=lambda: contextlib.nullcontext(None), _peek=lambda: None)
    for node, args in ((skip_layer_guidance_dit, (3.0, 0.0, 1.0, 0.0)), (skip_layer_guidance_dit_simple, (0.0, 1.0))):
        rec = Recorder()
        assert node(rec.ctx, model, "0", "", *args)[0] is model
        assert any(says in m and "nothing is skipped" in m for m in rec.messages)
    rec = Recorder()
    (rescaling,) = skip_layer_guidance_dit(rec.ctx, model, "0", "", 3.0, 0.0, 1.0, 0.7)
    assert rescaling.patches.skip_layers.layers == (("double", ()), ("single", ()))
    assert any("only rescaling_scale acts" in m for m in rec.messages)


def test_where_nothing_is_skipped_only_the_rescaling_acts():
    """Z-Image at cfg 3 with SkipLayerGuidanceDiT (scale 3, rescaling 0.7), as ComfyUI computes it there:
    the skipped pass is the conditional one, so the guided prediction is only rescaled towards the
    conditional prediction's spread (on clean predictions); no third network pass is run."""
    from nodes.families.guidance_rules import Parametrisation
    from nodes.families.skip_layers import rescaled
    from nodes.families import z_image
    import tiny_z_image

    family = z_image.FAMILY
    net = family.wrap_network(tiny_z_image.components()["transformer"])
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(1, family.latent.channels, 8, 8, generator=gen)
    pos, neg = (torch.randn(1, 6, net.text_width, generator=gen) for _ in range(2))
    schedule = training_schedule(family.scheduler_config())
    calls = []
    hook = net.kiln_network.register_forward_hook(lambda *_: calls.append(1))

    def output(skip=None):
        calls.clear()
        with torch.inference_mode():
            return Denoiser(net.kiln_network, family, positive=[[pos, {}]], negative=[[neg, {}]], cfg=3.0,
                            image_size=(64, 64), batch=1, schedule=schedule, skip_layers=skip).model_output(x, T)

    try:
        plain, plain_calls = output(), len(calls)
        (model,) = skip_layer_guidance_dit(Recorder().ctx, _model_of(family, net), "1", "", 3.0, 0.0, 1.0, 0.7)
        ours, our_calls = output(model.patches.skip_layers), len(calls)
        alone = Denoiser(net.kiln_network, family, positive=[[pos, {}]], negative=None, cfg=1.0, image_size=(64, 64),
                         batch=1, schedule=schedule)
        with torch.inference_mode():
            cond = alone.model_output(x, T)
    finally:
        hook.remove()
    space = Parametrisation(alone.prediction_type, x, float(schedule.sigma(float(T))), alone.sigma_data)
    want = space.from_x0(rescaled(space.to_x0(plain), space.to_x0(cond), 0.7))
    assert (ours - want).abs().max() <= 1e-5
    assert (ours - plain).abs().max() > 1e-3  # the rescaling acts
    assert our_calls == plain_calls > 0  # and no extra pass


def _model_of(family, net) -> ModelHandle:
    return ModelHandle(family, scheduler_config=family.scheduler_config(), latent=family.latent,
                       _use_unet=lambda: contextlib.nullcontext(net), _peek=lambda: net)


def test_a_block_whose_outputs_it_cannot_match_is_named():
    """A block returning three streams has no input for each: the skip says which block and what it takes."""
    class Triple(torch.nn.Module):
        def forward(self, hidden_states, encoder_hidden_states, temb):
            return hidden_states, encoder_hidden_states, temb

    block = Triple()
    a, b, c = torch.ones(1), torch.zeros(1), torch.full((1,), 2.0)
    from nodes.families.base import ConditioningError

    with pytest.raises(ConditioningError, match="Triple.*returns 3 values.*hidden_states, encoder_hidden_states, temb") \
            as err:
        with skipping({"double": [block]}, (("double", (0,)),)):
            block(a, b, temb=c)
    assert err.value.input_name == "model"
    assert [float(t) for t in block(a, encoder_hidden_states=b, temb=c)] == [1.0, 0.0, 2.0]  # unhooked again
