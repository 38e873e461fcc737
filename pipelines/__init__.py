"""Everything that turns a list file into ``(images, labels)`` batches on a device.

``build_loader`` is the one entry the trainer and the benchmarks call; each backend is one
module here (``dali``, ``pil``). This package imports nothing else of the project's.
"""

from __future__ import annotations

from .lists import FetchError, ImageError, ListError

__all__ = ["BACKENDS", "FetchError", "ImageError", "ListError", "build_loader"]


def __getattr__(name: str):
    # torch (and DALI) load only when a loader is asked for: the list tools and the demo data
    # generator import this package too, and their worker processes would each pay ~1.5 s.
    if name in ("build_loader", "BACKENDS"):
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
