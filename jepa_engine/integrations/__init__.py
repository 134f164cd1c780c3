"""Adapters to other people's code: ``accelerate`` (timm, I-JEPA and V-JEPA 2 attention routed through
the fused masked-attention op, timm EMA objects through the one-launch EMA) and ``torchvision_cpu``
(``import timm`` on a CPU torch).

Modules: ``accelerate`` (the public accelerate / restore / stats / patch_model_ema), ``detect`` (which
modules are patched, as what kind), ``patch`` (installing and removing the patched forward, pickling),
``timm`` / ``ijepa`` (recognisers and fused forwards of those attention classes), ``sdpa`` (rerouting
the SDPA calls of other forwards), ``masks`` (the user's mask -> key padding / frame-causal plan),
``record`` (per-module patch records and call counters), ``torchvision_cpu``.

Importing this package loads nothing (the ``.pth`` hook of ``torchvision_cpu`` runs at start-up).
"""
