"""The dtype models compute in (``--precision``), and when to suggest another.

``auto`` is half precision (float16) on a GPU and float32 on a CPU: most CPUs have no native half
precision, and there bf16/fp16 matrix products are emulated, about 80x slower (AMD EPYC, AVX2). Intel
Xeons since Sapphire Rapids multiply bfloat16 natively (AMX), where full-size SD 1.5 txt2img took
7.6 s per image in bf16 against 20.8 s in float32 (bench/cpu_precision.py): on such a CPU
``--precision bf16`` is offered in the loaders' messages, not chosen, because float32 is what makes
Kiln's images equal diffusers' float32 pipelines and bf16 moves them a little (4.5/255 there).

On a GPU, ``auto`` follows the family: each declares the dtypes its network holds in, preferred first
(``Family.inference_dtypes``, ComfyUI's ``supported_inference_dtypes``), and the first one the GPU computes
natively is taken. The SD-era UNets keep float16; FLUX and its kin were trained in bfloat16 and take it;
Qwen-Image, HiDream, Lumina 2, Z-Image and others overflow in float16 (black images) and never get it
from ``auto``: bfloat16, else float32 on a GPU without bfloat16. The loaders resolve this once they know
the family (:func:`resolve`), so every module of one load shares one dtype. A VAE loaded by VAELoader or
from an SD 1.x/2.x/SDXL checkpoint decodes in bfloat16 there (float32 without it), never float16, as in
ComfyUI: SDXL's VAE overflows in float16.
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

#: ``--precision`` choices -> torch dtype names; "auto" is :func:`dtype_for`'s rule
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
CHOICES = ("auto", *DTYPES)
#: CPU flags of native bfloat16 arithmetic (Linux's names)
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def check_mode(mode: str) -> str:
    if mode not in CHOICES:
        raise ValueError(f"precision must be one of {', '.join(CHOICES)}, got {mode!r}")
    return mode


#: The dtypes a network holds in when its family says nothing, preferred first: the SD-era UNets' (ComfyUI's
#: default), half precision first.
DEFAULT_PREFERENCE = ("fp16", "bf16", "fp32")
#: Trained in bfloat16 and tested in float16 too (ComfyUI's list for FLUX and its kin).
BF16_THEN_FP16 = ("bf16", "fp16", "fp32")
#: Trained in bfloat16 and known to overflow in float16, or not known to hold there (ComfyUI lists bf16 and
#: fp32 only for Qwen-Image, HiDream, Lumina 2, HunyuanImage and others).
NO_FP16 = ("bf16", "fp32")


def dtype_for(mode: str, gpu: bool, preferred: tuple[str, ...] = DEFAULT_PREFERENCE, gpu_bf16: bool = True) -> Any:
    """The compute dtype of ``mode`` on a GPU (``gpu``, ``gpu_bf16``: whether it computes bfloat16
    natively) or a CPU, for a network that holds in the dtypes ``preferred`` (first is best)."""
    import torch

    if mode in DTYPES:
        return getattr(torch, DTYPES[mode])
    if not gpu:
        return torch.float32
    usable = next(name for name in (*preferred, "fp32") if name != "bf16" or gpu_bf16)
    return getattr(torch, DTYPES[usable])


@dataclasses.dataclass(frozen=True)
class DtypeRule:
    """The model manager's precision, for a loader that learns the family only from the file: passed
    where a loader takes ``dtype`` and turned into one by :func:`resolve` once the family is known."""

    mode: str
    gpu: bool
    gpu_bf16: bool = True

    def for_family(self, family: Any) -> Any:
        """The dtype every module of ``family``'s load computes in (None: a family-less load)."""
        preferred = getattr(family, "inference_dtypes", DEFAULT_PREFERENCE)
        return dtype_for(self.mode, self.gpu, preferred, self.gpu_bf16)

    def for_vae(self) -> Any:
        """The dtype VAEs decode in under ``auto`` on a GPU (bfloat16, else float32: :data:`VAE_PREFERENCE`);
        None elsewhere, where the loader's own choice stands (the model's dtype, float32 for a VAE whose
        config asks, SDXL's)."""
        if self.mode != "auto" or not self.gpu:
            return None
        return dtype_for(self.mode, self.gpu, VAE_PREFERENCE, self.gpu_bf16)

    def caution(self, family: Any) -> str:
        """", <why this may fail>" for a loader's message where ``--precision`` forced a dtype the family is
        not known to hold in ("" otherwise)."""
        preferred = getattr(family, "inference_dtypes", DEFAULT_PREFERENCE)
        if self.mode not in DTYPES or self.mode in preferred:
            return ""
        return (f" (--precision {self.mode}: {getattr(family, 'name', 'this model')} is not known to hold in "
                f"{DTYPES[self.mode]}, it may overflow into a black image; it runs in "
                f"{' or '.join(DTYPES[d] for d in preferred)})")


#: The dtypes a VAE decodes in on a GPU under ``auto`` (ComfyUI's rule for every VAE): SDXL's overflows in
#: float16, and a VAE file alone does not say which family's it is.
VAE_PREFERENCE = NO_FP16


def resolve(dtype: Any, family: Any) -> Any:
    """``dtype`` itself, or where it is a :class:`DtypeRule` (a load through the model manager), the rule's
    dtype for ``family``: the one place a load's family turns into its dtype."""
    return dtype.for_family(family) if isinstance(dtype, DtypeRule) else dtype


def gpu_computes_bf16(device: str) -> bool:
    """Whether GPU ``device`` computes bfloat16 natively: CUDA from compute capability 8 (Ampere) on, Apple
    GPUs from macOS 14; elsewhere bfloat16 would be emulated, slower than float32."""
    import torch

    if device.startswith("cuda"):  # a manager named for CUDA on a host without it (tests): no
        return torch.cuda.is_available() and torch.cuda.get_device_capability(torch.device(device))[0] >= 8
    if device.startswith("mps"):
        newer = getattr(torch.backends.mps, "is_macos_or_newer", None)
        return bool(newer and newer(14, 0))
    return False


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX-512 BF16), from Linux's CPU flags;
    False where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return any(flag in flags for flag in NATIVE_BF16_FLAGS)


def note(mode: str, gpu: bool) -> str:
    """", <what --precision could give>" for a loader's message: only where ``auto`` left a CPU with
    native bfloat16 in float32."""
    if mode != "auto" or gpu or not cpu_has_native_bf16():
        return ""
    return (" (this CPU multiplies bfloat16 natively: --precision bf16 samples about 2.7x faster, with images "
            "slightly different from float32's)")
