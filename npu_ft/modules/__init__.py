"""nn.Modules that users and the trainer see; they call the npu_ft ops (per-device kernels).

* :class:`LoraLinear` - frozen base (``nn.Linear`` or :class:`Nf4Linear`) + trainable LoRA A/B,
  PEFT-compatible parameter names, init and numerics.
* :class:`Nf4Linear` - frozen NF4 (bitsandbytes layout) linear layer, the QLoRA base.
* :class:`DoraLinear` (DoRA), :class:`VeraLinear` (VeRA) - the LoRA family's other layers;
  ``LoraLinear(lora_fa=True)`` is LoRA-FA, ``init_lora_weights="pissa..."`` PiSSA (docs/methods.md).
* :func:`enable_fused_cross_entropy` - patch a Qwen2/Qwen3 ``*ForCausalLM`` so its loss is the chunked
  fused linear cross-entropy (no ``[tokens, vocab]`` logits; :mod:`npu_ft.modules.fused_loss`).
"""

from __future__ import annotations

from .dora import DoraLinear
from .fused_loss import enable_fused_cross_entropy
from .lora import LoraLinear
from .nf4 import Nf4Linear
from .vera import VeraLinear

__all__ = ["DoraLinear", "LoraLinear", "Nf4Linear", "VeraLinear", "enable_fused_cross_entropy"]
