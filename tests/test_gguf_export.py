"""``gguf_export.export_gguf``: the merged model as a llama.cpp GGUF file.

The real-model tests export SmolLM2 + a LoRA with random non-zero B once per dtype (module fixtures) and
read the files back with our reader and with transformers' GGUF loader (an independent implementation of
the name mapping, the rotary permutation and the dequantization). The refusals and the merge/split/permute
logic are checked on tiny models without writing a file.

Tolerances. F16 keeps 11 significant bits: rounding moves every weight by at most 2^-12 of itself
(relative; ~2.4e-4). The files are checked at two levels:

* tensors: every tensor read back from the file *equals* the merged float32 tensor rounded to F16
  (or quantized to Q8_0 and back), bit for bit; so the file holds exactly what it should;
* logits: through 30 layers those roundings move SmolLM2's logits (magnitude ~30) by 0.05-0.06 at most
  and 0.006-0.008 on average (measured on a 38-token chat prompt and a 36-token sentence); we allow 0.1
  max and 0.02 mean, still far below the adapter's own effect (5-7 logits; asserted > 1), so a missing,
  doubled or mis-permuted update fails. Q8_0 (int8 blocks of 32 with one f16 scale: error up to 1/254 of a
  block's largest weight, ~10-20x F16's) moved them by 1.3-1.4 at most and 0.14-0.16 on average, with 97-100 %
  argmax agreement; we allow 3, 0.5 and 90 %.

The same file read by transformers and by us agree to ~1e-4 (we require < 1e-2, the bar of the other
parity tests); against the *unrounded* float32 base + adapter, transformers' logits are as close as ours
(the F16 rounding above), not < 1e-2.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from helpers import lora_model, random_ids, randomize_adapters, tiny_model
from lora_tutorial import load_base_model
from lora_tutorial.generation import generate_ids
from lora_tutorial.gguf_export import check_mergeable, export_gguf, gguf_tensors, merged_tensor, permute_rope_rows
from lora_tutorial.peft import (AdapterPEFTConfig, IA3PEFTConfig, LoraPEFTConfig, PtuningPEFTConfig, add_adapter,
                                disable_adapters)
from lora_tutorial.peft.lora import lora_modules
from lora_tutorial.checkpoint_names import GGUF, llama_state_dict, unpermute_rope_rows
from lora_tutorial.pretrained import build_model, gguf_fields, resolve_model_path

BASE = "smollm2-135m-instruct"
QUESTION = "Which city is the capital of France?"
TEXT = "The Eiffel Tower is in Paris, the capital of France. It was built in 1889 (330 m tall) 🙂 <|im_end|>"


# ----------------------------------------------------------------------------------------------
# Tiny models: merging, splitting, permuting (no file), refusals
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_head", [1, 3])
def test_permute_inverts_unpermute(n_head):
    w = torch.randn(n_head * 8, 5, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(permute_rope_rows(w, n_head), w)
    assert torch.equal(unpermute_rope_rows(permute_rope_rows(w, n_head), n_head), w)
    assert torch.equal(permute_rope_rows(unpermute_rope_rows(w, n_head), n_head), w)


def _read_back(model, tensors: dict[str, torch.Tensor]):
    """A plain model from GGUF-named tensors, read the way ``pretrained`` reads a GGUF file."""
    c = model.config
    raw = dict(tensors)
    for name in raw:
        if name.endswith(".attn_q.weight"):
            raw[name] = unpermute_rope_rows(raw[name], c.n_head)
        elif name.endswith(".attn_k.weight"):
            raw[name] = unpermute_rope_rows(raw[name], c.n_kv_head)
    return build_model(c, llama_state_dict(raw, c, GGUF, "export"), torch.float32)


def test_lora_and_ia3_merge_into_gguf_tensors_that_give_the_same_logits():
    model = lora_model(targets=("attention_qkv", "attention_dense", "mlp_fc1", "mlp_fc2"))
    add_adapter(model, IA3PEFTConfig(None), verbose=False)  # IA3 wraps the LoRA of attention_qkv
    randomize_adapters(model, seed=1)  # IA3 vectors away from 1 (and LoRA moved further)
    ids = random_ids(2, 12)
    with torch.no_grad():
        tuned = model(ids)
        with disable_adapters(model):
            base = model(ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    tensors = dict(gguf_tensors(model))
    assert "output.weight" not in tensors  # tied embeddings
    assert {"blk.1.attn_q.weight", "blk.1.attn_k.weight", "blk.1.attn_v.weight", "blk.1.ffn_gate.weight",
            "blk.1.ffn_up.weight"} <= tensors.keys()
    plain = _read_back(model, tensors)
    with torch.no_grad():
        assert (plain(ids) - tuned).abs().max().item() < 1e-5
    assert (tuned - base).abs().max().item() > 0.1  # the adapters matter

    # The caller's model is untouched: same tensors, LoRA still unmerged and wrapped.
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert lora_modules(model) and not any(m.merged for m in lora_modules(model))


def test_merged_lora_is_not_added_twice_and_disabled_adapters_are_not_exported():
    model = lora_model()
    ids = random_ids(1, 10)
    with torch.no_grad():
        tuned = model(ids)
    lora_modules(model)[0].merge()  # base.weight already holds W + BA for this layer
    with torch.no_grad():
        assert (_read_back(model, dict(gguf_tensors(model)))(ids) - tuned).abs().max().item() < 1e-5
        with disable_adapters(model):  # the export follows what the model computes
            assert (_read_back(model, dict(gguf_tensors(model)))(ids) - model(ids)).abs().max().item() < 1e-5


@pytest.mark.parametrize("method", ["ptuning", "adapter"])
def test_methods_that_cannot_merge_are_refused_naming_them(tmp_path, method):
    model = tiny_model()
    cfg = PtuningPEFTConfig(None, virtual_tokens=2, embedding_dim=8, bottleneck_dim=8) if method == "ptuning" \
        else AdapterPEFTConfig(None, adapter_dim=4)
    add_adapter(model, [LoraPEFTConfig(None, adapter_dim=2), cfg], verbose=False)
    out = tmp_path / "x.gguf"
    with pytest.raises(ValueError, match=f"cannot merge {method} into the base weights") as err:
        export_gguf(model, BASE, out)
    assert "lora" not in str(err.value).split("(")[0]  # only the offending method is named
    assert not out.exists()


@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(init_lora_weights="pissa"),
                                     dict(init_lora_weights="olora", use_dora=True)])
def test_lora_variants_merge_as_their_forward_computes(variant):
    model = tiny_model()
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=4, alpha=8, **variant), verbose=False)
    randomize_adapters(model, seed=2)  # moves A, B and DoRA's magnitude away from their start
    ids = random_ids(2, 12)
    with torch.no_grad():
        tuned = model(ids)
        with disable_adapters(model):  # PiSSA / OLoRA: the exported base is W, not the residual
            base = model(ids)
            assert (_read_back(model, dict(gguf_tensors(model)))(ids) - base).abs().max().item() < 1e-5
        assert (_read_back(model, dict(gguf_tensors(model)))(ids) - tuned).abs().max().item() < 1e-5
    assert (tuned - base).abs().max().item() > 0.1


def test_an_unknown_peft_method_is_refused():
    class Mystery(nn.Module):
        peft_scheme = "mystery"

        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    model = tiny_model()
    model.blocks[0].mlp.mlp_fc2 = Mystery(model.blocks[0].mlp.mlp_fc2)
    with pytest.raises(ValueError, match="cannot merge mystery into the base weights"):
        check_mergeable(model)


def test_bad_arguments_and_another_base(tmp_path):
    model = lora_model()
    with pytest.raises(ValueError, match="dtype='q4_0'"):
        export_gguf(model, BASE, tmp_path / "x.gguf", dtype="q4_0")
    with pytest.raises(ValueError, match="must end in .gguf"):
        export_gguf(model, BASE, tmp_path / "x.bin")
    with pytest.raises(ValueError, match="does not match the base GGUF"):  # a tiny model on SmolLM2's metadata
        export_gguf(model, BASE, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


# ----------------------------------------------------------------------------------------------
# The real model: SmolLM2 + LoRA, exported as F16 and Q8_0
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tuned(smollm2):
    """SmolLM2 (a copy of the session's base) + LoRA r 8 on every target with random non-zero B."""
    model, tokenizer = copy.deepcopy(smollm2[0]), smollm2[1]
    torch.manual_seed(0)  # lora_A's init
    add_adapter(model, LoraPEFTConfig(None, adapter_dim=8, alpha=16), verbose=False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_modules(model):
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.01)
    return model, tokenizer


@pytest.fixture(scope="module")
def chat_ids(tuned):
    tokenizer = tuned[1]
    return torch.tensor([tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}]))])


@pytest.fixture(scope="module")
def reference(tuned, chat_ids):
    """float32 logits of base + (unmerged) adapter, and of the base alone."""
    model = tuned[0]
    with torch.no_grad():
        tuned_logits = model(chat_ids)
        with disable_adapters(model):
            base_logits = model(chat_ids)
    return tuned_logits, base_logits


@pytest.fixture(scope="module")
def exported(tuned, tmp_path_factory):
    """dtype -> (path, the model read back by ``load_base_model``, its tokenizer)."""
    model = tuned[0]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    files = {}
    for dtype in ("f16", "q8_0"):
        path = export_gguf(model, BASE, tmp_path_factory.mktemp("gguf") / f"smollm2-lora-{dtype}.gguf", dtype=dtype)
        files[dtype] = (path, *load_base_model(path, use_cache=False))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # caller's model untouched
    assert not any(m.merged for m in lora_modules(model))
    return files


def _answer(model, tokenizer) -> str:
    chat = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}])
    return tokenizer.decode(generate_ids(model, [tokenizer.encode(chat)], tokens_to_generate=12,
                                         stop_ids=[tokenizer.eos_id])[0])


def test_f16_holds_exactly_the_merged_weights_rounded(tuned, exported):
    _, back, _ = exported["f16"]
    state = back.state_dict()
    for name in state:
        if name == "lm_head.weight":  # tied to wte.weight
            continue
        expected = merged_tensor(tuned[0], name)
        if expected.dim() > 1:
            expected = expected.half().float()
        assert torch.equal(state[name], expected), name


def test_q8_0_holds_exactly_the_merged_weights_quantized(tuned, exported):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    _, back, _ = exported["q8_0"]
    state = back.state_dict()
    for name in ("wte.weight", "blocks.0.attention.attention_dense.weight", "blocks.29.mlp.mlp_fc2.weight",
                 "blocks.7.norm_2.weight"):
        expected = merged_tensor(tuned[0], name).numpy()
        if expected.ndim > 1:
            q8 = GGMLQuantizationType.Q8_0
            expected = dequantize(quantize(expected, q8), q8)
        assert torch.equal(state[name], torch.from_numpy(expected)), name


def test_f16_round_trip_gives_the_tuned_logits_and_answer(tuned, exported, reference, chat_ids):
    tuned_logits, base_logits = reference
    path, back, tokenizer = exported["f16"]
    with torch.no_grad():
        diff = (back(chat_ids) - tuned_logits).abs()
    assert (tuned_logits - base_logits).abs().max().item() > 1.0  # the adapter matters, and is in the file:
    assert diff.max().item() < 0.1 and diff.mean().item() < 0.02, (diff.max().item(), diff.mean().item())
    assert _answer(back, tokenizer) == _answer(*tuned)
    assert path.stat().st_size < 300e6  # 134.5 M weights x 2 bytes + metadata


def test_q8_0_round_trip_is_close(exported, reference, chat_ids):
    tuned_logits, _ = reference
    path, back, _ = exported["q8_0"]
    with torch.no_grad():
        logits = back(chat_ids)
    diff = (logits - tuned_logits).abs()
    assert diff.max().item() < 3.0 and diff.mean().item() < 0.5, (diff.max().item(), diff.mean().item())
    assert (logits.argmax(-1) == tuned_logits.argmax(-1)).float().mean().item() >= 0.9
    assert path.stat().st_size < 0.55 * exported["f16"][0].stat().st_size  # 8.5 bits a weight instead of 16


def test_metadata_and_tokenizer_are_the_bases(exported, tuned):
    from gguf import GGUFReader

    from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES

    llama_cpp_names = {TENSOR_NAMES[t].format(bid=i) + ".weight" for t in MODEL_TENSORS[MODEL_ARCH.LLAMA]
                       for i in range(30)}
    base_tok = tuned[1]
    base = gguf_fields(GGUFReader(str(resolve_model_path(BASE))))
    for dtype, (path, _, tokenizer) in exported.items():
        reader = GGUFReader(str(path))
        fields = gguf_fields(reader)
        for key in base:
            if key.startswith(("llama.", "tokenizer.")):
                assert fields[key] == base[key], (dtype, key)
        assert fields["general.architecture"] == "llama"
        assert fields["general.name"] != base["general.name"]
        assert fields["general.base_model.0.name"] == base["general.name"]
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        assert types.keys() <= llama_cpp_names  # gguf-py's list of what llama.cpp's llama architecture reads
        assert "output.weight" not in types and len(types) == 2 + 30 * 9
        matrix = "F16" if dtype == "f16" else "Q8_0"
        assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == types["blk.29.ffn_down.weight"] == matrix
        assert types["output_norm.weight"] == types["blk.3.attn_norm.weight"] == "F32"
        assert tokenizer.encode(TEXT) == base_tok.encode(TEXT)
        assert tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}]) == \
            base_tok.apply_chat_template([{"role": "user", "content": QUESTION}])
        assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (base_tok.bos_id, base_tok.eos_id,
                                                                           base_tok.pad_id)


def test_transformers_reads_the_f16_file_as_we_do(exported, reference, chat_ids, tuned):
    import transformers

    path, back, _ = exported["f16"]
    transformers.logging.set_verbosity_error()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    with torch.no_grad():
        hf_logits = hf(chat_ids).logits
        ours = back(chat_ids)
    assert (hf_logits - ours).abs().max().item() < 1e-2  # the same file, two readers
    assert (hf_logits - reference[0]).abs().max().item() < 0.1  # = base + adapter, up to F16 rounding
    assert hf_tok(TEXT, add_special_tokens=False).input_ids == tuned[1].encode(TEXT)
    assert np.array_equal(hf_logits.argmax(-1).numpy(), reference[0].argmax(-1).numpy())
