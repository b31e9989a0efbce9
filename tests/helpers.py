"""The one home of the builders tests share: tiny random models, a tiny real BPE tokenizer, tiny Hugging Face
model directories, tiny SFT data and models, and small tensor helpers.

Nothing here is a test; every test file imports what it needs from here instead of keeping its own copy.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Iterable, Sequence

import pytest
import torch
from torch import nn

from lora_tutorial.int8_kernel import library
from lora_tutorial.model import GPT, GPTConfig
from lora_tutorial.precision import cpu_has_amx

# ----------------------------------------------------------------------------------------------
# Tiny GPT models
# ----------------------------------------------------------------------------------------------

VOCAB = 101  # the tiny configs' vocabulary (random ids are drawn below it)


def tiny_llama_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, d_model=32, d_ff=48, max_seq_len=64,
                rope_base=10000.0)
    base.update(overrides)
    return GPTConfig(**base)


def tiny_gpt2_config(**overrides) -> GPTConfig:
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=4, d_model=32, d_ff=64, max_seq_len=64)
    base.update(overrides)
    return GPTConfig.gpt2_style(**base)


# Hand count of tiny_llama_config()'s parameters (tied embeddings counted once). head_dim = 32 / 4 = 8, so the
# fused QKV matrix has 4*8 + 2*8 + 2*8 = 64 rows and the fused gate|up matrix 2*48 = 96 rows.
TINY_LLAMA_BLOCK = (32            # norm_1 gain
                    + 64 * 32     # attention_qkv
                    + 32 * 32     # attention_dense
                    + 32          # norm_2 gain
                    + 96 * 32     # mlp_fc1 (gate | up)
                    + 32 * 48)    # mlp_fc2
TINY_LLAMA_PARAMS = VOCAB * 32 + 2 * TINY_LLAMA_BLOCK + 32  # embeddings (= LM head) + 2 blocks + final norm
assert TINY_LLAMA_BLOCK == 7744 and TINY_LLAMA_PARAMS == 18752
# LoRA rank 4 on each target of one tiny Llama block: A (4, in) + B (out, 4).
TINY_LORA_R4 = {"attention_qkv": 4 * 32 + 64 * 4, "attention_dense": 4 * 32 + 32 * 4,
                "mlp_fc1": 4 * 32 + 96 * 4, "mlp_fc2": 4 * 48 + 32 * 4}


def init_weights(model: GPT, std: float = 0.02, seed: int | None = None) -> GPT:
    """Random GPT-2-style initialisation for the tiny test models (real runs load pretrained weights)."""
    if seed is not None:
        torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() >= 2 or name.endswith("bias"):
            nn.init.normal_(p, mean=0.0, std=std)
        else:
            nn.init.ones_(p)
    return model


def tiny_model(config: GPTConfig | None = None, seed: int = 0, name_or_path: str = "") -> GPT:
    """A tiny GPT with random weights (std 0.2, norm gains 1), in eval mode."""
    return init_weights(GPT(config or tiny_llama_config(), name_or_path), std=0.2, seed=seed).eval()


def random_ids(batch: int, length: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


def logits(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(x, **kwargs)


def randomize_adapters(model: nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Move every adapter tensor away from its output-preserving initial value (as training would)."""
    from lora_tutorial.peft import adapter_parameters

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model).values():
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def lora_model(rank: int = 4, alpha: float = 8, targets: Sequence[str] = ("attention_qkv", "mlp_fc1"),
               layers: Sequence[int] | None = None, rslora: bool = False, seed: int = 0) -> GPT:
    """A tiny Llama with LoRA whose B is random, so that every ΔW = (alpha/r) B A is non-zero."""
    from lora_tutorial.peft import LoraPEFTConfig, add_adapter
    from lora_tutorial.peft.lora import lora_modules

    model = tiny_model(seed=seed)
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=rank, alpha=alpha, target_modules=list(targets),
                                      layer_selection=None if layers is None else list(layers), rslora=rslora),
                verbose=False)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for layer in lora_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
    return model


# ----------------------------------------------------------------------------------------------
# A tiny real byte-level BPE tokenizer (the same kind as SmolLM2's, so BPE boundary effects are real)
# ----------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_CORPUS = [
    "The cat sat on the mat.", "Paris is the capital of France.", "The mat is red.", "France has a capital.",
    "User: Context: The Broncos defeated the Panthers in Super Bowl 50 at Levi's Stadium in Santa Clara.",
    "Question: Which team won Super Bowl 50?\n\nAssistant: Denver Broncos",
    "Architecturally, the school has a Catholic character. Atop the Main Building's gold dome is a statue.",
    "Question: What sits on top of the Main Building?\n\nAssistant: a golden statue of the Virgin Mary",
    "The city of Paris is the capital of France, on the Seine river, with about two million people.",
]


@functools.lru_cache(maxsize=1)
def _tiny_bpe_json() -> str:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(TOKENIZER_CORPUS * 10, trainer)
    return backend.to_str()


def tiny_tokenizer():
    """A ``lora_tutorial.tokenizer.Tokenizer`` over the tiny BPE: bos <|im_start|>, eos <|im_end|>, pad
    <|endoftext|>, and the ChatML chat template (without a default system prompt)."""
    from tokenizers import Tokenizer as HFTokenizer

    from lora_tutorial.tokenizer import Tokenizer

    backend = HFTokenizer.from_str(_tiny_bpe_json())
    pad, bos, eos = (backend.token_to_id(t) for t in SPECIAL_TOKENS)
    return Tokenizer(backend, bos_id=bos, eos_id=eos, pad_id=pad, chat_format="chatml")


def write_tiny_tokenizer(directory: Path) -> None:
    """The tiny tokenizer as a Hugging Face model directory's tokenizer.json + special-token map."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "tokenizer.json").write_text(_tiny_bpe_json())
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))


def tiny_vocab_size() -> int:
    return tiny_tokenizer().vocab_size


# ----------------------------------------------------------------------------------------------
# Tiny Hugging Face model directories (the reference implementation, saved the way users have them)
# ----------------------------------------------------------------------------------------------

def save_hf_llama(directory: Path, seed: int = 0, max_positions: int = 128):
    """A tiny random ``LlamaForCausalLM`` (GQA, tied embeddings, non-trivial norm gains) saved with the tiny
    tokenizer; returns the HF model in eval mode."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=max_positions, rms_norm_eps=1e-5, rope_theta=10000.0,
                                      tie_word_embeddings=True)
    hf = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a swapped or ignored norm gain must show up in the logits
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(directory)
    write_tiny_tokenizer(directory)
    return hf


def save_hf_gpt2(directory: Path, seed: int = 0):
    """A tiny random ``GPT2LMHeadModel`` (biases and LayerNorms randomised too) saved with the tiny tokenizer."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(vocab_size=tiny_vocab_size(), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    hf = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or "bias" in name:
                p.uniform_(-0.5, 1.5)
    hf.save_pretrained(directory)
    write_tiny_tokenizer(directory)
    return hf


# ----------------------------------------------------------------------------------------------
# Tiny SFT data, SFT models and training runs
# ----------------------------------------------------------------------------------------------

QA_EXAMPLES = [("The cat sat on the mat.", "Where did the cat sit?", "on the mat"),
               ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
               ("The mat is red.", "What color is the mat?", "red"),
               ("France has a capital.", "What has a capital?", "France")]


def write_lines(path: Path, lines: Iterable[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def write_records(path: Path, records: Iterable[dict]) -> Path:
    return write_lines(path, [json.dumps(r, ensure_ascii=False) for r in records])


def qa_records(examples=QA_EXAMPLES) -> list[dict]:
    from lora_tutorial.squad import format_prompt

    return [{"input": format_prompt(c, q), "output": a, "answers": [a]} for c, q, a in examples]


def tiny_sft_model(cfg=None, seed: int = 0, max_seq_len: int = 1024):
    """An ``SFTModel`` around a tiny random Llama and the tiny tokenizer (default config unless given)."""
    from lora_tutorial.config import default_config
    from lora_tutorial.sft_model import SFTModel

    tok = tiny_tokenizer()
    model = tiny_model(tiny_llama_config(vocab_size=tok.vocab_size, max_seq_len=max_seq_len), seed=seed)
    return SFTModel(cfg if cfg is not None else default_config(), model, tok)


def write_tiny_run_inputs(root: Path) -> Path:
    """A tiny HF Llama directory (``root/model``) and SQuAD-style ``train.jsonl`` / ``val.jsonl``."""
    save_hf_llama(root / "model")
    write_records(root / "train.jsonl", qa_records(QA_EXAMPLES * 3))
    write_records(root / "val.jsonl", qa_records())
    return root


def tiny_overrides(root: Path, log_dir: Path, max_steps: int = 6) -> list[str]:
    """Config overrides that train LoRA (r 4) on the tiny run inputs for a few steps on the CPU."""
    return [f"model.restore_from_path={root / 'model'}",
            f"model.data.train_ds.file_names=[{root / 'train.jsonl'}]",
            f"model.data.validation_ds.file_names=[{root / 'val.jsonl'}]",
            f"model.data.test_ds.file_names=[{root / 'val.jsonl'}]",
            f"exp_manager.explicit_log_dir={log_dir}", f"trainer.max_steps={max_steps}",
            "trainer.val_check_interval=3", "trainer.log_every_n_steps=1", "trainer.enable_progress_bar=false",
            "trainer.accelerator=cpu", "trainer.precision=32",  # float32: exact comparisons in the tests
            "model.global_batch_size=2", "model.micro_batch_size=1", "model.optim.lr=0.01",
            "model.peft.lora_tuning.adapter_dim=4", "model.peft.lora_tuning.alpha=8",
            "model.data.validation_ds.tokens_to_generate=4", "model.data.validation_ds.limit=null",
            "model.data.test_ds.tokens_to_generate=4", "inference.tokens_to_generate=4"]


# A training log as Lightning's CSVLogger writes it for SFTModel (see analysis.read_metrics).
METRICS_CSV = (
    "epoch,lr,step,train_loss,trained_steps,val_em,val_f1,val_loss\n"
    "0,,0,,0.0,5.0,10.0,3.0\n"          # validation before training
    "0,0.001,1,2.5,1.0,,,\n"            # the loss of optimizer step 1 (Lightning's step column: 1)
    "0,0.0005,3,2.0,2.0,,,\n"           # step 2 (Lightning's step column counts otherwise: 3)
    "0,,3,,2.0,20.0,30.0,2.2\n"         # validation after 2 steps
    "0,0.0001,5,9.9,,,,\n"              # a row without trained_steps is not read
)


# ----------------------------------------------------------------------------------------------
# The real model
# ----------------------------------------------------------------------------------------------

def assert_agrees_with_fp32_and_answers(fp32_model, model, tokenizer, min_agreement: float) -> None:
    """A lower-precision copy of the real model predicts the same next token as float32 at nearly every
    position of a real sentence, and still answers a simple question.

    (bf16 rounding alone ties "The" and "L" as first tokens of "What is the capital of France?", a
    0.08-nat decision in float32, so the question is one whose answer is not on a knife's edge.)
    """
    from lora_tutorial.generation import generate_ids

    ids = torch.tensor([tokenizer.encode("The Eiffel Tower is in Paris, the capital of France. It was built in "
                                         "1889 for the World's Fair and is 330 metres tall.")])
    with torch.no_grad():
        agreement = (fp32_model(ids).argmax(-1) == model(ids).argmax(-1)).float().mean().item()
    assert agreement >= min_agreement, agreement
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Which city is the capital of France?"}])
    answer = tokenizer.decode(generate_ids(model, [tokenizer.encode(chat)], tokens_to_generate=12,
                                           stop_ids=[tokenizer.eos_id])[0])
    assert "Paris" in answer, answer


# -- the C paths of generation (decode_step.py, glued_blocks.py) --------------------------------------------

# They run where the C library is built and the KV cache is bf16 (CPUs with AVX-512 and AMX: the project's
# machine and its CI); elsewhere the tests that compare them with the PyTorch blocks are skipped.
needs_c_blocks = pytest.mark.skipif(library() is None or not cpu_has_amx(),
                                    reason="the C blocks run only with the compiled library and a bf16 cache (AMX)")


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token ids left-padded with 0 to the longest prompt, and their attention mask (None without pads)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, None if bool(mask.all()) else mask


def generation_cache(model: GPT, rows: int, length: int):
    """A KV cache as ``generate_ids`` makes one: without gradients, so in bf16 where the CPU has AMX."""
    with torch.no_grad():
        return model.new_cache(rows, length)


class RunnerSpy:
    """Wraps a block runner (``KVCache.run_blocks``) and counts the forward passes it computed (returned a
    tensor for) in ``calls``."""

    def __init__(self, runner):
        self.runner, self.calls = runner, 0

    def __call__(self, *args):
        out = self.runner(*args)
        self.calls += out is not None
        return out


def record_runners(monkeypatch) -> list[RunnerSpy]:
    """Make ``generate_ids`` wrap each block runner it asks for in a ``RunnerSpy``; returns the list of
    spies, which each call of ``generate_ids`` extends."""
    from lora_tutorial import generation
    from lora_tutorial.decode_step import block_runner

    spies: list[RunnerSpy] = []

    def recording_runner(model, cache):
        spies.append(RunnerSpy(block_runner(model, cache)))
        return spies[-1]

    monkeypatch.setattr(generation, "block_runner", recording_runner)
    return spies
