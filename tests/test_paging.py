"""Tests for kernels/paging.py: the page pool's accounting and its eviction policies (host == device
here, and on CUDA when there is one)."""

import pytest
import torch

from minituner.kernels.paging import PagePool


def test_allocate_short_last_page():
    """10 elements in pages of 4 -> pages of 4, 4 and 2 elements, zero-filled: 40 bytes in all."""
    pool = PagePool(page_numel=4)
    ids = pool.allocate(10)
    assert [pool.nbytes(i) for i in ids] == [16, 16, 8] and pool.total_bytes == 40
    assert all(torch.equal(pool.read(i), torch.zeros(pool.nbytes(i) // 4)) for i in ids)


def test_lru_eviction_writes_back_and_counts():
    """Budget of two pages: getting a third evicts the least recently used one, whose contents
    come back intact on the next page-in; ins and outs are counted, resident <= budget."""
    pool = PagePool(page_numel=4, budget_bytes=32, policy="lru")
    a, b, c = (pool.allocate(4)[0] for _ in range(3))
    (pa,) = pool.get([a])
    pa.fill_(1.0)
    pool.get([b])[0].fill_(2.0)
    pool.get([a])  # a is now most recently used, b the LRU
    pool.get([c])  # evicts b
    assert pool.page_ins == 3 and pool.page_outs == 1
    assert pool.resident_bytes == 32 and pool.peak_resident_bytes == 32
    assert torch.equal(pool.get([b])[0], torch.full((4,), 2.0))  # evicts a, brings b back
    assert torch.equal(pool.read(a), torch.full((4,), 1.0))
    assert pool.page_outs == 2 and pool.resident_bytes <= 32


def test_prefetch_never_evicts_pages_in_use():
    pool = PagePool(page_numel=4, budget_bytes=32)
    a, b, c = (pool.allocate(4)[0] for _ in range(3))
    pool.get([a, b])
    pool.prefetch([c])  # would need to evict a or b, both in use: skipped
    assert pool.page_ins == 2
    pool.release()
    pool.prefetch([c])
    assert pool.page_ins == 3 and pool.resident_bytes == 32


def test_budget_too_small_for_one_request():
    pool = PagePool(page_numel=4, budget_bytes=16)
    ids = pool.allocate(8)
    with pytest.raises(ValueError, match="raise the budget"):
        pool.get(ids)


def test_write_then_read():
    pool = PagePool(page_numel=3)
    (i,) = pool.allocate(3)
    pool.write(i, torch.tensor([1.0, 2.0, 3.0]))
    assert pool.get([i])[0].tolist() == [1.0, 2.0, 3.0]
    with pytest.raises(ValueError, match="holds 3 values"):
        pool.write(i, torch.zeros(2))


def test_free_drops_resident_pages_and_ids_are_reused():
    """Freeing a resident page lowers resident_bytes by its size with no page-out (its contents
    are dropped, not copied back); allocate then reuses the freed ids, zero-filled, so the pool
    does not grow; a freed id is rejected until it is allocated again."""
    pool = PagePool(page_numel=4, budget_bytes=64)
    ids = pool.allocate(10)  # pages of 4, 4, 2 elements
    pool.get(ids)[0].fill_(3.0)
    pool.release()
    assert pool.resident_bytes == 40 and pool.num_pages == 3
    pool.free(ids[:2])
    assert pool.resident_bytes == 8 and pool.page_outs == 0
    assert pool.num_pages == 1 and pool.total_bytes == 8
    with pytest.raises(ValueError, match="was freed"):
        pool.read(ids[0])
    with pytest.raises(ValueError, match="not allocated"):
        pool.free(ids[:1])
    again = pool.allocate(8)
    assert sorted(again) == sorted(ids[:2]) and pool.num_pages == 3 and pool.total_bytes == 40
    assert torch.equal(pool.get(again)[0], torch.zeros(4))  # a fresh page, not the old contents


@pytest.mark.parametrize("pages, budget", [(4, 2), (8, 3), (10, 10), (12, 1)])
def test_cyclic_sweep_page_ins_per_policy(pages, budget):
    """A sweep over N pages, one page per get, repeated, with a budget of C pages. "newest" evicts
    the page paged in most recently: in the first sweep pages 0 .. C-2 stay and one slot streams
    the rest, so every later sweep pages in N - C + 1 pages (Belady's optimum for a cycle; N = 4,
    C = 2: 3 pages, page 0 never moves) - and none at all when C >= N. LRU evicts the page needed
    next: every sweep pages in all N when C < N."""
    counts = {}
    for policy in ("newest", "lru"):
        pool = PagePool(page_numel=4, budget_bytes=budget * 16, policy=policy)
        ids = pool.allocate(4 * pages)
        counts[policy] = []
        for sweep in range(4):
            before = pool.page_ins
            for i in ids:
                pool.get([i])[0].add_(1.0)
            pool.release()
            counts[policy].append(pool.page_ins - before)
            assert pool.peak_resident_bytes <= budget * 16
        assert all(torch.equal(pool.read(i), torch.full((4,), 4.0)) for i in ids)  # no update lost
    later = pages - budget + 1 if budget < pages else 0
    assert counts["newest"] == [pages] + [later] * 3
    assert counts["lru"] == [pages] + [pages if budget < pages else 0] * 3


def test_unknown_policy_is_rejected():
    with pytest.raises(ValueError, match="policy must be one of"):
        PagePool(policy="mru")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("policy", ["newest", "lru"])
def test_cuda_pages_round_trip_through_pinned_memory(policy):
    """On CUDA, pages live in pinned host memory and move on a side stream: after a sweep that
    forces page-outs, every page read back holds what the device wrote into it."""
    pool = PagePool(page_numel=1024, device="cuda", budget_bytes=3 * 4096, policy=policy)
    ids = pool.allocate(8 * 1024)
    for sweep in range(3):
        for k, i in enumerate(ids):
            (page,) = pool.get([i])
            page.add_(k + 1)
            if k + 1 < len(ids):
                pool.prefetch([ids[k + 1]])
        pool.release()
    assert pool.page_outs > 0 and pool.peak_resident_bytes <= 3 * 4096
    for k, i in enumerate(ids):
        assert torch.equal(pool.read(i), torch.full((1024,), 3.0 * (k + 1)))
