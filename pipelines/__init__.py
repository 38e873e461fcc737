"""Everything that turns a list file into ``(images, labels)`` batches on a device.

``build_loader`` is the one entry the trainer and the benchmarks call; each backend is one
module here (``dali``, ``pil``). This package imports nothing else of the project's.
"""
