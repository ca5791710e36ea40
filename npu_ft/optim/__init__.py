"""npu-ft's optimizers: 8-bit AdamW with bitsandbytes' state layout on every device, its paged
variants, and the mapping from transformers' ``optim`` names (see docs/methods.md#8-bit-adamw).

>>> from npu_ft.optim import create_optimizer, is_npu_ft_optim  # doctest: +SKIP
>>> if is_npu_ft_optim(args.optim):                              # doctest: +SKIP
...     opt = create_optimizer(args.optim, groups, lr=args.learning_rate, model=model)
"""

from __future__ import annotations

from .adamw8bit import AdamW8bit, PagedAdamW8bit, PagedAdamW32bit, adamw32_update
from .names import NPU_FT_OPTIMS, create_optimizer, is_npu_ft_optim, resolve_optim

__all__ = [
    "NPU_FT_OPTIMS",
    "AdamW8bit",
    "PagedAdamW8bit",
    "PagedAdamW32bit",
    "adamw32_update",
    "create_optimizer",
    "is_npu_ft_optim",
    "resolve_optim",
]
