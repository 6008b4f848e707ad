"""Model placement for the node library: devices, dtypes, offload, weight patches.

The engine stays a general DAG engine: it only holds the object the node library
hands it (``Environment.models``, a :class:`engine.context.ModelHost`). This package
provides that object (:class:`nodes.runtime.models.ModelManager`) and the weight
patching that LoRA uses (:mod:`nodes.runtime.patches`).
"""
