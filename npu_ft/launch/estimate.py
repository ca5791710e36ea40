"""Memory per card for a Qwen fine-tuning recipe, and how many 910B (64 GB) cards it needs.

The estimate adds four parts, each by method and ZeRO stage (N = data-parallel world size,
P = all parameters, P_lin = parameters of the decoder linears, P_lora = LoRA parameters):

========================  =====================================================================
part                      bytes on one card
========================  =====================================================================
weights                   full: 4P (LLaMA-Factory casts trainable weights to fp32) without
                          DeepSpeed, 2P (bf16) with it; lora: 2P base + 4 P_lora; qlora:
                          0.516 P_lin (NF4 + double-quantized absmax) + 2 (P - P_lin) + 4 P_lora.
                          ZeRO-3 divides the bf16 weights by N; ZeRO-3 parameter offload keeps
                          only the layers being gathered (2 decoder layers + the embeddings).
gradients                 one per trainable weight: 4 bytes (fp32 trainable weights), 2 bytes
                          (DeepSpeed bf16); ZeRO-2/3 divide them by N. Full fine-tuning: two
                          [vocab, hidden] buffers more (the head's and the embedding's gradient
                          are built apart before autograd adds them to .grad).
optimizer states          AdamW: 8 bytes (two fp32 moments) per trainable weight, + 4 (fp32
                          master copy) under DeepSpeed bf16; ZeRO-1/2/3 divide by N; optimizer
                          offload moves them to the host (0 on the card).
activations               per micro-batch of T = batch x cutoff tokens, e bytes per element
                          (2 for bf16 autocast, 4 for fp32): each decoder layer saves
                          e T (4 h + 2 q + 2 kv + 3 i + 7 r) with npu-ft's fused block ops
                          (:func:`layer_bytes` lists the tensors, counted from the code), more
                          with transformers' modules (silu(gate), fp32 norm copies); with
                          gradient checkpointing only its input e T h is kept, plus one layer
                          recomputed; the final norm (full fine-tuning); and one layer's worth
                          more for the gradients of the layer being back-propagated. The loss: with
                          npu-ft's fused linear cross-entropy (``fused_cross_entropy``, the
                          default) one chunk of fp32 logits, min(T, c) V (4 + e for e < 4) bytes
                          (c = rows per chunk), plus the saved fp32 [T, h] input gradient,
                          made in the forward: the chunk and the backward's working layers are
                          never alive together (the larger of the two counts); with
                          transformers' loss, alive through the backward, the logits, their
                          fp32 upcast, log-softmax and its gradient: T V (16 + 2e for e < 4).
========================  =====================================================================

plus ``overhead_gib`` per card for the runtime (CANN/HCCL workspaces and communication buffers:
3 GiB by default on NPU, an assumption to check with ``npu-smi`` on the first run) and DeepSpeed's
ZeRO-2 buckets (allgather + reduce, 2 x 5e8 elements x 2 bytes). The CPU check
(``tests/launch/test_estimate.py``) runs small shapes in a fresh process each and compares the
training-phase peak (weights excluded, they are exact) with :meth:`Estimate.train_bytes` plus
``CPU_TRAIN_RUNTIME_BYTES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable

__all__ = [
    "CARD_GIB",
    "CPU_TRAIN_RUNTIME_BYTES",
    "LINEAR_NAMES",
    "MODELS",
    "Estimate",
    "ModelShape",
    "adapted_linears",
    "cards_needed",
    "estimate",
]

GIB = 1024 ** 3
#: memory of one Ascend 910B card (910B1/B2/B3: 64 GB HBM), and the share usable by training
CARD_GIB = 64.0
USABLE_FRACTION = 0.9
#: bytes per parameter of an NF4 linear weight: 4 bits + absmax as uint8 per 64 (double
#: quantization) + fp32 per 256 blocks of absmax (bitsandbytes' format)
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
#: the anonymous memory a CPU training phase adds besides the four parts and keeps after the first
#: step (autograd engine, oneDNN primitive caches, the small-object heap): 11-15 MiB on the shapes of
#: the CPU check, measured with glibc's mmap threshold fixed (freed tensors leave the resident set) and
#: without the library pages the phase maps (tests/launch/test_estimate.py, docs/recipes.md)
CPU_TRAIN_RUNTIME_BYTES = 12 * 1024 ** 2
#: the adapter methods of ``method`` lora / qlora (:func:`estimate`'s ``adapter``)
ADAPTERS = ("lora", "dora", "lora_fa", "vera")
#: optimizer state bytes per trainable element: AdamW's two fp32 moments, or two 8-bit blockwise codes
#: with an fp32 absmax per 256 (bitsandbytes' layout, npu_ft.optim.adamw8bit)
ADAMW_STATE_BYTES = {32: 8.0, 8: 2 * (1 + 4 / 256)}
#: ``optim`` names :func:`estimate` knows: (state bits, states paged to host memory)
OPTIMS = {"adamw_torch": (32, False), "adamw_8bit": (8, False), "adamw_bnb_8bit": (8, False),
          "paged_adamw_8bit": (8, True), "paged_adamw_32bit": (32, True)}


#: the decoder linears of a Qwen layer, in the order of :meth:`ModelShape.linear_shapes`
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def adapted_linears(lora_target: Iterable[str]) -> tuple[str, ...]:
    """The :data:`LINEAR_NAMES` a recipe's ``lora_target`` adapts (PEFT's rule: the name or a
    ``.``-separated suffix of it; ``all``: every one)."""
    names = list(lora_target)
    if names == ["all"]:
        return LINEAR_NAMES
    return tuple(n for n in LINEAR_NAMES if any(t == n or t.endswith("." + n) for t in names))


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Architecture numbers from a Qwen ``config.json``."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int | None = None
    qkv_bias: bool = True  # Qwen2/2.5: bias on q/k/v; Qwen3: none, but q/k RMSNorm
    qk_norm: bool = False

    @property
    def hd(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def q_dim(self) -> int:
        return self.heads * self.hd

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hd

    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of the seven linears of one decoder layer, in :data:`LINEAR_NAMES` order."""
        h, i = self.hidden, self.intermediate
        return [(h, self.q_dim), (h, self.kv_dim), (h, self.kv_dim), (self.q_dim, h), (h, i), (h, i), (i, h)]

    def adapted_shapes(self, targets: Collection[str] | None = None) -> list[tuple[int, int]]:
        """(in, out) of the linears of one decoder layer that carry an adapter: those of ``targets``
        (names of :data:`LINEAR_NAMES`), all seven when None."""
        return [s for n, s in zip(LINEAR_NAMES, self.linear_shapes(), strict=True) if targets is None or n in targets]

    @property
    def linear_params(self) -> int:
        """Weights of all decoder linears (what QLoRA quantizes and LoRA 'all' adapts)."""
        return self.layers * sum(a * b for a, b in self.linear_shapes())

    @property
    def params(self) -> int:
        h = self.hidden
        per_layer = sum(a * b for a, b in self.linear_shapes()) + 2 * h
        if self.qkv_bias:
            per_layer += self.q_dim + 2 * self.kv_dim
        if self.qk_norm:
            per_layer += 2 * self.hd
        embed = self.vocab * h * (1 if self.tied else 2)
        return self.layers * per_layer + embed + h

    def lora_params(self, rank: int, targets: Collection[str] | None = None) -> int:
        """LoRA's A and B over every layer's adapted linears (:meth:`adapted_shapes`)."""
        return self.layers * sum(rank * (a + b) for a, b in self.adapted_shapes(targets))

    def layer_params(self) -> int:
        return self.params // max(self.layers, 1)

    @classmethod
    def from_config(cls, cfg, name: str = "model") -> ModelShape:
        """The shape of a transformers Qwen2/Qwen3 config (or any object with its attributes)."""
        qwen3 = getattr(cfg, "model_type", "") == "qwen3"
        return cls(name, int(cfg.hidden_size), int(cfg.intermediate_size), int(cfg.num_hidden_layers),
                   int(cfg.num_attention_heads), int(cfg.num_key_value_heads), int(cfg.vocab_size),
                   bool(getattr(cfg, "tie_word_embeddings", True)), head_dim=getattr(cfg, "head_dim", None),
                   qkv_bias=not qwen3, qk_norm=qwen3)


def _qwen2(name, h, i, layers, heads, kv, vocab, tied):
    return ModelShape(name, h, i, layers, heads, kv, vocab, tied)


def _qwen3(name, h, i, layers, heads, kv, vocab, tied):
    return ModelShape(name, h, i, layers, heads, kv, vocab, tied, head_dim=128, qkv_bias=False, qk_norm=True)


#: the released models' shapes (their config.json); parameter counts are checked in the tests
MODELS: dict[str, ModelShape] = {m.name: m for m in (
    _qwen2("qwen2.5-0.5b", 896, 4864, 24, 14, 2, 151936, True),
    _qwen2("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, True),
    _qwen2("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, False),
    _qwen2("qwen2.5-14b", 5120, 13824, 48, 40, 8, 152064, False),
    _qwen2("qwen2.5-32b", 5120, 27648, 64, 40, 8, 152064, False),
    _qwen2("qwen2.5-72b", 8192, 29568, 80, 64, 8, 152064, False),
    _qwen3("qwen3-0.6b", 1024, 3072, 28, 16, 8, 151936, True),
    _qwen3("qwen3-8b", 4096, 12288, 36, 32, 8, 151936, False),
    _qwen3("qwen3-32b", 5120, 25600, 64, 64, 8, 151936, False),
)}


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Bytes on one card, by part."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float
    #: of ``weights``: the trainable LoRA adapters (fp32)
    adapters: float = 0.0
    #: of ``activations``: what the loss keeps (fused chunk, or the whole logits)
    loss: float = 0.0

    @property
    def train_bytes(self) -> float:
        """Everything but the weights (what training adds on top of the loaded model)."""
        return self.gradients + self.optimizer + self.activations

    @property
    def total(self) -> float:
        return self.weights + self.train_bytes + self.overhead

    @property
    def total_gib(self) -> float:
        return self.total / GIB

    def parts_gib(self) -> dict[str, float]:
        return {k: getattr(self, k) / GIB for k in ("weights", "gradients", "optimizer", "activations",
                                                    "overhead")} | {"total": self.total_gib}


def norm_bytes(width: int, rows: int, elem: int, trains_weight: bool, fused_kernels: bool = True) -> float:
    """What one RMSNorm over ``rows`` rows of ``width`` elements saves for backward (part of
    :func:`layer_bytes`): its input (by reference; with transformers' module and 16-bit activations
    its fp32 upcast instead, 4 bytes per element), 1/rms per row (fp32), and with transformers' module
    when its weight trains the normalised tensor the weight's gradient needs (npu-ft's ``rms_norm``
    recomputes it from the input and 1/rms)."""
    per_row = 4 + (4 if not fused_kernels and elem < 4 else elem) * width
    if trains_weight and not fused_kernels:
        per_row += elem * width
    return rows * per_row


def layer_bytes(shape: ModelShape, tokens: int, elem: int, lora_rank: int | None = None,
                fused_kernels: bool = True, adapter: str = "lora", targets: Collection[str] | None = None) -> float:
    """What one decoder layer saves for backward when it is not checkpointed (part of
    :func:`activation_bytes`), per micro-batch of ``tokens`` tokens. ``lora_rank=None``: full
    fine-tuning (the norm weights train).

    Per token (h hidden, q = heads x head_dim, kv = KV heads x head_dim, i intermediate, r LoRA
    rank; e bytes per element), counted with ``torch.autograd.graph.saved_tensors_hooks`` on the
    bench's model (``tests/launch/test_estimate.py::test_layer_bytes_counts_saved_tensors``):

    ===============================  ==============================================================
    saved by                         tensors
    ===============================  ==============================================================
    ``input_layernorm``              :func:`norm_bytes`: the layer input h, 1/rms
    q/k/v_proj                       their shared input (the norm's output) h; LoRA: x A^T, 3 r
    RoPE                             cos/sin only (shared by all layers, not counted)
    attention (sdpa)                 q and k, v after RoPE: q + 2 kv (GQA runs in the kernel,
                                     ``enable_gqa``: no repeat_kv copies without a padding mask);
                                     its output q (also o_proj's input: the same storage);
                                     logsumexp, fp32 per head: 4 heads bytes
    o_proj                           LoRA: r
    ``post_attention_layernorm``     :func:`norm_bytes` of the residual sum h (npu-ft fuses the
                                     add into the norm and keeps the sum)
    gate/up_proj                     their shared input h; LoRA: 2 r
    SwiGLU                           gate and up, 2 i; transformers' ``act_fn(gate) * up`` also
                                     silu(gate), i
    down_proj                        its input (the product) i; LoRA: r
    ===============================  ==============================================================

    In all e (4 h + 2 q + 2 kv + 3 i + 7 r) + 4 (heads + 2) bytes with the fused ops and LoRA; + e i
    (silu(gate)) with transformers' modules, which in full fine-tuning also keep each norm's
    normalised tensor (+ 2 e h) and with 16-bit activations each norm's fp32 input (+ 2 (4 - e) h).
    Qwen3's q/k norms add :func:`norm_bytes` of q and kv (per head rows). QLoRA's NF4 linears also
    keep their dequantized absmax (weight-sized, added in :func:`estimate`).

    ``adapter`` (with ``lora_rank``; no dropout): ``dora`` keeps each linear's output beside what LoRA
    keeps (the outputs of gate / up are SwiGLU's, v is attention's: + e (q + 2 kv + 2 h) per token) and
    each linear's fp32 weight norm (4 x the outputs per layer); ``lora_fa`` and ``vera`` (A frozen: the
    fused op keeps x A^T, never x) drop what only the linears kept: the two norm outputs and the
    product, - e (2 h + i); VeRA's scaled B (lambda_b B lambda_d and B lambda_d, fp32 [out, r] per
    linear) adds 8 r x the outputs per layer.

    ``targets`` (LoRA family; :data:`LINEAR_NAMES`, None = all seven): only the adapted linears keep
    their input (a frozen linear's backward needs its weight, not its input: the norm output of q/k/v
    is kept when one of them is adapted, gate/up's likewise, the product for down_proj), their
    ``x A^T`` (r each), DoRA's outputs (q: q, k and v: kv, o and down: h; gate's and up's are SwiGLU's)
    and weight norms, VeRA's scaled B.
    """
    h, q, kv, i = shape.hidden, shape.q_dim, shape.kv_dim, shape.intermediate
    trains_norm = not lora_rank
    adapted = set(LINEAR_NAMES if targets is None or not lora_rank else targets) & set(LINEAR_NAMES)
    # attention's q, k, v (after RoPE) and output, SwiGLU's gate and up, attention's fp32 logsumexp
    per_token = elem * (2 * q + 2 * kv + 2 * i) + 4 * shape.heads
    if not lora_rank or adapter in ("lora", "dora"):  # the linears that keep their input x
        per_token += elem * linear_input_elems(shape, adapted)
    outputs = sum(out for _, out in shape.adapted_shapes(adapted))
    per_layer = 0.0
    if lora_rank:
        per_token += elem * lora_rank * len(adapted)
        if adapter == "dora":
            kept_output = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": h, "down_proj": h}
            per_token += elem * sum(kept_output.get(n, 0) for n in adapted)
            per_layer += 4 * outputs
        elif adapter == "vera":
            per_layer += 2 * 4 * lora_rank * outputs
    if not fused_kernels:
        per_token += elem * i  # silu(gate)
    body = tokens * per_token + per_layer + 2 * norm_bytes(h, tokens, elem, trains_norm, fused_kernels)
    if shape.qk_norm:
        body += norm_bytes(shape.hd, tokens * shape.heads, elem, trains_norm, fused_kernels)
        body += norm_bytes(shape.hd, tokens * shape.kv_heads, elem, trains_norm, fused_kernels)
    return body


def linear_input_elems(shape: ModelShape, names: Collection[str]) -> int:
    """Elements per token of the distinct inputs of the named decoder linears: q/k/v share the first
    norm's output (h), gate/up the second's (h), down_proj takes the SwiGLU product (i); o_proj's input
    is attention's output, kept by attention anyway (not counted)."""
    names = set(names)
    return (shape.hidden * bool(names & {"q_proj", "k_proj", "v_proj"})
            + shape.hidden * bool(names & {"gate_proj", "up_proj"}) + shape.intermediate * ("down_proj" in names))


def layer_working_bytes(shape: ModelShape, tokens: int, elem: int, lora_rank: int | None = None,
                        fused_kernels: bool = True, targets: Collection[str] | None = None) -> float:
    """Every tensor one decoder layer's forward creates, saved for backward or not (part of
    :func:`activation_bytes`): what the layer being recomputed under checkpointing and the layer being
    back-propagated hold at once, per micro-batch of ``tokens`` tokens.

    Per token, in elements: its input, the first norm's output, q / k / v and q / k after RoPE, the
    attention output, o_proj's output, the residual sum, the second norm's output, gate, up, their
    product, down_proj's output and the second residual sum: 7 h + 3 q + 3 kv + 3 i, + r for LoRA's
    ``x A^T`` per adapted linear (``targets``, :func:`layer_bytes`); transformers' unfused modules
    also make what they keep beyond the fused ops (:func:`layer_bytes` with and without
    ``fused_kernels``: ``silu(gate)``, the norms' copies).
    :func:`layer_bytes` is the subset autograd keeps; the difference is what a layer's forward frees
    again at once, which a CPU allocator keeps mapped while the backward's working set is live.
    """
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    adapters = len(shape.adapted_shapes(targets)) * lora_rank if lora_rank else 0
    per_token = 7 * h + 3 * shape.q_dim + 3 * kv + 3 * i + adapters
    working = float(elem * tokens * per_token)
    if not fused_kernels:
        working += (layer_bytes(shape, tokens, elem, lora_rank, False, targets=targets)
                    - layer_bytes(shape, tokens, elem, lora_rank, targets=targets))
    return working


def stored_layer_bytes(shape: ModelShape, tokens: int, elem: int, gradient_checkpointing: bool,
                       lora_rank: int | None = None, checkpoint_policy: str = "full",
                       fused_kernels: bool = True, adapter: str = "lora",
                       targets: Collection[str] | None = None) -> float:
    """What all decoder layers keep between their forward and their backward (part of
    :func:`activation_bytes`): :func:`layer_bytes` each without checkpointing; with it, each layer's
    input (``full``), plus its GEMM outputs (q, k, v, o, gate, up, down) and attention output
    (``selective``)."""
    if not gradient_checkpointing:
        return shape.layers * layer_bytes(shape, tokens, elem, lora_rank, fused_kernels, adapter, targets)
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_dim
    kept = h
    if checkpoint_policy == "selective":
        kept += 2 * shape.q_dim + 2 * kv + 2 * h + 2 * i
    return float(shape.layers * elem * tokens * kept)


def activation_bytes(shape: ModelShape, tokens: int, elem: int, gradient_checkpointing: bool,
                     lora_rank: int | None = None, fused_cross_entropy: bool = True,
                     loss_chunk_rows: int | None = None, checkpoint_policy: str = "full",
                     fused_kernels: bool = True, adapter: str = "lora",
                     targets: Collection[str] | None = None) -> float:
    """Saved activations of one micro-batch of ``tokens`` tokens (see the module docstring).

    Each layer that is not checkpointed keeps :func:`layer_bytes` (``fused_kernels``: npu-ft's fused
    RMSNorm / RoPE / SwiGLU ops, the default of ``npu-ft train``, or transformers' modules); the layer
    being recomputed and the one being back-propagated hold :func:`layer_working_bytes` each.

    ``checkpoint_policy="selective"`` (:mod:`npu_ft.modules.checkpointing`): each checkpointed layer
    also keeps its GEMM outputs (q, k, v, o, gate, up, down) and its attention output (the same with
    or without the fused ops: it reruns them).

    ``loss_chunk_rows``: rows per chunk of the fused loss (default: its accelerator default for
    this vocabulary, ``npu_ft.ops.linear_cross_entropy.default_chunk_rows``)."""
    h = shape.hidden
    working = layer_working_bytes(shape, tokens, elem, lora_rank, fused_kernels, targets)
    body = stored_layer_bytes(shape, tokens, elem, gradient_checkpointing, lora_rank, checkpoint_policy,
                              fused_kernels, adapter, targets)
    if not lora_rank:
        # the final norm keeps the last layer's output (with LoRA it stands in for the first layer's
        # input, which nobody keeps: the frozen embedding's output needs no gradient)
        body += norm_bytes(h, tokens, elem, True, fused_kernels)
    # the layer being back-propagated: the gradients of its activations, about one layer's forward
    # worth; with checkpointing also the layer being recomputed
    backward = working * (2 if gradient_checkpointing else 1)
    loss = loss_bytes(shape, tokens, elem, fused_cross_entropy, loss_chunk_rows)
    if not fused_cross_entropy:  # the logits and their gradient live through the whole backward
        return body + backward + loss
    # the fused loss makes its logits chunks during the forward and keeps only the [T, h] input
    # gradient: its chunk and the backward's working set are never alive at the same time
    return body + max(loss, backward + loss_input_grad_bytes(shape, tokens))


def loss_bytes(shape: ModelShape, tokens: int, elem: int, fused_cross_entropy: bool = True,
               loss_chunk_rows: int | None = None) -> float:
    """What the loss keeps (part of :func:`activation_bytes`): one fp32 logits chunk plus the saved
    input gradient with the fused linear cross-entropy, the whole logits and their copies without."""
    if fused_cross_entropy:
        if loss_chunk_rows is None:
            from npu_ft.ops.linear_cross_entropy import default_chunk_rows

            loss_chunk_rows = default_chunk_rows(shape.vocab)
        return (min(tokens, loss_chunk_rows) * shape.vocab * (4 + (elem if elem < 4 else 0))
                + loss_input_grad_bytes(shape, tokens))
    return tokens * shape.vocab * (16 + (2 * elem if elem < 4 else 0))


def loss_input_grad_bytes(shape: ModelShape, tokens: int) -> float:
    """The fp32 ``[tokens, hidden]`` input gradient the fused linear cross-entropy makes in the forward
    and keeps for the backward (part of :func:`loss_bytes`)."""
    return 4.0 * tokens * shape.hidden


def estimate(shape: ModelShape | str, method: str, *, zero: int = 0, offload_optimizer: bool = False,
             offload_param: bool = False, world_size: int = 1, batch: int = 1, seq: int = 2048,
             gradient_checkpointing: bool = True, lora_rank: int = 16, dtype: str = "bf16",
             overhead_gib: float | None = None, fused_cross_entropy: bool = True,
             checkpoint_policy: str = "full",
             loss_chunk_rows: int | None = None, fused_kernels: bool = True, adapter: str = "lora",
             optim: str = "adamw_torch", targets: Collection[str] | None = None) -> Estimate:
    """Per-card memory of ``method`` (lora | qlora | full) on ``world_size`` data-parallel cards.

    ``adapter`` (lora / qlora; :data:`ADAPTERS`): what trains and what the adapted linears keep for
    backward (:func:`layer_bytes`). DoRA trains LoRA's A and B and one magnitude per output feature;
    LoRA-FA trains B only (A is a frozen fp32 weight); VeRA trains two vectors per linear (lambda_b per
    output, lambda_d per rank) over frozen fp32 projections shared by all layers (A [r, largest in],
    B [largest out, r]); ``lora_rank`` is VeRA's rank. ``optim`` (:data:`OPTIMS`): AdamW's fp32
    moments, or 8-bit blockwise ones (every trainable tensor of 4096 elements or more but the
    embedding, which keeps fp32 states as transformers' Trainer does), paged ones in host memory (the
    card holds the largest tensor's states while it is updated).

    ``fused_cross_entropy`` / ``loss_chunk_rows``: the loss as npu-ft trains by default (chunked,
    no full logits) or transformers' loss (False); ``fused_kernels``: npu-ft's fused decoder-block
    ops (the default) or transformers' modules (False); see :func:`activation_bytes`. ``targets``:
    the adapted decoder linears of the LoRA family (names of :data:`LINEAR_NAMES`; None = all seven,
    ``lora_target: all``), see :func:`layer_bytes`.

    ``dtype="fp32"`` describes a plain fp32 run (weights, gradients and activations in fp32, no
    mixed precision), which is what the CPU check measures.
    """
    if isinstance(shape, str):
        shape = MODELS[shape]
    if method not in ("lora", "qlora", "full"):
        raise ValueError(f"method must be lora, qlora or full, got {method!r}")
    if adapter not in ADAPTERS or (adapter != "lora" and method == "full"):
        raise ValueError(f"adapter must be one of {', '.join(ADAPTERS)} with lora or qlora, got {adapter!r} "
                         f"with {method}")
    if optim not in OPTIMS:
        raise ValueError(f"optim must be one of {', '.join(OPTIMS)}, got {optim!r}")
    if zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be 0..3, got {zero}")
    if targets is not None and (not set(targets) <= set(LINEAR_NAMES) or not targets):
        raise ValueError(f"targets must be some of {', '.join(LINEAR_NAMES)}, got {sorted(targets)}")
    if method == "qlora" and zero == 3:
        raise ValueError("QLoRA with ZeRO-3 is not supported")
    n = max(int(world_size), 1)
    ds = zero > 0
    fp32 = dtype == "fp32"
    elem = 4 if fp32 else 2
    half = 4 if fp32 else 2  # bytes of a frozen / DeepSpeed-held weight
    p = shape.params
    bits, paged = OPTIMS[optim]
    master = 0.0  # DeepSpeed's fp32 master weights (with the optimizer, on the card)
    if method == "full":
        trainable = p
        frozen_bytes = 0.0
        embedding = shape.vocab * shape.hidden  # fp32 states with 8-bit ones (transformers' rule)
        opt = ADAMW_STATE_BYTES[bits] * (p - embedding) + ADAMW_STATE_BYTES[32] * embedding
        largest_states = ADAMW_STATE_BYTES[32] * embedding  # the largest tensor
        if ds and not fp32:
            weights = 2.0 * p
            grads = 2.0 * p
            master = 4.0 * p
        else:
            weights = 4.0 * p
            grads = 4.0 * p
    else:
        trainable, frozen_adapter, largest = _adapter_params(shape, adapter, lora_rank, targets)
        if method == "qlora":
            frozen_bytes = NF4_BYTES_PER_PARAM * shape.linear_params + half * (p - shape.linear_params)
        else:
            frozen_bytes = half * p
        weights = frozen_bytes + 4.0 * (trainable + frozen_adapter)
        grads = 4.0 * trainable
        opt = ADAMW_STATE_BYTES[bits] * trainable
        largest_states = ADAMW_STATE_BYTES[bits] * largest
    if paged:  # the states live in host memory; the card holds one tensor's while it is updated
        opt = largest_states
    opt += master
    # ZeRO partitioning
    if zero >= 1:
        opt /= n
    if zero >= 2:
        grads /= n
    if zero == 3:
        weights /= n
        if offload_param:
            weights = 2 * half * shape.layer_params() + half * shape.vocab * shape.hidden
        else:  # gathered working set: ~2 layers (current + prefetch)
            weights += 2 * half * shape.layer_params()
    if offload_optimizer:
        opt = 0.0
    if method == "full":
        # the head / embedding gradient is built in a buffer of its own (the fused loss's grad_W,
        # the embedding's dense backward) before autograd adds it to .grad: two [vocab, hidden] more
        grads += 2 * (2 if ds and not fp32 else 4) * shape.vocab * shape.hidden / (n if zero >= 2 else 1)
    acts = activation_bytes(shape, batch * seq, elem, gradient_checkpointing,
                            lora_rank if method != "full" else None, fused_cross_entropy, loss_chunk_rows,
                            checkpoint_policy, fused_kernels, adapter, targets)
    if method == "full" and zero < 2:
        # back to front, each layer's weight gradients are made while its kept activations are freed:
        # at any time the decoder layers hold the gradients of the layers behind and the activations
        # of those ahead, so the two overlap by the smaller of them (not with sharded gradients)
        layer_grads = (2 if ds and not fp32 else 4) * shape.layers * shape.layer_params()
        acts -= min(layer_grads, stored_layer_bytes(shape, batch * seq, elem, gradient_checkpointing, None,
                                                    checkpoint_policy, fused_kernels))
    if method == "qlora":  # one dequantized weight at a time
        acts += half * max(a * b for a, b in shape.linear_shapes())
        # each NF4 linear keeps its dequantized fp32 absmax (one per 64 weights) for backward, in every
        # layer that is not checkpointed (with checkpointing: the one recomputed)
        acts += (1 if gradient_checkpointing else shape.layers) * 4 * shape.linear_params / shape.layers / 64
    if overhead_gib is None:
        overhead_gib = 0.0 if fp32 else 3.0
    overhead = overhead_gib * GIB
    if zero == 2 and not fp32:
        overhead += 2 * 5e8 * 2
    adapters = 0.0 if method == "full" else 4.0 * trainable
    if zero == 3:
        adapters /= n
    loss = loss_bytes(shape, batch * seq, elem, fused_cross_entropy, loss_chunk_rows)
    return Estimate(weights=weights, gradients=grads, optimizer=opt, activations=acts, overhead=overhead,
                    adapters=adapters, loss=loss)


def _adapter_params(shape: ModelShape, adapter: str, rank: int,
                    targets: Collection[str] | None = None) -> tuple[int, int, int]:
    """(trainable, frozen fp32 adapter elements, largest trainable tensor) of ``adapter`` at ``rank``
    on the adapted decoder linears (``targets``, None = all seven)."""
    linears = shape.adapted_shapes(targets)
    if adapter == "vera":
        trainable = shape.layers * sum(out + rank for _, out in linears)
        projections = rank * (max(a for a, _ in linears) + max(b for _, b in linears))
        return trainable, projections, max(b for _, b in linears)
    largest = rank * max(max(a, b) for a, b in linears)
    if adapter == "lora_fa":  # B trains, A stays
        b_part = shape.layers * sum(rank * b for _, b in linears)
        return b_part, shape.lora_params(rank, targets) - b_part, largest
    magnitudes = shape.layers * sum(b for _, b in linears) if adapter == "dora" else 0
    return shape.lora_params(rank, targets) + magnitudes, 0, largest


def cards_needed(shape: ModelShape | str, method: str, *, zero: int = 0, card_gib: float = CARD_GIB,
                 usable: float = USABLE_FRACTION, candidates: Iterable[int] = (1, 2, 4, 8, 16, 32, 64, 128),
                 **kw) -> tuple[int | None, Estimate]:
    """Smallest card count (from ``candidates``) whose per-card estimate fits ``usable x card_gib``.

    Without ZeRO the per-card memory does not fall with more cards, so the answer is 1 or None.
    """
    budget = card_gib * usable * GIB
    last = None
    for n in candidates:
        est = estimate(shape, method, zero=zero, world_size=n, **kw)
        last = est
        if est.total <= budget:
            return n, est
        if zero == 0:
            break
    return None, last  # type: ignore[return-value]


def format_gib(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _main() -> None:  # pragma: no cover - convenience
    for name, shape in MODELS.items():
        print(f"{name}: {shape.params / 1e9:.2f} B params, linear {shape.linear_params / 1e9:.2f} B")


if __name__ == "__main__":  # pragma: no cover
    _main()
