"""8-bit AdamW with bitsandbytes' state layout, on every device, and its paged variants.

:class:`AdamW8bit` follows ``bitsandbytes.optim.AdamW8bit`` (0.50): a parameter with at least
``min_8bit_size`` (4096) elements keeps its two moments as 8-bit blockwise codes (``state1``,
``state2`` uint8, ``absmax1``, ``absmax2`` float32 per block of 256, ``qmap1``/``qmap2`` the signed /
unsigned dynamic maps) and is updated by the ``npu_ft::adamw8bit_update`` op; a smaller one keeps
float32 ``state1``/``state2`` updated with bitsandbytes' 32-bit arithmetic. ``step`` is an int.
The state dict wraps the quantization tensors the way bitsandbytes does (for FSDP), so it reads the
same; both forms load.

``optim_bits=32`` keeps every state in float32 (``paged_adamw_32bit``). ``paged=True`` keeps the
states in host memory and streams them per parameter to the device for the update
(:mod:`npu_ft.optim.host_states`); on CPU that is the same as ``paged=False`` (logged once).
``fp32_state_params``: parameters that keep float32 states whatever their size (transformers keeps
every ``nn.Embedding`` weight in 32-bit states when it builds a bitsandbytes 8-bit optimizer;
:func:`npu_ft.optim.create_optimizer` does the same).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import Any

import torch

from npu_ft.ops import adamw8bit as _op

from .host_states import HostStates

log = logging.getLogger(__name__)

__all__ = ["AdamW8bit", "PagedAdamW8bit", "PagedAdamW32bit", "adamw32_update"]

#: the keys bitsandbytes' state dict nests under ``_WRAP_KEY`` (and never casts to the param dtype)
QUANT_KEYS = ("state1", "state2", "absmax1", "absmax2", "qmap1", "qmap2")
_WRAP_KEY = "__bnb_optimizer_quant_state__"


def adamw32_update(p: torch.Tensor, g: torch.Tensor, state1: torch.Tensor, state2: torch.Tensor, *, lr: float,
                   beta1: float, beta2: float, eps: float, weight_decay: float, step: int) -> None:
    """One AdamW step with float32 moments (``state1``, ``state2`` shaped like ``p``), in place.

    bitsandbytes' 32-bit arithmetic (its CPU kernel): ``p += (-lr * c2 / c1) * m / (sqrt(v) + eps * c2)``
    with ``c1 = 1 - beta1**step``, ``c2 = sqrt(1 - beta2**step)``, after ``p *= 1 - lr * weight_decay``.
    """
    g32 = g.float()
    p32 = p.float()
    state1.mul_(beta1).add_(g32, alpha=1.0 - beta1)
    state2.mul_(beta2).addcmul_(g32, g32, value=1.0 - beta2)
    correction1 = 1.0 - beta1**step
    correction2 = math.sqrt(1.0 - beta2**step)
    if weight_decay > 0.0:
        p32.mul_(1.0 - lr * weight_decay)
    p32.add_(state1 / (state2.sqrt() + eps * correction2), alpha=-lr * correction2 / correction1)
    if p32 is not p:
        p.copy_(p32)


def _check_hyper(lr, betas, eps, weight_decay) -> tuple[float, float]:
    if not lr >= 0.0:
        raise ValueError(f"lr: {lr} must be >= 0")
    if not eps >= 0.0:
        raise ValueError(f"eps: {eps} must be >= 0")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay: {weight_decay} must be >= 0")
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"betas: {betas} must be two numbers in [0, 1)")
    return float(betas[0]), float(betas[1])


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit blockwise moments (bitsandbytes' ``AdamW8bit``); see the module docstring.

    Args:
        params: parameters or parameter groups (each group may set lr, betas, eps, weight_decay).
        optim_bits: 8 (moments of large parameters in 8 bits) or 32 (every moment in float32).
        min_8bit_size: parameters with fewer elements keep float32 moments (bitsandbytes: 4096).
        paged: keep the states in host memory, streamed per parameter to the device.
        fp32_state_params: parameters that keep float32 moments whatever their size.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, optim_bits: int = 8, min_8bit_size: int = 4096,
                 paged: bool = False, fp32_state_params: Iterable[torch.Tensor] = ()) -> None:
        _check_hyper(lr, betas, eps, weight_decay)
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits: {optim_bits} not supported (expected 8 or 32)")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size: expected an int >= 0, got {min_8bit_size!r}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.optim_bits = optim_bits
        self.min_8bit_size = min_8bit_size
        self.paged = bool(paged)
        self._fp32_ids = {id(p) for p in fp32_state_params}
        self._host = HostStates() if self.paged else None
        self._maps: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._logged_cpu_paged = False

    # -- state ---------------------------------------------------------------------------------
    def uses_8bit_states(self, p: torch.Tensor) -> bool:
        """Whether ``p`` gets 8-bit moments (bitsandbytes' rule, plus ``fp32_state_params``)."""
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size and id(p) not in self._fp32_ids

    def _code_maps(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The signed and unsigned code maps for ``p``'s states: one pair per device, shared by all
        parameters (as bitsandbytes does), in host memory for a paged optimizer."""
        if p.device not in self._maps:
            maps = (_op.signed_dynamic_map().clone(), _op.unsigned_dynamic_map().clone())
            host = self._host
            self._maps[p.device] = (
                (host.place(maps[0], p), host.place(maps[1], p)) if host is not None
                else (maps[0].to(p.device), maps[1].to(p.device))
            )
        return self._maps[p.device]

    def _zeros(self, shape, dtype: torch.dtype, p: torch.Tensor) -> torch.Tensor:
        if self._host is not None:
            return self._host.zeros(shape, dtype, p)
        return torch.zeros(shape, dtype=dtype, device=p.device)

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state = self.state[p]
        state["step"] = 0
        if self.uses_8bit_states(p):
            state["state1"] = self._zeros(p.shape, torch.uint8, p)
            state["state2"] = self._zeros(p.shape, torch.uint8, p)
            state["absmax1"] = self._zeros((_op.state_blocks(p.numel()),), torch.float32, p)
            state["absmax2"] = self._zeros((_op.state_blocks(p.numel()),), torch.float32, p)
            state["qmap1"], state["qmap2"] = self._code_maps(p)
        else:
            state["state1"] = self._zeros(p.shape, torch.float32, p)
            state["state2"] = self._zeros(p.shape, torch.float32, p)
        return state

    # -- step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = _check_hyper(group["lr"], group["betas"], group["eps"], group["weight_decay"])
            hyper = dict(lr=float(group["lr"]), beta1=beta1, beta2=beta2, eps=float(group["eps"]),
                         weight_decay=float(group["weight_decay"]))
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamW8bit does not support sparse gradients")
                state = self.state[p] if len(self.state[p]) else self._init_state(p)
                state["step"] += 1
                self._update(p, state, hyper)
        if self._host is not None:
            self._host.finish()
        return loss

    def _update(self, p: torch.Tensor, state: dict[str, Any], hyper: dict[str, float]) -> None:
        work = state
        if self._host is not None:
            if p.device.type == "cpu" and not self._logged_cpu_paged:
                log.info("paged optimizer on cpu: the states already live in host memory; "
                         "this is the same as the non-paged optimizer")
                self._logged_cpu_paged = True
            work = self._host.checkout(state, p.device)
        target = p if p.is_contiguous() else p.contiguous()
        grad = p.grad
        assert grad is not None
        if work["state1"].dtype == torch.uint8:
            torch.ops.npu_ft.adamw8bit_update(
                target, grad, work["state1"], work["state2"], work["absmax1"], work["absmax2"],
                work["qmap1"], work["qmap2"], hyper["lr"], hyper["beta1"], hyper["beta2"], hyper["eps"],
                hyper["weight_decay"], state["step"],
            )
        else:
            adamw32_update(target, grad, work["state1"], work["state2"], step=state["step"], **hyper)
        if target is not p:
            p.copy_(target)
        if self._host is not None:
            self._host.checkin(state, work)

    # -- state dict (bitsandbytes' form) ----------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict with each parameter's quantization tensors nested under
        ``"__bnb_optimizer_quant_state__"``, as bitsandbytes writes it."""
        sd = super().state_dict()
        wrapped = {}
        for index, entry in sd["state"].items():
            entry = dict(entry)
            quant = {k: entry.pop(k) for k in QUANT_KEYS if k in entry}
            if quant:
                entry[_WRAP_KEY] = quant
            wrapped[index] = entry
        sd["state"] = wrapped
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this class or of bitsandbytes' ``AdamW8bit`` / ``PagedAdamW*``.

        Quantization tensors keep their dtype (torch would cast float32 absmax to a bf16 parameter's
        dtype) and go to the parameter's device, or to host memory for a paged optimizer.
        """
        held: dict[Any, dict[str, torch.Tensor]] = {}
        stripped: dict[Any, dict[str, Any]] = {}
        for index, entry in state_dict["state"].items():
            entry = dict(entry)
            quant = dict(entry.pop(_WRAP_KEY, {}))
            quant.update({k: entry.pop(k) for k in QUANT_KEYS if k in entry})
            held[index] = quant
            stripped[index] = entry
        super().load_state_dict({**state_dict, "state": stripped})
        params = [p for group in self.param_groups for p in group["params"]]
        for index, quant in held.items():
            p = params[index]
            maps = self._code_maps(p)
            for key, value in quant.items():
                standard = maps[int(key[-1]) - 1] if key.startswith("qmap") else None
                if standard is not None and torch.equal(value.detach().cpu(), standard.cpu()):
                    value = standard  # share the optimizer's map again (one per device)
                elif self._host is not None:
                    value = self._host.place(value, p)
                else:
                    value = value.to(p.device)
                self.state[p][key] = value
            if "step" in self.state[p]:
                self.state[p]["step"] = int(self.state[p]["step"])


class PagedAdamW8bit(AdamW8bit):
    """:class:`AdamW8bit` with ``paged=True`` (transformers' ``paged_adamw_8bit``)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **kwargs) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **{**kwargs, "paged": True})


class PagedAdamW32bit(AdamW8bit):
    """Float32 moments in host memory, streamed per parameter (transformers' ``paged_adamw_32bit``)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, **kwargs) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, **{**kwargs, "paged": True, "optim_bits": 32})
