"""Training on a tiny random Llama: train(cfg), the per-optimizer-step loss log, bf16-mixed, kill and resume,
the experiment directory, DDP with two CPU processes, and the batch / schedule arithmetic."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning
import torch
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback
from safetensors.torch import load_file

from lora_tutorial import training
from lora_tutorial.analysis import read_metrics
from lora_tutorial.config import ConfigError, load_config
from lora_tutorial.peft import peft_configs_from_scheme
from lora_tutorial.sft_model import SFTModel, collect_predictions, warmup_cosine
from lora_tutorial.training import (TrainResult, adapter_path_of, build_trainer, exp_manager, gradient_accumulation,
                                    train)

from helpers import QA_EXAMPLES, tiny_overrides, write_tiny_run_inputs

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    return write_tiny_run_inputs(tmp_path_factory.mktemp("tiny"))


class RecordMicroBatchLosses(Callback):
    """The loss of every micro-batch, computed just before the step uses it, grouped by optimizer step."""

    def __init__(self) -> None:
        self.by_step: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with torch.no_grad():
            loss = pl_module.model.loss(batch["input_ids"], batch["labels"]).item()
        self.by_step.setdefault(trainer.global_step + 1, []).append(loss)


def test_train_logs_one_mean_loss_per_optimizer_step_and_writes_the_adapter(tiny_setup, tmp_path, monkeypatch):
    recorder = RecordMicroBatchLosses()
    real_build = training.build_trainer
    monkeypatch.setattr(training, "build_trainer", lambda cfg, **kw: real_build(cfg, callbacks=[recorder], **kw))
    cfg = load_config(REPO / "conf/peft_tuning.yaml", tiny_overrides(tiny_setup, tmp_path, max_steps=12))
    result = train(cfg)

    assert isinstance(result, TrainResult) and result.log_dir == tmp_path and result.train_seconds > 0
    assert result.adapter == adapter_path_of(cfg) == tmp_path / "checkpoints" / "smollm2_lora_squad.safetensors"
    tensors = load_file(str(result.adapter))
    assert tensors and all(".lora_" in name for name in tensors)
    metrics = read_metrics(tmp_path)
    steps, losses = zip(*metrics["train_loss"])
    assert list(steps) == list(range(1, 13))  # one row per optimizer step, counted from 1
    # each is the mean of that step's two micro-batch losses (global 2 = micro 1 x accumulation 2)
    assert [len(recorder.by_step[s]) for s in steps] == [2] * 12
    assert list(losses) == pytest.approx([sum(recorder.by_step[s]) / 2 for s in steps], rel=1e-4)
    assert losses[-1] < losses[0]
    assert [s for s, _ in metrics["val_loss"]] == [3, 6, 9, 12]  # val_check_interval counts optimizer steps
    assert [s for s, _ in metrics["val_f1"]] == [3, 6, 9, 12]
    assert OmegaConf.load(tmp_path / "hparams.yaml") == OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))


def test_bf16_mixed_loads_the_base_in_bf16_and_keeps_adapters_float32(tiny_setup, tmp_path):
    cfg = load_config(REPO / "conf/peft_tuning.yaml", tiny_overrides(tiny_setup, tmp_path, max_steps=8)
                      + ["trainer.precision=bf16-mixed", "trainer.val_check_interval=0"])
    trainer = build_trainer(cfg)
    restored = SFTModel.restore_from(cfg.model.restore_from_path, cfg, trainer)
    assert restored.model.blocks[0].mlp.mlp_fc1.weight.dtype == torch.bfloat16  # loaded so, no float32 copy
    assert restored.model.norm_f.weight.dtype == torch.float32
    result = train(cfg)
    model = result.model.model
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dim() >= 2]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    tensors = load_file(str(result.adapter))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    losses = [v for _, v in read_metrics(tmp_path)["train_loss"]]
    assert len(losses) == 8 and losses[-1] < losses[0]


class CrashAt(Callback):
    """Simulates a crash (power loss, preemption) after ``step`` optimizer steps."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


class CountBatches(Callback):
    def __init__(self) -> None:
        self.global_steps: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.global_steps.append(trainer.global_step)


def _fit(cfg, callbacks=()):
    pytorch_lightning.seed_everything(cfg.model.seed, verbose=False)
    trainer = build_trainer(cfg, callbacks=list(callbacks))
    exp_manager(trainer, cfg)
    model = SFTModel.restore_from(cfg.model.restore_from_path, cfg, trainer)
    model.add_adapter(peft_configs_from_scheme(cfg.model))
    trainer.fit(model)
    return model


def test_kill_and_resume_gives_the_same_adapter(tiny_setup, tmp_path):
    # micro-batches of 2 with length grouping: the resumed data stream must be the uninterrupted one
    common = ["exp_manager.checkpoint_callback_params.every_n_train_steps=1", "trainer.val_check_interval=0",
              "model.data.validation_ds.metric=null", "model.micro_batch_size=2", "model.global_batch_size=4",
              "model.data.train_ds.length_grouping=true"]
    straight = load_config(None, tiny_overrides(tiny_setup, tmp_path / "a") + common)
    _fit(straight)
    resumable = load_config(None, tiny_overrides(tiny_setup, tmp_path / "b") + common
                            + ["exp_manager.resume_if_exists=true"])
    with pytest.raises(RuntimeError, match="simulated crash"):
        _fit(resumable, [CrashAt(4)])
    assert (tmp_path / "b/checkpoints/last.ckpt").exists()
    assert not (tmp_path / "b/checkpoints/smollm2_lora_squad.safetensors").exists()
    counter = CountBatches()
    _fit(resumable, [counter])
    assert counter.global_steps[0] == 3  # it resumed after step 3 (the last checkpoint), not from scratch
    a = load_file(str(tmp_path / "a/checkpoints/smollm2_lora_squad.safetensors"))
    b = load_file(str(tmp_path / "b/checkpoints/smollm2_lora_squad.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    # and the run really trained: B moved away from its zero initialisation
    assert any(a[name].abs().max() > 0 for name in a if "lora_B" in name)


def test_exp_manager_clears_an_earlier_run_unless_resuming(tiny_setup, tmp_path):
    cfg = load_config(None, tiny_overrides(tiny_setup, tmp_path))
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir(parents=True)
    adapter = adapter_path_of(cfg)
    for stale in (ckpt / "last.ckpt", ckpt / "old--step=3.ckpt", tmp_path / "metrics.csv", adapter):
        stale.write_text("stale")
    assert exp_manager(build_trainer(cfg), cfg) == tmp_path
    assert not list(ckpt.glob("*.ckpt")) and not (tmp_path / "metrics.csv").exists() and not adapter.exists()
    # ... but an adapter file this run starts from (continued training in the same directory) stays
    adapter.write_text("the adapter to continue from")
    start_from = load_config(None, tiny_overrides(tiny_setup, tmp_path) + [f"model.peft.restore_from_path={adapter}"])
    exp_manager(build_trainer(start_from), start_from)
    assert adapter.read_text() == "the adapter to continue from"
    (ckpt / "last.ckpt").write_text("from an interrupted run")
    resume = load_config(None, tiny_overrides(tiny_setup, tmp_path) + ["exp_manager.resume_if_exists=true"])
    trainer = build_trainer(resume)
    exp_manager(trainer, resume)
    assert trainer.ckpt_path == str(ckpt / "last.ckpt") and (ckpt / "last.ckpt").exists()


def test_predict_batches_have_sentences(tiny_setup, tmp_path):
    cfg = load_config(REPO / "conf/peft_eval.yaml", tiny_overrides(tiny_setup, tmp_path))
    model = SFTModel.restore_from(cfg.model.restore_from_path, cfg)
    trainer = build_trainer(cfg)
    response = trainer.predict(model, model.build_dataloader(cfg.model.data.test_ds))
    answers, golds, prompts = collect_predictions(response)
    assert len(answers) == len(prompts) == len(QA_EXAMPLES)
    assert sorted(g[0] for g in golds) == sorted(a for _, _, a in QA_EXAMPLES)
    sentences = [s for batch in response for s in batch["sentences"]]
    assert sentences == [p + " " + a for p, a in zip(prompts, answers)]


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_writes_one_adapter(tiny_setup, tmp_path):
    overrides = tiny_overrides(tiny_setup, tmp_path / "ddp", max_steps=2) + [
        "trainer.devices=2", "trainer.strategy=ddp", "model.global_batch_size=4",
        "model.data.validation_ds.metric=null"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "lora_tutorial", "train", "--config",
                           str(REPO / "conf/peft_tuning.yaml"), *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapters = list((tmp_path / "ddp/checkpoints").glob("*.safetensors"))
    assert len(adapters) == 1
    assert proc.stdout.count("Training took") == 1  # rank 0 reports, rank 1 does not


def test_non_divisible_global_batch_is_a_clear_error():
    cfg = load_config(None, ["model.global_batch_size=5", "model.micro_batch_size=2"])
    with pytest.raises(ConfigError, match=r"model.global_batch_size=5: expected a multiple of .*= 2\)"):
        gradient_accumulation(cfg)
    ok = load_config(None, ["model.global_batch_size=8", "model.micro_batch_size=2", "trainer.devices=2",
                            "trainer.accelerator=cpu"])
    assert gradient_accumulation(ok) == 2  # 8 = 2 per micro-batch x 2 processes x 2 accumulated


def test_precision_auto_follows_the_hardware(monkeypatch, capsys):
    cfg = load_config(None, ["trainer.precision=auto", "trainer.accelerator=cpu"])
    for native, expected in ((True, "bf16-mixed"), (False, "32")):
        monkeypatch.setattr(training, "cpu_has_native_bf16", lambda native=native: native)
        assert training.resolve_precision(cfg) == expected
        assert f"trainer.precision=auto: {expected}" in capsys.readouterr().out
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    fp16 = load_config(None, ["trainer.precision=16-mixed", "trainer.accelerator=cpu"])
    assert training.resolve_precision(fp16) == "bf16-mixed"  # a CPU has no fp16 path


def test_warmup_cosine_by_hand():
    factor = warmup_cosine(warmup_steps=2, total_steps=10, min_ratio=0.1)
    # linear warm-up over steps 0, 1; then cosine from 1 at step 2 to 0.1 at step 10 (halfway at step 6)
    assert [factor(s) for s in (0, 1, 2, 6, 10, 12)] == pytest.approx([0.5, 1.0, 1.0, 0.55, 0.1, 0.1])
    assert warmup_cosine(0, 4, 0.0)(2) == pytest.approx(0.5)  # no warm-up: halfway down at half the steps


class CrashInValidation(Callback):
    """Fails in the middle of the first validation batch loop, after LoRA has been merged for it."""

    def __init__(self) -> None:
        self.merged_seen = False

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        from lora_tutorial.peft.lora import lora_modules

        self.merged_seen = all(m.merged for m in lora_modules(pl_module.model))
        raise RuntimeError("simulated crash in validation")


def test_a_crash_during_validation_leaves_lora_unmerged_and_the_base_weights_intact(tiny_setup, tmp_path):
    from lora_tutorial.peft.lora import lora_modules

    cfg = load_config(None, tiny_overrides(tiny_setup, tmp_path))
    trainer = build_trainer(cfg, callbacks=[crash := CrashInValidation()])
    model = SFTModel.restore_from(cfg.model.restore_from_path, cfg, trainer)
    model.add_adapter(peft_configs_from_scheme(cfg.model))
    layers = lora_modules(model.model)
    for layer in layers:  # a nonzero update, so that a merged weight would differ from the base
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    before = [layer.base.weight.detach().clone() for layer in layers]
    with pytest.raises(RuntimeError, match="simulated crash in validation"):
        trainer.fit(model)
    assert crash.merged_seen  # validation did run merged ...
    assert not any(layer.merged for layer in layers)  # ... and the failure put everything back
    assert all(torch.equal(layer.base.weight, w) for layer, w in zip(layers, before))
