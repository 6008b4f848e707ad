"""HypernetworkLoader (ComfyUI's node): an A1111-style hypernetwork on a UNet's attention.

A hypernetwork file (``models/hypernetworks/*.pt``, as AUTOMATIC1111's web UI trains them) holds,
for each feature width it was trained on, two small MLPs: one for what an attention's key
projection reads and one for what its value projection reads. While the model samples, every
attention of the UNet, self- and cross-attention alike, whose key input has such a width reads
``x + strength * mlp(x)`` instead of ``x`` (the query is left alone), as ComfyUI's attn1/attn2
patch and A1111 apply it. Kiln puts it on as a pre-hook on each ``to_k``/``to_v``, where diffusers'
attention reads exactly those inputs, for the run only (:func:`applied`).

The file format, as ComfyUI reads it: integer keys (the widths), each a pair of state dicts of
``linear.N.weight``/``bias`` in order; a LayerNorm's follows its Linear when ``is_layer_norm``;
``activation_func`` (ComfyUI's list, "swish" being Hardswish) goes after every Linear but the last
unless ``activate_output`` (A1111's rule; ComfyUI counts a LayerNorm as a layer there, so with
``is_layer_norm`` it also activates the last Linear's output). Dropout layers are inactive here, as in A1111 at inference (ComfyUI
builds its MLPs in training mode, so they drop 30 % of the features at random), which keeps a
seed's result the same from run to run. Pickle files are read with ``weights_only``, never by
running code from the file.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Iterator

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.loaders import fingerprinter, list_models, locate, validator
from nodes.runtime.compiled import while_hooked

HYPERNETWORK_FOLDER = "hypernetworks"
ACTIVATIONS = ("linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid", "softsign", "mish")


class HypernetworkError(ValueError):
    """A file that is not a hypernetwork Kiln can apply; the message says why."""


@dataclasses.dataclass(eq=False)
class Hypernetwork:
    """The MLPs by input width: ``mlps[width] = (key_mlp, value_mlp)``, on the CPU in eval mode."""

    name: str
    mlps: dict[int, tuple[Any, Any]]
    #: copies on the devices and dtypes the network ran in, made once each
    placed: dict[tuple[str, str], dict[int, tuple[Any, Any]]] = dataclasses.field(default_factory=dict, repr=False)

    def on(self, device: Any, dtype: Any) -> dict[int, tuple[Any, Any]]:
        """The MLPs on ``device`` in ``dtype``."""
        import copy

        key = (str(device), str(dtype))
        if key not in self.placed:
            self.placed[key] = {w: tuple(copy.deepcopy(m).to(device=device, dtype=dtype) for m in pair)
                                for w, pair in self.mlps.items()}
        return self.placed[key]


def _activation(name: str) -> Any:
    import torch

    return {"relu": torch.nn.ReLU, "leakyrelu": torch.nn.LeakyReLU, "elu": torch.nn.ELU, "swish": torch.nn.Hardswish,
            "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid, "softsign": torch.nn.Softsign,
            "mish": torch.nn.Mish}[name]()


def build_mlp(state: dict[str, Any], activation: str, layer_norm: bool, activate_output: bool) -> Any:
    """One MLP from its state dict, in the order the file lists its weights."""
    import torch

    names = [k[:-len(".weight")] for k in state if k.endswith(".weight")]
    layers, i = [], 0
    while i < len(names):
        weight, bias = state[f"{names[i]}.weight"], state.get(f"{names[i]}.bias")
        if weight.ndim != 2 or bias is None:
            raise HypernetworkError(f"{names[i]} is not a linear layer with a bias")
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        linear.load_state_dict({"weight": weight, "bias": bias})
        layers.append(linear)
        last = i == len(names) - 1 - (1 if layer_norm else 0)
        if activation != "linear" and (not last or activate_output):
            layers.append(_activation(activation))
        if layer_norm:
            i += 1
            if i >= len(names):
                raise HypernetworkError(f"is_layer_norm is set but {names[i - 1]} has no LayerNorm after it")
            norm = torch.nn.LayerNorm(state[f"{names[i]}.weight"].shape[0])
            norm.load_state_dict({"weight": state[f"{names[i]}.weight"], "bias": state[f"{names[i]}.bias"]})
            layers.append(norm)
        i += 1
    if not layers:
        raise HypernetworkError("an MLP has no layers")
    return torch.nn.Sequential(*layers).eval().requires_grad_(False)


def read_hypernetwork(path: Path) -> Hypernetwork:
    """The file's MLPs; HypernetworkError naming what is wrong with it."""
    from nodes.checkpoint.pickle_file import PickleRefused, load_weights_only

    try:
        data = load_weights_only(path)
    except PickleRefused as exc:
        raise HypernetworkError(f"it {exc}") from None
    if not isinstance(data, dict):
        raise HypernetworkError("it does not hold a hypernetwork (a dict of widths)")
    activation = data.get("activation_func") or "linear"
    if activation not in ACTIVATIONS:
        raise HypernetworkError(f"its activation {activation!r} is not one ComfyUI reads ({', '.join(ACTIVATIONS)})")
    mlps = {}
    for width, pair in data.items():
        if not isinstance(width, int):
            continue
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(p, dict) for p in pair)):
            raise HypernetworkError(f"width {width} does not hold a (key, value) pair of layers")
        try:
            mlps[width] = tuple(build_mlp(p, activation, bool(data.get("is_layer_norm")),
                                          bool(data.get("activate_output"))) for p in pair)
        except (KeyError, RuntimeError) as exc:
            raise HypernetworkError(f"width {width}'s layers do not fit together ({exc})") from None
    if not mlps:
        raise HypernetworkError("it holds no layers (no integer width keys)")
    return Hypernetwork(path.name, mlps)


def _attentions(network: Any) -> list[Any]:
    """The network's attentions whose key and value projections are plain linear layers."""
    import torch

    network = getattr(network, "kiln_network", network)
    return [m for m in network.modules() if isinstance(getattr(m, "to_k", None), torch.nn.Linear)
            and isinstance(getattr(m, "to_v", None), torch.nn.Linear)]


@contextlib.contextmanager
def applied(network: Any, hypernetworks: tuple) -> Iterator[None]:
    """``network`` with each (Hypernetwork, strength) of ``hypernetworks`` on its attentions' key and value
    inputs, in the order they were loaded, until the block ends; nothing when there are none."""
    if not hypernetworks:
        yield
        return
    handles = []
    for attention in _attentions(network):
        for index, projection in ((0, attention.to_k), (1, attention.to_v)):
            def reads(module: Any, args: tuple, index: int = index) -> tuple:
                x = args[0]
                for hypernetwork, strength in hypernetworks:
                    mlp = hypernetwork.on(x.device, x.dtype).get(x.shape[-1])
                    if mlp is not None:
                        x = x + mlp[index](x) * strength
                return (x, *args[1:])

            handles.append(projection.register_forward_pre_hook(reads))
    with while_hooked(handles):
        yield


def _hypernetworks(env: Any) -> list[str]:
    return list_models(env, HYPERNETWORK_FOLDER, diffusers_marker=None)


@define_node(
    "HypernetworkLoader",
    category="loaders",
    inputs=[Input("model", T.MODEL),
            Input("hypernetwork_name", T.COMBO, choices=_hypernetworks,
                  tooltip="An A1111-style hypernetwork (.pt) in models/hypernetworks"),
            Input("strength", T.FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01)],
    outputs=[Output("MODEL", T.MODEL)],
    validate=validator(HYPERNETWORK_FOLDER, "hypernetwork_name"),
    fingerprint=fingerprinter(HYPERNETWORK_FOLDER, "hypernetwork_name"),
)
def hypernetwork_loader(ctx, model, hypernetwork_name: str, strength: float):
    """The model with the hypernetwork on its UNet's attentions while it samples (stacked after any
    already on it); a file made for other widths than this UNet's attentions read is refused."""
    from nodes.speed_patches import unet_model

    unet_model(model, "HypernetworkLoader")
    widths = {a.to_k.in_features for a in _attentions(model.peek())}
    path = locate(ctx.env, HYPERNETWORK_FOLDER, hypernetwork_name, "hypernetwork_name")
    try:
        hypernetwork = read_hypernetwork(path)
    except HypernetworkError as exc:
        raise NodeError(f"{hypernetwork_name}: {exc}", "hypernetwork_name") from None
    if not widths & set(hypernetwork.mlps):
        raise NodeError(f"{hypernetwork_name} was made for another model: its widths {sorted(hypernetwork.mlps)} "
                        f"are none of this UNet's attention inputs {sorted(widths)}", "hypernetwork_name")
    patches = model.patches
    return (dataclasses.replace(model, patches=dataclasses.replace(
        patches, hypernetworks=(*patches.hypernetworks, (hypernetwork, float(strength))))),)
