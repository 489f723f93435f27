"""Tests for minituner/qlora.py: NF4Linear (QLoRA Eq. 5-6), quantize_model, apply_qlora, saving.

By hand: the buffers' bytes are 4 + 8/64 + 32/(64*256) = 4.127 bits per weight plus per-layer
constants; a zero LoRA B leaves the quantized base's output unchanged.
Parity: forward == F.linear(x, dequantize()) exactly; dE/dX == autograd through the float
reference; bitsandbytes' dequantize_4bit on a QuantState built from our buffers == our W
(skipped per test without bitsandbytes).
Invariants (hypothesis): odd shapes, partial last blocks, compute dtypes and blocksizes.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from minituner.kernels.nf4 import NF4_CODE, dequantize_nf4, quantize_nf4
from torch import nn

from minituner.lora import LoRALinear
from minituner.model import ModelConfig, Transformer
from minituner.protocol import (
    count_parameters,
    disable_adapters,
    load_adapter,
    memory_bytes,
    save_adapter,
    trainable_parameters,
)
from minituner.qlora import (
    NF4Linear,
    QLoRAConfig,
    apply_qlora,
    load_quantized,
    nf4_layers,
    quantize_model,
    release_scratch,
    save_quantized,
)

V = 64
FAMILIES = ["gpt2", "llama", "bert"]


def tiny(family: str, seed: int = 0, n_embd: int = 16, intermediate_size: int = 24) -> Transformer:
    torch.manual_seed(seed)
    cfg = ModelConfig(family=family, vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=n_embd,
                      n_kv_head=2 if family == "llama" else None, intermediate_size=intermediate_size,
                      tie_embeddings=family == "gpt2")
    with torch.no_grad():
        m = Transformer(cfg)
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m.eval()


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(seed))


def linear(n_in: int, n_out: int, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(n_in, n_out, bias=bias)


# ---------------------------------------------------------------------------- NF4Linear
@pytest.mark.parametrize("double_quant", [True, False])
def test_forward_is_linear_of_dequantized_weight_exactly(double_quant):
    """Eq. 5 without LoRA: Y = X doubleDequant(c1, c2, W_NF4) + b, bit for bit."""
    lin = linear(96, 40)
    q = NF4Linear.from_linear(lin, double_quant=double_quant)
    x = torch.randn(3, 5, 96)
    assert torch.equal(q(x), F.linear(x, q.dequantize(), lin.bias))


def test_dequantize_matches_the_kernels_and_double_quant_is_close():
    """Without DQ the layer's W is kernels.dequantize_nf4 of its bytes; with DQ the scales carry
    the 8-bit error of Eq. 6 only: |c2~ - c2| <= c1 * (largest gap of the dynamic map)/2 ~ 1% of
    c1, so W moves by well under 2% of the block's absmax."""
    lin = linear(128, 64)
    packed, absmax = quantize_nf4(lin.weight.detach())
    plain = NF4Linear.from_linear(lin, double_quant=False)
    dq = NF4Linear.from_linear(lin, double_quant=True)
    ref = dequantize_nf4(packed, absmax, (64, 128))
    assert torch.equal(plain.dequantize(), ref) and torch.equal(dq.weight_nf4, packed)
    assert (dq.dequantize() - ref).abs().max() <= 0.02 * absmax.max()


def test_input_gradient_equals_float_reference_and_buffers_get_none():
    """dE/dX = dE/dY W (W the dequantized weight), against autograd through F.linear(x, W, b)
    in float64, at rtol 1e-5 (float32 matmuls); the bias gets dE/db when it trains; the
    buffers hold no gradient and are never inputs of the graph."""
    lin = linear(70, 33)
    q = NF4Linear.from_linear(lin)
    q.bias.requires_grad_(True)
    x = torch.randn(4, 70, requires_grad=True)
    g = torch.randn(4, 33)
    q(x).backward(g)
    x64 = x.detach().double().requires_grad_(True)
    b64 = q.bias.detach().double().requires_grad_(True)
    F.linear(x64, q.dequantize(torch.float64), b64).backward(g.double())
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.bias.grad, b64.grad.float(), rtol=1e-5, atol=1e-6)
    assert all(b.grad is None and not b.requires_grad for b in q.buffers())
    assert [n for n, _ in q.named_parameters()] == ["bias"]


def test_backward_saves_no_float_weight():
    """Between forward and backward the graph keeps no (out, in) float tensor: the saved
    tensors of the whole graph are at most x itself (through hooks on pack)."""
    q = NF4Linear.from_linear(linear(256, 128, bias=False))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = q(torch.randn(2, 256, requires_grad=True))
    assert (128, 256) not in saved and (256, 128) not in saved
    y.sum().backward()


def test_shared_scratch_keeps_every_layer_its_own_weight():
    """On the CPU every NF4Linear dequantizes into one reused buffer (qlora._scratch). A stack of
    layers of different sizes must still give, forward and backward, what the float reference
    gives with each layer's own W: a W kept from the forward for the backward (or read after
    the next layer's dequantization) would give the wrong layer's weight here. A W that a user
    gets from dequantize() is a fresh tensor that later forwards leave alone."""
    qs = [NF4Linear.from_linear(linear(a, b, seed=i)) for i, (a, b) in enumerate([(64, 96), (96, 40), (40, 64)])]
    Ws = [q.dequantize() for q in qs]
    kept = [W.clone() for W in Ws]
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = x
    for q in qs:
        y = q(y)
    (y * torch.arange(64.0)).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = x_ref
    for q, W in zip(qs, Ws):
        y_ref = F.linear(y_ref, W, q.bias)
    (y_ref * torch.arange(64.0)).sum().backward()
    assert torch.equal(y, y_ref)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(W, k) for W, k in zip(Ws, kept))  # the public W is never the scratch
    release_scratch()
    assert torch.equal(qs[0](x), F.linear(x, Ws[0], qs[0].bias))  # allocated again after a release


@settings(max_examples=20, deadline=None)
@given(n_in=st.integers(1, 70), n_out=st.integers(1, 9), bias=st.booleans(),
       blocksize=st.sampled_from([16, 64, 256]), double_quant=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), seed=st.integers(0, 99))
def test_invariants_over_shapes_dtypes_blocksizes(n_in, n_out, bias, blocksize, double_quant, dtype, seed):
    """Odd sizes and partial last blocks: forward == F.linear in the compute dtype exactly, the
    output has x's dtype, each weight is within half the largest NF4 gap (plus the DQ error) of
    its block's absmax, and the input gradient has x's shape."""
    lin = linear(n_in, n_out, bias, seed)
    q = NF4Linear.from_linear(lin, blocksize, double_quant, compute_dtype=dtype)
    x = torch.randn(2, n_in, requires_grad=True)
    y = q(x)
    W = q.dequantize()
    assert W.dtype == dtype and y.dtype == x.dtype
    assert torch.equal(y, F.linear(x.detach().to(dtype), W, None if q.bias is None else q.bias).float())
    w = lin.weight.detach().reshape(-1)
    pad = (-w.numel()) % blocksize
    absmax = F.pad(w, (0, pad)).view(-1, blocksize).abs().amax(1).repeat_interleave(blocksize)[: w.numel()]
    half_gap = (NF4_CODE[1:] - NF4_CODE[:-1]).max() / 2
    err = (q.dequantize(torch.float32).reshape(-1) - w).abs()
    assert (err <= absmax * (half_gap + 0.02) + 1e-2 * absmax + 1e-6).all()
    y.float().sum().backward()
    assert x.grad.shape == x.shape


# ---------------------------------------------------------------------------- quantize_model
def bytes_of(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_model_skips_and_close_to_float(family):
    """Every nn.Linear but the skipped (and GPT-2's tied lm_head) becomes NF4; the logits move
    by a fraction of their norm only (4-bit weights, a tiny random model: 10-27%)."""
    m = tiny(family)
    ref = m(ids())
    n_linear = sum(type(x) is nn.Linear for x in m.modules())
    quantize_model(m, skip=("lm_head", "blocks.0.attn.k_proj"))
    kinds = {n: type(x) for n, x in m.named_modules()}
    assert kinds["blocks.0.attn.k_proj"] is nn.Linear and kinds["blocks.1.attn.k_proj"] is NF4Linear
    if family != "bert":
        assert kinds["lm_head"] is nn.Linear
    assert len(nf4_layers(m)) == n_linear - 1 - (family != "bert")
    assert not any(isinstance(p, torch.Tensor) and p.dim() == 2 for n, p in m.named_parameters()
                   if n.rpartition(".")[0] in dict(nf4_layers(m)))
    out = m(ids())
    assert (out - ref).norm() < 0.35 * ref.norm()


def test_quantize_model_frees_the_float_weight():
    """The replaced nn.Linear no longer holds its weight (nothing keeps 32 bits per weight)."""
    m = tiny("llama")
    old = m.blocks[0].attn.q_proj
    quantize_model(m)
    assert old.weight is None and isinstance(m.blocks[0].attn.q_proj, NF4Linear)


@pytest.mark.parametrize("family", FAMILIES)
def test_buffers_at_most_4127_bits_per_weight_plus_constants(family):
    """Per layer of n weights, nb = ceil(n/64): ceil(n/2) code bytes + nb DQ codes
    + 4 ceil(nb/256) (c1) + 4 (offset) <= n (4 + 8/64 + 32/(64*256))/8 + (0.5 + 1 + 4 + 4):
    a half byte for odd n, one code and one c1 for partial blocks, one offset."""
    m = quantize_model(tiny(family))
    for _, layer in nf4_layers(m):
        n = layer.quantized_numel
        assert bytes_of(layer) <= n * (4 + 8 / 64 + 32 / (64 * 256)) / 8 + 9.5
    total_n = sum(x.quantized_numel for _, x in nf4_layers(m))
    total = sum(bytes_of(x) for _, x in nf4_layers(m))
    assert total <= total_n * 4.127 / 8 + 9.5 * len(nf4_layers(m))


def test_memory_bytes_counts_quantized_weights():
    """protocol.count_parameters counts the weights NF4Linear stands for, so QLoRA's
    bytes/param is per weight of the model, not per float parameter left."""
    m = tiny("llama")
    before = count_parameters(m)[1]
    quantize_model(m)
    assert count_parameters(m)[1] == before
    assert memory_bytes(m)["weights_per_param"] < 4.0


# ---------------------------------------------------------------------------- apply_qlora
@pytest.mark.parametrize("family", FAMILIES)
def test_only_lora_trains_and_disable_gives_quantized_base(family):
    """After apply_qlora the trainable tensors are exactly the LoRA A, B (in the compute dtype);
    at init (B = 0) the model equals the quantized base; a step changes only A, B; under
    disable_adapters it is the quantized base again."""
    m = tiny(family)
    base = quantize_model(tiny(family))
    apply_qlora(m, QLoRAConfig(r=4, target_modules=("q_proj", "v_proj", "fc", "up_proj")))
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert isinstance(m.blocks[0].attn.q_proj, LoRALinear) and isinstance(m.blocks[0].attn.q_proj.base, NF4Linear)
    x = ids()
    assert torch.equal(m(x), base(x))
    opt = torch.optim.SGD(trainable_parameters(m), lr=0.5)
    m(x).float().pow(2).mean().backward()
    assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
    opt.step()
    assert not torch.equal(m(x), base(x))
    with disable_adapters(m):
        assert torch.equal(m(x), base(x))


def test_lora_branch_in_bf16():
    """compute_dtype='bfloat16': the dequantized W and A, B are bf16; the model still runs."""
    m = apply_qlora(tiny("llama"), QLoRAConfig(compute_dtype="bfloat16"))
    layer = m.blocks[0].attn.q_proj
    assert layer.lora_A["default"].dtype == torch.bfloat16 and layer.base.dequantize().dtype == torch.bfloat16
    m(ids()).sum().backward()
    assert not layer.lora_A["default"].grad.any() and layer.lora_B["default"].grad.any()  # B = 0: dA = 0


def test_config_errors_name_the_fix():
    with pytest.raises(ValueError, match="compute_dtype"):
        QLoRAConfig(compute_dtype="int8")
    with pytest.raises(ValueError, match="power of two"):
        QLoRAConfig(blocksize=48)
    assert QLoRAConfig(compute_dtype=torch.bfloat16).compute_dtype == "bfloat16"  # saves as JSON
    with pytest.raises(ValueError, match="names that exist"):
        apply_qlora(tiny("llama"), QLoRAConfig(target_modules=("nope",)))
    m = apply_qlora(tiny("llama"))
    with pytest.raises(ValueError, match="already quantized"):
        apply_qlora(m)


def randomize_lora(model: nn.Module, seed: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_save_adapter_load_on_plain_base_is_exact(family, tmp_path):
    """The adapter holds LoRA tensors only; load_adapter re-applies qlora on a plain base and
    the deterministic re-quantization gives the same model, bit for bit."""
    m = randomize_lora(apply_qlora(tiny(family), QLoRAConfig(r=2, target_modules=("q_proj", "o_proj"))))
    save_adapter(m, tmp_path / "a")
    loaded = load_adapter(tiny(family), tmp_path / "a")
    assert torch.equal(loaded(ids()), m(ids()))
    from safetensors.torch import load_file
    assert all("lora_" in k for k in load_file(str(tmp_path / "a" / "adapter.safetensors")))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_save_quantized_load_quantized_exact_and_no_float_weights(family, double_quant, tmp_path):
    """The file holds uint8 codes and small float32 scales for every quantized layer, never a
    float copy of its weight; loading gives the same logits bit for bit."""
    m = quantize_model(tiny(family), double_quant=double_quant)
    save_quantized(m, tmp_path / "q")
    from safetensors.torch import load_file
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    for n, _ in nf4_layers(m):
        assert f"{n}.weight" not in state and state[f"{n}.weight_nf4"].dtype == torch.uint8
    back = load_quantized(tmp_path / "q")
    assert torch.equal(back(ids()), m(ids()))
    assert [n for n, _ in nf4_layers(back)] == [n for n, _ in nf4_layers(m)]


# ---------------------------------------------------------------------------- interop
@pytest.mark.parametrize("double_quant", [True, False])
def test_bitsandbytes_dequantize_4bit_of_our_buffers(double_quant):
    """A bitsandbytes QuantState built from our buffers (codes, c1 per 256, offset, the NF4 and
    dynamic maps) -> bitsandbytes.functional.dequantize_4bit == our W (float32, exact)."""
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from minituner.qlora import bnb_quant_state

    q = NF4Linear.from_linear(linear(200, 48), double_quant=double_quant)
    state = bnb_quant_state(q)
    assert isinstance(state, bnb_f.QuantState)
    W = bnb_f.dequantize_4bit(q.weight_nf4.view(-1, 1), state)
    torch.testing.assert_close(W, q.dequantize(), rtol=0, atol=0)


def _hf_logits(path, family: str, x: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    if family == "bert":
        hf = transformers.AutoModel.from_pretrained(path, add_pooling_layer=False, device_map="cpu")
        return hf(x).last_hidden_state
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")(x).logits


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("double_quant", [True, False])
def test_transformers_bitsandbytes_loads_our_4bit_model(family, double_quant, tmp_path):
    """save_hf_quantized -> transformers.from_pretrained (bitsandbytes Linear4bit on the CPU)
    gives our logits (BERT: hidden states) within 1e-5; Llama and BERT store our very bytes.
    GPT-2's c_attn re-double-quantizes q, k, v's scales together (one offset per tensor), so
    its tolerance is one 8-bit scale step's effect: 2e-2 of the logits' spread with DQ.
    Layers are >= 64 wide: bitsandbytes 0.50's CPU dequantize_4bit kernel computes wrong
    values when in_features < blocksize (16 x 16: errors of 0.007), and its CPU Linear4bit
    needs out_features divisible by 32."""
    from minituner.qlora import save_hf_quantized

    m = quantize_model(tiny(family, n_embd=64, intermediate_size=128), skip=("lm_head", "blocks.1.mlp.fc"), double_quant=double_quant)
    save_hf_quantized(m, tmp_path / "hf")
    x = ids()
    theirs = _hf_logits(tmp_path / "hf", family, x)
    ours = m.hidden_states(x) if family == "bert" else m(x)
    tol = 2e-2 * float(ours.std()) if family == "gpt2" and double_quant else 1e-5
    torch.testing.assert_close(theirs, ours, rtol=0, atol=tol)


# ---------------------------------------------------------------------------- memory
def test_memory_formula_matches_measurement():
    """qlora_memory.formula (bytes from Q, O, L alone) against protocol.memory_bytes after one
    real step of each method on a tiny Llama: equal for full and LoRA (every byte is a formula
    term; AdamW also keeps one float32 step counter per tensor) and within 1% for QLoRA's weights (partial blocks, c1 and offsets are the constants
    beside 4.127 bits). The 65B row: QLoRA under the paper's 48 GB, 16-bit full above 780 GB."""
    from minituner.qlora_memory import LLAMA, counts, formula, measure

    factory = lambda: tiny("llama", n_embd=64, intermediate_size=128)
    c = counts(factory())
    measured, want = measure(factory), formula(c)
    steps = {"full": 4 * len(list(factory().parameters())), "lora": 4 * 2 * 2 * 2}  # LoRA: A, B x q, v x 2 layers
    for method in ("full", "lora"):
        for k in ("weights", "gradients"):
            assert measured[method][k] == want[method][k], (method, k)
        assert measured[method]["optimizer"] == want[method]["optimizer"] + steps[method], method
    q = measured["qlora"]
    assert q["gradients"] == want["qlora"]["gradients"] and q["optimizer"] >= want["qlora"]["optimizer"]
    assert abs(q["weights"] - want["qlora"]["weights"]) <= 0.01 * want["qlora"]["weights"]
    big = formula(LLAMA[65e9], compute_bytes=2)
    assert sum(big["qlora"].values()) < 48e9 and 12 * LLAMA[65e9].total > 780e9
    assert 6.5e9 < LLAMA[7e9].total < 6.8e9  # LLaMA-7B has 6.74B parameters


# ---------------------------------------------------------------------------- fidelity
def test_nf4_error_below_fp4_below_int4_on_the_base_models_weights():
    """QLoRA Table 2's ordering, as quantization error: every linear weight of the course's base
    model, blockwise absmax (64) with the NF4, FP4 (E2M1) and Int4 (k/7) codes; mean squared
    error NF4 < FP4 < Int4 (normal-ish weights: NF4 spends its levels where the mass is)."""
    from minituner.kernels.nf4 import (
        FP4_CODE,
        INT4_CODE,
        dequantize_4bit,
        quantize_4bit,
    )

    from minituner import checkpoint

    model = checkpoint.load(checkpoint.find_base_model())
    weights = [m.weight.detach() for m in model.modules() if type(m) is nn.Linear and m is not model.lm_head]
    err = {}
    for name, code in (("nf4", NF4_CODE), ("fp4", FP4_CODE), ("int4", INT4_CODE)):
        sq = n = 0
        for w in weights:
            packed, absmax = quantize_4bit(w, code, 64, fast=False)  # no lookup table to build per code
            sq += float((dequantize_4bit(packed, absmax, w.shape, code, 64, fast=False) - w).double().square().sum())
            n += w.numel()
        err[name] = sq / n
    assert err["nf4"] < err["fp4"] < err["int4"], err


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_format_round_trip_on_a_quantized_base(family, tmp_path):
    """A QLoRA adapter is a LoRA adapter: save_peft writes it, and load_peft onto the plain
    quantized base (quantize_model, no LoRA yet) finds the NF4 layers and gives the same logits
    (within 1e-5: GPT-2's fused c_attn adapter of rank 3r sums in another order)."""
    from minituner.lora import load_peft, save_peft

    m = randomize_lora(apply_qlora(tiny(family), QLoRAConfig(r=2, target_modules=("q_proj", "k_proj", "v_proj"))))
    save_peft(m, tmp_path / "peft")
    loaded = load_peft(quantize_model(tiny(family)), tmp_path / "peft")
    torch.testing.assert_close(loaded(ids()), m(ids()), rtol=0, atol=1e-5)


FIDELITY = {"n_train": 2000, "n_test": 600, "pooling": "mean", "progress": False, "measure_forgetting": False,
            "seed": 0}


@pytest.mark.slow
def test_qlora_reaches_loras_accuracy_on_the_worlds_task():
    """QLoRA's claim (Sec. 4, "NF4 + DQ matches 16-bit LoRA"): the recipe's LoRA and QLoRA,
    same seed, data, steps and LoRA config (r=8, q and v), reach the same accuracy within 2
    points on the world's day stories, and both beat the majority class by far; QLoRA holds
    about a quarter of LoRA's weight bytes (NF4 + DQ under a float32 base's 4 bytes).
    Measured (300 steps, OMP_NUM_THREADS=1): lr 3e-3 LoRA 0.815, QLoRA 0.807 (majority 0.333;
    weights 14.4 MB vs 3.4 MB); lr 1e-3 LoRA 0.637, QLoRA 0.635."""
    from minituner.finetune import finetune

    lora = finetune("lora", **FIDELITY)
    q = finetune("qlora", **FIDELITY)
    assert lora.after > lora.majority + 0.2 and q.after > q.majority + 0.2, (lora.after, q.after, q.majority)
    assert abs(q.after - lora.after) <= 0.02, (q.after, lora.after)
    assert q.memory["weights"] < 0.3 * lora.memory["weights"]
