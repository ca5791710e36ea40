"""nn.Modules that users and the trainer see; they call the npu_ft ops (per-device kernels).

* :class:`LoraLinear` - frozen base (``nn.Linear`` or :class:`Nf4Linear`) + trainable LoRA A/B,
  PEFT-compatible parameter names, init and numerics.
* :class:`Nf4Linear` - frozen NF4 (bitsandbytes layout) linear layer, the QLoRA base.
* :func:`enable_fused_cross_entropy` - patch a Qwen2/Qwen3 ``*ForCausalLM`` so its loss is the chunked
  fused linear cross-entropy (no ``[tokens, vocab]`` logits; :mod:`npu_ft.modules.fused_loss`).
"""

from __future__ import annotations

from .fused_loss import enable_fused_cross_entropy
from .lora import LoraLinear
from .nf4 import Nf4Linear

__all__ = ["LoraLinear", "Nf4Linear", "enable_fused_cross_entropy"]
