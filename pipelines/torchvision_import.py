"""``from pipelines.torchvision_import import torchvision``: torchvision, imported without
importing torch._dynamo.

torchvision's ``ops/roi_align.py`` (since pytorch/vision#8436, 2024) imports one function,
``torch._dynamo.utils.is_compile_supported``, at module level, which imports all of Dynamo
(and sympy with it): measured here with torch 2.14.1 / torchvision 0.29.1, ``import
torchvision`` takes 3.5 s and 815 MB RSS that way, 2.0 s and 665 MB without. Every rank, every
PIL workers' server and every tool pays it at start, for an op (roi_align) a classifier never
calls; torchvision's own comment beside that import says Dynamo should load lazily.

So, while torchvision imports, ``torch._dynamo.utils`` is a stand-in holding only that
function, which imports the real one on its first call; the stand-in is gone from
``sys.modules`` once the import ends, so ``torch.compile`` (``--compile``) and anything else
that asks for Dynamo later imports the real package as usual. Where Dynamo is already
imported, or torchvision is, this is a plain import.
"""

from __future__ import annotations

import sys
import types

import torch

__all__ = ["torchvision"]


def _is_compile_supported(device_type):
    from torch._dynamo.utils import is_compile_supported

    return is_compile_supported(device_type)


def _import_torchvision() -> types.ModuleType:
    if "torchvision" in sys.modules or "torch._dynamo" in sys.modules:
        import torchvision

        return torchvision
    package = types.ModuleType("torch._dynamo")
    utils = types.ModuleType("torch._dynamo.utils")
    utils.is_compile_supported = _is_compile_supported
    package.utils = utils
    sys.modules["torch._dynamo"], sys.modules["torch._dynamo.utils"] = package, utils
    try:
        import torchvision
    finally:
        for name, stand_in in (("torch._dynamo.utils", utils), ("torch._dynamo", package)):
            if sys.modules.get(name) is stand_in:
                del sys.modules[name]
        if torch.__dict__.get("_dynamo") is package:
            del torch._dynamo
    return torchvision


torchvision = _import_torchvision()
