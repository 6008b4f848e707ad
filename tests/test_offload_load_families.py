"""UNETLoader files of SD3, Z-Image, FLUX.2, Chroma, Qwen-Image, Krea 2, FIBO 2, Qwen-Image 2.1, Ideogram 4,
JoyImage, Kandinsky 5, LongCat-Image, Ovis-Image, HiDream-I1, ERNIE-Image and AuraFlow built straight into blocks
paged to disk (nodes.checkpoint.paged_files), as FLUX.1 files are (tests/test_offload_load.py).

For each family's tiny model saved as ComfyUI's file (original keys under ``model.diffusion_model.``;
Qwen-Image's, FIBO 2's, JoyImage's, Kandinsky 5's, HiDream's and ERNIE-Image's are diffusers' own names): the size asked before
building is the whole build's module bytes, the paged module gives the whole build's outputs, its blocks rest on disk, and the build never held the
whole weight set (every tensor read from the file is metered until freed).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import tiny_auraflow
import tiny_chroma
import tiny_ernie
import tiny_fibo2
import tiny_flux
import tiny_flux2
import tiny_hidream
import tiny_ideogram4
import tiny_joyimage
import tiny_kandinsky5
import tiny_krea2
import tiny_longcat
import tiny_lumina2
import tiny_ovis
import tiny_qwen_image
import tiny_qwen_image21
import tiny_sd3
import tiny_wan
import tiny_z_image
from nodes.checkpoint.split import load_unet_file
from nodes.runtime import offload
from nodes.runtime.measure import module_bytes
from test_offload_load import _disk, alive, phase  # noqa: F401 (fixtures)

PREFIX = "model.diffusion_model."


def _sd3_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 16, 8, 8, generator=g)
    text = torch.randn(1, 7, tiny_sd3.T5, generator=g)
    pooled = torch.randn(1, tiny_sd3.CLIP_L + tiny_sd3.CLIP_G, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=text, pooled_projections=pooled,
                   timestep=torch.tensor([500.0]), return_dict=False)[0]


def _z_image_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, cap = torch.randn(16, 1, 8, 8, generator=g), torch.randn(7, 48, generator=g)
    with torch.no_grad():
        return net([x], torch.tensor([0.6]), [cap], return_dict=False)[0][0]


def _lumina2_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, cap = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 7, tiny_lumina2.CAP, generator=g)
    with torch.no_grad():
        return net(x, torch.tensor([0.6]), cap, torch.ones(1, 7, dtype=torch.long), return_dict=False)[0]


def _flux2_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 128, generator=g), torch.randn(1, 8, 3 * tiny_flux2.QWEN, generator=g)
    ids = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(4), torch.arange(4), torch.arange(1),
                                     indexing="ij"), -1).reshape(1, 16, 4)
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.7]), img_ids=ids,
                   txt_ids=torch.zeros(1, 8, 4), return_dict=False)[0]


def _chroma_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, tiny_chroma.TEXT, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.7]),
                   img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)[0]


def _qwen_image_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, 7, tiny_qwen_image.TEXT, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=text, encoder_hidden_states_mask=torch.ones(1, 7),
                   timestep=torch.tensor([0.7]), img_shapes=[[(1, 4, 4)]], return_dict=False)[0]


def _krea2_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, 7, 12, tiny_krea2.TEXT, generator=g)
    ids = torch.cat([torch.zeros(7, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(4.0),
                                                                   indexing="ij"), -1).reshape(16, 3)])
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.7]), position_ids=ids,
                   return_dict=False)[0]


def _fibo2_forward(net: Any) -> torch.Tensor:
    """Divided by 32: the tiny FIBO 2's outputs are some 30 in size (its random gates), the other families'
    about 1, so the shared 1e-5 bound on the paged layers' rounding stays a bound on the same relative error."""
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 32, 8, 8, generator=g), torch.randn(1, 6, 7, net.config.cap_feat_dim, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.7]),
                   return_dict=False)[0] / 32


def _qwen_image21_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, 7, tiny_qwen_image21.TEXT, generator=g)
    slots = torch.cat([torch.zeros(1, 7, dtype=torch.bool), torch.ones(1, 4, dtype=torch.bool)], dim=1)
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.7]),
                   img_shapes=[[(1, 4, 4)]], img_mask=slots, return_dict=False)[0]


def _ideogram4_forward(net: Any) -> torch.Tensor:
    """Three text tokens then a 2x2 grid of image tokens, as Kiln's Ideogram4Network packs them."""
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 7, 128, generator=g), torch.randn(1, 7, net.config.llm_features_dim, generator=g)
    ids = torch.cat([torch.arange(3).view(-1, 1).expand(3, 3),
                     torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(2), torch.arange(2),
                                                indexing="ij"), -1).reshape(4, 3) + 65536]).unsqueeze(0)
    with torch.no_grad():
        return net(hidden_states=x, timestep=torch.tensor([0.7]), encoder_hidden_states=text, position_ids=ids,
                   segment_ids=torch.ones(1, 7, dtype=torch.long), indicator=torch.tensor([[3] * 3 + [2] * 4]),
                   return_dict=False)[0]


def _joyimage_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 1, 4, 4, generator=g), torch.randn(1, 7, tiny_joyimage.TEXT, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text, return_dict=False)[0]


def _ernie_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 128, 4, 4, generator=g), torch.randn(1, 7, tiny_ernie.TEXT, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, timestep=torch.tensor([500.0]), text_bth=text, text_lens=torch.tensor([7]),
                   return_dict=False)[0]


def _kandinsky5_forward(net: Any) -> torch.Tensor:
    import tiny_flux
    import tiny_qwen_image

    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 1, 4, 4, 16, generator=g), torch.randn(1, 7, tiny_qwen_image.TEXT, generator=g)
    pooled = torch.randn(1, tiny_flux.TEXT, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                   pooled_projections=pooled, visual_rope_pos=[torch.arange(1), torch.arange(2), torch.arange(2)],
                   text_rope_pos=torch.arange(7), return_dict=False)


def _longcat_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, tiny_longcat.TEXT, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.7]),
                   img_ids=torch.ones(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)[0]


def _wan_forward(net: Any) -> torch.Tensor:
    """Two frames: ComfyUI's rotary positions (0 and 1, nodes.checkpoint.wan_rope), not the class's own (0 and 7)."""
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 36, 2, 4, 4, generator=g), torch.randn(1, 512, tiny_wan.TEXT, generator=g)
    image = torch.randn(1, 5, tiny_wan.VISION, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
                   encoder_hidden_states_image=image, return_dict=False)[0]


def _ovis_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 64, generator=g), torch.randn(1, 8, 48, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.7]),
                   img_ids=torch.ones(16, 3), txt_ids=torch.zeros(8, 3), return_dict=False)[0]


def _hidream_forward(net: Any) -> torch.Tensor:
    """A 4 x 4 patch grid with every expert's router in play (the tiny model's four experts, two active)."""
    from nodes.families import hidream

    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 7, tiny_hidream.T5, generator=g)
    extra = {"pooled_output": torch.randn(1, tiny_hidream.CLIP_L + tiny_hidream.CLIP_G, generator=g),
             hidream.LLAMA: torch.randn(1, tiny_hidream.LLAMA_LAYERS, 7, tiny_hidream.LLAMA, generator=g)}
    kwargs = hidream.FAMILY.network_kwargs([extra], 1, (64, 64), torch.device("cpu"), torch.float32)
    with torch.no_grad():
        return hidream.FAMILY.wrap_network(net)(x, torch.tensor([700.0]), text, **kwargs)[0]


def _auraflow_forward(net: Any) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 7, tiny_auraflow.TEXT, generator=g)
    with torch.no_grad():
        return net(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([0.6]), return_dict=False)[0]


#: family -> (its UNETLoader file's tensors, one forward on fixed inputs)
FAMILIES: dict[str, tuple[Callable[[], dict], Callable[[Any], torch.Tensor]]] = {
    "sd3": (lambda: tiny_sd3.original_transformer("medium"), _sd3_forward),
    "z_image": (tiny_z_image.original_transformer, _z_image_forward),
    "lumina2": (tiny_lumina2.original_transformer, _lumina2_forward),  # Z-Image's names, no pad tokens
    "flux2": (tiny_flux2.original_transformer, _flux2_forward),
    "chroma": (tiny_chroma.original_transformer, _chroma_forward),
    "qwen_image": (lambda: dict(tiny_qwen_image.components()["transformer"].state_dict()), _qwen_image_forward),
    "krea2": (tiny_krea2.original_state, _krea2_forward),
    "fibo2": (tiny_fibo2.transformer_state, _fibo2_forward),
    "qwen_image21": (tiny_qwen_image21.original_state, _qwen_image21_forward),
    "ideogram4": (tiny_ideogram4.original_state, _ideogram4_forward),
    "joyimage": (tiny_joyimage.transformer_state, _joyimage_forward),
    "kandinsky5": (tiny_kandinsky5.transformer_state, _kandinsky5_forward),
    "longcat": (tiny_longcat.original_state, _longcat_forward),
    "ovis": (tiny_ovis.original_transformer, _ovis_forward),  # its gated MLP input stacks two file tensors
    "hidream": (lambda: dict(tiny_hidream.components()["transformer"].state_dict()), _hidream_forward),
    "ernie_image": (lambda: dict(tiny_ernie.components()["transformer"].state_dict()), _ernie_forward),
    "wan": (tiny_wan.original_state, _wan_forward),
    "auraflow": (tiny_auraflow.original_transformer, _auraflow_forward),  # the final modulation's halves swap
}
#: families whose ComfyUI files hold diffusers' own names (no second layout to write)
DIFFUSERS_NAMED = ("qwen_image", "fibo2", "joyimage", "kandinsky5", "hidream", "ernie_image")


def _module(family: str) -> Any:
    if family == "longcat":  # the transformer alone: its components bring a text encoder and VAE along
        return tiny_longcat.transformer()
    return (tiny_sd3.components("medium") if family == "sd3" else
            {"z_image": tiny_z_image, "flux2": tiny_flux2, "chroma": tiny_chroma,
             "krea2": tiny_krea2, "fibo2": tiny_fibo2, "qwen_image21": tiny_qwen_image21,
             "ideogram4": tiny_ideogram4, "ovis": tiny_ovis, "lumina2": tiny_lumina2, "wan": tiny_wan,
             "auraflow": tiny_auraflow}[family].components())["transformer"]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Each family's file with ComfyUI's prefix in fp32 and in diffusers' names, and (Z-Image, SD3, Qwen-Image 2.1,
    Ideogram 4) in bf16 (JoyImage, Kandinsky 5 and ERNIE-Image too), in ComfyUI's scaled fp8 (Ovis-Image too) and in Comfy-Org's int8 (rotated
    in part)."""
    from test_int8_quant import quantise_int8

    root = tmp_path_factory.mktemp("family-files")
    for family, (state, _) in FAMILIES.items():
        tensors = {PREFIX + k: v for k, v in state().items()}
        tiny_flux._save(root / f"{family}.safetensors", tensors)
        if family not in DIFFUSERS_NAMED:  # their files hold diffusers' names already
            tiny_flux._save(root / f"{family}-diffusers.safetensors", _module(family).state_dict())
        if family in ("z_image", "sd3", "qwen_image21", "ideogram4", "joyimage", "kandinsky5", "ernie_image"):
            tiny_flux._save(root / f"{family}-bf16.safetensors", {k: v.bfloat16() for k, v in tensors.items()})
        if family in ("z_image", "sd3", "qwen_image21", "ideogram4", "ovis", "hidream"):  # scales split with
            # gate_up, with qkv; Ovis's per-tensor scales of its up and gate projections stacked with its MLP input
            tiny_flux._save(root / f"{family}-scaled.safetensors", _linears_scaled(state()))
        if family in ("z_image", "sd3", "qwen_image21", "ideogram4"):  # int8, every other linear left float32
            tiny_flux._save(root / f"{family}-int8.safetensors", quantise_int8(state(), PREFIX)[0])
    return root


def _linears_scaled(state: dict) -> dict:
    """ComfyUI's scaled fp8 file of ``state``: its linear weights quantised (ComfyUI quantises linears only;
    Ideogram 4's ``embed_image_indicator`` is an embedding, HiDream's ``ff_i.gate`` routers bare parameters,
    left as they are)."""
    from test_scaled_fp8 import quantise

    embeddings = {k: v for k, v in state.items() if k.startswith("embed_image_indicator.") or ".ff_i.gate." in k}
    scaled = quantise({k: v for k, v in state.items() if k not in embeddings}, PREFIX)[0]
    return scaled | {PREFIX + k: v for k, v in embeddings.items()}


def _files_block_bytes(whole: Any) -> tuple[int, int]:
    """(bytes outside the blocks, bytes of the largest block) of a whole-built module."""
    sizes = [module_bytes(block) for _, _, block in offload.blocks(whole)]
    return module_bytes(whole) - sum(sizes), max(sizes)


@pytest.mark.parametrize("family,layout", [(f, "") for f in FAMILIES] +
                         [(f, "-diffusers") for f in FAMILIES if f not in DIFFUSERS_NAMED])
def test_a_families_unet_file_loads_straight_into_disk_blocks(files, family, layout, alive, phase):
    """ComfyUI's layout (converted per tensor by the family's own key map) and diffusers' (no conversion)."""
    path, forward = files / f"{family}{layout}.safetensors", FAMILIES[family][1]
    whole = load_unet_file(path, torch.float32).modules["unet"]
    assert alive.peak >= 0.95 * alive.total  # the meter sees a whole load hold everything: it can fail
    top, largest = _files_block_bytes(whole)
    alive.peak = before = alive.now
    asked = []
    paged = load_unet_file(path, torch.float32, offload=lambda n, b: asked.append((n, b)) or _disk()).modules["unet"]
    assert asked == [(module_bytes(whole), 0)]
    info = offload.offloaded(paged)
    assert info is not None and info.paged and info.note == "test: paged"
    layout = offload.blocks(paged)
    files_there = {p.name for p in Path(info.folder).glob("*.safetensors")}
    assert len(layout) >= 2 and len(files_there) > len(layout)  # the blocks and the rest
    for _, _, block in layout:  # each block's own file, which its group reads
        group = block._diffusers_hook.get_hook("group_offloading").group
        assert group.modules == [block] and Path(group.safetensors_file_path).name in files_there
    # building held at most the parts outside the blocks and one block (the file is fp32, as the module)
    assert len(phase) == 1 and phase[0] <= top + largest, (phase, top, largest)
    assert alive.peak - before < module_bytes(whole)
    assert {n: p.dtype for n, p in paged.named_parameters()} == {n: p.dtype for n, p in whole.named_parameters()}
    _same_outputs(paged, whole, forward)


def _same_outputs(paged: Any, whole: Any, forward: Callable[[Any], torch.Tensor]) -> None:
    """The straight build gives bit for bit what the whole build paged afterwards gives (the manager's other
    way to the same module), and the whole build's own outputs within the paged layers' rounding."""
    reference = forward(whole)
    offload.offload_blocks(whole, "cpu", "disk", "test: paged after building whole")
    out = forward(paged)
    assert torch.equal(out, forward(whole))
    assert (out - reference).abs().max() <= 1e-5


@pytest.mark.parametrize("family,name,fp8", [("z_image", "z_image-bf16", ""), ("z_image", "z_image", "float8_e4m3fn"),
                                             ("z_image", "z_image-scaled", ""), ("sd3", "sd3-bf16", ""),
                                             ("sd3", "sd3-scaled", "float8_e4m3fn"), ("sd3", "sd3", "float8_e4m3fn"),
                                             ("flux2", "flux2", "float8_e4m3fn"), ("chroma", "chroma", "float8_e4m3fn"),
                                             ("qwen_image", "qwen_image", "float8_e4m3fn"),
                                             ("z_image", "z_image-int8", ""), ("sd3", "sd3-int8", "float8_e4m3fn"),
                                             ("qwen_image21", "qwen_image21-int8", ""),
                                             ("ideogram4", "ideogram4-scaled", ""), ("ideogram4", "ideogram4-int8", ""),
                                             ("joyimage", "joyimage-bf16", ""), ("kandinsky5", "kandinsky5-bf16", ""),
                                             ("longcat", "longcat", "float8_e4m3fn"),
                                             ("ovis", "ovis-scaled", ""), ("ovis", "ovis", "float8_e4m3fn"),
                                             ("hidream", "hidream-scaled", ""), ("hidream", "hidream", "float8_e4m3fn"),
                                             ("ernie_image", "ernie_image-bf16", ""),
                                             ("wan", "wan", "float8_e4m3fn")])
def test_stored_dtypes_fp8_and_scales_are_kept_as_the_whole_build_keeps_them(files, family, name, fp8):
    """bf16 linear weights kept bf16 (Z-Image's timestep embedder then in fp32, counted so in the size),
    UNETLoader's fp8 weight_dtype, a scaled fp8 or int8 file's scales (split with the fused qkv; weight_dtype
    unused), an int8 layer's rotation group travelling with its scale."""
    from nodes.runtime.fp8 import rotation_group, weight_scale

    path, forward = files / f"{name}.safetensors", FAMILIES[family][1]
    whole = load_unet_file(path, torch.float32, fp8=fp8).modules["unet"]
    asked = []
    paged = load_unet_file(path, torch.float32, fp8=fp8,
                           offload=lambda n, b: asked.append((n, b)) or _disk()).modules["unet"]
    assert asked == [(module_bytes(whole), 0)] and offload.offloaded(paged).paged
    stored = {n: p.dtype for n, p in paged.named_parameters()}
    assert stored == {n: p.dtype for n, p in whole.named_parameters()}
    q = {"z_image": "layers.1.attention.to_k.weight", "ideogram4": "layers.0.attention.to_k.weight",
         "joyimage": "double_blocks.0.attn.img_attn_qkv.weight",
         "kandinsky5": "visual_transformer_blocks.0.self_attention.to_query.weight",
         "hidream": "double_stream_blocks.0.block.attn1.to_q.weight",
         "ernie_image": "layers.0.self_attention.to_q.weight",
         "wan": "blocks.0.attn1.to_q.weight"}.get(family, "transformer_blocks.0.attn.to_q.weight")
    if "int8" in name:
        assert torch.int8 in stored.values()
    else:
        assert stored[q] == (torch.bfloat16 if "bf16" in name else torch.float8_e4m3fn)
    scaled = {n for n, m in paged.named_modules() if weight_scale(m) is not None}  # values: by the outputs
    assert scaled == {n for n, m in whole.named_modules() if weight_scale(m) is not None}
    assert bool(scaled) == ("scaled" in name or "int8" in name)
    rotated = {n: rotation_group(m) for n, m in paged.named_modules() if rotation_group(m)}
    assert rotated == {n: rotation_group(m) for n, m in whole.named_modules() if rotation_group(m)}
    assert bool(rotated) == ("int8" in name)
    _same_outputs(paged, whole, forward)


def test_a_file_scaling_an_embedding_is_built_whole_as_the_manager_would_page_it_after(files, tmp_path):
    """A scaled fp8 file that also scales a layer other than a linear one (every 2-D weight of Ideogram 4,
    its image-indicator embedding too): the whole build dequantises that weight once, which a block build
    cannot, so the loader builds whole (the manager pages it afterwards) and the model runs."""
    from test_scaled_fp8 import quantise

    path = tiny_flux._save(tmp_path / "all-scaled.safetensors", quantise(tiny_ideogram4.original_state(), PREFIX)[0])
    whole = load_unet_file(path, torch.float32).modules["unet"]
    built = load_unet_file(path, torch.float32, offload=lambda n, b: _disk()).modules["unet"]
    assert offload.offloaded(built) is None and type(built.embed_image_indicator) is torch.nn.Embedding
    assert torch.equal(_ideogram4_forward(built), _ideogram4_forward(whole))


def test_a_bad_family_file_fails_by_name_before_any_block_is_written(files, tmp_path):
    from nodes.checkpoint.load import CheckpointError
    from nodes.checkpoint.tensors import LazyState

    good = LazyState.open(files / "z_image.safetensors").materialise()
    plan = offload.Plan(onload="cpu", rest="disk", note="test", folder_root=str(tmp_path))
    key = PREFIX + "layers.1.feed_forward.w2.weight"
    wrong = dict(good, **{key: torch.zeros(good[key].shape[0], 3)})
    bad = tmp_path / "files"
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*layers\.1\.feed_forward\.w2\.weight.*, 3\)"):
        load_unet_file(tiny_flux._save(bad / "bad.safetensors", wrong), torch.float32, offload=lambda n, b: plan)
    lacking = {k: v for k, v in good.items() if k != PREFIX + "noise_refiner.0.attention.qkv.weight"}
    with pytest.raises(CheckpointError,
                       match=r"lacking\.safetensors.*missing.*noise_refiner\.0\.attention\.to_q\.weight"):
        load_unet_file(tiny_flux._save(bad / "lacking.safetensors", lacking), torch.float32,
                       offload=lambda n, b: plan)
    assert [p.name for p in tmp_path.iterdir()] == ["files"]  # no block folder was made


def test_a_bf16_z_image_folders_transformer_pages_with_its_timestep_embedder_in_fp32(tmp_path):
    """A diffusers folder's transformer/ (bf16, as on the hub) built straight into disk blocks: the timestep
    embedder, which the Z-Image loader holds in the compute dtype, is made so before its blocks are written
    (once the hooks hold a layer, changing it breaks the forward)."""
    from diffusers import ZImageTransformer2DModel

    from nodes.checkpoint.folders import folder_component
    from nodes.checkpoint.z_image_load import time_embedder_in_compute_dtype

    folder = tmp_path / "transformer"
    copy.deepcopy(tiny_z_image.components()["transformer"]).to(torch.bfloat16).save_pretrained(
        str(folder), safe_serialization=True)
    whole = time_embedder_in_compute_dtype(folder_component(folder, ZImageTransformer2DModel, torch.float32,
                                                            as_stored=True))
    paged = folder_component(folder, ZImageTransformer2DModel, torch.float32, lambda n, b: _disk(), as_stored=True,
                             ready=time_embedder_in_compute_dtype)
    paged = time_embedder_in_compute_dtype(paged)  # as load_folder does after: nothing left to change
    assert offload.offloaded(paged).paged
    assert paged.layers[0].attention.to_q.weight.dtype == torch.bfloat16
    assert paged.t_embedder.mlp[0].weight.dtype == torch.float32
    _same_outputs(paged, whole, _z_image_forward)


def test_traced_rows_give_the_familys_own_conversion_and_refuse_a_mixing_one():
    """The rows traced from diffusers' SD3 converter (splits, the swapped adaLN halves) give its very tensors."""
    from nodes.checkpoint.paged_files import traced_rows
    from nodes.checkpoint.sd3_load import _converted

    state = tiny_sd3.original_transformer("medium")
    rows = traced_rows(_converted, {k: tuple(v.shape) for k, v in state.items()})
    ours = {name: t for key, convert in rows for name, t in convert(state[key]).items()}
    theirs = _converted(dict(state))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert any(len(convert(torch.empty(0))) == 3 for _, convert in rows)  # a fused qkv split in three
    with pytest.raises(ValueError, match="several file tensors"):
        traced_rows(lambda s: {"both": torch.cat([s["a"], s["b"]])}, {"a": (2, 3), "b": (2, 3)})


def test_traced_rows_give_ovis_stacked_mlp_inputs_in_pieces_only_where_the_layout_stacks():
    """Ovis-Image's conversion stacks ComfyUI's up and gate projections into diffusers' MLP input: traced with
    ``stacks``, the two file tensors give that tensor's two pieces, and joined they equal the conversion's own."""
    from nodes.checkpoint import ovis_keys
    from nodes.checkpoint.paged import Piece, joined
    from nodes.checkpoint.paged_files import traced_rows

    state = tiny_ovis.original_transformer()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    with pytest.raises(ValueError, match="several file tensors"):
        traced_rows(ovis_keys.original_to_diffusers, shapes)
    rows = traced_rows(ovis_keys.original_to_diffusers, shapes, stacks=True)
    ours = {name: t for key, convert in rows for name, t in convert(state[key]).items()}
    pieces = [k for k in ours if isinstance(k, Piece)]
    assert {p.name for p in pieces} == {"transformer_blocks.0.ff.net.0.proj.weight",
                                        "transformer_blocks.0.ff.net.0.proj.bias",
                                        "transformer_blocks.0.ff_context.net.0.proj.weight",
                                        "transformer_blocks.0.ff_context.net.0.proj.bias"}
    assert all(p.count == 2 for p in pieces) and len(pieces) == 8
    theirs = ovis_keys.original_to_diffusers(dict(state))
    ours = joined(ours)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    with pytest.raises(ValueError, match="1 of its 2 stacked pieces"):
        joined({pieces[0]: torch.zeros(2)})


def test_an_ovis_file_quantising_only_one_of_gate_and_up_fails_by_name(tmp_path):
    """Comfy-Org's int8 files may quantise a layer and leave its neighbour (here every other linear): an Ovis
    block's gate and up projections stored apart so cannot be one fused layer, and both builds say which."""
    from test_int8_quant import quantise_int8

    from nodes.checkpoint.load import CheckpointError

    path = tiny_flux._save(tmp_path / "mixed.safetensors", quantise_int8(tiny_ovis.original_transformer(), PREFIX)[0])
    for ask in (None, lambda n, b: _disk()):
        with pytest.raises(CheckpointError, match=r"mixed\.safetensors.*img_mlp\.gate_proj and up_proj are stored"):
            load_unet_file(path, torch.float32, offload=ask)
