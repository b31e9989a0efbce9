"""Training: the Lightning ``Trainer``, the experiment manager, and ``train(cfg)`` which uses both.

``build_trainer(cfg)`` turns the ``trainer`` section into a ``pl.Trainer``. The one piece of arithmetic
is gradient accumulation: NeMo configs give a *global* batch size, and each optimizer step must see that
many examples, so every process accumulates ``global / (micro x devices x nodes)`` micro-batches.

``exp_manager(trainer, cfg)`` then decides where the run lives and wires logging and checkpoints, with
NeMo's layout::

    <explicit_log_dir or exp_dir/name>/
        metrics.csv                 one row per logged value (train_loss per optimizer step, val_loss, val_em, val_f1)
        hparams.yaml                the resolved config
        checkpoints/
            last.ckpt, <name>--step=...ckpt   adapter + optimizer state, for resuming
            <name>.safetensors                the adapter-only file, written when training ends

``train(cfg)`` is the whole of ``python -m lora_tutorial train``: seed, trainer, experiment manager,
base model, ``add_adapter``, ``trainer.fit``.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from .config import ConfigError
from .files import write_text
from .peft import peft_configs_from_scheme, save_adapters
from .precision import cpu_has_native_bf16
from .progress_callback import StepProgressBar
from .sft_model import SFTModel

logger = logging.getLogger(__name__)


def resolve_accelerator(cfg: DictConfig) -> str:
    accelerator = str(cfg.trainer.accelerator)
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    return accelerator


def resolve_devices(cfg: DictConfig) -> int:
    """How many processes per node the trainer will run (``devices`` may be an int, a list or "auto")."""
    devices = cfg.trainer.devices
    if isinstance(devices, int) and devices > 0:
        return devices
    if OmegaConf.is_list(devices) or isinstance(devices, (list, tuple)):
        return len(devices)
    if devices != "auto":
        raise ConfigError(f"trainer.devices={devices!r}: expected a positive integer, a list of device ids or 'auto'")
    return max(1, torch.cuda.device_count()) if resolve_accelerator(cfg) in ("gpu", "cuda") else 1


def gradient_accumulation(cfg: DictConfig) -> int:
    """global_batch_size / (micro_batch_size x devices x num_nodes), which must be a whole number."""
    micro, global_batch = cfg.model.micro_batch_size, cfg.model.global_batch_size
    replicas = resolve_devices(cfg) * cfg.trainer.num_nodes
    if global_batch % (micro * replicas):
        raise ConfigError(f"model.global_batch_size={global_batch}: expected a multiple of "
                          f"model.micro_batch_size={micro} x trainer.devices x trainer.num_nodes={replicas} "
                          f"(= {micro * replicas})")
    return global_batch // (micro * replicas)


def resolve_precision(cfg: DictConfig) -> str:
    """The precision to give Lightning.

    ``auto`` is ``bf16-mixed`` where the hardware multiplies bf16 natively (a CPU with AVX512-BF16 or
    AMX, a GPU that supports bf16) and ``32`` elsewhere; the choice is printed. ``16-mixed`` becomes
    ``bf16-mixed`` on a CPU, which has no fp16 path.
    """
    precision = str(cfg.trainer.precision)
    on_cpu = resolve_accelerator(cfg) == "cpu"
    if precision == "auto":
        native = cpu_has_native_bf16() if on_cpu else torch.cuda.is_bf16_supported()
        precision = "bf16-mixed" if native else "32"
        device = "this CPU" if on_cpu else "this GPU"
        print(f"trainer.precision=auto: {precision} ({device} {'has' if native else 'has no'} native bf16 "
              "matrix multiplies)")
    if precision == "16-mixed" and on_cpu:
        print("trainer.precision=16-mixed needs a GPU; using bf16-mixed on the CPU instead")
        precision = "bf16-mixed"
    if precision == "bf16-mixed" and on_cpu and not cpu_has_native_bf16():
        print("Note: this CPU has no native bf16 matrix instructions (AVX512-BF16 or AMX), so bf16-mixed "
              "will probably be slower than trainer.precision=32 here.")
    return precision


def quiet_lightning() -> None:
    """Keep output to what teaches: no banners about absent GPUs/TPUs, no tips to install cloud loggers,
    and no warnings that do not apply here (few DataLoader workers is right: data is tokenized lazily)."""
    for name in ("pytorch_lightning.utilities.rank_zero", "pytorch_lightning.accelerators.cuda"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*does not have many workers.*", ".*Checkpoint directory .* exists and is not empty.*",
                    ".*Experiment logs directory .* exists and is not empty.*",
                    r".*isinstance\(treespec, LeafSpec\)` is deprecated.*"):
        warnings.filterwarnings("ignore", message=message)


def build_trainer(cfg: DictConfig, **overrides) -> pl.Trainer:
    """A Lightning Trainer for ``cfg``; loggers and checkpointing are added by ``exp_manager``."""
    quiet_lightning()
    t = cfg.trainer
    kwargs = dict(
        accelerator=resolve_accelerator(cfg), devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=resolve_precision(cfg), max_steps=t.max_steps, max_epochs=t.max_epochs,
        val_check_interval=t.val_check_interval, limit_val_batches=t.limit_val_batches,
        num_sanity_val_steps=t.num_sanity_val_steps, gradient_clip_val=t.gradient_clip_val,
        log_every_n_steps=t.log_every_n_steps, enable_progress_bar=False,
        callbacks=[StepProgressBar()] if t.enable_progress_bar else [],
        enable_model_summary=t.enable_model_summary, accumulate_grad_batches=gradient_accumulation(cfg),
        logger=False, enable_checkpointing=False,
        use_distributed_sampler=False,  # SFTModel shards and resumes its own training stream (sampler.py)
    )
    if not t.val_check_interval:  # 0 or null: no validation during training
        kwargs.update(val_check_interval=None, limit_val_batches=0)
    elif t.max_steps > 0:
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
            save_adapters(pl_module.model, self.path)


def log_dir_of(cfg: DictConfig) -> Path:
    exp_cfg = cfg.exp_manager
    return Path(exp_cfg.explicit_log_dir) if exp_cfg.explicit_log_dir else Path(exp_cfg.exp_dir) / exp_cfg.name


def adapter_path_of(cfg: DictConfig) -> Path:
    """Where ``exp_manager`` writes the adapter-only file for this config."""
    return log_dir_of(cfg) / "checkpoints" / cfg.exp_manager.adapter_file


def exp_manager(trainer: pl.Trainer, cfg: DictConfig) -> Path:
    """Attach the CSV logger, checkpointing and the adapter export to ``trainer``; return the log dir.

    With ``resume_if_exists`` and a ``checkpoints/last.ckpt`` from an earlier (interrupted) run,
    ``trainer.fit`` continues from it: same step, optimizer state and data position. Without it, what an
    earlier run left in the same directory (checkpoints, ``metrics.csv``, the adapter file) is removed, so
    that it cannot be mistaken for this run's -- except an adapter file this run starts from
    (``model.peft.restore_from_path``).
    """
    exp_cfg = cfg.exp_manager
    log_dir = log_dir_of(cfg)
    ckpt_dir = log_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    last = ckpt_dir / "last.ckpt"
    adapter = ckpt_dir / exp_cfg.adapter_file
    if exp_cfg.resume_if_exists and last.exists():
        print(f"Resuming from {last}")
        trainer.ckpt_path = str(last)
    elif trainer.is_global_zero:
        start_from = cfg.model.peft.get("restore_from_path")
        keep = {Path(start_from).resolve()} if start_from else set()
        for stale in [*ckpt_dir.glob("*.ckpt"), log_dir / "metrics.csv", adapter]:
            if stale.exists() and stale.resolve() not in keep:
                logger.info("removing %s of an earlier run", stale)
                stale.unlink()
    if trainer.is_global_zero:
        write_text(OmegaConf.to_yaml(cfg, resolve=True), log_dir / "hparams.yaml")
    trainer.loggers = [CSVLogger(save_dir=str(log_dir), name="", version="")]
    if exp_cfg.create_checkpoint_callback:
        p = exp_cfg.checkpoint_callback_params
        # Without validation there is no val_loss to rank checkpoints by (Lightning would then save none).
        monitor = p.monitor if trainer.limit_val_batches != 0 else None
        trainer.callbacks.append(ModelCheckpoint(
            dirpath=str(ckpt_dir), filename=f"{exp_cfg.name}--{{step}}", monitor=monitor, mode=p.mode,
            save_top_k=p.save_top_k, save_last=p.save_last, every_n_train_steps=p.every_n_train_steps))
    trainer.callbacks.append(SaveAdapterOnTrainEnd(adapter))
    return log_dir


@dataclass
class TrainResult:
    """What ``train`` returns: the trained module, its trainer, where the run lives, and how long it took."""

    model: SFTModel
    trainer: pl.Trainer
    log_dir: Path
    adapter: Path
    train_seconds: float


def train(cfg: DictConfig) -> TrainResult:
    """Fine-tune as configured: seed, trainer, experiment manager, base model, ``add_adapter``, ``fit``."""
    pl.seed_everything(cfg.model.seed, verbose=False)
    peft_configs = peft_configs_from_scheme(cfg.model)  # checked before the (slow) model load
    trainer = build_trainer(cfg)
    log_dir = exp_manager(trainer, cfg)
    model = SFTModel.restore_from(cfg.model.restore_from_path, cfg, trainer)
    model.add_adapter(peft_configs)
    if cfg.model.peft.restore_from_path:
        model.load_adapters(cfg.model.peft.restore_from_path)
    started = time.perf_counter()
    trainer.fit(model)
    seconds = time.perf_counter() - started
    return TrainResult(model, trainer, log_dir, adapter_path_of(cfg), seconds)


__all__ = ["build_trainer", "exp_manager", "train", "TrainResult", "gradient_accumulation", "adapter_path_of",
           "log_dir_of"]
