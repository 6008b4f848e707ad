"""LyCORIS LoHa and LoKr modules: a weight difference rebuilt from its factors when it is used.

Facts as ComfyUI and LyCORIS apply them (own code, none copied):

* LoHa (``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``): the Hadamard product
  ``(w1_a @ w1_b) * (w2_a @ w2_b)`` reshaped to the weight, times ``alpha / rank`` with
  rank = ``hada_w1_b.shape[0]`` (1 without alpha). With Tucker cores ``hada_t1``/``hada_t2``
  (convolutions) each factor is ``t[i, j, k, l] * w_b[j, in] * w_a[i, out] -> [out, in, k, l]``
  (``w_a`` is then stored rank-first).
* LoKr (``lokr_w1`` or ``lokr_w1_a @ lokr_w1_b``; ``lokr_w2`` or ``lokr_w2_a @ lokr_w2_b``,
  optionally through the Tucker core ``lokr_t2``): the Kronecker product ``kron(w1, w2)``
  reshaped to the weight (``w1`` gains two unit axes when ``w2`` is a 4-D kernel). The scale is
  ``alpha / rank`` where rank is that of the factored ``w2`` (``lokr_w2_b.shape[0]``), else of
  the factored ``w1``; when both are stored whole, the scale is 1 whatever the alpha.

The difference is as large as the weight, so it is not kept: :class:`Product` holds the small
factors and rebuilds the difference where the weight is patched, or, beside an fp8 or paged
linear layer, on every call (the price of not holding a weight-sized tensor per layer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: every tensor suffix a LoHa or LoKr module may have, by the part name it is stored under
SUFFIXES = tuple(f".{p}" for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
                                   "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b",
                                   "lokr_t2"))


def _tucker(t: Any, b: Any, a: Any) -> Any:
    import torch

    return torch.einsum("ijkl,jr,ip->prkl", t, b, a)


def _loha(f: dict[str, Any]) -> Any:
    if "hada_t1" in f:
        return _tucker(f["hada_t1"], f["hada_w1_b"], f["hada_w1_a"]) * \
            _tucker(f["hada_t2"], f["hada_w2_b"], f["hada_w2_a"])
    return (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])


def _lokr(f: dict[str, Any]) -> Any:
    import torch

    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = _tucker(f["lokr_t2"], f["lokr_w2_b"], f["lokr_w2_a"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1.contiguous(), w2.contiguous())  # an einsum's result may be strided (kron needs views)


def read(parts: dict[str, Any], alpha: Any) -> tuple[str, dict[str, Any], float] | str:
    """(kind, factors, scale) of one module's LyCORIS tensors, or why they are incomplete."""
    names = {k for k in parts if f".{k}" in SUFFIXES}
    hada = {k for k in names if k.startswith("hada_")}
    if hada and hada != names:
        return "LoHa and LoKr tensors in one module"
    if hada:
        need = {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} | ({"hada_t2"} if "hada_t1" in hada else set()) \
            | ({"hada_t1"} if "hada_t2" in hada else set())
        if need - hada:
            return f"LoHa without {sorted(need - hada)[0]}"
        rank = parts["hada_w1_b"].shape[0]
        return "loha", {k: parts[k] for k in hada}, float(alpha) / rank if alpha is not None else 1.0
    w1 = "lokr_w1" in names or {"lokr_w1_a", "lokr_w1_b"} <= names
    w2 = "lokr_w2" in names or {"lokr_w2_a", "lokr_w2_b"} <= names
    if not (w1 and w2):
        return f"LoKr without its {'w1' if not w1 else 'w2'} factor"
    rank = parts["lokr_w2_b"].shape[0] if "lokr_w2" not in names else \
        parts["lokr_w1_b"].shape[0] if "lokr_w1" not in names else None
    return "lokr", {k: parts[k] for k in names}, float(alpha) / rank if alpha is not None and rank else 1.0


def full_shape(kind: str, factors: dict[str, Any]) -> tuple[int, ...]:
    """The shape of the rebuilt difference, computed without its numbers (on the meta device)."""
    return tuple(_rebuild(kind, {k: v.to("meta") for k, v in factors.items()}).shape)


def _rebuild(kind: str, factors: dict[str, Any]) -> Any:
    return _loha(factors) if kind == "loha" else _lokr(factors)


@dataclass(frozen=True, eq=False)
class Product:
    """A LoHa or LoKr patch for one parameter (see the module doc). ``rows``: the parameter's
    rows of a fused module's difference (FLUX's ``qkv``), or None for all of it."""

    kind: str
    factors: dict
    scale: float
    shape: tuple
    rows: tuple | None = None

    def delta(self, shape: tuple[int, ...], device: Any) -> Any:
        import torch

        full = _rebuild(self.kind, {k: v.to(device, torch.float32) for k, v in self.factors.items()})
        if self.rows is not None:
            full = torch.cat([full[a:b] for a, b in self.rows])
        return full.reshape(shape) * self.scale

    def beside(self, device: Any, coefficient: float) -> tuple:
        """The layer-side form ``(self, "product", c)``: the layer rebuilds ``c * delta`` per call
        (``CastLinear.kiln_lora``), so no weight-sized tensor is held for every layer at once. The small
        factors move to ``device`` once here, not on every call."""
        import dataclasses

        import torch

        moved = {k: v.to(device, torch.float32) for k, v in self.factors.items()}
        return (dataclasses.replace(self, factors=moved), "product", coefficient)
