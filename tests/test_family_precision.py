"""``--precision auto`` on a GPU follows the family (nodes.runtime.precision, ``Family.inference_dtypes``).

SD-era UNets keep float16; FLUX and its kin take bfloat16; Qwen-Image, HiDream, Lumina 2, Z-Image and
HunyuanImage overflow in float16 (black images), so ``auto`` never gives them float16: bfloat16, else
float32 on a GPU without it. There is no GPU here, so the loaders are handed the rule a GPU manager would
give them (``DtypeRule(gpu=True)``) and load the tiny files, on the CPU, through the real loading code:
the dtype of every loaded parameter is what is checked. The messages are checked through the nodes with a
CPU manager, where ``--precision`` forces a dtype a family is not known to hold in.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import tiny_flux
import tiny_models
import tiny_qwen_image
from flow_family_files import models_root
from engine.context import Environment, Paths
from node_call import Called, call
from nodes import families, split_loaders
from nodes.checkpoint.load import load_checkpoint
from nodes.checkpoint.split import TextFile, family_for_texts, load_text_files, load_unet_file
from nodes.runtime import precision
from nodes.runtime.models import ModelManager

GPU = precision.DtypeRule("auto", gpu=True, gpu_bf16=True)
OLD_GPU = precision.DtypeRule("auto", gpu=True, gpu_bf16=False)  # before Ampere: no native bfloat16
#: Families ComfyUI runs in bfloat16 or float32 only (supported_inference_dtypes), and ones it starts in float16.
NEVER_FP16 = {"qwen_image", "qwen_image21", "qwen_image_layered", "hidream", "lumina2", "z-image", "hunyuan_image",
              "hunyuan_image_refiner",
              "kandinsky5", "joyimage", "ernie_image", "ideogram4", "cosmos_predict2", "anima"}
FP16_FIRST = {"sd1", "sd2", "sdxl", "sdxl-refiner", "sd3", "wan21", "pixart_sigma"}


def _make(root: Path) -> Path:
    from safetensors.torch import save_file

    from test_flux_controlnet import tiny_controlnet

    tiny_flux.make_models_folder(root)
    tiny_qwen_image.make_models_folder(root)
    from test_qwen_image_blockwise import patch_state

    (root / "controlnet").mkdir()
    save_file({k: v.contiguous() for k, v in tiny_controlnet().state_dict().items()},
              str(root / "controlnet" / "tiny-flux-controlnet.safetensors"))
    (root / "model_patches").mkdir()
    save_file({k: v.contiguous() for k, v in patch_state().items()},
              str(root / "model_patches" / "tiny-qwen-blockwise.safetensors"))
    return root


root = models_root(_make, "family-precision")


def _dtypes(loaded) -> dict[str, set]:
    return {name: {p.dtype for p in module.parameters() if p.is_floating_point()}
            for name, module in loaded.modules.items() if hasattr(module, "parameters")}


def test_auto_gives_each_family_its_first_dtype_the_gpu_computes():
    by_name = {f.name: f for f in families.ALL}
    for name in NEVER_FP16:
        assert by_name[name].inference_dtypes == precision.NO_FP16, name
        assert GPU.for_family(by_name[name]) is torch.bfloat16
        assert OLD_GPU.for_family(by_name[name]) is torch.float32, name  # not float16, which overflows
    for name in FP16_FIRST:
        assert GPU.for_family(by_name[name]) is torch.float16, name
    assert GPU.for_family(by_name["flux"]) is torch.bfloat16 and OLD_GPU.for_family(by_name["flux"]) is torch.float16
    assert GPU.for_family(None) is torch.float16  # a load with no family: a VAE, a ControlNet of SD
    for family in families.ALL:  # a CPU is float32 whatever the family; a forced dtype is forced for every one
        assert precision.DtypeRule("auto", gpu=False).for_family(family) is torch.float32
        assert precision.DtypeRule("fp16", gpu=True).for_family(family) is torch.float16
        assert family.inference_dtypes[-1] == "fp32" and set(family.inference_dtypes) <= set(precision.DTYPES)


def test_vaes_decode_in_bf16_on_a_gpu_else_float32_never_float16():
    assert GPU.for_vae() is torch.bfloat16 and OLD_GPU.for_vae() is torch.float32
    # elsewhere the loader's own choice stands: the model's dtype, float32 where the VAE's config asks
    assert precision.DtypeRule("auto", gpu=False).for_vae() is None
    assert precision.DtypeRule("fp16", gpu=True).for_vae() is None


def test_a_plain_dtype_passes_through_and_a_cpu_manager_gives_float32():
    assert precision.resolve(torch.float32, families.by_name("qwen_image")) is torch.float32
    manager = ModelManager(device="cpu")
    assert manager.dtype_rule == precision.DtypeRule("auto", gpu=False, gpu_bf16=False)
    assert manager.dtype is torch.float32


def test_unet_files_load_in_their_familys_dtype(root):
    flux = load_unet_file(root / "diffusion_models" / "tiny-flux-dev.safetensors", GPU)
    qwen = load_unet_file(root / "diffusion_models" / "tiny-qwen_image.safetensors", GPU)
    assert _dtypes(flux)["unet"] == {torch.bfloat16} and _dtypes(qwen)["unet"] == {torch.bfloat16}
    old_flux = load_unet_file(root / "diffusion_models" / "tiny-flux-dev.safetensors", OLD_GPU)
    old_qwen = load_unet_file(root / "diffusion_models" / "tiny-qwen_image.safetensors", OLD_GPU)
    assert _dtypes(old_flux)["unet"] == {torch.float16} and _dtypes(old_qwen)["unet"] == {torch.float32}


def test_text_encoders_load_in_their_familys_dtype(root):
    files = [TextFile.read(root / "text_encoders" / "tiny-qwen_2.5_vl.safetensors")]
    qwen = load_text_files(files, family_for_texts("qwen_image", files), GPU)
    assert set().union(*_dtypes(qwen).values()) == {torch.bfloat16}
    files = [TextFile.read(root / "text_encoders" / name) for name in ("tiny-clip_l.safetensors", "tiny-t5xxl.safetensors")]
    flux = load_text_files(files, family_for_texts("flux", files), OLD_GPU)
    assert set().union(*_dtypes(flux).values()) == {torch.float16}


def test_checkpoints_and_pipeline_folders_load_every_module_in_the_familys_dtype(root, tiny_models_dir):
    sd1 = load_checkpoint(Path(tiny_models_dir) / "checkpoints" / tiny_models.checkpoint_name("sd1"), GPU,
                          vae_dtype=GPU.for_vae())  # as the CheckpointLoader node passes it
    assert _dtypes(sd1)["unet"] == {torch.float16} and _dtypes(sd1)["vae"] == {torch.bfloat16}
    aio = load_checkpoint(root / "checkpoints" / "tiny-flux-dev-aio.safetensors", GPU)
    assert _dtypes(aio)["unet"] == {torch.bfloat16}
    old = load_checkpoint(root / "checkpoints" / "tiny-flux-dev-aio.safetensors", OLD_GPU, vae_dtype=OLD_GPU.for_vae())
    assert _dtypes(old)["unet"] == {torch.float16} and _dtypes(old)["vae"] == {torch.float32}  # VAEs: never fp16
    folder = load_checkpoint(root / "checkpoints" / "tiny-qwen-image-diffusers", GPU)
    assert set(folder.modules) >= {"unet", "text_encoder"}
    for name, found in _dtypes(folder).items():
        assert torch.float16 not in found, name  # the transformer, its Qwen2.5-VL and its VAE
    assert _dtypes(folder)["unet"] == {torch.bfloat16}


def test_a_controlnet_loads_in_the_dtype_of_the_family_it_drives(root):
    from nodes.control.load import load_controlnet

    loaded = load_controlnet(root / "controlnet" / "tiny-flux-controlnet.safetensors", GPU)
    assert loaded.family.name == "flux" and {p.dtype for p in loaded.network.parameters()} == {torch.bfloat16}


def test_a_model_patch_loads_in_the_dtype_of_the_family_it_patches(root):
    from nodes.model_patch_nodes import load_model_patch

    path = root / "model_patches" / "tiny-qwen-blockwise.safetensors"  # DiffSynth's Qwen-Image ControlNet
    for rule, dtype in ((GPU, torch.bfloat16), (OLD_GPU, torch.float32)):
        loaded = load_model_patch(path, rule)
        assert loaded.family.name == "qwen_image" and {p.dtype for p in loaded.network.parameters()} == {dtype}


def _unet_messages(root: Path, tmp_path: Path, mode: str, name: str) -> list[str]:
    manager = ModelManager(device="cpu", precision=mode)
    rec = Called()
    try:
        environment = Environment(paths=Paths.under(tmp_path / mode, models=root), models=manager)
        call(split_loaders.unet_loader, environment, rec, unet_name=name)
    finally:
        manager.unload_all(collect=False)
    return rec.messages


def test_the_loader_says_the_dtype_and_warns_where_a_forced_one_may_overflow(root, tmp_path):
    (auto,) = _unet_messages(root, tmp_path, "auto", "tiny-qwen_image.safetensors")
    assert " on cpu in float32" in auto and "overflow" not in auto
    (forced,) = _unet_messages(root, tmp_path, "fp16", "tiny-qwen_image.safetensors")
    assert " in float16" in forced and "qwen_image is not known to hold in float16" in forced
    assert "bfloat16 or float32" in forced
    (held,) = _unet_messages(root, tmp_path, "fp16", "tiny-flux-dev.safetensors")  # FLUX holds in float16
    assert " in float16" in held and "overflow" not in held


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on the CI hosts)")
def test_on_a_cuda_gpu_the_manager_loads_qwen_image_in_bf16_and_sd_in_fp16_with_a_bf16_vae(root, tiny_models_dir, tmp_path):
    """The rule as a real GPU manager makes it (bench/gpu/checks.sh runs this where a GPU is lent)."""
    manager = ModelManager(device="cuda")
    native = torch.cuda.get_device_capability()[0] >= 8
    assert manager.dtype_rule == precision.DtypeRule("auto", gpu=True, gpu_bf16=native)
    shutil.copyfile(Path(tiny_models_dir) / "checkpoints" / tiny_models.checkpoint_name("sd1"),
                    root / "checkpoints" / tiny_models.checkpoint_name("sd1"))
    try:
        env = Environment(paths=Paths.under(tmp_path, models=root), models=manager)
        rec = Called()
        (qwen,) = call(split_loaders.unet_loader, env, rec, unet_name="tiny-qwen_image.safetensors")
        with qwen.unet() as net:
            assert {p.dtype for p in net.parameters()} == {torch.bfloat16 if native else torch.float32}
        from nodes import loaders

        sd1, _, vae = call(loaders.checkpoint_loader, env, rec, ckpt_name=tiny_models.checkpoint_name("sd1"))
        with sd1.unet() as net:
            assert {p.dtype for p in net.parameters()} == {torch.float16}
        with vae.module() as net:
            assert {p.dtype for p in net.parameters()} == {torch.bfloat16 if native else torch.float32}
        shutil.copyfile(Path(tiny_models_dir) / "vae" / "tiny-vae.safetensors", root / "vae" / "tiny-vae.safetensors")
        (alone,) = call(loaders.vae_loader, env, rec, vae_name="tiny-vae.safetensors")  # VAELoader: never fp16
        with alone.module() as net:
            assert {p.dtype for p in net.parameters()} == {torch.bfloat16 if native else torch.float32}
    finally:
        manager.unload_all(collect=False)


def test_no_native_bf16_is_read_for_a_cpu_or_a_cuda_name_without_cuda():
    """A manager named for CUDA on a host without it (as the offload tests make) reads no device capability."""
    assert not precision.gpu_computes_bf16("cpu")
    if not torch.cuda.is_available():
        assert not precision.gpu_computes_bf16("cuda:0")
        assert ModelManager(device="cuda").dtype_rule == precision.DtypeRule("auto", gpu=True, gpu_bf16=False)
