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
`device_budget_bytes` of them; the update of a parameter walks its pages in order (a loop over
pages, each page's math one vectorized op) and prefetches the next page pair while the current one
is computed. With the same hyper-parameters the steps are the same as torch.optim.AdamW's: the same
float32 operations in the same order, elementwise, on page-sized slices.

How this differs from bitsandbytes' paged optimizers, and why. bitsandbytes allocates the states
with cudaMallocManaged (CUDA unified memory): one pointer valid on host and device, with the driver
migrating 4 KiB-2 MiB pages on a page fault and evicting them under memory pressure, plus
cudaMemPrefetchAsync hints. That needs no bookkeeping in Python and reacts to the whole process's
memory pressure, but it only exists on CUDA (and its page faults stall the kernel that touches
them). Here the paging is explicit: the pool decides, with a budget in bytes and an LRU policy,
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


class PagedAdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay) with m and v in a page pool of `device_budget_bytes`.

    Extra keyword arguments: `page_numel` (elements per page), `device` (where updates run;
    default: the first parameter's device). `device_budget_bytes=None` keeps every page resident.
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
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"lr, eps and weight_decay must be >= 0, got {lr}, {eps}, {weight_decay}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        first = self.param_groups[0]["params"][0]
        self.pool = PagePool(page_numel, device or first.device, device_budget_bytes, torch.float32)
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
        work = []  # (p, grad, state, hyper-parameters) for every parameter with a gradient
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("PagedAdamW does not support sparse gradients")
                work.append((p, group, self._state(p)))
        pages = [(s["m_pages"][k], s["v_pages"][k]) for _, _, s in work for k in range(len(s["m_pages"]))]
        at = 0
        for p, group, state in work:
            beta1, beta2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            state["step"] += 1
            t = state["step"].item()
            bias_correction1 = 1 - beta1**t  # 1 - beta1^t
            bias_correction2_sqrt = (1 - beta2**t) ** 0.5  # sqrt(1 - beta2^t)
            step_size = lr / bias_correction1
            theta = p.view(-1)  # (N,) flat view, updated in place
            grad = p.grad.reshape(-1)
            P = self.pool.page_numel
            for k in range(len(state["m_pages"])):  # one iteration per page pair
                m, v = self.pool.get(pages[at])
                at += 1
                if at < len(pages):
                    self.pool.prefetch(pages[at])  # next pair's copies overlap this update
                th, g = theta[k * P : k * P + m.numel()], grad[k * P : k * P + m.numel()]
                th.mul_(1 - lr * wd)  # decoupled weight decay  theta * (1 - lr lambda)
                m.lerp_(g, 1 - beta1)  # m = beta1 m + (1 - beta1) g
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)  # v = beta2 v + (1 - beta2) g^2
                denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)  # sqrt(v_hat) + eps
                th.addcdiv_(m, denom, value=-step_size)  # theta -= lr m_hat / denom
        self.pool.release()
        return loss

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
