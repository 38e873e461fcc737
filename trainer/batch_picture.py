"""A picture of one batch as the loader hands it to the model: ``tools/show_batch.py``, and
``train_batch.png`` that a run draws from its first batch.

The tensors are drawn as they are, only de-normalized (times ImageNet's std, plus its mean)
and clipped to [0, 1]: crops, flips, automatic augmentation, EXIF rotation, the crop size and
the channel order are the model's. Each tile is titled with its label's class name.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from pipelines.common import IMAGENET_MEAN, IMAGENET_STD
from trainer.metrics import PlotUnavailable, figure_format

TRAIN_BATCH = "train_batch.png"


def to_pictures(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` normalized images (any float dtype, any memory format) -> float32
    ``(B, H, W, 3)`` in [0, 1] on the CPU."""
    images = images.detach().float().cpu()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


def draw_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: Sequence[str],
    out_path: str,
    *,
    title: str = "",
    max_images: int = 64,
) -> str:
    """Draw the first ``max_images`` of a batch in a grid, each titled with its class name;
    returns ``out_path``. PlotUnavailable without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "matplotlib is not installed: pip install -e '.[plot]' to draw a batch"
        ) from None
    picture_format = figure_format(out_path)
    pictures = to_pictures(images[:max_images])
    names = [
        class_names[k] if 0 <= k < len(class_names) else str(k)
        for k in labels[:max_images].tolist()
    ]
    count = len(pictures)
    columns = min(8, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.6 * columns, 1.8 * rows + 0.4), squeeze=False
    )
    for index, ax in enumerate(axes.flat):
        ax.axis("off")
        if index < count:
            ax.imshow(pictures[index].numpy())
            ax.set_title(names[index], fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    from pipelines.fileio import atomic_write

    atomic_write(out_path, lambda f: fig.savefig(f, format=picture_format, dpi=100))
    plt.close(fig)
    return out_path
