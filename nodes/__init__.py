"""Kiln's built-in node library, registered through the ``kiln.nodes`` entry point."""
from __future__ import annotations

import importlib

#: One module per family; a module missing here is simply not registered yet.
FAMILIES = ("image", "latent", "sampling", "loaders", "text", "vae", "grid")


def register(registry) -> None:
    for family in FAMILIES:
        try:
            module = importlib.import_module(f"nodes.{family}")
        except ModuleNotFoundError as exc:
            if exc.name == f"nodes.{family}":
                continue
            raise
        registry.add_module(module)
