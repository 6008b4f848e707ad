"""Deterministic samplers of ComfyUI's list that diffusers has no scheduler for.

Importing this module does not import torch.
"""
from __future__ import annotations

from typing import Any

#: name -> stepper class, looked up by ``steppers.kiln_stepper_class``.
STEPPERS: dict[str, Any] = {}
