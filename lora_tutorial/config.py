"""The configuration schema: every key a YAML in ``conf/`` may set, with its default.

The layout follows NeMo's ``megatron_gpt_finetuning_config.yaml`` so the tutorial's steps map one to one:
``trainer`` (what PyTorch Lightning needs), ``exp_manager`` (where logs and checkpoints go), ``model``
(base model, batch sizes, data, PEFT method, optimizer) and ``inference`` (decoding knobs).

``load_config`` merges a YAML file and ``key=value`` overrides onto these defaults in OmegaConf's
*struct* mode, so a misspelt or unknown key is an error naming the key instead of being silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


def _dataset_defaults(file_names: list[str], shuffle: bool, micro_batch_size: int | None,
                      metric: str | None) -> dict:
    return {
        "file_names": file_names,              # one or more jsonl files
        "names": None,                         # display names for the files (validation / test)
        "concat_sampling_probabilities": None, # one probability per training file, summing to 1
        "num_samples": None,                   # with the probabilities: how many examples to draw
        "prompt_template": "{input} {output}",
        "max_seq_length": 1024,
        "truncation_field": "input",           # cut this field's context (never question/answer) if too long
        "add_bos": False,
        "add_eos": True,
        "answer_only_loss": True,
        "num_workers": 0,
        "shuffle": shuffle,
        "micro_batch_size": micro_batch_size,  # None: model.micro_batch_size (eval batches generation)
        "tokens_to_generate": 30,
        "metric": metric,                      # "squad" (EM/F1 by generation) or null (loss only)
        "limit": None,                         # use only the first N examples (quick runs)
    }


DEFAULTS: dict[str, Any] = {
    "name": "smollm2_lora_squad",
    "trainer": {
        "accelerator": "auto",         # cpu | gpu | auto
        "devices": 1,
        "num_nodes": 1,
        "strategy": "auto",            # auto | ddp | ddp_spawn | fsdp ...
        "precision": "32",             # 32 | bf16-mixed | 16-mixed (GPU only)
        "max_steps": 100,
        "max_epochs": None,
        "val_check_interval": 50,      # in optimizer steps x accumulation, as Lightning counts batches
        "limit_val_batches": None,
        "num_sanity_val_steps": 0,
        "gradient_clip_val": 1.0,
        "log_every_n_steps": 5,
        "enable_progress_bar": True,
        "enable_model_summary": False,
    },
    "exp_manager": {
        "exp_dir": "experiments",
        "name": "${name}",
        "explicit_log_dir": None,      # default: exp_dir/name
        "resume_if_exists": False,     # continue from checkpoints/last.ckpt after an interruption
        "create_checkpoint_callback": True,
        "checkpoint_callback_params": {
            "monitor": "val_loss",
            "mode": "min",
            "save_top_k": 1,
            "save_last": True,
            "every_n_train_steps": None,
        },
        "adapter_file": "${name}.safetensors",  # adapter-only file written to checkpoints/ at the end
    },
    "model": {
        "restore_from_path": "smollm2-135m-instruct",
        "seed": 1234,
        "micro_batch_size": 1,
        "global_batch_size": 4,
        "data": {
            "train_ds": _dataset_defaults(["data/SQuAD/squad_short_train.jsonl"], True, None, None),
            "validation_ds": _dataset_defaults(["data/SQuAD/squad_short_val.jsonl"], False, 10, "squad"),
            "test_ds": _dataset_defaults(["data/SQuAD/squad_short_val.jsonl"], False, 16, "squad"),
        },
        "peft": {
            "peft_scheme": "lora",      # lora | adapter | ia3 | ptuning | lora,ptuning ...
            "restore_from_path": None,  # an adapter file to start from / evaluate
            "lora_tuning": {
                "target_modules": ["all"],  # see conf/peft_tuning.yaml for why not just attention_qkv
                "adapter_dim": 32,
                "alpha": 32,
                "adapter_dropout": 0.0,
                "column_init_method": "xavier",
                "row_init_method": "zero",
                "layer_selection": None,
                "rslora": False,
            },
            "adapter_tuning": {
                "adapter_dim": 32,
                "adapter_dropout": 0.0,
                "norm_position": "pre",
                "layer_selection": None,
                "column_init_method": "xavier",
                "row_init_method": "zero",
            },
            "ia3_tuning": {"layer_selection": None},
            "p_tuning": {"virtual_tokens": 10, "bottleneck_dim": 1024, "embedding_dim": 1024, "init_std": 0.023},
        },
        "optim": {
            "name": "adamw",
            "lr": 6e-4,
            "weight_decay": 0.01,
            "betas": [0.9, 0.98],
            "sched": {"name": "CosineAnnealing", "warmup_steps": 0, "min_lr": 0.0},
        },
    },
    "inference": {
        "greedy": True,
        "top_k": 0,
        "top_p": 0.9,
        "temperature": 1.0,
        "repetition_penalty": 1.0,
        "tokens_to_generate": 30,
        "batch_size": 16,
        "use_chat_template": False,  # wrap each prompt in the base model's chat template (zero-shot)
        "output_file": None,         # evaluate: where to write predictions jsonl (default: next to the adapter)
        "quantize_int8": False,      # evaluate: int8 weight-only base for faster CPU decoding (quantize.py)
    },
}


def default_config() -> DictConfig:
    """A fresh copy of the schema with its defaults, in struct mode (unknown keys are errors)."""
    cfg = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(cfg, True)
    return cfg


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Defaults, then the YAML file (if any), then ``key=value`` overrides; unknown keys raise ValueError."""
    cfg = default_config()
    layers: list[tuple[str, DictConfig]] = []
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            layers.append((str(path), OmegaConf.load(path)))
        except Exception as err:  # noqa: BLE001 - yaml and omegaconf raise several kinds
            raise ValueError(f"{path}: cannot parse YAML ({err})") from None
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"override {bad[0]!r} must look like key=value (e.g. trainer.max_steps=20)")
        layers.append(("command-line overrides", OmegaConf.from_dotlist(list(overrides))))
    for source, layer in layers:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except ConfigKeyError as err:
            raise ValueError(f"{source}: unknown config key {err.full_key!r}; see conf/peft_tuning.yaml "
                             "for the keys that exist") from None
        except OmegaConfBaseException as err:
            raise ValueError(f"{source}: bad value for {getattr(err, 'full_key', '?')!r}: {err.msg}") from None
    return cfg


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML (what a notebook prints as "the final config")."""
    return OmegaConf.to_yaml(cfg, resolve=True)
