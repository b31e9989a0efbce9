"""T5 (``lora_tutorial/t5.py``) against the reference: transformers' T5ForConditionalGeneration and HF PEFT.

Two tiny random T5s cover both families: ReLU + tied, rescaled head (t5-small) and gated-GELU + untied head
(T5 v1.1 / flan-t5). Each is saved with ``save_pretrained`` (safetensors) and loaded with ``load_t5``.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import peft  # noqa: E402 - a dev dependency: the reference implementation
import transformers  # noqa: E402

from lora_tutorial.peft import AdapterCheckpointError, LoRALinear, merge_lora, unmerge_lora
from lora_tutorial.checkpoint_names import CheckpointError
from lora_tutorial.t5 import (T5Attention, add_lora_t5, t5_hf_name, load_t5, load_t5_lora, relative_position_bucket,
                              save_t5_lora)

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
pytestmark = [pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")]
VOCAB = 96
TOL = 1e-4
FAMILIES = {"t5": dict(feed_forward_proj="relu", tie_word_embeddings=True),
            "flan": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False)}


def hf_t5(family: str, seed: int = 0) -> transformers.T5ForConditionalGeneration:
    """A tiny random HF T5 (2 encoder / 3 decoder blocks, d_model 32, 4 heads of 8) in eval mode."""
    torch.manual_seed(seed)
    config = transformers.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3,
                                   num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                   dropout_rate=0.0, decoder_start_token_id=0, **FAMILIES[family])
    model = transformers.T5ForConditionalGeneration(config)
    if family == "flan" and model.lm_head.weight is model.shared.weight:
        # transformers 5 ties every T5 head at construction; untie it as flan-t5's checkpoints are.
        model.lm_head.weight = torch.nn.Parameter(torch.randn(VOCAB, 32))
    return model.eval()


@pytest.fixture(params=sorted(FAMILIES))
def pair(request, tmp_path):
    """(HF model, our model loaded from its save_pretrained directory, directory)."""
    hf = hf_t5(request.param)
    hf.save_pretrained(tmp_path / "t5", safe_serialization=True)
    ours, tokenizer = load_t5(tmp_path / "t5")
    assert tokenizer is None
    return hf, ours, tmp_path / "t5"


def batch(seed: int = 0, padded: bool = False) -> dict[str, torch.Tensor]:
    """Encoder ids (2, 11) and decoder ids (2, 7); ``padded``: row 1 has 3 pads on the encoder's left and 2 on
    the decoder's right."""
    g = torch.Generator().manual_seed(seed)
    x = {"input_ids": torch.randint(2, VOCAB, (2, 11), generator=g),
         "decoder_input_ids": torch.randint(2, VOCAB, (2, 7), generator=g)}
    if padded:
        x["attention_mask"] = torch.ones(2, 11, dtype=torch.long)
        x["attention_mask"][1, :3] = 0
        x["input_ids"][1, :3] = 0
        x["decoder_attention_mask"] = torch.ones(2, 7, dtype=torch.long)
        x["decoder_attention_mask"][1, 5:] = 0
    return x


def max_diff(ours: torch.nn.Module, hf: torch.nn.Module, x: dict) -> float:
    """Largest |logit difference| of our model and a HF (or HF PEFT) model on the real decoder positions."""
    with torch.no_grad():
        ours, theirs = ours(**x), hf(**x).logits
    keep = x.get("decoder_attention_mask", torch.ones(ours.shape[:2])).bool()
    return (ours - theirs)[keep].abs().max().item()


# ----------------------------------------------------------------------------------------------
# The base model
# ----------------------------------------------------------------------------------------------

def test_relative_position_buckets_equal_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention as HFAttention
    rel = torch.arange(-300, 301)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 16)):
            expected = HFAttention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), expected)


@pytest.mark.parametrize("padded", [False, True])
def test_logits_equal_transformers(pair, padded):
    hf, ours, _ = pair
    diff = max_diff(ours, hf, batch(padded=padded))
    print(f"{'flan' if ours.config.feed_forward_proj == 'gated-gelu' else 't5'} padded={padded}: {diff:.2e}")
    assert diff < TOL


def test_padding_does_not_change_the_real_tokens(pair):
    _, ours, _ = pair
    x = batch(padded=True)
    alone = {"input_ids": x["input_ids"][1:, 3:], "decoder_input_ids": x["decoder_input_ids"][1:, :5]}
    with torch.no_grad():
        assert (ours(**x)[1, :5] - ours(**alone)[0]).abs().max() < TOL


def test_config_and_head_follow_the_family(pair):
    hf, ours, _ = pair
    tied = hf.config.feed_forward_proj == "relu"
    assert ours.config.tie_embeddings == tied and ours.config.scale_decoder_outputs == tied
    assert (ours.lm_head.weight is ours.shared.weight) == tied
    assert ours.config.n_layer == 2 and ours.config.n_decoder_layer == 3


def test_generate_equals_transformers_greedy(pair):
    hf, ours, _ = pair
    x = batch(seed=3, padded=True)
    with torch.no_grad():
        # use_cache=False: transformers 5.24's cache breaks when the decoder has more blocks than the encoder
        theirs = hf.generate(input_ids=x["input_ids"], attention_mask=x["attention_mask"], max_new_tokens=6,
                             do_sample=False, num_beams=1, use_cache=False, decoder_start_token_id=0,
                             eos_token_id=1, pad_token_id=0)
    assert torch.equal(ours.generate(x["input_ids"], 6, x["attention_mask"]), theirs)


def test_an_old_style_untied_config_loads_the_same(tmp_path):
    """transformers 4 / the hub's flan-t5: ``tie_word_embeddings: false`` and no ``scale_decoder_outputs``."""
    hf = hf_t5("flan")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours, _ = load_t5(tmp_path)
    assert not ours.config.tie_embeddings and not ours.config.scale_decoder_outputs
    assert max_diff(ours, hf, batch()) < TOL


def test_an_mt5_directory_loads_too(tmp_path):
    """mT5 has T5 v1.1's layout under another model_type; transformers 5 writes it tied, never rescaled."""
    config = transformers.MT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                                    dropout_rate=0.0, decoder_start_token_id=0)
    torch.manual_seed(0)
    hf = transformers.MT5ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours, _ = load_t5(tmp_path)
    assert ours.config.feed_forward_proj == "gated-gelu" and not ours.config.scale_decoder_outputs
    assert max_diff(ours, hf, batch(padded=True)) < TOL


def test_tokenizer_json_is_loaded(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    hf_t5("t5").save_pretrained(tmp_path, safe_serialization=True)
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "</s>": 1, "hello": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    _, tokenizer = load_t5(tmp_path)
    assert tokenizer.encode("hello world").ids == [2, 3]


def _break(directory, case: str) -> str:
    """Damage a saved tiny T5 directory; return a phrase the error must contain."""
    weights = directory / "model.safetensors"
    if case == "no directory":
        return "config.json: no such file"
    if case == "model_type":
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
        return "model_type 'llama' is not supported"
    if case == "feed_forward":
        config = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**config, "feed_forward_proj": "gated-silu"}))
        return "gated-silu"
    tensors = load_file(weights)
    if case == "missing":
        del tensors["decoder.block.1.layer.1.EncDecAttention.v.weight"]
        message = "'decoder.block.1.layer.1.EncDecAttention.v.weight' is missing from model.safetensors"
    elif case == "unexpected":
        tensors["encoder.block.0.layer.0.SelfAttention.q.bias"] = torch.zeros(32)
        message = "unexpected tensors ['encoder.block.0.layer.0.SelfAttention.q.bias']"
    elif case == "shape":
        tensors["encoder.block.1.layer.1.DenseReluDense.wo.weight"] = torch.zeros(32, 40)
        message = "'encoder.block.1.layer.1.DenseReluDense.wo.weight' has shape (32, 40)"
    else:  # pickle only
        weights.rename(directory / "pytorch_model.bin")
        return "pickle files, never loaded: pytorch_model.bin"
    save_file(tensors, str(weights))
    return message


@pytest.mark.parametrize("case", ["no directory", "model_type", "feed_forward", "missing", "unexpected", "shape",
                                  "pickle"])
def test_bad_directories_give_one_clear_error(tmp_path, case):
    hf_t5("t5").save_pretrained(tmp_path / "t5", safe_serialization=True)
    directory = tmp_path / ("nowhere" if case == "no directory" else "t5")
    message = _break(directory, case)
    with pytest.raises(CheckpointError) as err:
        load_t5(directory)
    assert message in str(err.value) and str(directory) in str(err.value)


# ----------------------------------------------------------------------------------------------
# LoRA
# ----------------------------------------------------------------------------------------------

def _randomize(model: torch.nn.Module, seed: int = 1, std: float = 0.3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(torch.randn(m.lora_A.shape, generator=g) * std)
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * std)


def test_add_lora_wraps_q_and_v_of_every_attention_and_freezes_the_rest(pair):
    _, ours, directory = pair
    names = add_lora_t5(ours, rank=4, alpha=8)
    # 2 encoder blocks x self + 3 decoder blocks x (self + cross) = 8 attentions, 2 targets each
    assert len(names) == 16 and "decoder.blocks.2.cross_attn.v" in names
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"}
    with pytest.raises(ValueError, match="expected some of"):
        add_lora_t5(load_t5(directory)[0], rank=4, alpha=8, targets=("q", "wi"))
    with pytest.raises(ValueError, match="already has LoRA"):
        add_lora_t5(ours, rank=4, alpha=8)


def test_lora_with_b_zero_leaves_logits_unchanged(pair):
    _, ours, _ = pair
    x = batch(padded=True)
    with torch.no_grad():
        before = ours(**x)
        add_lora_t5(ours, rank=4, alpha=8, targets=("q", "k", "v", "o"))
        assert torch.equal(ours(**x), before)


@pytest.mark.parametrize("padded", [False, True])
def test_lora_equals_hf_peft_with_the_same_tensors(pair, padded):
    hf, ours, _ = pair
    names = add_lora_t5(ours, rank=4, alpha=8)
    _randomize(ours)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                     target_modules=["q", "v"])).eval()
    hf_lora = {n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")}
    assert hf_lora == {t5_hf_name(f"{n}.weight").removesuffix(".weight") for n in names}
    with torch.no_grad():
        for name in names:
            layer, target = ours.get_submodule(name), theirs.base_model.model.get_submodule(
                t5_hf_name(f"{name}.weight").removesuffix(".weight"))
            target.lora_A["default"].weight.copy_(layer.lora_A)
            target.lora_B["default"].weight.copy_(layer.lora_B)
    x = batch(padded=padded)
    diff = max_diff(ours, theirs, x)
    print(f"LoRA vs PEFT ({ours.config.feed_forward_proj}, padded={padded}): {diff:.2e}")
    assert diff < TOL
    assert max_diff(ours, hf, x) > 1e-2  # ...and the adapter does change the model
    merge_lora(ours)
    assert max_diff(ours, theirs, x) < TOL
    unmerge_lora(ours)


def test_training_lowers_the_loss_and_changes_only_lora(pair):
    """A tiny seq2seq task: write the input backwards."""
    _, ours, _ = pair
    add_lora_t5(ours, rank=4, alpha=8, targets=("q", "k", "v", "o"))
    frozen = {n: p.detach().clone() for n, p in ours.named_parameters() if not p.requires_grad}
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(2, VOCAB, (16, 6), generator=g)
    labels = torch.cat([inputs.flip(1), torch.ones(16, 1, dtype=torch.long)], dim=1)  # reversed + EOS
    decoder_inputs = torch.cat([torch.zeros(16, 1, dtype=torch.long), labels[:, :-1]], dim=1)  # [start] + labels[:-1]
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=2e-2)
    ours.train()
    losses = []
    for _ in range(25):
        logits = ours(inputs, decoder_inputs)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    print(f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert losses[-1] < 0.7 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if not p.requires_grad)


def test_save_then_load_gives_the_same_logits(pair, tmp_path):
    _, ours, directory = pair
    add_lora_t5(ours, rank=4, alpha=8, targets=("q", "v", "o"))
    _randomize(ours)
    x = batch(padded=True)
    with torch.no_grad():
        expected = ours(**x)
    path = save_t5_lora(ours, tmp_path / "adapter.safetensors")
    fresh, _ = load_t5(directory)
    assert len(load_t5_lora(fresh, path)) == 3 * 8
    with torch.no_grad():
        assert torch.equal(fresh(**x), expected)
    assert sum(isinstance(m, LoRALinear) for m in fresh.modules()) == 24


def test_bad_adapter_files_give_one_clear_error(pair, tmp_path):
    _, ours, directory = pair
    with pytest.raises(AdapterCheckpointError, match="no such adapter file"):
        load_t5_lora(ours, tmp_path / "nothing.safetensors")
    add_lora_t5(ours, rank=4, alpha=8)
    path = save_t5_lora(ours, tmp_path / "adapter.safetensors")
    other = load_t5(directory)[0]
    with torch.no_grad():
        other.shared.weight.add_(1.0)
    with pytest.raises(AdapterCheckpointError, match="another base model"):
        load_t5_lora(other, path)
    rank8 = load_t5(directory)[0]
    add_lora_t5(rank8, rank=8, alpha=8)
    with pytest.raises(AdapterCheckpointError, match="differ from the model's"):
        load_t5_lora(rank8, path)
    tensors = load_file(path)
    tensors.pop(next(iter(tensors)))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, str(path), metadata=metadata)
    fresh = load_t5(directory)[0]
    with pytest.raises(AdapterCheckpointError, match="missing"):
        load_t5_lora(fresh, path)
    assert not any(isinstance(m, LoRALinear) for m in fresh.modules())  # the model is left as it was
    assert all(isinstance(m.q, torch.nn.Linear) for m in fresh.modules() if isinstance(m, T5Attention))
