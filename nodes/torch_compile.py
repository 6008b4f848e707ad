"""TorchCompileModel, ComfyUI's node for torch.compile, mapped onto Kiln's compiled mode.

In ComfyUI the node wraps one MODEL in torch.compile. Kiln compiles for the whole
process instead (nodes.runtime.compiled: ``kiln serve/run --compile auto|on|off``;
auto compiles on CUDA only, where inductor pays back its compile time), with the
compiled code cached on disk and LoRA patches still applied to the compiled module.
A per-workflow switch would let one workflow make a CPU server compile for many
minutes, so the node does not override the process's choice: it passes the model
through and says what this process does with it, so a ComfyUI workflow runs unchanged
and its user learns how to get compilation here.
"""
from __future__ import annotations

from engine import types as T
from engine.context import NodeError
from engine.node import Input, Output, define_node
from nodes.handles import ModelHandle
from nodes.loaders import model_manager

#: ComfyUI's choices. Kiln's compiled mode uses inductor (with CUDA graphs left to inductor).
BACKENDS = ["inductor", "cudagraphs"]


@define_node(
    "TorchCompileModel",
    category="_for_testing",
    inputs=[Input("model", T.MODEL), Input("backend", T.COMBO, choices=BACKENDS)],
    outputs=[Output("MODEL", T.MODEL)],
)
def torch_compile_model(ctx, model, backend: str):
    """Pass the model through; say whether this process compiles it (its --compile setting)."""
    if not isinstance(model, ModelHandle):
        raise NodeError(f"must be a MODEL from a loader, got {type(model).__name__}", "model")
    if backend not in BACKENDS:
        raise NodeError(f"must be one of {', '.join(BACKENDS)}, got {backend!r}", "backend")
    manager = model_manager(ctx.env)
    if manager.compiles():
        ctx.message(f"the denoiser is compiled by Kiln's compiled mode (--compile {manager.compile_mode}, inductor "
                    f"on {manager.device}, cached on disk); backend {backend!r} is not needed")
    else:
        ctx.message(f"not compiled: this process runs with --compile {manager.compile_mode} on {manager.device} "
                    "(Kiln compiles for the whole process, auto on CUDA only; start it with --compile on to "
                    "compile here); the model runs eagerly with the same results")
    return (model,)
