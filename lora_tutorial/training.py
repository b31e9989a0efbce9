"""The Lightning ``Trainer`` and the experiment manager, built from the ``trainer`` / ``exp_manager`` config.

``build_trainer(cfg)`` turns the config into a ``pl.Trainer``. The one piece of arithmetic is gradient
accumulation: NeMo configs give a *global* batch size, and each optimizer step must see that many
examples, so every process accumulates ``global / (micro x devices x nodes)`` micro-batches.

``exp_manager(trainer, cfg)`` then decides where the run lives and wires logging and checkpoints,
with NeMo's layout::

    <explicit_log_dir or exp_dir/name>/
        metrics.csv                 every logged value (train_loss, lr, val_loss, val_em, val_f1)
        hparams.yaml                the resolved config
        checkpoints/
            last.ckpt, <name>--step=...ckpt   adapter + optimizer state, for resuming
            <name>.safetensors                the adapter-only file, written when training ends
"""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

_PRECISIONS = {"32", "32-true", "bf16-mixed", "16-mixed", "bf16-true"}


def resolve_devices(cfg: DictConfig) -> int:
    """How many processes per node the trainer will run (``devices`` may be an int, a list or "auto")."""
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices > 0:
        return devices
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    accelerator = resolve_accelerator(cfg)
    return max(1, torch.cuda.device_count()) if accelerator == "gpu" else 1


def resolve_accelerator(cfg: DictConfig) -> str:
    accelerator = str(cfg.trainer.accelerator)
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


def gradient_accumulation(cfg: DictConfig) -> int:
    """global_batch_size / (micro_batch_size x devices x num_nodes), which must be a whole number."""
    micro, global_batch = cfg.model.micro_batch_size, cfg.model.global_batch_size
    replicas = resolve_devices(cfg) * cfg.trainer.num_nodes
    if micro < 1 or global_batch < 1 or global_batch % (micro * replicas):
        raise ValueError(f"model.global_batch_size={global_batch} must be a positive multiple of "
                         f"model.micro_batch_size={micro} x trainer.devices x trainer.num_nodes={replicas} "
                         f"(= {micro * replicas})")
    return global_batch // (micro * replicas)


def resolve_precision(cfg: DictConfig) -> str:
    precision = str(cfg.trainer.precision)
    if precision not in _PRECISIONS:
        raise ValueError(f"trainer.precision={precision!r}; expected one of {sorted(_PRECISIONS)}")
    on_cpu = resolve_accelerator(cfg) == "cpu"
    if precision == "16-mixed" and on_cpu:
        print("trainer.precision=16-mixed needs a GPU; using bf16-mixed on the CPU instead")
        precision = "bf16-mixed"
    if precision == "bf16-mixed" and on_cpu and not cpu_has_native_bf16():
        print("Note: this CPU has no native bf16 matrix instructions (AVX512-BF16 or AMX), so bf16-mixed "
              "will probably be slower than trainer.precision=32 here.")
    return precision


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX): bf16-mixed pays off there."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # private helpers of torch.cpu; assume the best if a future torch drops them
        return True


def build_trainer(cfg: DictConfig, **overrides) -> pl.Trainer:
    """A Lightning Trainer for ``cfg``; loggers and checkpointing are added by ``exp_manager``."""
    t = cfg.trainer
    kwargs = dict(
        accelerator=resolve_accelerator(cfg), devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=resolve_precision(cfg), max_steps=t.max_steps, max_epochs=t.max_epochs,
        val_check_interval=t.val_check_interval, limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps, gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=t.enable_progress_bar,
        enable_model_summary=t.enable_model_summary, accumulate_grad_batches=gradient_accumulation(cfg),
        logger=False, enable_checkpointing=False,
        # SFTModel shards and resumes its own training stream (see sampler.py).
        use_distributed_sampler=False,
    )
    if not t.val_check_interval:  # 0 or null: no validation during training
        kwargs.update(val_check_interval=None, limit_val_batches=0)
    elif t.max_steps and t.max_steps > 0 and isinstance(t.val_check_interval, int):
        # Lightning counts val_check_interval in micro-batches; NeMo users think in optimizer steps.
        kwargs["val_check_interval"] = t.val_check_interval * kwargs["accumulate_grad_batches"]
        kwargs["check_val_every_n_epoch"] = None
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


class SaveAdapterOnTrainEnd(Callback):
    """Write the adapter-only safetensors file when ``fit`` finishes (on global rank 0 only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            from .peft import save_adapters

            save_adapters(pl_module.model, self.path)
            size = self.path.stat().st_size / 2**20
            print(f"Adapter saved to {self.path} ({size:.1f} MiB)")


def log_dir_of(cfg: DictConfig) -> Path:
    em = cfg.exp_manager
    return Path(em.explicit_log_dir) if em.explicit_log_dir else Path(em.exp_dir) / em.name


def exp_manager(trainer: pl.Trainer, cfg: DictConfig) -> Path:
    """Attach the CSV logger, checkpointing and the adapter export to ``trainer``; return the log dir.

    With ``resume_if_exists`` and a ``checkpoints/last.ckpt`` from an earlier (interrupted) run,
    ``trainer.fit`` continues from it: same step, optimizer state and data position.
    """
    em = cfg.exp_manager
    log_dir = log_dir_of(cfg)
    ckpt_dir = log_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if trainer.is_global_zero:
        (log_dir / "hparams.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    loggers = [CSVLogger(save_dir=str(log_dir), name="", version="")]
    try:
        from pytorch_lightning.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401 - optional

        loggers.append(TensorBoardLogger(save_dir=str(log_dir), name="", version="tensorboard"))
    except ImportError:
        pass
    trainer.loggers = loggers
    if em.create_checkpoint_callback:
        p = em.checkpoint_callback_params
        # Without validation there is no val_loss to rank checkpoints by (Lightning would then save none).
        monitor = p.monitor if trainer.limit_val_batches != 0 else None
        trainer.callbacks.append(ModelCheckpoint(
            dirpath=str(ckpt_dir), filename=f"{em.name}--{{step}}", monitor=monitor, mode=p.mode,
            save_top_k=p.save_top_k, save_last=p.save_last, every_n_train_steps=p.every_n_train_steps))
    trainer.callbacks.append(SaveAdapterOnTrainEnd(ckpt_dir / em.adapter_file))
    last = ckpt_dir / "last.ckpt"
    if em.resume_if_exists and last.exists():
        print(f"Resuming from {last}")
        trainer.ckpt_path = str(last)
    elif last.exists() and trainer.is_global_zero:
        stale = sorted(ckpt_dir.glob("*.ckpt"))
        print(f"Starting afresh: removing {len(stale)} checkpoint(s) of an earlier run in {ckpt_dir} "
              "(set exp_manager.resume_if_exists=true to continue it instead)")
        for f in stale:
            f.unlink()
    return log_dir


def adapter_path_of(cfg: DictConfig) -> Path:
    """Where ``exp_manager`` writes the adapter-only file for this config."""
    return log_dir_of(cfg) / "checkpoints" / cfg.exp_manager.adapter_file
