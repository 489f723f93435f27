"""Tests for minituner/paged_adamw.py: same steps as torch.optim.AdamW (fused kernel and per-term
lesson), state_dict, budget, and the page-ins of the eviction policy under the step's sweep."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from minituner.paged_adamw import PagedAdamW

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 40), torch.nn.GELU(), torch.nn.Linear(40, 3))


def groups(model: torch.nn.Module) -> list[dict]:
    """Two parameter groups: weights with weight decay, biases without and with their own lr."""
    return [
        {"params": [model[0].weight, model[2].weight], "weight_decay": 0.1},
        {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "lr": 3e-3},
    ]


def train(model, opt, steps, seed=1, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 16, generator=g).to(device), torch.randn(8, 3, generator=g).to(device)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("policy", ["newest", "lru"])
@pytest.mark.parametrize("budget", [None, 4 * 64 * 2, 10**6])
def test_same_steps_as_torch_adamw(budget, policy, fused, device):
    """50 steps, float32, weight decay, two groups: parameters within 1e-6 of torch.optim.AdamW,
    whether the budget holds every page (10^6 bytes, None) or only one page pair (512 bytes),
    for the fused kernel and the per-term lesson, under both eviction policies."""
    ref, ours = mlp().to(device), mlp().to(device)
    opt_ref = torch.optim.AdamW(groups(ref), lr=1e-2, betas=(0.9, 0.99), eps=1e-8)
    opt = PagedAdamW(groups(ours), lr=1e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01,
                     device_budget_bytes=budget, page_numel=64, fused=fused, policy=policy)
    train(ref, opt_ref, 50, device=device)
    train(ours, opt, 50, device=device)
    for p, q in zip(ref.parameters(), ours.parameters()):
        assert (p - q).abs().max().item() <= 1e-6
    assert any((p.cpu() - q0).abs().max() > 1e-3 for p, q0 in zip(ours.parameters(), mlp().parameters()))
    if budget == 512:
        assert opt.pool.page_outs > 0 and opt.pool.peak_resident_bytes <= 512
    else:
        assert opt.pool.page_outs == 0


def sweep_model(pairs: int, page_numel: int) -> torch.nn.Parameter:
    """One parameter of `pairs` full pages: its m and v make 2 * pairs pages of page_numel floats."""
    return torch.nn.Parameter(torch.randn(pairs * page_numel, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("fused", [True, False])
def test_newest_policy_keeps_a_resident_set_under_the_sweep(fused):
    """A quarter of the state as budget: K = 64 page pairs (N = 128 pages of 32 floats), budget
    C = 32 pages. Derivation, for the policy "newest" (evict the page paged in most recently):
    step 1 pages in pairs 0, 1, 2, ... (each get prefetches the next pair) until the budget is full
    at pair c - 1 = 15; prefetching pair 16 then evicts the newest page not in use, pair 14 (15 is
    being updated, 16 is the prefetch), and from there on the window of two pairs slides while
    pairs 0 .. 13 stay: after step 1 pairs 0..13 and the last two pairs 62, 63 are resident. Every
    later step finds 0..13 resident, updates them without a copy, and streams the other
    K - (c - 2) = 50 pairs through the window (prefetching pair 14 evicts 63, the newest, and so
    on), ending in the same resident set. Page-ins per step: N - (C - 4) = 128 - 28 = 100, i.e. the
    three quarters of the state not held (96 pages) plus the 4 pages of the window. Under LRU the
    same sweep evicts exactly the pages needed next: all 128 pages per step (the old behaviour)."""
    K, page, C = 64, 32, 32
    counts = {}
    for policy in ("newest", "lru"):
        p = sweep_model(K, page)
        opt = PagedAdamW([p], lr=1e-2, device_budget_bytes=C * page * 4, page_numel=page,
                         fused=fused, policy=policy)
        counts[policy] = []
        for step in range(4):
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            opt.step()
            counts[policy].append(opt.last_step_page_ins)
            assert opt.pool.peak_resident_bytes <= C * page * 4
        if policy == "newest":
            m_pages, v_pages = opt.state[p]["m_pages"], opt.state[p]["v_pages"]
            kept = {i for k in [*range(14), 62, 63] for i in (m_pages[k], v_pages[k])}
            assert {i for i in kept if opt.pool.is_resident(i)} == kept and opt.pool.resident_bytes == C * page * 4
    assert counts["newest"] == [128, 100, 100, 100]
    assert counts["lru"] == [128, 128, 128, 128]
    assert counts["newest"][-1] <= 3 * 128 // 4 + 4  # the resident quarter (less the window) is not re-paged


def test_one_fused_call_per_group_when_every_page_is_resident(monkeypatch):
    """When the budget holds the whole state, a step after the first updates every page of a group
    with one call of torch's fused kernel (two groups: two calls), like torch.optim.AdamW(fused=True);
    the first step, paging pairs in one at a time, calls it once per page pair (640, 120, 40 and 3
    values in pages of 16: 40 + 8 + 3 + 1 = 52 pairs)."""
    calls = []
    fused = torch._fused_adamw_
    monkeypatch.setattr(torch, "_fused_adamw_", lambda *a, **k: (calls.append(len(a[0])), fused(*a, **k))[1])
    model = mlp()
    opt = PagedAdamW(groups(model), lr=1e-2, page_numel=16)
    train(model, opt, 1)
    first = list(calls)
    calls.clear()
    train(model, opt, 1)
    pairs = sum(-(-p.numel() // 16) for p in model.parameters())  # ceil(n / 16) page pairs per tensor
    assert pairs == 52 and sum(first) == pairs and len(first) == pairs
    assert len(calls) == 2 and sum(calls) == pairs


@settings(max_examples=10, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=4), page_numel=st.integers(8, 100),
       budget_pairs=st.one_of(st.none(), st.integers(1, 6)), seed=st.integers(0, 100))
def test_fused_kernel_agrees_with_per_term_lesson(sizes, page_numel, budget_pairs, seed):
    """For any tensor sizes, page size and budget, the fused path and the per-term lesson
    (_adamw_page) give the same parameters and moments within float32 rounding after 5 steps."""
    g = torch.Generator().manual_seed(seed)
    init = [torch.randn(n, generator=g) for n in sizes]
    budget = None if budget_pairs is None else budget_pairs * 2 * page_numel * 4
    runs = []
    for fused in (True, False):
        ps = [torch.nn.Parameter(t.clone()) for t in init]
        opt = PagedAdamW(ps, lr=1e-2, weight_decay=0.1, device_budget_bytes=budget, page_numel=page_numel, fused=fused)
        gg = torch.Generator().manual_seed(seed + 1)
        for _ in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gg)
            opt.step()
        runs.append((ps, opt.state_dict()["state"]))
    (a, sa), (b, sb) = runs
    for p, q in zip(a, b):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    for i in sa:
        torch.testing.assert_close(sa[i]["exp_avg"], sb[i]["exp_avg"], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(sa[i]["exp_avg_sq"], sb[i]["exp_avg_sq"], rtol=1e-6, atol=1e-9)


def test_first_step_by_hand():
    """Step 1 of Adam moves every coordinate by lr * sign(g) (m_hat = g, v_hat = g^2), and AdamW
    first scales theta by (1 - lr * lambda): theta = 1, g = 0.5, lr = 0.1, lambda = 0.1 ->
    1 * 0.99 - 0.1 * 0.5 / (0.5 + 1e-8) = 0.89."""
    p = torch.nn.Parameter(torch.ones(3))
    opt = PagedAdamW([p], lr=0.1, weight_decay=0.1, eps=1e-8)
    p.grad = torch.full((3,), 0.5)
    opt.step()
    assert p.tolist() == pytest.approx([0.89] * 3, abs=1e-7)


def test_state_dict_round_trip_and_adamw_compatibility():
    """Saving after 10 steps, loading into a fresh PagedAdamW (and into torch AdamW) and training
    10 more steps gives the same parameters as 20 uninterrupted steps."""
    full, part = mlp(), mlp()
    opt_full = PagedAdamW(groups(full), lr=1e-2, page_numel=50, device_budget_bytes=400)
    train(full, opt_full, 20)
    opt_part = PagedAdamW(groups(part), lr=1e-2, page_numel=50, device_budget_bytes=400)
    train(part, opt_part, 10)
    sd = opt_part.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"} and sd["state"][0]["step"].item() == 10
    resumed = PagedAdamW(groups(part), lr=1e-2, page_numel=50, device_budget_bytes=400)
    resumed.load_state_dict(sd)
    torch.testing.assert_close(resumed.state_dict()["state"][2]["exp_avg_sq"], sd["state"][2]["exp_avg_sq"])
    train_tail = torch.Generator().manual_seed(1)
    for _ in range(10):  # skip the first 10 batches of the stream
        torch.randn(8, 16, generator=train_tail), torch.randn(8, 3, generator=train_tail)
    for _ in range(10):
        x, y = torch.randn(8, 16, generator=train_tail), torch.randn(8, 3, generator=train_tail)
        resumed.zero_grad()
        torch.nn.functional.mse_loss(part(x), y).backward()
        resumed.step()
    for p, q in zip(full.parameters(), part.parameters()):
        assert torch.equal(p, q)
    adamw = torch.optim.AdamW(groups(mlp()), lr=1e-2)
    adamw.load_state_dict(sd)  # same layout as torch's AdamW
    assert torch.equal(adamw.state_dict()["state"][0]["exp_avg"], sd["state"][0]["exp_avg"])


def test_repeated_loads_keep_the_pool_constant():
    """Loading a state_dict writes into the pages the parameters already have: after each of
    three loads (and a step) the pool holds the same pages, total and resident bytes as after
    the first step (the old code allocated a new set per load: 28 -> 56 -> 84 -> 112 pages, and
    the stale resident pages counted against the budget until evicted with a copy back)."""
    model = mlp()
    opt = PagedAdamW(groups(model), lr=1e-2, page_numel=64, device_budget_bytes=10**6)
    train(model, opt, 2)
    sd = opt.state_dict()
    before = opt.pool.stats()
    for _ in range(3):
        opt.load_state_dict(sd)
        assert opt.pool.stats() == before
        train(model, opt, 1)
        after = opt.pool.stats()
        assert (after["pages"], after["total_bytes"], after["resident_bytes"]) == (
            before["pages"], before["total_bytes"], before["resident_bytes"])
        assert after["page_outs"] == 0  # nothing stale had to be written back to make room


def test_load_without_a_parameters_state_frees_its_pages():
    """A state_dict with no state for a parameter (it had no gradient yet) frees that parameter's
    pages and restarts it from zero moments, as torch.optim.AdamW does: both optimizers, loaded
    with the same partial state_dict, take the same next step; the pool's size is unchanged after
    the step re-allocates the freed pages (their ids are reused)."""
    ref_model, model = mlp(), mlp()
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2)
    opt = PagedAdamW(model.parameters(), lr=1e-2, page_numel=64, device_budget_bytes=10**6)
    train(ref_model, ref, 3)
    train(model, opt, 3)
    before = opt.pool.stats()
    sd = opt.state_dict()
    del sd["state"][1]  # forget the first bias's moments and step
    ref.load_state_dict(sd)
    opt.load_state_dict(sd)
    bias_pages = 2  # 40 values, pages of 64: one page of m and one of v
    assert opt.pool.num_pages == before["pages"] - bias_pages
    assert opt.pool.resident_bytes == before["resident_bytes"] - 2 * 40 * 4
    train(ref_model, ref, 2, seed=7)
    train(model, opt, 2, seed=7)
    for p, q in zip(ref_model.parameters(), model.parameters()):
        assert (p - q).abs().max().item() <= 1e-6
    assert opt.pool.stats()["pages"] == before["pages"] and opt.pool.num_pages == len(opt.pool._host)


def test_load_state_dict_with_wrong_sizes_changes_nothing():
    """A state_dict whose moments do not fit the parameters is rejected before any state changes."""
    model = mlp()
    opt = PagedAdamW(model.parameters(), lr=1e-2, page_numel=64)
    train(model, opt, 1)
    sd = opt.state_dict()
    good = opt.state_dict()
    sd["state"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="has 3 values, the parameter 640"):
        opt.load_state_dict(sd)
    torch.testing.assert_close(opt.state_dict()["state"], good["state"], rtol=0, atol=0)


@settings(max_examples=8, deadline=None)
@given(budget_pages=st.integers(2, 12), page_numel=st.integers(8, 200), seed=st.integers(0, 1000))
def test_resident_bytes_never_exceed_budget(budget_pages, page_numel, seed):
    """For any budget of >= 2 pages, the pool's own peak resident bytes stay within it."""
    model = mlp(seed)
    budget = budget_pages * page_numel * 4
    opt = PagedAdamW(model.parameters(), lr=1e-3, page_numel=page_numel, device_budget_bytes=budget)
    train(model, opt, 3, seed)
    assert opt.pool.peak_resident_bytes <= budget
    total = 2 * 4 * sum(p.numel() for p in model.parameters())
    assert opt.pool.total_bytes == total
    if total > budget:
        assert opt.pool.page_outs > 0


def test_bad_arguments():
    p = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="cannot hold one page"):
        PagedAdamW([p], device_budget_bytes=100, page_numel=64)
    with pytest.raises(ValueError, match="betas"):
        PagedAdamW([p], betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="policy must be one of"):
        PagedAdamW([p], policy="fifo")
    q = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = PagedAdamW([q])
    q.grad = torch.ones(3, dtype=torch.float64)
    with pytest.raises(TypeError, match="float32"):
        opt.step()
