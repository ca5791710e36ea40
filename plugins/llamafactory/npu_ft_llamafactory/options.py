"""The plugin's options, and the one place that reads them from the environment.

:class:`PluginOptions` is what :func:`~npu_ft_llamafactory.apply_npu_ft_to_llamafactory` takes as
keyword arguments (validated here). Only the two env-driven entry points read environment variables,
through :func:`options_from_env` / :func:`hook_enabled_from_env`: ``npu-ft lf-train`` (which hands the
same options to its torchrun workers with :func:`options_to_env`) and the ``NPU_FT_LLAMAFACTORY=1``
import hook.

>>> PluginOptions(checkpoint_policy="selective").fused_loss
True
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from npu_ft.envflags import EnvFlagError, env_flag

__all__ = [
    "ENV_CHECKPOINT_POLICY",
    "ENV_COUNTERS",
    "ENV_ENABLE",
    "ENV_FALLBACK",
    "ENV_FUSED_KERNELS",
    "ENV_FUSED_LOSS",
    "NpuFtLlamaFactoryError",
    "PluginOptions",
    "hook_enabled_from_env",
    "options_from_env",
    "options_to_env",
]

ENV_ENABLE = "NPU_FT_LLAMAFACTORY"
ENV_FALLBACK = "NPU_FT_LF_FALLBACK"
ENV_FUSED_LOSS = "NPU_FT_LF_FUSED_LOSS"
ENV_FUSED_KERNELS = "NPU_FT_LF_FUSED_KERNELS"
ENV_CHECKPOINT_POLICY = "NPU_FT_LF_CHECKPOINT_POLICY"
ENV_COUNTERS = "NPU_FT_LF_COUNTERS"


class NpuFtLlamaFactoryError(RuntimeError):
    """LLaMA-Factory cannot be patched as asked (and no fallback was requested), or an option is bad."""


@dataclass(frozen=True)
class PluginOptions:
    """How :func:`~npu_ft_llamafactory.apply_npu_ft_to_llamafactory` patches LLaMA-Factory.

    Attributes:
        fallback: run LLaMA-Factory unpatched (with a warning) where it cannot be patched, instead of
            raising :class:`NpuFtLlamaFactoryError`.
        fused_loss: npu-ft's fused linear cross-entropy for training (unless a LLaMA-Factory option
            needs the logits).
        fused_kernels: npu-ft's fused decoder-block ops (RMSNorm with the residual add, RoPE, SwiGLU)
            on the trained model (unless LLaMA-Factory's ``enable_liger_kernel`` is set).
        checkpoint_policy: ``full`` (LLaMA-Factory's own gradient checkpointing) or ``selective``
            (npu-ft's policy: GEMM outputs kept, not recomputed).
        counters_path: write :func:`~npu_ft_llamafactory.counters` there as JSON when the process
            exits (``.rank<N>`` appended on ranks other than 0); None: not written.
    """

    fallback: bool = False
    fused_loss: bool = True
    fused_kernels: bool = True
    checkpoint_policy: str = "full"
    counters_path: str | None = None

    def __post_init__(self) -> None:
        for name in ("fallback", "fused_loss", "fused_kernels"):
            if not isinstance(getattr(self, name), bool):
                raise NpuFtLlamaFactoryError(f"{name}={getattr(self, name)!r}: expected True or False")
        _check_policy("checkpoint_policy", self.checkpoint_policy)
        if self.counters_path is not None:
            if not isinstance(self.counters_path, (str, os.PathLike)) or not str(self.counters_path):
                raise NpuFtLlamaFactoryError(f"counters_path={self.counters_path!r}: expected a file path or None")
            object.__setattr__(self, "counters_path", os.fspath(self.counters_path))

    def as_kwargs(self) -> dict:
        """The keyword arguments of ``apply_npu_ft_to_llamafactory`` that give these options."""
        return asdict(self)


def _check_policy(name: str, value: str) -> None:
    from npu_ft.modules.checkpointing import POLICIES

    if value not in POLICIES:
        raise NpuFtLlamaFactoryError(f"{name}={value!r}: expected one of {', '.join(POLICIES)}")


def _flag(name: str, default: bool) -> bool:
    try:
        return env_flag(name, default)
    except EnvFlagError as exc:
        raise NpuFtLlamaFactoryError(str(exc)) from None


def hook_enabled_from_env() -> bool:
    """Whether ``NPU_FT_LLAMAFACTORY`` switches the import hook on (raises for a value that is not on/off)."""
    return _flag(ENV_ENABLE, False)


def options_from_env() -> PluginOptions:
    """:class:`PluginOptions` from ``NPU_FT_LF_FALLBACK``, ``NPU_FT_LF_FUSED_LOSS``,
    ``NPU_FT_LF_FUSED_KERNELS``, ``NPU_FT_LF_CHECKPOINT_POLICY`` and ``NPU_FT_LF_COUNTERS`` (unset: the
    defaults). A bad value raises :class:`NpuFtLlamaFactoryError` with one line naming the variable."""
    policy = os.environ.get(ENV_CHECKPOINT_POLICY, "").strip().lower() or "full"
    _check_policy(ENV_CHECKPOINT_POLICY, policy)
    return PluginOptions(fallback=_flag(ENV_FALLBACK, False), fused_loss=_flag(ENV_FUSED_LOSS, True),
                         fused_kernels=_flag(ENV_FUSED_KERNELS, True), checkpoint_policy=policy,
                         counters_path=os.environ.get(ENV_COUNTERS) or None)


def options_to_env(options: PluginOptions) -> dict[str, str]:
    """The environment variables that make :func:`options_from_env` return ``options`` (for the
    worker processes a launcher starts)."""
    env = {ENV_FALLBACK: "1" if options.fallback else "0", ENV_FUSED_LOSS: "1" if options.fused_loss else "0",
           ENV_FUSED_KERNELS: "1" if options.fused_kernels else "0", ENV_CHECKPOINT_POLICY: options.checkpoint_policy}
    if options.counters_path:
        env[ENV_COUNTERS] = options.counters_path
    return env
