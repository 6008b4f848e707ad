"""HypernetworkLoader (nodes/hypernetwork.py) on the tiny SD1 checkpoint, with A1111-format files written here.

The claims: a linear hypernetwork is exactly a change of the key and value projections' weights, so the
hooked UNet equals a copy with those folded in (and sampling with the node differs from without it, at
strength 0 it is the plain model); the MLPs are built in A1111's layer order (activation, LayerNorm,
dropout inactive) from the file; files Kiln cannot apply, a model without a UNet and a file made for
other widths are refused naming the input; the hooks are gone after the run."""
from __future__ import annotations

import copy

import pytest
import torch

import tiny_models as tm
from engine.context import NodeError
from node_call import call, model_in_memory
from nodes import hypernetwork as hn
from nodes import loaders, text
from nodes.sampling import ksampler


def _linear_state(width: int, hidden: int, generator: torch.Generator, layer_norm: bool = False) -> dict:
    """``linear.N`` weights as A1111 saves them: width -> hidden -> width (LayerNorms after each when asked)."""
    state, index = {}, 0
    for fan_in, fan_out in ((width, hidden), (hidden, width)):
        state[f"linear.{index}.weight"] = torch.randn(fan_out, fan_in, generator=generator) * 0.2
        state[f"linear.{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.1
        index += 1
        if layer_norm:
            state[f"linear.{index}.weight"] = 1 + torch.randn(fan_out, generator=generator) * 0.1
            state[f"linear.{index}.bias"] = torch.randn(fan_out, generator=generator) * 0.1
            index += 1
    return state


def write_hypernetwork(path, widths=(32, 64), seed=0, **options) -> dict:
    g = torch.Generator().manual_seed(seed)
    data = {w: [_linear_state(w, 2 * w, g, options.get("is_layer_norm", False)) for _ in range(2)] for w in widths}
    data.update({"activation_func": "linear", "is_layer_norm": False, "use_dropout": False, "activate_output": False,
                 "name": "test", "layer_structure": [1, 2, 1]}, **options)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(data, str(path))
    return data


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from node_call import environment_over

    yield from environment_over(tm.make_models_folder(tmp_path_factory.mktemp("models")), tmp_path_factory.mktemp("d"))


def _folded(unet, data: dict, strength: float):
    """A copy of ``unet`` whose to_k/to_v read x + s * (B(Ax + a) + b) through their weights: W' = W (I + s BA),
    bias' = s W (B a + b)."""
    out = copy.deepcopy(unet)
    for module in out.modules():
        for index, name in ((0, "to_k"), (1, "to_v")):
            proj = getattr(module, name, None)
            if not isinstance(proj, torch.nn.Linear) or proj.in_features not in data:
                continue
            layers = data[proj.in_features][index]
            a, a_bias, b, b_bias = (layers[f"linear.{i}.{k}"] for i in (0, 1) for k in ("weight", "bias"))
            weight = proj.weight.detach()
            folded = torch.nn.Linear(proj.in_features, proj.out_features, bias=True)
            with torch.no_grad():
                folded.weight.copy_(weight @ (torch.eye(proj.in_features) + strength * b @ a))
                folded.bias.copy_(strength * weight @ (b @ a_bias + b_bias))
            setattr(module, name, folded)
    return out


def test_a_linear_hypernetwork_equals_its_weights_folded_into_the_projections(env, tmp_path):
    data = write_hypernetwork(tmp_path / "h.pt")
    network = hn.read_hypernetwork(tmp_path / "h.pt")
    unet = tm.components("sd1")["unet"]
    x, t, context = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 64)
    with torch.no_grad():
        plain = unet(x, t, context).sample
        with hn.applied(unet, ((network, 0.7),)):
            hooked = unet(x, t, context).sample
        folded = _folded(unet, data, 0.7)(x, t, context).sample
        after = unet(x, t, context).sample
    assert (hooked - plain).abs().max() > 1e-3  # not vacuous
    assert torch.allclose(hooked, folded, atol=1e-5)
    assert torch.equal(after, plain)  # hooks gone


def _sample(env, model, clip):
    pos = call(text.clip_text_encode, env, text="a red barn", clip=clip)[0]
    neg = call(text.clip_text_encode, env, text="blurry", clip=clip)[0]
    return call(ksampler, env, model=model, seed=3, steps=2, cfg=5.0, sampler_name="euler", scheduler="normal",
                positive=pos, negative=neg, latent_image={"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]


def test_the_node_hooks_the_model_while_it_samples(env):
    write_hypernetwork(env.paths.models.root / "hypernetworks" / "style.pt")
    model, clip, _ = call(loaders.checkpoint_loader, env, ckpt_name=tm.checkpoint_name("sd1"))
    plain = _sample(env, model, clip)
    (zero,) = call(hn.hypernetwork_loader, env, model=model, hypernetwork_name="style.pt", strength=0.0)
    (styled,) = call(hn.hypernetwork_loader, env, model=model, hypernetwork_name="style.pt", strength=1.0)
    assert torch.equal(_sample(env, zero, clip), plain)
    assert (_sample(env, styled, clip) - plain).abs().max() > 1e-3
    assert torch.equal(_sample(env, model, clip), plain)  # the handle given samples as before
    (twice,) = call(hn.hypernetwork_loader, env, model=styled, hypernetwork_name="style.pt", strength=1.0)
    assert len(twice.patches.hypernetworks) == 2  # stacked, as ComfyUI appends attention patches


def test_layers_are_built_in_a1111_order_and_run_deterministically(tmp_path):
    g = torch.Generator().manual_seed(1)
    state = _linear_state(32, 64, g, layer_norm=True)
    mlp = hn.build_mlp(state, "relu", layer_norm=True, activate_output=False)
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "LayerNorm", "Linear", "LayerNorm"]
    x = torch.randn(3, 32)
    h = torch.nn.functional.layer_norm(torch.relu(x @ state["linear.0.weight"].T + state["linear.0.bias"]), (64,),
                                       state["linear.1.weight"], state["linear.1.bias"])
    want = torch.nn.functional.layer_norm(h @ state["linear.2.weight"].T + state["linear.2.bias"], (32,),
                                          state["linear.3.weight"], state["linear.3.bias"])
    assert torch.allclose(mlp(x), want, atol=1e-6)
    out = hn.build_mlp(_linear_state(32, 64, g), "tanh", layer_norm=False, activate_output=True)
    assert [type(m).__name__ for m in out] == ["Linear", "Tanh", "Linear", "Tanh"]
    write_hypernetwork(tmp_path / "d.pt", use_dropout=True, last_layer_dropout=True)
    key_mlp = hn.read_hypernetwork(tmp_path / "d.pt").mlps[32][0]
    assert not key_mlp.training and torch.equal(key_mlp(x), key_mlp(x))


def test_what_cannot_be_applied_is_refused_naming_the_input(env):
    folder = env.paths.models.root / "hypernetworks"
    model, _, _ = call(loaders.checkpoint_loader, env, ckpt_name=tm.checkpoint_name("sd1"))

    def refused(name: str, **inputs) -> NodeError:
        with pytest.raises(NodeError) as err:
            call(hn.hypernetwork_loader, env, **{"model": model, "hypernetwork_name": name, "strength": 1.0, **inputs})
        return err.value

    write_hypernetwork(folder / "gelu.pt", activation_func="gelu")
    err = refused("gelu.pt")
    assert err.input_name == "hypernetwork_name" and "'gelu'" in str(err)
    write_hypernetwork(folder / "sdxl.pt", widths=(640, 2048))
    err = refused("sdxl.pt")
    assert err.input_name == "hypernetwork_name" and "[640, 2048]" in str(err) and "[32, 64]" in str(err)
    (folder / "broken.pt").write_bytes(b"not a zip")
    assert "could not be read" in str(refused("broken.pt"))

    class Payload:  # a pickle that needs code to load is never run
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Payload()}, str(folder / "code.pt"))
    assert "arbitrary code" in str(refused("code.pt"))

    import tiny_flux

    from nodes.families import flux

    write_hypernetwork(folder / "ok.pt")
    flux_model = model_in_memory(flux.FAMILY, tiny_flux.build("dev", seed=0)["transformer"])
    assert refused("ok.pt", model=flux_model).input_name == "model"
