"""Optimizer states kept in host memory and streamed to the device one parameter at a time ("paged").

:class:`HostStates` owns where a paged optimizer's state tensors live (host memory, page-locked
where the device runtime can pin it) and moves them for one update: :meth:`HostStates.checkout`
copies a parameter's states to its device, the update runs there, :meth:`HostStates.checkin`
copies them back. Device memory then holds the states of one parameter at a time instead of all of
them. Copies and updates run in order on the current stream (no overlap between the copy of one
parameter and the update of another); call :meth:`HostStates.finish` after the last parameter.

On a CPU parameter there is nothing to move: checkout returns the states themselves (the optimizer
logs once that a paged optimizer on CPU is the non-paged one).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)


class HostStates:
    """Allocation and per-parameter streaming of host-resident optimizer states."""

    def __init__(self) -> None:
        self._pin: bool | None = None  # decided on the first allocation for a device parameter
        self._device_copies: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        self._devices: set[torch.device] = set()

    # -- allocation ------------------------------------------------------------------------------
    def zeros(self, shape, dtype: torch.dtype, param: torch.Tensor) -> torch.Tensor:
        """A zero tensor in host memory for a state of ``param`` (pinned when the runtime allows)."""
        pin = param.device.type != "cpu" and self._can_pin(param.device)
        return torch.zeros(shape, dtype=dtype, pin_memory=pin)

    def place(self, value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """``value`` as a host tensor for ``param``'s states (pinned where possible)."""
        value = value.detach().to("cpu")
        if param.device.type == "cpu" or not self._can_pin(param.device):
            return value
        return value.pin_memory()

    def _can_pin(self, device: torch.device) -> bool:
        if self._pin is None:
            try:
                self._pin = bool(torch.zeros(1).pin_memory().is_pinned())
                reason = "the runtime returned pageable memory"
            except (RuntimeError, NotImplementedError) as exc:
                self._pin = False
                reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            if not self._pin:
                log.warning("paged optimizer: page-locked host memory is not available for %s (%s); optimizer "
                            "states use ordinary host memory (copies to the device are synchronous)", device, reason)
        return self._pin

    # -- streaming -------------------------------------------------------------------------------
    def checkout(self, state: Mapping[str, object], device: torch.device) -> dict[str, object]:
        """Device copies of the tensors in ``state`` (ints and other values as they are).

        Small constant tensors (the code maps, ``shared`` below) are copied once per device and kept.
        """
        if device.type == "cpu":
            return dict(state)
        self._devices.add(device)
        work: dict[str, object] = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                work[key] = self._shared(value, device) if key.startswith("qmap") else value.to(
                    device, non_blocking=True
                )
            else:
                work[key] = value
        return work

    def _shared(self, host: torch.Tensor, device: torch.device) -> torch.Tensor:
        key = (id(host), device)
        hit = self._device_copies.get(key)
        if hit is None or hit[0] is not host:
            hit = self._device_copies[key] = (host, host.to(device))
        return hit[1]

    def checkin(self, state: dict[str, object], work: Mapping[str, object]) -> None:
        """Copy the updated device tensors of ``work`` back into the host tensors of ``state``."""
        for key, value in work.items():
            host = state.get(key)
            if isinstance(value, torch.Tensor) and isinstance(host, torch.Tensor) and value is not host:
                if not key.startswith("qmap"):
                    host.copy_(value, non_blocking=True)
            elif not isinstance(value, torch.Tensor):
                state[key] = value

    def finish(self) -> None:
        """Wait for the copies back to host memory (they may be asynchronous into pinned memory)."""
        from npu_ft.device import get_backend

        for device in self._devices:
            get_backend("npu" if device.type == "privateuseone" else device.type).synchronize()
