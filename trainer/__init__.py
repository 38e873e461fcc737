"""The DDP trainer: ``torchrun --nproc_per_node=N trainer/main.py``.

Reusable pieces: ``trainer.config`` (Config, build_parser, parse_config), ``trainer.dist``
(setup_distributed, print0, all-reduce helpers), ``trainer.model`` (build_model, wrap_ddp,
load_pretrained), ``trainer.engine`` (train_step, train_one_epoch, evaluate, make_optimizer,
make_scheduler, build_step) and ``trainer.checkpoint`` (atomic_save, export_model). Beside
``main.py``, the script's own parts: ``trainer.data`` (the lists and classes a run trains on),
``trainer.run_dir`` (the output folder: never over an earlier run, one run at a time),
``trainer.launch`` (starting itself under torchrun, exit statuses), ``trainer.nodes`` (what
every rank and node must agree on), ``trainer.preemption`` (signals, step checkpoints) and
``trainer.weights`` (torchvision's weights by name: resolved, fetched once per node).
"""

from trainer.config import TrainerError

__all__ = ["TrainerError"]
