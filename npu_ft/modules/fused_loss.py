"""Fused linear cross-entropy for a transformers causal LM: :func:`enable_fused_cross_entropy`.

transformers' ``Qwen2ForCausalLM`` / ``Qwen3ForCausalLM`` forward computes
``logits = lm_head(hidden)`` for every position, upcasts them to fp32 and runs ``ForCausalLMLoss``:
three ``[tokens, vocab]`` fp32 tensors (logits, log-softmax, their gradient) -- Qwen's vocab is
151,936, so 2 x 4096 tokens cost ~14 GiB -- and logits even at prompt positions (label -100).

:func:`enable_fused_cross_entropy` replaces the **instance** ``forward`` (the class is untouched)
so that a call **with labels** runs ``self.model(...)`` for the hidden states, shifts the labels as
``ForCausalLMLoss`` does (pad one ``ignore_index`` on the right, drop the first; or take the
``shift_labels`` kwarg when given) and computes the loss with
:func:`npu_ft.ops.linear_cross_entropy.linear_cross_entropy` on ``lm_head.weight``: the same
loss and gradients within fp32 rounding, honouring ``num_items_in_batch`` (gradient accumulation)
and ``ignore_index`` as transformers does.

The output is a ``CausalLMOutputWithPast`` with ``loss`` set and **``logits=None``** (the point is
never to build them). Neither transformers' ``Trainer`` training step nor npu-ft's trainer or bench
read logits during training: they take ``outputs["loss"]`` (``outputs[0]``). Evaluation with
labels returns the loss only as well (``prediction_step`` then has no logits; ``compute_metrics``
that need logits must call without labels or disable the patch). A call **without labels**
(``generate``, scoring, eval for logits) runs the original forward unchanged, as do calls with
``logits_to_keep != 0``, and calls where the head weight is not materialised (DeepSpeed ZeRO-3 /
FSDP sharded parameters: the head's own module hooks gather it, so the original forward is used).

Because only the instance attribute changes, DDP / DeepSpeed / accelerate wrapping afterwards
still go through it (they call ``module.forward``; accelerate's mixed-precision wrapper wraps this
bound method).

Not applicable (returns False, model untouched, the reason logged): not one of the transformers
classes whose forward is exactly base model -> ``lm_head`` -> ``ForCausalLMLoss``
(:data:`KNOWN_CLASSES`: Qwen2, Qwen3, Llama, Mistral ``*ForCausalLM``; a ``peft.PeftModel``
around one is not patched either -- patch the inner model); ``lm_head`` not exactly ``nn.Linear``
(PEFT's ``ModulesToSaveWrapper``, a LoRA on the head, a quantized head; npu-ft's own
``additional_target: lm_head`` is a plain trainable ``nn.Linear`` copy and is fused); a loss
function other than transformers' ``ForCausalLMLoss``.
"""

from __future__ import annotations

import collections
import logging
import types
from typing import Any, cast

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "CALLS",
    "KNOWN_CLASSES",
    "disable_fused_cross_entropy",
    "enable_fused_cross_entropy",
    "fused_cross_entropy_enabled",
    "why_not_applicable",
]

#: calls of patched forwards since import (or ``CALLS.clear()``): "fused" (the loss went through
#: the fused op) and "original" (handed to the model's own forward: no labels, logits_to_keep, ...)
CALLS: collections.Counter = collections.Counter()

_ATTR = "_npu_ft_fused_ce"  # {"previous_forward": ..., "chunk_rows": ...} on a patched model


#: classes whose transformers forward is exactly ``self.model(...)`` -> ``lm_head`` -> ``ForCausalLMLoss``
#: (MoE models add a router loss in forward and are not listed)
KNOWN_CLASSES = frozenset({"Qwen2ForCausalLM", "Qwen3ForCausalLM", "LlamaForCausalLM", "MistralForCausalLM"})


def why_not_applicable(model: nn.Module) -> str | None:
    """None if :func:`enable_fused_cross_entropy` can patch ``model``, else the reason."""
    name = type(model).__name__
    if name not in KNOWN_CLASSES:
        return f"{name} is not a known causal LM ({', '.join(sorted(KNOWN_CLASSES))})"
    if not type(model).forward.__module__.startswith("transformers.models."):
        return f"{name}.forward is overridden ({type(model).forward.__module__})"
    base = getattr(model, "model", None)
    if not isinstance(base, nn.Module):
        return f"{name} has no .model base module"
    head = getattr(model, "lm_head", None)
    if head is None:
        return f"{name} has no .lm_head"
    if type(head) is not nn.Linear:
        return (
            f"{name}.lm_head is {type(head).__module__}.{type(head).__name__}, not a plain nn.Linear "
            "(e.g. a LoRA or PEFT modules_to_save wrapper on the head); transformers' loss is used"
        )
    if head.weight.dim() != 2 or head.weight.shape[0] != getattr(model.config, "vocab_size", head.weight.shape[0]):
        return f"{name}.lm_head.weight has shape {tuple(head.weight.shape)}, not [vocab, hidden]"
    try:
        from transformers.loss.loss_utils import ForCausalLMLoss
    except ImportError:  # pragma: no cover - transformers < 4.46
        return "transformers has no transformers.loss.loss_utils.ForCausalLMLoss"
    try:
        loss_fn = model.loss_function
    except Exception as exc:  # noqa: BLE001 - any model without transformers' loss machinery
        return f"{name} has no loss_function ({exc})"
    if loss_fn is not ForCausalLMLoss:
        return f"{name}.loss_function is {getattr(loss_fn, '__name__', loss_fn)}, not ForCausalLMLoss"
    return None


def fused_cross_entropy_enabled(model: nn.Module) -> bool:
    """Whether ``model``'s forward is the fused one."""
    return _ATTR in vars(model)


def enable_fused_cross_entropy(model: nn.Module, chunk_rows: int | None = None) -> bool:
    """Patch ``model.forward`` (this instance) to compute the loss with the chunked fused linear
    cross-entropy when labels are given. Returns True if patched (or already was), False -- model
    untouched, reason logged -- when not applicable. See the module docstring."""
    if fused_cross_entropy_enabled(model):
        return True
    reason = why_not_applicable(model)
    if reason is not None:
        logger.warning("fused cross-entropy not enabled (transformers' loss is used): %s", reason)
        return False
    previous = vars(model).get("forward")  # an instance forward someone set before us, else None
    object.__setattr__(model, _ATTR, {"previous_forward": previous, "chunk_rows": chunk_rows})
    object.__setattr__(model, "forward", types.MethodType(_fused_forward, model))
    logger.info(
        "fused cross-entropy enabled on %s (vocab %d): no [tokens, vocab] logits in training",
        type(model).__name__,
        cast(Any, model).lm_head.weight.shape[0],
    )
    return True


def disable_fused_cross_entropy(model: nn.Module) -> bool:
    """Undo :func:`enable_fused_cross_entropy`; returns whether it was enabled."""
    state = vars(model).get(_ATTR)
    if state is None:
        return False
    del model.__dict__[_ATTR]
    if state["previous_forward"] is not None:
        object.__setattr__(model, "forward", state["previous_forward"])
    else:
        model.__dict__.pop("forward", None)
    return True


def _original_forward(self):
    state = vars(self).get(_ATTR) or {}
    previous = state.get("previous_forward")
    return previous if previous is not None else types.MethodType(type(self).forward, self)


def _head_is_materialised(weight: torch.Tensor, hidden_size: int) -> bool:
    # ZeRO-3 partitions parameters (ds_id, numel 0 outside the module's own forward hooks);
    # FSDP flat / sharded parameters likewise do not have the [V, H] shape here
    return not hasattr(weight, "ds_id") and weight.dim() == 2 and weight.shape[1] == hidden_size


def _fused_forward(
    self,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.LongTensor | None = None,
    past_key_values: Any = None,
    inputs_embeds: torch.Tensor | None = None,
    labels: torch.LongTensor | None = None,
    use_cache: bool | None = None,
    logits_to_keep: Any = 0,
    **kwargs: Any,
):
    """``*ForCausalLM.forward`` with the loss from the fused linear cross-entropy (``logits=None``)
    when ``labels`` are given (``shift_labels`` then replaces their shift, as in transformers); the
    original forward otherwise."""
    shift_labels = kwargs.get("shift_labels")
    plain_ltk = isinstance(logits_to_keep, int) and not isinstance(logits_to_keep, bool) and logits_to_keep == 0
    weight = self.lm_head.weight
    if labels is None or not plain_ltk or not _head_is_materialised(weight, self.config.hidden_size):
        CALLS["original"] += 1
        return _original_forward(self)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )

    from transformers.modeling_outputs import CausalLMOutputWithPast

    from npu_ft.ops.linear_cross_entropy import linear_cross_entropy

    CALLS["fused"] += 1

    return_dict = kwargs.pop("return_dict", None)
    if return_dict is None:
        return_dict = getattr(self.config, "return_dict", True)
    # as transformers: every kwarg goes to the base model (it ignores the loss ones) and to the loss
    outputs = self.model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        past_key_values=past_key_values,
        inputs_embeds=inputs_embeds,
        use_cache=use_cache,
        **kwargs,
    )
    hidden = outputs.last_hidden_state  # [B, S, H]
    ignore_index = kwargs.get("ignore_index", -100)
    if shift_labels is None:  # ForCausalLMLoss: tokens < n predict n
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    shift_labels = shift_labels.reshape(-1).to(hidden.device)
    state = vars(self).get(_ATTR) or {}
    loss = linear_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        weight,
        shift_labels,
        bias=self.lm_head.bias,
        ignore_index=ignore_index,
        num_items_in_batch=kwargs.get("num_items_in_batch"),
        chunk_rows=state.get("chunk_rows"),
    )
    out = CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=outputs.past_key_values,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
    )
    return out if return_dict else out.to_tuple()
