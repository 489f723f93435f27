"""Tests for minituner/adapters.py: bottleneck adapters (Houlsby 2019; Pfeiffer 2021).

By hand: L * k * (2md + d + m) trainable parameters; with W_up = 0 the model is the base.
Parity: the adapted model equals the base model with forward hooks that apply
h + W_up f(W_down h + b_down) + b_up (float64) to each targeted sublayer's output.
Invariants (hypothesis): the adapter formula for any d, m and batch shape; only the adapters
receive gradients and change in a training step.
"""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.adapters import Adapted, Adapter, AdapterConfig, adapter_parameters, apply_adapters
from minituner.model import ModelConfig, Transformer
from minituner.protocol import applied, count_parameters, disable_adapters

FAMILIES = ["gpt2", "llama", "bert"]
V = 64


def tiny(family: str, n_layer: int = 2, n_embd: int = 16, dtype=torch.float32, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=V, block_size=32, n_layer=n_layer, n_head=2, n_embd=n_embd)
    with torch.no_grad():
        m = Transformer(cfg)
        for p in m.parameters():  # non-trivial weights: sublayers matter
            p.add_(0.2 * torch.randn_like(p))
    return m.to(dtype).eval()


def adapted_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, Adapted)]


def test_config_errors_name_the_fix():
    for kw, msg in [({"placement": "both"}, "placement"), ({"reduction_factor": 0}, "reduction_factor"),
                    ({"activation": "softplus"}, "activation"), ({"init": "ones"}, "init")]:
        with pytest.raises(ValueError, match=msg):
            AdapterConfig(**kw)
    with pytest.raises(ValueError, match="reduction_factor <= 16"):
        apply_adapters(tiny("gpt2"), AdapterConfig(reduction_factor=32))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement, k", [("houlsby", 2), ("pfeiffer", 1)])
@pytest.mark.parametrize("n_layer, d, rf", [(2, 16, 4), (3, 24, 8)])
def test_parameter_count_by_hand(family, placement, k, n_layer, d, rf):
    """m = d / rf; each adapter: W_down (m*d) + b_down (m) + W_up (d*m) + b_up (d) = 2md + d + m;
    k per layer (Houlsby: after attention and after the MLP; Pfeiffer: after the MLP)."""
    model = tiny(family, n_layer, d)
    total = count_parameters(model)[1]
    apply_adapters(model, AdapterConfig(placement=placement, reduction_factor=rf))
    m = d // rf
    added = n_layer * k * (2 * m * d + d + m)
    assert count_parameters(model) == (added, total + added)
    assert adapter_parameters(d, m) == 2 * m * d + d + m
    want = [f"blocks.{i}.{s}" for i in range(n_layer)
            for s in (["attn.o_proj", "mlp"] if placement == "houlsby" else ["mlp"])]
    assert adapted_names(model) == want
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{a}.adapter.{lin}.{t}" for a in want for lin in ("down", "up") for t in ("weight", "bias")}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_zero_init_is_exactly_the_base_model(family, placement):
    """W_up = 0 and b_up = 0: adapter(h) = h + 0 * f(...) + 0 = h, bit for bit."""
    base = tiny(family)
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(placement=placement, reduction_factor=4))
    x = torch.randint(0, V, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        assert torch.equal(model(x), base(x))
        assert torch.equal(model(x, attention_mask=mask), base(x, attention_mask=mask))
    near = apply_adapters(copy.deepcopy(base), AdapterConfig(placement=placement, reduction_factor=4,
                                                             init="near_identity"))
    with torch.no_grad():
        diff = (near(x) - base(x)).abs().max()
    assert 0 < diff < 0.1 * base(x).abs().max()  # near, not equal


def test_near_identity_init_is_a_truncated_small_normal():
    """Houlsby: both projections N(0, 1e-2) truncated at two deviations, biases zero."""
    torch.manual_seed(0)
    a = Adapter(256, 64, init="near_identity")
    for lin in (a.down, a.up):
        w = lin.weight
        assert w.abs().max() <= 2e-2 and 0.007 < w.std() < 0.011
        assert torch.equal(lin.bias, torch.zeros_like(lin.bias))
    z = Adapter(256, 64, init="zeros")
    assert torch.equal(z.up.weight, torch.zeros(256, 64)) and z.down.weight.abs().sum() > 0


@settings(max_examples=25, deadline=None)
@given(d=st.integers(1, 24), m=st.integers(1, 8), shape=st.lists(st.integers(1, 4), min_size=0, max_size=3),
       activation=st.sampled_from(["relu", "gelu", "silu", "tanh"]), seed=st.integers(0, 2**16))
def test_adapter_formula_for_any_shape(d, m, shape, activation, seed):
    """adapter(h) = h + W_up f(W_down h + b_down) + b_up, elementwise sums in float64, for h of
    shape (*batch, d); and zero init returns h itself."""
    torch.manual_seed(seed)
    a = Adapter(d, m, activation, init="near_identity").double()
    with torch.no_grad():
        for p in a.parameters():
            p.normal_()
    h = torch.randn(*shape, d, dtype=torch.float64)
    f = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu, "tanh": torch.tanh}[activation]
    Wd, bd, Wu, bu = a.down.weight, a.down.bias, a.up.weight, a.up.bias
    z = f((h[..., None, :] * Wd).sum(-1) + bd)  # (..., m): sum_j Wd[i, j] h_j + bd_i
    want = h + (z[..., None, :] * Wu).sum(-1) + bu  # (..., d)
    torch.testing.assert_close(a(h), want, rtol=1e-12, atol=1e-12)
    assert sum(p.numel() for p in a.parameters()) == 2 * m * d + d + m
    zero = Adapter(d, m, activation, init="zeros").double()
    assert torch.equal(zero(h), h)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
def test_adapters_sit_on_the_sublayer_output_before_the_residual(family, placement):
    """Reference: the untouched base model with forward hooks on attn.o_proj / mlp that replace
    the output y by y + up(f(down(y))), written out with the adapter's weights (float64)."""
    base = tiny(family, dtype=torch.float64)
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(placement=placement, reduction_factor=4,
                                                              activation="gelu", init="near_identity"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # large enough that a misplaced adapter shows

    def hook(adapter):
        def fn(module, inputs, y):
            W_down, b_down, W_up, b_up = adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias
            return y + F.gelu(y @ W_down.T + b_down) @ W_up.T + b_up
        return fn

    for name in adapted_names(model):
        base.get_submodule(name).register_forward_hook(hook(model.get_submodule(name).adapter))
    x = torch.randint(0, V, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), rtol=0, atol=1e-12)


@settings(max_examples=12, deadline=None)
@given(family=st.sampled_from(FAMILIES), placement=st.sampled_from(["houlsby", "pfeiffer"]),
       rf=st.sampled_from([2, 4, 16]), init=st.sampled_from(["zeros", "near_identity"]),
       train_layernorms=st.booleans(), seed=st.integers(0, 100))
def test_only_adapter_parameters_get_gradients_and_change(family, placement, rf, init, train_layernorms, seed):
    """After one AdamW step on the model's loss: every frozen tensor is bit-for-bit unchanged and
    has no gradient; every trainable tensor has a gradient; with near_identity init each one
    changes (with zero init W_down's gradient is W_up^T(...) = 0 in the first step)."""
    model = apply_adapters(tiny(family, seed=seed), AdapterConfig(
        placement=placement, reduction_factor=rf, init=init, train_layernorms=train_layernorms))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    norms = {n for n in before if "norm" in n}
    assert trainable == {n for n in before if ".adapter." in n} | (norms if train_layernorms else set())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    out = model(torch.randint(0, V, (2, 6)))
    (out ** 2).mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in trainable:
            assert p.grad is not None, n
            if init == "near_identity" and ".adapter." in n:
                assert not torch.equal(p, before[n]), f"{n} did not change"
        else:
            assert p.grad is None and torch.equal(p, before[n]), n
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_disable_adapters_gives_the_untouched_base(family):
    """Trained-looking adapters change the output; under disable_adapters it is the base's,
    bit for bit; afterwards (also after an error inside) the adapters are back."""
    base = tiny(family)
    model = apply_adapters(copy.deepcopy(base), AdapterConfig(reduction_factor=4, init="near_identity"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1)
    x = torch.randint(0, V, (2, 8))
    with torch.no_grad():
        want, adapted = base(x), model(x)
        assert not torch.allclose(adapted, want)
        with disable_adapters(model):
            assert torch.equal(model(x), want)
        assert torch.equal(model(x), adapted)
        with pytest.raises(KeyError):
            with disable_adapters(model):
                raise KeyError("inside")
        assert torch.equal(model(x), adapted)


def test_apply_twice_is_refused_and_the_config_is_recorded():
    model = apply_adapters(tiny("llama"), AdapterConfig(placement="pfeiffer", reduction_factor=4))
    assert applied(model) == [{"technique": "adapters", "config": {
        "placement": "pfeiffer", "reduction_factor": 4, "activation": "relu", "init": "zeros",
        "train_layernorms": False}}]
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, AdapterConfig())


def test_adapters_follow_the_base_dtype():
    model = apply_adapters(tiny("gpt2", dtype=torch.bfloat16), AdapterConfig(reduction_factor=4))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(torch.randint(0, V, (1, 4))).dtype == torch.bfloat16


# -- benchmarks/finetune_speed.py: its arithmetic by hand, and each suite end to end on tiny sizes --
FINETUNE_SPEED = Path(__file__).resolve().parents[1] / "benchmarks" / "finetune_speed.py"


def load_finetune_speed():
    spec = importlib.util.spec_from_file_location("finetune_speed", FINETUNE_SPEED)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_finetune_speed_ratios_by_hand():
    """Rates are work / median seconds; 'x' divides the medians' rates, 'paired' takes the
    median of the per-round ratios. full: 100 tokens in 2, 4, 3 s -> median 3 s, 33.3/s;
    adapters: 100 tokens in 1, 4, 2 s -> median 2 s, 50/s, x 1.5; per round 2, 1, 1.5 ->
    paired 1.5. head: 600 tokens in 3, 3, 3 s -> 200/s, x 6, per round 4, 8, 6 -> paired 6."""
    fs = load_finetune_speed()
    r = fs.ratios({"full": 100, "adapters": 100, "head": 600},
                  {"full": [2.0, 4.0, 3.0], "adapters": [1.0, 4.0, 2.0], "head": [3.0, 3.0, 3.0]}, "full")
    assert r["full"] == pytest.approx((100 / 3, 1.0, 1.0))
    assert r["adapters"] == pytest.approx((50.0, 1.5, 1.5))
    assert r["head"] == pytest.approx((200.0, 6.0, 6.0))


TINY_RUN = ["--rounds", "1", "--warmup", "0", "--batch-size", "2"]


def test_finetune_speed_methods_suite_reports_every_method(capsys):
    """One round of every method of the recipe on the real base model, with a 2-example batch."""
    load_finetune_speed().main(["--suite", "methods", "--extract-batches", "1", *TINY_RUN])
    out = capsys.readouterr().out
    table = out[out.index("training tokens/s x full fine-tuning"):].splitlines()[3:]  # after the header
    rows = {line.split()[0]: line.split() for line in table if line.strip() and not line.startswith("ratio")}
    assert set(rows) == {"full", "adapters", "adapters-pfeiffer", "lora", "prefix", "prompt", "head"}, out
    assert rows["full"][1:2] == ["100.00"] and rows["full"][4:6] == ["1.00x", "1.00x"], out
    assert rows["adapters"][-1] == "1.5x" and rows["head"][-1] == "20x", out


@pytest.mark.slow
def test_finetune_speed_peft_sft_and_dpo_suites_run(capsys):
    """LoRA ours vs transformers + PEFT (GPT-2 base and a same-size Llama), merged inference,
    SFT packing and DPO vs TRL's DPOTrainer, one round each on tiny batches."""
    for name in ("transformers", "peft", "trl", "datasets"):
        pytest.importorskip(name)
    load_finetune_speed().main(["--suite", "peft", "sft", "dpo", "--sft-examples", "8", *TINY_RUN])
    out = capsys.readouterr().out
    for what in ("lora train: ours / transformers+peft", "inference: merged LoRA / base", "gpt2 (weights/base)",
                 "llama (same size)", "packed", "padded", "DPO training steps/s"):
        assert what in out, out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the failure without CUDA")
def test_finetune_speed_refuses_cuda_clearly_without_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        load_finetune_speed().main(["--device", "cuda"])
    assert exit_.value.code == 2
    assert "--device cuda: torch sees no CUDA device; use --device cpu" in capsys.readouterr().err
