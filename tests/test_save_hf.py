"""Tests for checkpoint.save_hf: our model leaves minituner as a Hugging Face directory.

By hand: GPT-2's c_attn is Conv1D (C, 3C) = [W_q; W_k; W_v]^T, so its first C columns are
W_q^T; a tied lm_head is not written; BERT is written under BertModel's names.
Inverse: load_hf(save_hf(model)) gives back every tensor bit for bit, for every family.
Parity with transformers (skipped per test without it): AutoModelForCausalLM / AutoModel load
the directory with no missing, unexpected or mismatched weights, and their logits equal ours
within 1e-4 (observed ~1e-6), for tiny random GPT-2, Llama (grouped-query, biases), Qwen2
(q/k/v biases) and BERT models and for the course's base model, whose tokenizer.json encodes
to the same ids in transformers. With PEFT: a LoRA adapter on the base model crosses over in
both directions (save_peft -> PeftModel on the export; save_pretrained -> load_peft) within 1e-5.
"""

import json

import pytest
import torch
from safetensors.torch import load_file

import minituner.checkpoint as ckpt
from minituner.checkpoint import CheckpointError, load_hf, save_hf
from minituner.lora import LoRAConfig, apply_lora, load_peft, save_peft
from minituner.model import ModelConfig, Transformer

TOL = 1e-4  # float32 parity with transformers (as tests/test_checkpoint.py)
PEFT_TOL = 1e-5
V = 61
SENTENCE = "Anna gave the red ball to Ben in the garden on Monday."


def tiny(family: str, seed: int = 0, **fields) -> Transformer:
    """A random tiny model with weights of std 0.2 (norm gains around 1), so layout errors show."""
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=V, block_size=24, n_layer=2, n_head=4, n_embd=16,
                      **{"intermediate_size": 24, **fields})
    model = Transformer(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(centre + 0.2 * torch.randn_like(p))
    return model.eval()


# family, extra config fields, the model_type save_hf must write
CASES = {
    "gpt2": ("gpt2", {"intermediate_size": 64}, "gpt2"),  # 4 C: n_inner is null
    "gpt2-untied-wide-mlp": ("gpt2", {"tie_embeddings": False, "intermediate_size": 40}, "gpt2"),
    "llama-gqa": ("llama", {"n_kv_head": 2, "rope_theta": 500.0}, "llama"),
    "llama-biases-tied": ("llama", {"n_kv_head": 2, "bias": True, "tie_embeddings": True}, "llama"),
    "llama-mlp-bias": ("llama", {"n_kv_head": 1, "mlp_bias": True}, "llama"),
    "qwen2": ("llama", {"n_kv_head": 2, "qkv_bias": True}, "qwen2"),
    "bert": ("bert", {}, "bert"),
}


def ids_and_mask(B: int = 3, T: int = 9, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # right padding
    return x, mask


def transformers_lib():
    transformers = pytest.importorskip("transformers", reason="parity with transformers (test extra)")
    transformers.logging.set_verbosity_error()
    return transformers


def hf_load(transformers, directory, causal: bool):
    """The export loaded by transformers' Auto classes, and what they report about its weights."""
    if causal:
        return transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
    return transformers.AutoModel.from_pretrained(directory, add_pooling_layer=False, output_loading_info=True)


def assert_loaded_cleanly(info: dict) -> None:
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info


# ---------------------------------------------------------------------------- by hand, no transformers
def test_gpt2_c_attn_is_fused_and_transposed_by_hand(tmp_path):
    """c_attn (C, 3C) = [W_q; W_k; W_v]^T: columns 0..C-1 are W_q^T, C..2C-1 W_k^T; its bias is
    [b_q, b_k, b_v]; c_fc is W_fc^T; the tied head is written once, as wte."""
    model = tiny("gpt2")
    save_hf(model, tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    a = model.blocks[1].attn
    assert torch.equal(t["transformer.h.1.attn.c_attn.weight"][:, :16], a.q_proj.weight.t())
    assert torch.equal(t["transformer.h.1.attn.c_attn.weight"][:, 16:32], a.k_proj.weight.t())
    assert torch.equal(t["transformer.h.1.attn.c_attn.bias"][32:], a.v_proj.bias)
    assert torch.equal(t["transformer.h.0.mlp.c_fc.weight"], model.blocks[0].mlp.fc.weight.t())
    assert "lm_head.weight" not in t and torch.equal(t["transformer.wte.weight"], model.tok_emb.weight)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"], cfg["n_embd"], cfg["tie_word_embeddings"]) == \
        ("gpt2", ["GPT2LMHeadModel"], 16, True)


def test_bert_is_written_under_bert_model_names(tmp_path):
    model = tiny("bert")
    save_hf(model, tmp_path)
    t = load_file(tmp_path / "model.safetensors")
    assert torch.equal(t["encoder.layer.1.attention.self.key.weight"], model.blocks[1].attn.k_proj.weight)
    assert torch.equal(t["embeddings.LayerNorm.bias"], model.emb_norm.bias)
    assert not any(k.startswith(("bert.", "pooler.", "cls.")) for k in t)


@pytest.mark.parametrize("case", CASES)
def test_load_hf_of_save_hf_is_exact(case, tmp_path):
    """save_hf is the inverse of load_hf: every tensor comes back bit for bit, same config."""
    family, fields, model_type = CASES[case]
    model = tiny(family, **fields)
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == model_type
    back = load_hf(tmp_path)
    assert back.config == model.config
    ours, theirs = model.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_refuses_a_non_empty_directory_unless_overwrite(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"not empty .*notes\.txt.*overwrite=True"):
        save_hf(tiny("gpt2"), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # nothing written
    save_hf(tiny("gpt2"), tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"  # others' files are kept
    second = tiny("gpt2", seed=5)
    save_hf(second, tmp_path, overwrite=True)
    assert torch.equal(load_hf(tmp_path).tok_emb.weight, second.tok_emb.weight)


def test_a_failed_write_leaves_the_previous_export(tmp_path, monkeypatch):
    first = tiny("llama")
    save_hf(first, tmp_path / "out")

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_hf(tiny("llama", seed=3), tmp_path / "out", overwrite=True)
    assert torch.equal(load_hf(tmp_path / "out").tok_emb.weight, first.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left behind


@pytest.mark.parametrize("fields, problem", [
    (dict(family="gpt2", positions="rope"), r"positions='rope' \(the gpt2 layout has 'learned'\)"),
    (dict(family="gpt2", n_kv_head=2), r"n_kv_head=2 \(grouped-query attention needs the llama layout\)"),
    (dict(family="llama", qkv_bias=True, mlp_bias=True), r"qkv_bias=True with bias=False, mlp_bias=True"),
    (dict(family="bert", causal=True), r"causal=True"),
])
def test_refuses_what_no_hf_layout_expresses(fields, problem, tmp_path):
    family = fields.pop("family")
    with pytest.raises(CheckpointError, match=problem):
        save_hf(tiny(family, **fields), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_injected_modules_and_names_save_peft(tmp_path):
    model = apply_lora(tiny("llama"), LoRAConfig(r=2))
    with pytest.raises(CheckpointError, match=r"injected modules .*lora.*save_peft"):
        save_hf(model, tmp_path / "out")


def test_family_check_and_tokenizer_vocab_check(tmp_path):
    from minituner.tokenizer import Tokenizer

    with pytest.raises(CheckpointError, match="expected a llama model, this one is gpt2"):
        save_hf(tiny("gpt2"), tmp_path / "a", family="llama")
    tok = Tokenizer.load(ckpt.find_base_model())  # 1327 ids, more than V
    with pytest.raises(CheckpointError, match=f"{tok.vocab_size} ids but the model's vocab_size is {V}"):
        save_hf(tiny("gpt2"), tmp_path / "b", tokenizer=tok)


# ---------------------------------------------------------------------------- parity with transformers
@pytest.mark.parametrize("case", CASES)
def test_transformers_loads_cleanly_and_logits_match(case, tmp_path):
    transformers = transformers_lib()
    family, fields, model_type = CASES[case]
    model = tiny(family, **fields)
    save_hf(model, tmp_path)
    hf, info = hf_load(transformers, tmp_path, causal=family != "bert")
    assert_loaded_cleanly(info)
    assert hf.config.model_type == model_type
    x, mask = ids_and_mask()
    with torch.no_grad():
        out = hf(input_ids=x, attention_mask=mask)
        ref = out.logits if family != "bert" else out.last_hidden_state
        got = model(x, attention_mask=mask)
    real = mask.bool()
    assert ref.abs().max() > 1.0  # not a comparison of near-zero tensors
    assert (got[real] - ref[real]).abs().max() <= TOL


def base_export(tmp_path):
    from minituner.checkpoint import find_base_model, load
    from minituner.tokenizer import Tokenizer

    base = find_base_model()
    model, tok = load(base), Tokenizer.load(base)
    save_hf(model, tmp_path / "hf", tokenizer=tok)
    return model, tok, tmp_path / "hf"


def test_base_model_export_matches_with_its_tokenizer(tmp_path):
    transformers = transformers_lib()
    model, tok, d = base_export(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (tok.bos_id, tok.eos_id, tok.pad_id)
    hf, info = hf_load(transformers, d, causal=True)
    assert_loaded_cleanly(info)
    assert (hf.generation_config.bos_token_id, hf.generation_config.eos_token_id) == (tok.bos_id, tok.eos_id)
    theirs_tok = transformers.AutoTokenizer.from_pretrained(d)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    ours_ids = tok.encode(SENTENCE)
    assert theirs_tok(SENTENCE)["input_ids"] == ours_ids == fast(SENTENCE)["input_ids"]
    assert (theirs_tok.bos_token_id, theirs_tok.eos_token_id, theirs_tok.pad_token_id) == \
        (tok.bos_id, tok.eos_id, tok.pad_id)
    x = torch.tensor([[tok.bos_id] + ours_ids])
    with torch.no_grad():
        ref, got = hf(x).logits, model(x)
        assert (got - ref).abs().max() <= TOL
        gen_ref = hf.generate(x, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(x, 8), gen_ref)


# ---------------------------------------------------------------------------- LoRA with PEFT, on the base model
def test_base_model_lora_save_peft_to_peft_model_on_the_export(tmp_path):
    """ours -> save_peft -> PeftModel.from_pretrained(AutoModelForCausalLM(save_hf dir)): same logits."""
    transformers = transformers_lib()
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft (test extra)")
    model, tok, d = base_export(tmp_path)
    lora = apply_lora(model, LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "fc")))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:  # B = 0 at init would make any adapter layout pass
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    save_peft(lora, tmp_path / "adapter")
    hf, _ = hf_load(transformers, d, causal=True)
    x = torch.tensor([[tok.bos_id] + tok.encode(SENTENCE)])
    with torch.no_grad():
        base = hf(x).logits
        pm = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
        theirs, ours = pm(x).logits, lora(x)
    assert (theirs - base).abs().max() > 1e-2  # the adapter matters
    assert (ours - theirs).abs().max() <= PEFT_TOL


def test_base_model_peft_save_pretrained_to_load_peft(tmp_path):
    """get_peft_model on the export -> save_pretrained -> load_peft on our base: same logits."""
    transformers = transformers_lib()
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft (test extra)")
    model, tok, d = base_export(tmp_path)
    hf, _ = hf_load(transformers, d, causal=True)
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                  fan_in_fan_out=True, use_rslora=True)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    pm.save_pretrained(tmp_path / "adapter")
    load_peft(model, tmp_path / "adapter")
    x = torch.tensor([[tok.bos_id] + tok.encode(SENTENCE)])
    with torch.no_grad():
        theirs, ours = pm(x).logits, model(x)
        with pm.disable_adapter():
            base = pm(x).logits
    assert (theirs - base).abs().max() > 1e-2
    assert (ours - theirs).abs().max() <= PEFT_TOL
