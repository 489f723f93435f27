"""Tests for minituner/lora.py: LoRA (Hu 2021, Eq. 3), rsLoRA, merging, named adapters, PEFT's format.

By hand: h = W0 x + (α/r) B A x for a hand-picked A, B; B = 0 at init so the model is the base
and A gets no gradient; GPT-2's fused c_attn adapter (A stacked, B block-diagonal, α' = 3α or √3·α).
Parity: with PEFT and transformers (skipped per test when not installed): ours -> save_peft ->
PeftModel.from_pretrained, and get_peft_model -> save_pretrained -> load_peft, logits within 1e-5.
Invariants (hypothesis): merge then unmerge restores W; merged equals unmerged.
"""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from hf_tiny import hf_model, ours_from
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from minituner.lora import (
    LoRAConfig,
    LoRALinear,
    apply_lora,
    load_peft,
    merge_and_unload,
    merge_lora,
    save_peft,
    set_adapter,
    unmerge_lora,
)
from minituner.model import ModelConfig, Transformer
from minituner.protocol import (
    applied,
    count_parameters,
    disable_adapters,
    load_adapter,
    save_adapter,
)

V = 64
FAMILIES = ["gpt2", "llama", "bert"]


def tiny(family: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=16,
                      n_kv_head=2 if family == "llama" else None, intermediate_size=24)
    with torch.no_grad():
        m = Transformer(cfg)
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def randomize(model: nn.Module, seed: int = 1, scale: float = 0.3) -> nn.Module:
    """Non-zero A and B (B is zero at init), so a wrong formula or a wrong layout shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return model


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- by hand
def test_update_by_hand():
    """W0 = 0, bias (0.5, -0.5); A = [[1,0,2],[0,1,0]], B = [[1,0],[0,2]], x = (1,2,3):
    A x = (1+6, 2) = (7, 2); B A x = (7, 4); α = 4, r = 2: α/r = 2, h = (14.5, 7.5).
    rsLoRA: α/√r = 2√2, h = (0.5 + 14√2, -0.5 + 8√2)."""
    for rs, want in [(False, [14.5, 7.5]), (True, [0.5 + 14 * math.sqrt(2), -0.5 + 8 * math.sqrt(2)])]:
        base = nn.Linear(3, 2).double()
        with torch.no_grad():
            base.weight.zero_()
            base.bias.copy_(torch.tensor([0.5, -0.5]))
        layer = LoRALinear(base, LoRAConfig(r=2, alpha=4, use_rslora=rs))
        with torch.no_grad():
            layer.lora_A["default"].copy_(torch.tensor([[1.0, 0, 2], [0, 1, 0]]))
            layer.lora_B["default"].copy_(torch.tensor([[1.0, 0], [0, 2]]))
        h = layer(torch.tensor([[1.0, 2, 3]], dtype=torch.float64))
        torch.testing.assert_close(h, torch.tensor([want], dtype=torch.float64), rtol=0, atol=1e-12)


def test_init_kaiming_a_and_zero_b():
    """A ~ U(-b, b) with b = sqrt(6 / ((1 + a^2) in)) = 1/sqrt(in) for a = √5; B = 0."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 30), LoRAConfig(r=16))
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    assert A.shape == (16, 400) and B.shape == (30, 16)
    assert A.abs().max() <= 1 / 20 and A.abs().max() > 0.9 / 20 and torch.equal(B, torch.zeros(30, 16))


@pytest.mark.parametrize("family", FAMILIES)
def test_init_is_exactly_the_base_and_counts(family):
    """B = 0: (α/r) B A x = 0, bit for bit; r (in + out) trainable parameters per layer."""
    base = tiny(family)
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=4, target_modules=("q_proj", "v_proj", "o_proj")))
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
    C, kv = 16, (8 if family == "llama" else 16)
    per_layer = 4 * (C + C) + 4 * (C + kv) + 4 * (C + C)  # q (16->16), v (16->kv), o (16->16)
    assert count_parameters(model) == (2 * per_layer, count_parameters(base)[1] + 2 * per_layer)
    assert applied(model)[0]["technique"] == "lora"


@pytest.mark.parametrize("family", FAMILIES)
def test_only_a_and_b_get_gradients(family):
    """dL/dA = (α/r) Bᵀ (dL/dh) xᵀ = 0 while B = 0, and dL/dB = (α/r) (dL/dh) (A x)ᵀ != 0;
    the frozen base gets none. With B != 0 both A and B get gradients."""
    mlp = ("gate_proj", "up_proj", "down_proj") if family == "llama" else ("fc", "proj")
    model = apply_lora(tiny(family), LoRAConfig(r=2, target_modules=("q_proj",) + mlp))
    model(ids()).pow(2).mean().backward()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif "lora_A" in n:
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), n
        else:
            assert not p.requires_grad and p.grad is None, n
    randomize(model)
    model.zero_grad()
    model(ids()).pow(2).mean().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == {n for n, _ in model.named_parameters() if "lora_" in n}


def test_dropout_only_on_the_lora_branch():
    """h = W0 x + (α/r) B A dropout(x): with B = 0 training-mode dropout leaves h = W0 x; with
    B != 0 it equals the formula computed with the same dropout mask (same RNG state)."""
    torch.manual_seed(0)
    base = nn.Linear(8, 5)
    layer = LoRALinear(base, LoRAConfig(r=3, alpha=6, dropout=0.5)).train()
    x = torch.randn(4, 8)
    assert torch.equal(layer(x), base(x))
    randomize(layer)
    torch.manual_seed(1)
    h = layer(x)
    torch.manual_seed(1)
    xd = nn.functional.dropout(x, 0.5, training=True)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    torch.testing.assert_close(h, base(x) + 2.0 * xd @ A.T @ B.T, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(h, base(x) + 2.0 * x @ A.T @ B.T)  # dropout did act on the branch
    torch.testing.assert_close(layer.eval()(x), base(x) + 2.0 * x @ A.T @ B.T, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------- merging
@settings(max_examples=30, deadline=None)
@given(inp=st.integers(1, 24), out=st.integers(1, 24), r=st.integers(1, 8), alpha=st.floats(0.5, 16),
       rs=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_then_unmerge_restores_w(inp, out, r, alpha, rs, seed):
    """merge: W0 + (α/r) B A, the same map as the branch; unmerge: W0 again within 1e-6."""
    torch.manual_seed(seed)
    base = nn.Linear(inp, out)
    w0 = base.weight.detach().clone()
    model = nn.Sequential(LoRALinear(base, LoRAConfig(r=r, alpha=alpha, use_rslora=rs)))
    randomize(model, seed, scale=0.1)
    x = torch.randn(3, inp)
    before = model(x)
    merge_lora(model)
    delta = model[0].delta_weight()
    torch.testing.assert_close(base.weight.detach(), w0 + delta, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(base.weight.detach(), w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_merged_logits_equal_unmerged(family):
    model = randomize(apply_lora(tiny(family), LoRAConfig(r=4, target_modules=r".*\.(q_proj|v_proj|fc|up_proj)")))
    x = ids()
    with torch.no_grad():
        want = model(x)
        merge_lora(model)
        assert all(m.merged == "default" for m in model.modules() if isinstance(m, LoRALinear))
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        with pytest.raises(RuntimeError, match="unmerge_lora"), disable_adapters(model):
            model(x)  # merged weights cannot give the base back
        unmerge_lora(model)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_merge_and_unload_leaves_the_base_architecture_with_the_merged_weights(family):
    """PEFT's merge_and_unload: no LoRA module is left, the state dict has exactly the base
    model's keys and shapes, the logits are the adapted model's; refusing changes nothing."""
    base = tiny(family)
    model = randomize(apply_lora(copy.deepcopy(base), LoRAConfig(r=4, target_modules=r".*\.(q_proj|v_proj|fc|up_proj)")))
    x = ids()
    with torch.no_grad():
        want = model(x)
        merge_and_unload(model)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in base.state_dict().items()}
    assert applied(model) == []
    tied = randomize(apply_lora(tiny("gpt2"), LoRAConfig(target_modules=("q_proj", "lm_head"))))
    with pytest.raises(ValueError, match="lm_head.*shared with"):
        merge_and_unload(tied)
    assert sum(isinstance(m, LoRALinear) for m in tied.modules()) == 3  # q_proj x 2 layers, lm_head


def test_merge_refuses_nan_inf_and_names_the_module():
    model = randomize(apply_lora(tiny("llama"), LoRAConfig(target_modules=("q_proj", "v_proj"))))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        model.blocks[1].attn.v_proj.lora_B["default"][0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.v_proj.*NaN/Inf"):
        merge_lora(model)
    for n, p in model.named_parameters():  # nothing merged, not even the layers before it
        if "base" in n:
            assert torch.equal(p, before[n]), n
    assert all(m.merged is None for m in model.modules() if isinstance(m, LoRALinear))


def test_merge_refuses_a_sum_that_overflows_the_dtype():
    """fp16 holds at most 65504: W0 = 6e4 plus ΔW = (α/r) B A = 2 * 5e3 = 1e4 is finite in
    float32 but Inf once stored in fp16."""
    base = nn.Linear(1, 1, bias=False).half()
    with torch.no_grad():
        base.weight.fill_(6e4)
    model = nn.Sequential(LoRALinear(base, LoRAConfig(r=1, alpha=2)))
    with torch.no_grad():
        model[0].lora_A["default"].fill_(100.0)
        model[0].lora_B["default"].fill_(50.0)
    with pytest.raises(ValueError, match=r"into 0 gives NaN/Inf torch.float16"):
        merge_lora(model)
    assert base.weight.item() == 6e4  # unchanged


def test_merge_refuses_a_tied_weight():
    """GPT-2's lm_head is tok_emb: merging into it would change the embedding too."""
    model = randomize(apply_lora(tiny("gpt2"), LoRAConfig(target_modules=("lm_head",))))
    with pytest.raises(ValueError, match="lm_head.*shared with.*tok_emb"):
        merge_lora(model)


# ---------------------------------------------------------------------------- protocol
@pytest.mark.parametrize("family", FAMILIES)
def test_disable_adapters_gives_the_base_exactly(family):
    base = tiny(family)
    model = randomize(apply_lora(copy.deepcopy(base), LoRAConfig(target_modules=("q_proj", "k_proj", "o_proj"))))
    x = ids()
    with torch.no_grad():
        assert not torch.allclose(model(x), base(x), atol=1e-3)
        with disable_adapters(model):
            assert torch.equal(model(x), base(x))


def test_set_adapter_switches_without_reloading_the_base():
    base = tiny("llama")
    model = randomize(apply_lora(copy.deepcopy(base), LoRAConfig(r=2, target_modules=("q_proj", "v_proj"))), 1)
    only_a = copy.deepcopy(model)
    weights = {n: m.base.weight for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    apply_lora(model, LoRAConfig(r=3, alpha=5, target_modules=("v_proj", "down_proj"), adapter_name="b"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".b"):
                p.normal_(0, 0.3)
    only_b = apply_lora(copy.deepcopy(base), LoRAConfig(r=3, alpha=5, target_modules=("v_proj", "down_proj")))
    with torch.no_grad():
        for n, p in only_b.named_parameters():
            if "lora_" in n:
                p.copy_(model.get_parameter(n.replace(".default", ".b")))
    x = ids()
    with torch.no_grad():
        assert torch.equal(model(x), only_b(x))  # apply_lora activates the new adapter
        set_adapter(model, "default")
        assert torch.equal(model(x), only_a(x))
        set_adapter(model, "b")
        assert torch.equal(model(x), only_b(x))
        assert not torch.allclose(only_a(x), only_b(x), atol=1e-3)
    assert all(model.get_submodule(n).base.weight is w for n, w in weights.items())  # the same tensors
    with pytest.raises(ValueError, match=r"no LoRA adapter 'c'.*\['b', 'default'\]"):
        set_adapter(model, "c")
    with pytest.raises(ValueError, match="already has LoRA adapter 'b'"):
        apply_lora(model, LoRAConfig(target_modules=("v_proj",), adapter_name="b"))


def test_protocol_save_and_load_adapter_round_trip(tmp_path):
    base = tiny("gpt2")
    model = apply_lora(copy.deepcopy(base), LoRAConfig(r=2, target_modules=("q_proj", "fc"), use_rslora=True))
    apply_lora(model, LoRAConfig(r=3, alpha=6, target_modules=r"blocks\.1\.attn\.v_proj", adapter_name="b"))
    randomize(model)
    set_adapter(model, "default")
    save_adapter(model, tmp_path / "a")
    loaded = load_adapter(copy.deepcopy(base), tmp_path / "a")
    assert applied(loaded) == applied(model)
    x = ids()
    with torch.no_grad():
        set_adapter(loaded, "default")
        assert torch.equal(loaded(x), model(x))
        set_adapter(loaded, "b"), set_adapter(model, "b")
        assert torch.equal(loaded(x), model(x))


def test_config_errors_name_the_fix():
    for kw, msg in [({"r": 0}, "r=0"), ({"alpha": -1}, "alpha"), ({"dropout": 1.0}, "dropout"),
                    ({"adapter_name": "a.b"}, "adapter_name")]:
        with pytest.raises(ValueError, match=msg):
            LoRAConfig(**kw)
    with pytest.raises(ValueError, match=r"names that exist.*blocks\.\{i\}\.attn\.q_proj"):
        apply_lora(tiny("llama"), LoRAConfig(target_modules=("query",)))


# ---------------------------------------------------------------------------- PEFT's format, by hand
def test_save_peft_names_and_config_by_hand(tmp_path):
    model = randomize(apply_lora(tiny("llama"), LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "down_proj"))))
    save_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["use_rslora"]) == ("LORA", 4, 8, False)
    assert cfg["target_modules"] == ["down_proj", "q_proj"] and cfg["rank_pattern"] == {}
    t = load_file(tmp_path / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(t[key], model.blocks[0].attn.q_proj.lora_A["default"])
    assert t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape == (16, 4)
    assert len(t) == 2 * 2 * 2


def test_bert_targets_use_the_shortest_exact_suffix(tmp_path):
    """HF BERT has attention.output.dense, intermediate.dense, output.dense and pooler.dense:
    "dense" would also reach the pooler, so the targets are the two-part suffixes."""
    model = randomize(apply_lora(tiny("bert"), LoRAConfig(target_modules=("o_proj", "fc", "proj"))))
    save_peft(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["target_modules"] == [
        "intermediate.dense", "output.dense"]


@pytest.mark.parametrize("rs, alpha", [(False, 12), (True, 4 * math.sqrt(3))])
def test_gpt2_qkv_saves_as_one_exact_c_attn_adapter(tmp_path, rs, alpha):
    """q, k, v at r = 2, α = 4 -> c_attn at R' = 6: A (6, C) stacked, B (3C, 6) block-diagonal;
    α'/R' = α/r gives α' = 12; with rsLoRA α'/√R' = α/√r gives α' = 4√3. o_proj keeps r = 2:
    rank_pattern/alpha_pattern name c_attn; "c_proj" alone would also reach mlp.c_proj, so
    the target is "attn.c_proj". Loading it back gives the same outputs."""
    base = tiny("gpt2")
    model = randomize(apply_lora(copy.deepcopy(base), LoRAConfig(r=2, alpha=4, use_rslora=rs,
                                                                 target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))))
    save_peft(model, tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["fan_in_fan_out"]) == (2, 4, ["attn.c_attn", "attn.c_proj"], True)
    assert cfg["rank_pattern"] == {"c_attn": 6} and cfg["alpha_pattern"]["c_attn"] == pytest.approx(alpha, rel=1e-12)
    t = load_file(tmp_path / "adapter_model.safetensors")
    A, B = t["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"], t["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    attn = model.blocks[0].attn
    assert torch.equal(A, torch.cat([attn.q_proj.lora_A["default"], attn.k_proj.lora_A["default"],
                                     attn.v_proj.lora_A["default"]]))
    torch.testing.assert_close(B[16:32, 2:4], attn.k_proj.lora_B["default"].detach(), rtol=1e-6, atol=0)
    assert torch.equal(B[16:32, :2], torch.zeros(16, 2)) and torch.equal(B[:16, 2:], torch.zeros(16, 4))
    loaded = load_peft(copy.deepcopy(base), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids()), model(ids()), rtol=1e-5, atol=1e-5)


def write_peft(d, config: dict, tensors: dict) -> None:
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}))
    save_file(tensors, str(d / "adapter_model.safetensors"))


def q_tensors(layers=(0, 1)) -> dict:
    return {f"base_model.model.model.layers.{i}.self_attn.q_proj.lora_{ab}.weight": torch.ones(shape)
            for i in layers for ab, shape in (("A", (2, 16)), ("B", (16, 2)))}


def test_load_peft_follows_peft_target_rule(tmp_path):
    """A list holds names or dotted suffixes; a string is a regex for the whole name, so the
    string "q_proj" matches nothing while ["q_proj"] matches every layer's q_proj."""
    write_peft(tmp_path / "list", {"target_modules": ["q_proj"]}, q_tensors())
    m = load_peft(tiny("llama"), tmp_path / "list")
    assert {n for n, x in m.named_modules() if isinstance(x, LoRALinear)} == {"blocks.0.attn.q_proj", "blocks.1.attn.q_proj"}
    write_peft(tmp_path / "regex", {"target_modules": r".*layers\.0\.self_attn\.q_proj"}, q_tensors((0,)))
    m = load_peft(tiny("llama"), tmp_path / "regex")
    assert [n for n, x in m.named_modules() if isinstance(x, LoRALinear)] == ["blocks.0.attn.q_proj"]
    write_peft(tmp_path / "str", {"target_modules": "q_proj"}, q_tensors())
    with pytest.raises(ValueError, match="match none"):
        load_peft(tiny("llama"), tmp_path / "str")
    write_peft(tmp_path / "short", {"target_modules": ["q_proj"]}, q_tensors((0,)))
    with pytest.raises(ValueError, match=r"missing \['model\.layers\.1\.self_attn\.q_proj\.lora_A"):
        load_peft(tiny("llama"), tmp_path / "short")
    bad = {k: torch.ones(3, 16) if "lora_A" in k else torch.ones(16, 3) for k in q_tensors()}  # rank 3, not 2
    write_peft(tmp_path / "bad", {"target_modules": ["q_proj"]}, bad)
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"q_proj\.lora_A: the file has \(3, 16\), the model needs \(2, 16\)"):
        load_peft(model, tmp_path / "bad")
    assert not applied(model) and not any(isinstance(x, LoRALinear) for x in model.modules())  # untouched


@pytest.mark.parametrize("setting", [{"use_dora": True}, {"bias": "all"}, {"modules_to_save": ["lm_head"]},
                                     {"layers_to_transform": [0]}, {"init_lora_weights": "pissa"}])
def test_load_peft_refuses_unsupported_settings_by_name(tmp_path, setting):
    write_peft(tmp_path, {"target_modules": ["q_proj"], **setting}, q_tensors())
    with pytest.raises(ValueError, match=next(iter(setting))):
        load_peft(tiny("llama"), tmp_path)


def test_load_peft_refuses_a_pickle(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="safetensors"):
        load_peft(tiny("llama"), tmp_path)


# ---------------------------------------------------------------------------- parity with PEFT
def hf_out(model, x):
    out = model(input_ids=x)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


# (our target_modules, PEFT's target_modules) per family: attention and MLP
TARGETS = {
    "llama": [(("q_proj", "k_proj", "v_proj", "o_proj"), ["q_proj", "k_proj", "v_proj", "o_proj"]),
              (("gate_proj", "up_proj", "down_proj"), ["gate_proj", "up_proj", "down_proj"])],
    "gpt2": [(("q_proj", "k_proj", "v_proj", "o_proj"), ["c_attn", "c_proj"]),
             (("fc", "proj"), ["c_fc", "mlp.c_proj"]), (("q_proj", "v_proj"), None)],
    "bert": [(("q_proj", "v_proj", "o_proj"), ["query", "value", "attention.output.dense"]),
             (("fc", "proj"), ["intermediate.dense", "layer.0.output.dense", "layer.1.output.dense"])],
}
CASES = [(f, ours, theirs, rs) for f, pairs in TARGETS.items() for ours, theirs in pairs for rs in (False, True)]


@pytest.mark.parametrize("family, ours_targets, _, rs", CASES)
def test_ours_to_peft_from_pretrained(tmp_path, family, ours_targets, _, rs):
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft (test extra)")
    hf = hf_model(family, V)
    model = randomize(apply_lora(ours_from(hf), LoRAConfig(r=4, alpha=8, target_modules=ours_targets, use_rslora=rs)))
    save_peft(model, tmp_path)
    x = ids()
    with torch.no_grad():
        base = hf_out(hf, x)
        pm = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
        theirs, ours = hf_out(pm, x), model(x)
    assert (theirs - base).abs().max() > 1e-2  # the adapter matters
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, _, peft_targets, rs", [c for c in CASES if c[2] is not None])
def test_peft_save_pretrained_to_load_peft(tmp_path, family, _, peft_targets, rs):
    peft = pytest.importorskip("peft", reason="PEFT parity needs peft (test extra)")
    hf = hf_model(family, V)
    model = ours_from(hf)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=peft_targets, use_rslora=rs,
                             fan_in_fan_out=family == "gpt2")
    pm = peft.get_peft_model(hf, config).eval()
    randomize(pm, seed=3)
    pm.save_pretrained(tmp_path)
    load_peft(model, tmp_path)
    x = ids()
    with torch.no_grad():
        theirs, ours = hf_out(pm, x), model(x)
        with pm.disable_adapter():
            base = hf_out(pm, x)
    assert (theirs - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
