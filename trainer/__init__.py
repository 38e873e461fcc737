"""The DDP trainer: ``torchrun --nproc_per_node=N trainer/main.py``.

Reusable pieces: ``trainer.config`` (Config, build_parser, parse_config), ``trainer.dist``
(setup_distributed, print0, all-reduce helpers), ``trainer.model`` (build_model, wrap_ddp,
load_pretrained), ``trainer.engine`` (train_step, train_one_epoch, evaluate, make_optimizer,
make_scheduler, build_step) and ``trainer.checkpoint`` (atomic_save, export_model).
"""

from trainer.config import TrainerError

__all__ = ["TrainerError"]
