"""npu-ft's optimizers: 8-bit AdamW with bitsandbytes' state layout on every device, its paged
variants, and the mapping from transformers' ``optim`` names (see docs/methods.md#8-bit-adamw).

>>> from npu_ft.optim import is_npu_ft_optim, trainer_optimizer      # doctest: +SKIP
>>> if is_npu_ft_optim(args.optim):                                  # doctest: +SKIP
...     trainer = Trainer(..., optimizer_cls_and_kwargs=trainer_optimizer(args.optim, args, model))
"""

from __future__ import annotations

from .adamw8bit import AdamW8bit, PagedAdamW8bit, PagedAdamW32bit, adamw32_update
from .names import NPU_FT_OPTIMS, create_optimizer, is_npu_ft_optim, resolve_optim, trainer_optimizer

__all__ = [
    "NPU_FT_OPTIMS",
    "AdamW8bit",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "adamw32_update",
    "create_optimizer",
    "is_npu_ft_optim",
    "resolve_optim",
    "trainer_optimizer",
]
