"""A page pool: tensors kept in fixed-size pages in host memory, a budget of them on the device.

Paper: Dettmers et al. 2023, "QLoRA" (arXiv 2305.14314), section 3, "Paged Optimizers": optimizer
states are paged out to CPU RAM when the GPU runs out of memory and paged back in when the
optimizer update needs them, so memory spikes (long sequences, large batches) do not crash.

This pool does the paging explicitly, in PyTorch:

    host  (pinned when CUDA is there)        device (at most budget_bytes of pages)
    +----+----+----+----+----+----+          +----+----+----+----+
    | p0 | p1 | p2 | p3 | p4 | p5 |  --in--> | p0 | p1 | p4 | p5 |   kept | streaming window
    +----+----+----+----+----+----+  <-out-- +----+----+----+----+

- `allocate(numel)` reserves ceil(numel / page_numel) zero pages on the host; the last one is
  short (only the remaining elements), so small tensors waste nothing. `free(ids)` gives pages
  back: they leave the device without a copy back, and `allocate` reuses their ids.
- `get(ids)` returns device tensors for the pages, paging in those that are not resident; it first
  evicts pages (copying them back to the host) until the budget holds them.
  Pages handed out by the latest `get` are never evicted by the next `prefetch`.
- `prefetch(ids)` starts the copies of pages that will be needed next, if the budget allows it
  without evicting pages in use. On CUDA copies run on a side stream with non_blocking=True from
  pinned memory, so they overlap the update running on the compute stream; events order them.
- Without CUDA the same code runs with host == device: page-ins and page-outs are real copies
  between two CPU tensors, and the pool accounts them (`page_ins`, `page_outs`, `resident_bytes`,
  `peak_resident_bytes`) against the budget, so the behaviour is testable on any machine.

Which page to evict: `policy="newest"` (the default) or `"lru"`. An optimizer step sweeps every
page in the same order, step after step. Under that cyclic sweep LRU always evicts the page that is
needed again soonest ("sequential flooding"): with a budget of a quarter of the pages, every page
is paged in on every step. `"newest"` evicts the page paged in most recently (that is not in
use), so the first pages brought in stay resident across steps and the rest stream through the
last slots of the budget. With a budget of C pages over a sweep of N pages taken in pairs with the
next pair prefetched (PagedAdamW), the kept set is C - 4 pages and every step pages in exactly

    N - (C - 4)  pages         (LRU: N; Belady's optimum without prefetch: N - C + 1)

since the current pair and the prefetched pair (4 pages) are the streaming window.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable

import torch

__all__ = ["PagePool", "POLICIES"]

POLICIES = ("newest", "lru")  # evict the page paged in most recently / the least recently used


class PagePool:
    """Fixed-size pages of `dtype` on the host; at most `budget_bytes` of them on `device`."""

    def __init__(
        self,
        page_numel: int = 1 << 19,
        device: torch.device | str | None = None,
        budget_bytes: int | None = None,
        dtype: torch.dtype = torch.float32,
        policy: str = "newest",
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        if page_numel < 1:
            raise ValueError(f"page_numel must be >= 1, got {page_numel}")
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.page_numel = page_numel
        self.dtype = dtype
        self.page_bytes = page_numel * torch.empty((), dtype=dtype).element_size()
        if budget_bytes is not None and budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0 or None (no limit), got {budget_bytes}")
        self.budget_bytes = budget_bytes
        cuda = self.device.type == "cuda"
        self._pin = cuda and torch.cuda.is_available()
        self._stream = torch.cuda.Stream(self.device) if self._pin else None  # side stream for copies
        self._host: list[torch.Tensor | None] = []  # page id -> host tensor (None: a freed id)
        self._free: list[int] = []  # freed page ids, reused by allocate
        # resident pages in eviction order: "newest" keeps page-in order (last = newest, evicted
        # first); "lru" moves a page to the end on every use (first = least recent, evicted first)
        self._resident: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._ready: dict[int, torch.cuda.Event] = {}  # page id -> copy-in finished (CUDA)
        self._in_use: set[int] = set()
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.page_ins = 0
        self.page_outs = 0

    # ------------------------------------------------------------------ allocation
    def allocate(self, numel: int) -> list[int]:
        """Reserve zero-filled host pages for `numel` elements; returns their page ids in order."""
        if numel < 1:
            raise ValueError(f"allocate needs numel >= 1, got {numel}")
        ids = []
        for start in range(0, numel, self.page_numel):  # one iteration per page
            size = min(self.page_numel, numel - start)
            page = torch.zeros(size, dtype=self.dtype, pin_memory=self._pin)
            if self._free:  # reuse a freed id, so the id space does not grow
                ids.append(self._free.pop())
                self._host[ids[-1]] = page
            else:
                self._host.append(page)
                ids.append(len(self._host) - 1)
        return ids

    def free(self, page_ids: Iterable[int]) -> None:
        """Give pages back: dropped from the device with no copy back, their ids reused later."""
        page_ids = list(page_ids)
        if self._stream is not None:
            self._stream.synchronize()  # no copy into or out of these pages is still running
        for i in page_ids:
            if not 0 <= i < len(self._host) or self._host[i] is None:
                raise ValueError(f"page {i} is not allocated (already freed?); free each page id once")
            if self._resident.pop(i, None) is not None:  # stale device copy: no longer counts
                self._ready.pop(i, None)
                self.resident_bytes -= self.nbytes(i)
            self._in_use.discard(i)
            self._host[i] = None
            self._free.append(i)

    def _page(self, page_id: int) -> torch.Tensor:
        """The host tensor of an allocated page (a clear error for a freed id)."""
        page = self._host[page_id]
        if page is None:
            raise ValueError(f"page {page_id} was freed; use the ids of a later allocate")
        return page

    def nbytes(self, page_id: int) -> int:
        page = self._page(page_id)
        return page.numel() * page.element_size()

    @property
    def num_pages(self) -> int:
        """Allocated pages (freed ones not counted)."""
        return len(self._host) - len(self._free)

    @property
    def total_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._host if t is not None)

    # ------------------------------------------------------------------ moving pages
    def is_resident(self, page_id: int) -> bool:
        """Whether the page has a device copy now (a `get` of it pages nothing in)."""
        return page_id in self._resident

    def _evict_until(self, need: int, protect: set[int]) -> bool:
        """Page out pages not in `protect`, in the policy's order, until `need` more bytes fit;
        False if impossible."""
        if self.budget_bytes is None:
            return True
        while self.resident_bytes + need > self.budget_bytes:
            order = reversed(self._resident) if self.policy == "newest" else iter(self._resident)
            victim = next((i for i in order if i not in protect), None)
            if victim is None:
                return False
            self._page_out(victim)
        return True

    def _page_out(self, page_id: int) -> None:
        dev = self._resident.pop(page_id)
        if self._stream is not None:
            # the copy-out waits for the updates queued on the compute stream
            self._stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._stream):
                self._host[page_id].copy_(dev, non_blocking=True)
            dev.record_stream(self._stream)  # keep the memory alive until the copy is done
        else:
            self._host[page_id].copy_(dev)
        self._ready.pop(page_id, None)
        self.resident_bytes -= self.nbytes(page_id)
        self.page_outs += 1

    def _page_in(self, page_id: int) -> None:
        host = self._page(page_id)
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                dev = torch.empty_like(host, device=self.device)
                dev.copy_(host, non_blocking=True)
                event = torch.cuda.Event()
                event.record(self._stream)
            dev.record_stream(torch.cuda.current_stream(self.device))
            self._ready[page_id] = event
        else:
            dev = host.clone() if self.device.type == "cpu" else host.to(self.device)
        self._resident[page_id] = dev
        self.resident_bytes += self.nbytes(page_id)
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        self.page_ins += 1

    def prefetch(self, page_ids: Iterable[int]) -> None:
        """Start bringing pages in, only if that evicts no page handed out by the latest `get`."""
        page_ids = list(page_ids)
        for i in page_ids:
            if i in self._resident:
                continue
            if not self._evict_until(self.nbytes(i), protect=self._in_use | set(page_ids)):
                return
            self._page_in(i)

    def get(self, page_ids: Iterable[int]) -> list[torch.Tensor]:
        """Device tensors for `page_ids` (paged in if needed; under "lru" marked most recently used)."""
        page_ids = list(page_ids)
        need = sum(self.nbytes(i) for i in page_ids)
        if self.budget_bytes is not None and need > self.budget_bytes:
            raise ValueError(
                f"pages of {need} bytes are needed at once but device_budget_bytes is "
                f"{self.budget_bytes}; raise the budget or use smaller pages (page_numel)"
            )
        self._in_use = set(page_ids)
        out = []
        for i in page_ids:
            if i not in self._resident:
                self._evict_until(self.nbytes(i), protect=self._in_use)
                self._page_in(i)
            if self.policy == "lru":
                self._resident.move_to_end(i)  # most recently used
            event = self._ready.pop(i, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)  # copy-in done first
            out.append(self._resident[i])
        return out

    def release(self) -> None:
        """Pages handed out by the latest `get` may be evicted again."""
        self._in_use = set()

    def read(self, page_id: int) -> torch.Tensor:
        """A host copy of the page's current contents (from the device copy if resident)."""
        if page_id in self._resident:
            event = self._ready.pop(page_id, None)
            if event is not None:
                torch.cuda.current_stream(self.device).wait_event(event)
            return self._resident[page_id].to("cpu", copy=True)
        if self._stream is not None:
            self._stream.synchronize()
        return self._page(page_id).clone()

    def write(self, page_id: int, values: torch.Tensor) -> None:
        """Overwrite a page's contents (resident copy and host copy)."""
        values = values.reshape(-1).to(self.dtype)
        host = self._page(page_id)
        if values.numel() != host.numel():
            raise ValueError(f"page {page_id} holds {host.numel()} values, got {values.numel()}")
        if self._stream is not None:
            self._stream.synchronize()
        host.copy_(values)
        if page_id in self._resident:
            self._resident[page_id].copy_(values)

    def stats(self) -> dict[str, int | None]:
        return {
            "pages": self.num_pages,
            "total_bytes": self.total_bytes,
            "budget_bytes": self.budget_bytes,
            "resident_bytes": self.resident_bytes,
            "peak_resident_bytes": self.peak_resident_bytes,
            "page_ins": self.page_ins,
            "page_outs": self.page_outs,
        }
