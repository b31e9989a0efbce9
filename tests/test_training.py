"""Training workflow on a tiny random Llama: fit, resume, predict, DDP, config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning
import torch
import transformers
from omegaconf import OmegaConf
from pytorch_lightning.callbacks import Callback
from safetensors.torch import load_file

from lora_tutorial.config import load_config
from lora_tutorial.peft import peft_configs_from_scheme
from lora_tutorial.sft_model import SFTModel, collect_predictions
from lora_tutorial.training import build_trainer, exp_manager, gradient_accumulation
from lora_tutorial.workflow import evaluate, train

from helpers import write_tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = [("The cat sat on the mat.", "Where did the cat sit?", "on the mat"),
            ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
            ("The mat is red.", "What color is the mat?", "red"),
            ("France has a capital.", "What has a capital?", "France")]


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model_dir = root / "model"
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                         tie_word_embeddings=True)
    transformers.LlamaForCausalLM(hf_config).save_pretrained(model_dir)
    write_tiny_tokenizer(model_dir)
    for name, rows in (("train.jsonl", EXAMPLES * 3), ("val.jsonl", EXAMPLES)):
        with open(root / name, "w") as f:
            for context, question, answer in rows:
                f.write(json.dumps({"input": f"User: Context: {context} Question: {question}\n\nAssistant:",
                                    "output": answer, "answers": [answer]}) + "\n")
    return root


def tiny_overrides(root: Path, log_dir: Path, max_steps: int = 6) -> list[str]:
    return [f"model.restore_from_path={root / 'model'}",
            f"model.data.train_ds.file_names=[{root / 'train.jsonl'}]",
            f"model.data.validation_ds.file_names=[{root / 'val.jsonl'}]",
            f"model.data.test_ds.file_names=[{root / 'val.jsonl'}]",
            f"exp_manager.explicit_log_dir={log_dir}", f"trainer.max_steps={max_steps}",
            "trainer.val_check_interval=3", "trainer.enable_progress_bar=false", "trainer.accelerator=cpu",
            "model.global_batch_size=2", "model.optim.lr=0.01", "model.peft.lora_tuning.adapter_dim=4",
            "model.peft.lora_tuning.alpha=8", "model.data.validation_ds.tokens_to_generate=4",
            "model.data.test_ds.tokens_to_generate=4", "inference.tokens_to_generate=4"]


def test_fit_lowers_loss_and_writes_adapter(tiny_setup, tmp_path):
    cfg = load_config(REPO / "conf/peft_tuning.yaml", tiny_overrides(tiny_setup, tmp_path, max_steps=12))
    result = train(cfg)
    adapter = result["adapter"]
    assert adapter.exists() and adapter.parent == tmp_path / "checkpoints"
    tensors = load_file(str(adapter))
    assert tensors and all("lora" in name for name in tensors)
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    col = header.index("train_loss")
    losses = [float(row.split(",")[col]) for row in lines[1:] if row.split(",")[col]]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert "val_f1" in header and "val_loss" in header


def test_bf16_mixed_fit_keeps_adapters_float32(tiny_setup, tmp_path):
    overrides = tiny_overrides(tiny_setup, tmp_path, max_steps=12) + ["trainer.precision=bf16-mixed"]
    result = train(load_config(REPO / "conf/peft_tuning.yaml", overrides))
    model = result["model"].model
    frozen = [p for p in model.parameters() if not p.requires_grad and p.dim() >= 2]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)  # stored rounded: half the memory
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    tensors = load_file(str(result["adapter"]))
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    col = lines[0].split(",").index("train_loss")
    losses = [float(row.split(",")[col]) for row in lines[1:] if row.split(",")[col]]
    assert len(losses) >= 2 and losses[-1] < losses[0]


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
    common = ["exp_manager.checkpoint_callback_params.every_n_train_steps=1", "trainer.val_check_interval=0",
              "model.data.validation_ds.metric=null"]
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


def test_predict_returns_one_answer_per_input(tiny_setup, tmp_path):
    cfg = load_config(REPO / "conf/peft_eval.yaml", tiny_overrides(tiny_setup, tmp_path)
                      + ["model.peft.restore_from_path=null", f"inference.output_file={tmp_path / 'pred.jsonl'}"])
    result = evaluate(cfg)
    assert len(result["answers"]) == len(EXAMPLES) == result["scores"]["n"]
    rows = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert [r["answers"] for r in rows] == [[e[2]] for e in EXAMPLES]
    assert all(set(r) == {"input", "prediction", "answers"} for r in rows)


def test_predict_batches_have_sentences(tiny_setup, tmp_path):
    cfg = load_config(REPO / "conf/peft_eval.yaml", tiny_overrides(tiny_setup, tmp_path))
    model = SFTModel.restore_from(cfg.model.restore_from_path, cfg)
    trainer = build_trainer(cfg)
    response = trainer.predict(model, model.build_dataloader(cfg.model.data.test_ds))
    answers, golds, prompts = collect_predictions(response)
    assert len(answers) == len(prompts) == 4
    sentences = [s for batch in response for s in batch["sentences"]]
    assert all(s.startswith(p) for s, p in zip(sentences, prompts))


def test_ddp_with_two_cpu_processes_writes_one_adapter(tiny_setup, tmp_path):
    overrides = tiny_overrides(tiny_setup, tmp_path / "ddp", max_steps=2) + [
        "trainer.devices=2", "trainer.strategy=ddp", "model.global_batch_size=4",
        "model.data.validation_ds.metric=null"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "lora_tutorial", "train", "--config",
                           str(REPO / "conf/peft_tuning.yaml"), *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    adapters = list((tmp_path / "ddp/checkpoints").glob("*.safetensors"))
    assert len(adapters) == 1
    assert "Adapter saved" in proc.stdout and proc.stdout.count("Adapter saved") == 1


def test_unknown_config_key_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'model.peft.lora_tuning.rank'"):
        load_config(REPO / "conf/peft_tuning.yaml", ["model.peft.lora_tuning.rank=8"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_stepz: 3\n")
    with pytest.raises(ValueError, match=r"bad.yaml: unknown config key 'trainer.max_stepz'"):
        load_config(bad)


def test_non_divisible_global_batch_is_a_clear_error():
    cfg = load_config(REPO / "conf/peft_tuning.yaml", ["model.global_batch_size=5", "model.micro_batch_size=2"])
    with pytest.raises(ValueError, match="global_batch_size=5 must be a positive multiple"):
        gradient_accumulation(cfg)
    ok = load_config(REPO / "conf/peft_tuning.yaml", ["model.global_batch_size=8", "model.micro_batch_size=2",
                                                      "trainer.devices=2", "trainer.accelerator=cpu"])
    assert gradient_accumulation(ok) == 2


def test_yaml_files_document_the_defaults():
    from lora_tutorial.config import default_config

    tuning = OmegaConf.to_container(load_config(REPO / "conf/peft_tuning.yaml"), resolve=True)
    assert tuning == OmegaConf.to_container(default_config(), resolve=True)
    load_config(REPO / "conf/peft_eval.yaml")  # parses against the schema
