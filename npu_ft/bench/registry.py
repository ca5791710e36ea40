"""The implementations a bench case can name, and where their code lives (imported only when a
case runs, so reading a suite stays cheap).

Two kinds:

* a **builder** ``fn(case, base_model_factory, device) -> impls.Prepared`` adapts the model; the
  shared training loop of :mod:`npu_ft.bench.worker` then measures it (``npu-ft``, ``reference``,
  and ``custom:<module>:<function>``);
* a **case runner** ``fn(case) -> result dict`` runs the whole case itself, e.g. in another Python
  (``llamafactory``, ``llamafactory+npu-ft``: LLaMA-Factory's own trainer).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__all__ = ["CUSTOM_PREFIX", "IMPLEMENTATIONS", "Implementation", "builder", "case_runner", "register",
           "supports_fused_kernels", "supports_policy"]

#: a custom implementation is named "custom:<module>:<function>" (a builder)
CUSTOM_PREFIX = "custom:"


class Implementation:
    """Where an implementation's builder or case runner lives (``"module:function"``)."""

    def __init__(self, name: str, *, builder: str | None = None, runner: str | None = None, doc: str = "",
                 policies: tuple[str, ...] = ("off", "full"), fused_kernels: bool = False):
        if (builder is None) == (runner is None):
            raise ValueError(f"implementation {name!r}: give a builder or a case runner")
        self.name, self.builder, self.runner, self.doc = name, builder, runner, doc
        #: the checkpointing policies it can run (off = no checkpointing)
        self.policies = policies
        #: whether it applies npu-ft's fused decoder-block ops when a case says fused_kernels: true
        self.fused_kernels = fused_kernels


IMPLEMENTATIONS: dict[str, Implementation] = {}


def register(impl: Implementation) -> Implementation:
    IMPLEMENTATIONS[impl.name] = impl
    return impl


def _load(target: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def builder(name: str) -> Callable[..., Any] | None:
    """The builder of implementation ``name`` (None when it is a case runner)."""
    if name.startswith(CUSTOM_PREFIX):
        return _load(name[len(CUSTOM_PREFIX):])
    impl = IMPLEMENTATIONS.get(name)
    if impl is None:
        raise ValueError(f"unknown implementation {name!r}")
    return _load(impl.builder) if impl.builder else None


def supports_policy(name: str, policy: str) -> bool:
    """Whether implementation ``name`` can run checkpointing ``policy`` (custom ones: every policy)."""
    impl = IMPLEMENTATIONS.get(name)
    return impl is None or policy in impl.policies


def supports_fused_kernels(name: str) -> bool:
    """Whether implementation ``name`` follows a case's ``fused_kernels`` (custom ones: yes, they get it)."""
    impl = IMPLEMENTATIONS.get(name)
    return impl is None or impl.fused_kernels


def case_runner(name: str) -> Callable[..., Any] | None:
    """The case runner of implementation ``name`` (None when it is a builder)."""
    impl = IMPLEMENTATIONS.get(name)
    return _load(impl.runner) if impl is not None and impl.runner else None


register(Implementation("npu-ft", builder="npu_ft.bench.lanes:npu_ft_lane",
                        doc="npu-ft's modules, fused loss and fused decoder-block ops, as run_sft trains",
                        policies=("off", "full", "selective"), fused_kernels=True))
register(Implementation("reference", builder="npu_ft.bench.lanes:reference_lane",
                        doc="transformers + PEFT (+ bitsandbytes 4-bit), what LLaMA-Factory runs"))
register(Implementation("llamafactory", runner="npu_ft.bench.impl_llamafactory:run_case",
                        doc="LLaMA-Factory 0.9.5's own trainer, in its own Python"))
register(Implementation("llamafactory+npu-ft", runner="npu_ft.bench.impl_llamafactory:run_case",
                        doc="LLaMA-Factory 0.9.5 with the npu-ft plugin applied",
                        policies=("off", "full", "selective"), fused_kernels=True))
