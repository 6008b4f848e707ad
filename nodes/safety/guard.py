"""The server's safety guard: the node library's :class:`engine.guard.OutputGuard`.

``kiln serve --safety-filter MODE --safety-checker NAME`` builds one at start-up
(loading the checker then, so a missing or foreign file stops the server before
it accepts a job) and installs it as ``env.output_guard``. From then on the
image writer passes every batch through :meth:`SafetyGuard.check_images` and the
executor every sampler preview through :meth:`SafetyGuard.check_preview`; no
graph can route an image around either, because they are the only ways out.
"""
from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from engine.context import Environment, NodeError
from engine.events import Preview
from engine.guard import GuardRefused
from nodes.safety.checker import FOLDER, SafetyCheckerHandle
from nodes.safety.modes import MODES, Filtered, apply_mode

WHERE_IT_GOES = ("put diffusers' StableDiffusionSafetyChecker there: the safety_checker folder of a Stable "
                 "Diffusion 1.x diffusers repository (config.json + model.safetensors), or its weights as one "
                 ".safetensors file; Kiln never downloads it")


#: Preview checks may take at most this share of a job's time. A preview the guard has
#: no time to check is not sent: on a GPU (a check takes milliseconds) every preview is
#: checked; on a CPU, where the full-size checker takes seconds, most are withheld
#: rather than slowing every sampler step by a checker pass.
PREVIEW_SHARE = 0.2


class SafetyGuard:
    """Classifies with one checker and applies one mode to everything a job lets out."""

    def __init__(self, env: Environment, mode: str, checker: SafetyCheckerHandle,
                 preview_share: float = PREVIEW_SHARE) -> None:
        self.env, self.mode, self.checker = env, mode, checker
        self.preview_share = preview_share
        self._next_preview_check = 0.0

    def describe(self) -> dict[str, Any]:
        return {"mode": self.mode, "checker": self.checker.name}

    def check_images(self, images: Any) -> Filtered:
        return apply_mode(images, self.checker.flags(images), self.mode)

    def check_preview(self, preview: Preview) -> Preview | None:
        """The preview as the mode leaves it: unchanged, blurred, black, or None (not sent).

        Previews arriving sooner after a check than the check's cost allows
        (``preview_share``) are not sent either.
        """
        if self.mode == "flag":  # the operator asked for reports only; a preview has none to carry
            return preview
        started = time.monotonic()
        if started < self._next_preview_check:
            return None  # no time to check it, so it is not sent
        try:
            return self._check_preview(preview)
        finally:
            spent = time.monotonic() - started
            self._next_preview_check = time.monotonic() + spent * (1 / self.preview_share - 1)

    def _check_preview(self, preview: Preview) -> Preview | None:
        import numpy as np
        import torch
        from PIL import Image

        with Image.open(io.BytesIO(preview.data)) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        batch = torch.from_numpy(pixels).unsqueeze(0)
        result = self.check_images(batch)
        if not result.count:
            return preview
        if not result.kept:
            return None
        out = Image.fromarray(np.clip(np.rint(result.images[0].numpy() * 255.0), 0, 255).astype(np.uint8), "RGB")
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=80)
        return Preview(data=buf.getvalue(), mime="image/jpeg", width=out.width, height=out.height)


def build_guard(env: Environment, mode: str, checker_name: str) -> SafetyGuard:
    """The guard ``kiln serve`` installs; raises GuardRefused saying what is wrong and where the file goes."""
    from nodes.safety import open_checker

    if mode not in MODES:
        raise GuardRefused(f"--safety-filter: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    folder = Path(env.paths.models.root) / FOLDER
    if not checker_name:
        raise GuardRefused(f"--safety-filter needs --safety-checker NAME, a checker in {folder}; {WHERE_IT_GOES}")
    try:
        handle = open_checker(env, checker_name, "safety_checker")
    except NodeError as exc:
        hint = "" if "StableDiffusionSafetyChecker" in str(exc) else f"; {WHERE_IT_GOES}"
        raise GuardRefused(f"--safety-checker: {exc} (that folder is {folder}){hint}") from None
    return SafetyGuard(env, mode, handle)
