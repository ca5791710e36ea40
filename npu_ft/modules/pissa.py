"""PiSSA: start LoRA from the principal singular components of the base weight (PEFT's
``init_lora_weights="pissa"`` / ``"pissa_niter_N"``, LLaMA-Factory's ``pissa_init`` / ``pissa_iter``).

::

    W = U S V^T                        (exact SVD, or torch.svd_lowrank with N subspace iterations)
    A = sqrt(S_r / s) V_r^T            [r, in]
    B = U_r sqrt(S_r / s)              [out, r]
    W_res = W - s * B @ A              the base layer keeps the residual (so the model is unchanged)

PEFT's order of operations and random draws (``svd_lowrank`` uses the global RNG), in fp32, so the
same seed gives the same A, B and residual. Converting a trained PiSSA adapter back to a LoRA of the
original W: ``dW = s (B A - B0 A0) = s' [B | -B0] [A ; A0]`` with rank 2r and ``alpha' = 2 alpha``
(``sqrt(2) alpha`` with rsLoRA) so that ``s' = s`` (:func:`pissa_to_lora`).
"""

from __future__ import annotations

import math
import re

import torch

__all__ = ["parse_pissa_init", "pissa_decompose", "pissa_to_lora"]

_NITER = re.compile(r"^pissa_niter_(\d+)$")


def parse_pissa_init(init_lora_weights) -> int | None:
    """``"pissa"`` -> None (exact SVD), ``"pissa_niter_N"`` -> N; anything else is a ValueError."""
    if init_lora_weights == "pissa":
        return None
    match = _NITER.match(str(init_lora_weights))
    if match is None:
        raise ValueError(f"init_lora_weights: expected True, 'pissa' or 'pissa_niter_<N>', got {init_lora_weights!r}")
    return int(match.group(1))


@torch.no_grad()
def pissa_decompose(weight: torch.Tensor, r: int, scaling: float, niter: int | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r], W_res [out, in])`` in fp32 for ``weight`` ``[out, in]`` (any float dtype).

    ``niter`` None: full SVD (``torch.linalg.svd``); else ``torch.svd_lowrank(W, q=r, niter)``
    (random, from the global RNG of W's device).
    """
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"weight: PiSSA needs a float32/float16/bfloat16 base weight, got {weight.dtype}")
    if r > min(weight.shape):
        raise ValueError(f"r: PiSSA rank {r} exceeds the weight's smallest dimension {min(weight.shape)}")
    w = weight.to(torch.float32)
    if niter is None:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        u_r, s_r, vh_r = u[:, :r], s[:r], vh[:r]
    else:
        u_r, s_r, v_r = torch.svd_lowrank(w, r, niter=niter)
        vh_r = v_r.t()
    s_r = s_r / scaling
    root = torch.sqrt(s_r)
    lora_A = root[:, None] * vh_r
    lora_B = u_r * root[None, :]
    residual = w - scaling * lora_B @ lora_A
    return lora_A, lora_B, residual


def pissa_to_lora(lora_A: torch.Tensor, lora_B: torch.Tensor, init_A: torch.Tensor, init_B: torch.Tensor,
                  lora_alpha: float, use_rslora: bool) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A trained PiSSA adapter as a rank-2r LoRA of the original weight (PEFT's conversion).

    Returns ``(A' [2r, in] = [A ; A0], B' [out, 2r] = [B | -B0], alpha')``.
    """
    alpha = lora_alpha * (math.sqrt(2.0) if use_rslora else 2.0)
    return torch.cat([lora_A, init_A], dim=0), torch.cat([lora_B, -init_B], dim=1), alpha
