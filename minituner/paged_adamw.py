"""PagedAdamW: AdamW whose two moment states live in a page pool (kernels/paging.py).

Papers: Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization" (arXiv 1711.05101),
Algorithm 2; Dettmers et al. 2023, "QLoRA" (arXiv 2305.14314), section 3, "Paged Optimizers".

AdamW, per parameter theta with gradient g at step t (Algorithm 2, as torch.optim.AdamW computes it):

    theta <- theta * (1 - lr * lambda)                      decoupled weight decay (line 12)
    m     <- beta1 * m + (1 - beta1) * g                    first moment  (line 7)
    v     <- beta2 * v + (1 - beta2) * g^2                  second moment (line 8)
    theta <- theta - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)   (lines 9-12)

m and v cost 8 bytes per parameter, twice a float32 model. Paging keeps them in host memory in
fixed-size pages and brings to the device only the pages of the slice being updated, at most
`device_budget_bytes` of them. A step sweeps every parameter's page pairs (m, v) in order; pages
already resident are updated together, a page pair that is not is fetched while the pages before
it are updated (the next pair is prefetched), so copies overlap compute. The pool evicts the page it
paged in most recently (kernels/paging.py says why LRU would page in every page on every step
here): with a budget of a quarter of the state, about three quarters of the pages move per step.

Two implementations of the same update, on page-sized slices:
- `fused=False`, the lesson: `_adamw_page` below, one line per term of the equations above.
- `fused=True` (default), the fast path: torch's fused AdamW kernel (`torch._fused_adamw_`, the op
  behind `torch.optim.AdamW(fused=True)`) on every page of a batch at once: one pass over memory
  instead of seven. tests/test_paged_adamw.py checks it against `_adamw_page` and both against
  torch.optim.AdamW. With the same hyper-parameters the steps are torch.optim.AdamW's (to float32
  rounding: the kernel orders a few operations differently, ~1e-7 after many steps).

How this differs from bitsandbytes' paged optimizers, and why. bitsandbytes allocates the states
with cudaMallocManaged (CUDA unified memory): one pointer valid on host and device, with the driver
migrating 4 KiB-2 MiB pages on a page fault and evicting them under memory pressure, plus
cudaMemPrefetchAsync hints. That needs no bookkeeping in Python and reacts to the whole process's
memory pressure, but it only exists on CUDA (and its page faults stall the kernel that touches
them). Here the paging is explicit: the pool decides, with a budget in bytes and an eviction policy,
what is resident, copies pages with ordinary (non_blocking, side-stream) copies, and counts every
page-in and page-out. It runs unchanged on a CPU (host == device, copies still counted), its
behaviour is testable and visible, and it teaches what unified memory does behind the scenes;
it reacts to its own budget only, not to memory pressure from elsewhere in the process.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from minituner.kernels.paging import PagePool

__all__ = ["PagedAdamW"]


def _adamw_page(theta: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: float,
                group: dict[str, Any]) -> None:
    """One AdamW step on one page-sized slice, in place: (N,) theta, gradient g, moments m and v."""
    beta1, beta2 = group["betas"]
    lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
    bias_correction1 = 1 - beta1**t  # 1 - beta1^t
    bias_correction2_sqrt = (1 - beta2**t) ** 0.5  # sqrt(1 - beta2^t)
    theta.mul_(1 - lr * wd)  # decoupled weight decay  theta * (1 - lr lambda)
    m.lerp_(g, 1 - beta1)  # m = beta1 m + (1 - beta1) g
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)  # sqrt(v_hat) + eps
    theta.addcdiv_(m, denom, value=-lr / bias_correction1)  # theta -= lr m_hat / denom


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with m and v in a page pool of `device_budget_bytes`.

    Extra keyword arguments: `page_numel` (elements per page), `device` (where updates run;
    default: the first parameter's device), `fused` (False: the readable per-term update),
    `policy` (the pool's eviction policy, "newest" or "lru"). `device_budget_bytes=None` keeps
    every page resident. `last_step_page_ins` counts the pages the latest step brought in.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        device_budget_bytes: int | None = None,
        *,
        page_numel: int = 1 << 19,
        device: torch.device | str | None = None,
        fused: bool = True,
        policy: str = "newest",
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        first = self.param_groups[0]["params"][0]
        self.pool = PagePool(page_numel, device or first.device, device_budget_bytes, torch.float32, policy)
        self.fused = fused
        self.last_step_page_ins = 0
        if device_budget_bytes is not None and device_budget_bytes < 2 * self.pool.page_bytes:
            pair = 2 * self.pool.page_bytes
            raise ValueError(
                f"device_budget_bytes={device_budget_bytes} cannot hold one page of m and one of v "
                f"({pair} bytes); raise it or pass a smaller page_numel"
            )

    # ------------------------------------------------------------------ state
    def _state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        if not state:
            if p.dtype != torch.float32 or not p.is_contiguous():
                raise TypeError("PagedAdamW updates contiguous float32 parameters; call .float().contiguous()")
            state["step"] = torch.tensor(0.0)
            state["m_pages"] = self.pool.allocate(p.numel())  # first moment, page ids
            state["v_pages"] = self.pool.allocate(p.numel())  # second moment, page ids
        return state

    # ------------------------------------------------------------------ the update
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        sweep = []  # one (p, group, state, k) per page pair k of every parameter with a gradient
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("PagedAdamW does not support sparse gradients")
                state = self._state(p)
                state["step"] += 1  # t, a CPU tensor as in torch.optim.AdamW
                sweep += [(p, group, state, k) for k in range(len(state["m_pages"]))]
        page_ins = self.pool.page_ins
        at = 0
        while at < len(sweep):
            batch = self._batch(sweep, at)
            pages = self.pool.get([i for _, _, s, k in batch for i in (s["m_pages"][k], s["v_pages"][k])])
            at += len(batch)
            if at < len(sweep):
                _, _, s, k = sweep[at]
                self.pool.prefetch([s["m_pages"][k], s["v_pages"][k]])  # its copies overlap this update
            P = self.pool.page_numel
            slices = []  # (theta, grad, m, v, state) per page pair: theta and grad are views
            for (p, group, state, k), m, v in zip(batch, pages[0::2], pages[1::2]):
                span = slice(k * P, k * P + m.numel())
                slices.append((p.view(-1)[span], p.grad.reshape(-1)[span], m, v, state))
            if self.fused:
                self._fused_update(slices, batch[0][1])
            else:
                for theta, grad, m, v, state in slices:
                    _adamw_page(theta, grad, m, v, state["step"].item(), batch[0][1])
        self.pool.release()
        self.last_step_page_ins = self.pool.page_ins - page_ins
        return loss

    def _batch(self, sweep: list, at: int) -> list:
        """The page pair at `at`, then the following pairs of the same group that are resident now,
        as long as they fit the budget together: updated by one get and (fused) one kernel call."""
        def pair(j: int) -> tuple[int, int]:
            _, _, s, k = sweep[j]
            return s["m_pages"][k], s["v_pages"][k]

        budget = self.pool.budget_bytes
        size = sum(self.pool.nbytes(i) for i in pair(at))
        end = at + 1
        while end < len(sweep) and sweep[end][1] is sweep[at][1] and all(map(self.pool.is_resident, pair(end))):
            size += sum(self.pool.nbytes(i) for i in pair(end))
            if budget is not None and size > budget:
                break
            end += 1
        return sweep[at:end]

    def _fused_update(self, slices: list, group: dict[str, Any]) -> None:
        """The same update as _adamw_page on every slice at once, by torch's fused AdamW kernel."""
        theta, grad, m, v, states = zip(*slices)
        steps = [self._step_tensor(s) for s in states]  # already incremented, as the op expects
        beta1, beta2 = group["betas"]
        torch._fused_adamw_(list(theta), list(grad), list(m), list(v), [], steps, amsgrad=False,
                            lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"],
                            eps=group["eps"], maximize=False, grad_scale=None, found_inf=None)  # fmt: skip

    def _step_tensor(self, state: dict[str, Any]) -> torch.Tensor:
        """t where the fused op reads it: the CPU step itself, or a device copy set without a sync."""
        if self.pool.device.type == "cpu":
            return state["step"]
        if "device_step" not in state:
            state["device_step"] = torch.zeros((), device=self.pool.device)
        return state["device_step"].fill_(state["step"].item())  # a host scalar: no device sync

    # ------------------------------------------------------------------ state_dict in AdamW's format
    def state_dict(self) -> dict[str, Any]:
        """torch.optim.AdamW's layout: per parameter index {"step", "exp_avg", "exp_avg_sq"}."""
        sd = super().state_dict()
        params = [p for g in self.param_groups for p in g["params"]]
        for idx in list(sd["state"]):  # packed entries alias self.state: build new dicts
            p = params[idx]
            pages = self.state[p]
            sd["state"][idx] = {
                "step": pages["step"].clone(),
                "exp_avg": torch.cat([self.pool.read(i) for i in pages["m_pages"]]).view(p.shape),
                "exp_avg_sq": torch.cat([self.pool.read(i) for i in pages["v_pages"]]).view(p.shape),
            }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state_dict from PagedAdamW or torch.optim.AdamW (same layout).

        The moments are written into the pages a parameter already has (loading again allocates
        nothing); the pages of a parameter the state_dict has no state for are freed, so that
        parameter starts from zero moments, as it would in torch.optim.AdamW.
        """
        params = [p for g in self.param_groups for p in g["params"]]
        moments = {}
        stripped = {"state": {}, "param_groups": state_dict["param_groups"]}
        for idx, st in state_dict["state"].items():
            if "exp_avg" not in st or "exp_avg_sq" not in st:
                raise ValueError(f"state for parameter {idx} lacks exp_avg/exp_avg_sq; is it an AdamW state_dict?")
            m, v = st["exp_avg"], st["exp_avg_sq"]
            n = params[int(idx)].numel() if int(idx) < len(params) else None  # out of range: super() says so
            if n is not None and (m.numel() != n or v.numel() != n):
                raise ValueError(f"state for parameter {idx} has {m.numel()} values, the parameter {n}")
            moments[int(idx)] = (m, v)
            stripped["state"][idx] = {"step": st["step"]}
        pages = {p: (s["m_pages"], s["v_pages"]) for p, s in self.state.items() if "m_pages" in s}
        super().load_state_dict(stripped)  # replaces self.state: the page ids live on in `pages`
        loaded = {params[idx] for idx in moments}
        for p in [p for p in pages if p not in loaded]:  # no state in the state_dict: free its pages
            m_pages, v_pages = pages.pop(p)
            self.pool.free(m_pages + v_pages)
        P = self.pool.page_numel
        for idx, (m, v) in moments.items():
            p = params[idx]
            step = torch.as_tensor(self.state[p]["step"], dtype=torch.float32).clone().cpu()
            self.state[p].clear()
            if p in pages:  # reuse the pages this parameter already has
                state = self.state[p]
                state["m_pages"], state["v_pages"] = pages[p]
            else:
                state = self._state(p)  # allocates its pages
            state["step"] = step
            for k, (mi, vi) in enumerate(zip(state["m_pages"], state["v_pages"])):
                self.pool.write(mi, m.reshape(-1)[k * P : (k + 1) * P])
                self.pool.write(vi, v.reshape(-1)[k * P : (k + 1) * P])
