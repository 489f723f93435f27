"""Tests for minituner/protocol.py: the helpers every technique shares.

By hand: parameter counts of a tiny GPT-2 with a tied embedding; optimizer bytes of AdamW.
Parity: save -> load onto a fresh base model gives the same outputs, bit for bit.
Invariants: disable_adapters gives the untouched base and restores the technique on exit,
also when the block raises, also nested.
"""

import copy
import json

import pytest
import torch
import torch.nn as nn

from minituner.adapters import AdapterConfig, apply_adapters
from minituner.heads import HeadConfig, add_head, apply_head, classify
from minituner.model import ModelConfig, Transformer
from minituner.protocol import (
    Injected, adapter_state_dict, applied, count_parameters, disable_adapters, find_modules, fingerprint,
    freeze, load_adapter, load_as_base, mark_applied, memory_bytes, replace_module, save_adapter,
    trainable_parameters,
)

V, BLOCK, L, C = 64, 32, 2, 16


def tiny(family: str = "gpt2", seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(family=family, vocab_size=V, block_size=BLOCK, n_layer=L,
                                   n_head=2, n_embd=C, **kw)).eval()


def perturb(model: nn.Module, seed: int = 1) -> None:
    """Stand-in for training: move every trainable tensor away from its initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


# -- counting -----------------------------------------------------------------------------------
def test_count_parameters_by_hand_with_a_tied_embedding():
    """GPT-2, V=64, T=32, L=2, C=16, MLP 4C=64:
    tok_emb 64*16 = 1024, pos_emb 32*16 = 512, per layer: 2 LayerNorms 2*32 = 64,
    q/k/v/o 4*(16*16 + 16) = 1088, fc 16*64 + 64 = 1088, proj 64*16 + 16 = 1040 -> 3280;
    norm_f 32; lm_head shares tok_emb: 0.  Total 1024 + 512 + 2*3280 + 32 = 8128.
    Untied, lm_head adds its own 64*16 = 1024."""
    model = tiny()
    assert model.lm_head.weight is model.tok_emb.weight
    assert count_parameters(model) == (8128, 8128)
    freeze(model)
    assert count_parameters(model) == (0, 8128) and trainable_parameters(model) == []
    model.lm_head.weight.requires_grad_(True)  # the tied tensor: one tensor, counted once
    assert count_parameters(model) == (1024, 8128)
    assert count_parameters(tiny(tie_embeddings=False)) == (8128 + 1024,) * 2


def test_memory_bytes_by_hand():
    """float32 GPT-2 above with Houlsby adapters (m = 16/4 = 4, 2*2*(2*4*16 + 16 + 4) = 592
    trainable): weights 4*(8128 + 592) bytes (the tied tensor once), gradients 4*592; AdamW keeps
    exp_avg and exp_avg_sq (2 * 4 bytes per trainable element) and a float32 step per tensor
    (4 bytes each, 16 tensors: 2 Linears * 2 tensors * 4 adapters)."""
    model = apply_adapters(tiny(), AdapterConfig(reduction_factor=4))
    opt = torch.optim.AdamW(trainable_parameters(model), lr=1e-3)
    before = memory_bytes(model, opt)
    assert before["optimizer"] == 0  # no state before the first step
    model(torch.randint(0, V, (2, 5))).sum().backward()
    opt.step()
    mem = memory_bytes(model, opt)
    assert (mem["parameters"], mem["trainable"]) == (8720, 592)
    assert mem["weights"] == 4 * 8720 and mem["gradients"] == 4 * 592 == before["gradients"]
    assert mem["optimizer"] == 8 * 592 + 4 * 16
    assert mem["total"] == mem["weights"] + mem["gradients"] + mem["optimizer"]
    assert mem["weights_per_param"] == 4.0 and mem["total_per_param"] == mem["total"] / 8720
    half = memory_bytes(tiny().to(torch.bfloat16))
    assert (half["weights_per_param"], half["gradients_per_param"], half["optimizer"]) == (2.0, 2.0, 0)


def test_memory_bytes_counts_paged_optimizer_pages():
    """PagedAdamW keeps m and v in its page pool, not in optimizer.state: after one step the
    optimizer's bytes are at least 2 * 4 bytes per trainable float32 element (m and v), as for
    torch's AdamW, not the handful of bytes of its step counters."""
    from minituner.paged_adamw import PagedAdamW

    model = apply_adapters(tiny(), AdapterConfig(reduction_factor=4))
    opt = PagedAdamW(trainable_parameters(model), lr=1e-3)
    model(torch.randint(0, V, (2, 5))).sum().backward()
    opt.step()
    mem = memory_bytes(model, opt)
    assert 8 * 592 <= mem["optimizer"] <= 8 * 592 + 4096  # m, v (+ page rounding, step counters)


# -- finding and replacing modules -----------------------------------------------------------------
def test_find_modules_follows_peft_matching():
    model = tiny()
    names = lambda pats, **kw: [n for n, _ in find_modules(model, pats, **kw)]  # noqa: E731
    assert names("q_proj") == ["blocks.0.attn.q_proj", "blocks.1.attn.q_proj"]
    assert names(["attn.o_proj", "blocks.1.attn.v_proj"]) == [
        "blocks.0.attn.o_proj", "blocks.1.attn.v_proj", "blocks.1.attn.o_proj"]
    assert names("proj") == ["blocks.0.mlp.proj", "blocks.1.mlp.proj"]  # a dotted suffix, not "q_proj"
    assert names(r"blocks\.1\.attn\.[qv]_proj") == ["blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert names("mlp", types=None) == ["blocks.0.mlp", "blocks.1.mlp"]


def test_a_regex_must_match_the_whole_name_and_no_match_lists_the_names():
    model = tiny()
    with pytest.raises(ValueError) as e:
        find_modules(model, r"attn\.[qv]_proj")  # matches only the end: not a full match
    msg = str(e.value)
    for name in ("blocks.{i}.attn.q_proj", "blocks.{i}.mlp.fc", "lm_head"):
        assert f"'{name}'" in msg
    assert "blocks.0.attn" not in msg  # layer indices collapsed
    with pytest.raises(ValueError, match="nor a valid regular expression"):
        find_modules(model, "q_proj[")


def test_replace_module_by_dotted_path():
    model = tiny()
    new = nn.Linear(C, C)
    replace_module(model, "blocks.1.attn.o_proj", new)
    assert model.blocks[1].attn.o_proj is new
    replace_module(model, "lm_head", nn.Identity())
    assert isinstance(model.lm_head, nn.Identity)
    with pytest.raises(ValueError, match="no module 'blocks.0.attn.x_proj'"):
        replace_module(model, "blocks.0.attn.x_proj", new)


def test_mark_applied_records_in_order_and_rejects_unknown_names():
    model = tiny()
    assert applied(model) == []
    mark_applied(model, "head", HeadConfig(num_classes=2))
    assert [t["technique"] for t in applied(model)] == ["head"]
    assert applied(model)[0]["config"]["num_classes"] == 2
    with pytest.raises(ValueError, match="TECHNIQUES"):
        mark_applied(model, "magic", HeadConfig(num_classes=2))


# -- disable_adapters ----------------------------------------------------------------------------
class Shift(Injected):
    """A minimal injected wrapper: base(x) + delta, or base(x) while disabled."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base, self.delta = base, nn.Parameter(torch.full((base.out_features,), 0.5))

    def forward(self, x):
        y = self.base(x)
        return y if self.disabled else y + self.delta


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_disable_adapters_is_the_base_and_restores_on_exit_and_on_error(family):
    base = tiny(family)
    model = copy.deepcopy(base)
    for name, m in find_modules(model, ["v_proj", "mlp.fc", "mlp.up_proj"]):
        replace_module(model, name, Shift(m))
    x = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        want, adapted = base(x), model(x)
        assert not torch.allclose(adapted, want)
        with disable_adapters(model):
            assert torch.equal(model(x), want)
            with disable_adapters(model):  # nested: the inner exit keeps the outer state
                pass
            assert torch.equal(model(x), want)
        assert torch.equal(model(x), adapted)
        with pytest.raises(RuntimeError, match="boom"):
            with disable_adapters(model):
                raise RuntimeError("boom")
        assert torch.equal(model(x), adapted)
        model.blocks[0].attn.v_proj.disabled = True  # a module disabled by hand stays disabled
        with disable_adapters(model):
            pass
        assert model.blocks[0].attn.v_proj.disabled and not model.blocks[1].attn.v_proj.disabled


# -- saving and loading --------------------------------------------------------------------------
def adapted_with_head(family: str) -> Transformer:
    model = apply_adapters(tiny(family), AdapterConfig(reduction_factor=4, init="near_identity"))
    add_head(model, HeadConfig(num_classes=3, pooling="mean"))
    perturb(model)
    return model


def test_adapter_state_dict_holds_only_the_trained_tensors():
    model = adapted_with_head("llama")
    sd = adapter_state_dict(model)
    assert set(sd) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("adapter." in k or k.startswith("head.")) for k in sd)
    assert len(sd) == L * 2 * 4 + 2
    assert all(t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad for t in sd.values())


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert"])
def test_save_then_load_onto_a_fresh_base_gives_identical_outputs(family, tmp_path):
    model = adapted_with_head(family)
    save_adapter(model, tmp_path / "ad")
    meta = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert [t["technique"] for t in meta["techniques"]] == ["adapters", "head"]
    assert meta["base_fingerprint"] == fingerprint(model.config.to_dict()) and len(meta["base_fingerprint"]) == 16
    fresh = load_adapter(tiny(family), tmp_path / "ad")  # the same base weights (seed 0)
    assert applied(fresh) == applied(model)
    assert count_parameters(fresh) == count_parameters(model)
    x, mask = torch.randint(0, V, (3, 7)), torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        assert torch.equal(classify(fresh, x, mask), classify(model, x, mask))
    again = load_adapter(fresh, tmp_path / "ad")  # same techniques already applied: just loads
    assert again is fresh and len(applied(fresh)) == 2


def test_an_adapter_on_a_full_fine_tune_carries_it_and_loads_back_exactly(tmp_path):
    """DPO with LoRA on a full SFT model: the LoRA alone on the plain base would be a different
    model with no error (the base's config, hence its fingerprint, is the same). The saved
    adapter carries the full run in start/, and loading it onto the plain base gives back the
    trained model exactly; onto a model that already has techniques it refuses."""
    from minituner.full import apply_full
    from minituner.lora import LoRAConfig, apply_lora

    full = apply_full(tiny())
    perturb(full, seed=3)  # the "SFT" weights
    save_adapter(full, tmp_path / "sft")
    model = apply_lora(load_as_base(tiny(), tmp_path / "sft"), LoRAConfig(r=2))
    assert applied(model)[0]["technique"] == "lora" and count_parameters(model)[0] == 2 * 2 * 2 * (C + C)
    perturb(model, seed=4)  # the "DPO" LoRA
    save_adapter(model, tmp_path / "dpo")
    assert json.loads((tmp_path / "dpo" / "adapter_config.json").read_text())["start"] == "start"
    x = torch.randint(0, V, (2, 9))
    back = load_adapter(tiny(), tmp_path / "dpo")
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
        lora_alone = apply_lora(tiny(), LoRAConfig(r=2))  # the LoRA tensors alone on the plain base
        lora_alone.load_state_dict(adapter_state_dict(model), strict=False)
        assert not torch.allclose(lora_alone(x), model(x), atol=1e-3)  # what loading gave before
        with disable_adapters(back), disable_adapters(model):
            assert torch.equal(back(x), model(x))  # disabled: the SFT model, DPO's reference
    save_adapter(back, tmp_path / "again")  # a loaded model saves its start along again
    assert torch.equal(load_adapter(tiny(), tmp_path / "again")(x), back(x))
    with pytest.raises(ValueError, match="plain base model"):
        load_adapter(apply_lora(tiny(), LoRAConfig(r=2)), tmp_path / "dpo")
    with pytest.raises(ValueError, match="only a full fine-tuning run"):
        load_as_base(tiny(), tmp_path / "dpo")


def test_loading_onto_a_different_base_names_both(tmp_path):
    model = apply_head(tiny("gpt2"), HeadConfig(num_classes=3))
    save_adapter(model, tmp_path / "ad")
    other = tiny("llama")
    with pytest.raises(ValueError) as e:
        load_adapter(other, tmp_path / "ad")
    msg = str(e.value)
    assert fingerprint(model.config.to_dict()) in msg and fingerprint(other.config.to_dict()) in msg
    assert "gpt2" in msg and "llama" in msg and "'family'" in msg
    assert applied(other) == []  # nothing was applied to the wrong model


def test_load_errors_list_techniques_and_keys(tmp_path):
    model = apply_adapters(tiny(), AdapterConfig(reduction_factor=4))
    save_adapter(model, tmp_path / "ad")
    with pytest.raises(ValueError, match="already has techniques"):
        load_adapter(apply_adapters(tiny(), AdapterConfig(reduction_factor=8)), tmp_path / "ad")
    cfg = tmp_path / "ad" / "adapter_config.json"  # a config that says m = 2, tensors with m = 4
    meta = json.loads(cfg.read_text())
    meta["techniques"][0]["config"]["reduction_factor"] = 8
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"mis-shaped \['blocks.0.attn.o_proj.adapter.down.bias"):
        load_adapter(tiny(), tmp_path / "ad")
    meta["techniques"][0]["config"]["placement"] = "pfeiffer"
    meta["techniques"][0]["config"]["reduction_factor"] = 4
    cfg.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"missing keys \[\], unexpected keys \['blocks.0.attn.o_proj"):
        load_adapter(tiny(), tmp_path / "ad")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(tiny(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="no trainable tensors"):
        save_adapter(freeze(tiny()), tmp_path / "empty")
