"""The memory estimator: its arithmetic, its small-model shapes against npu-ft's own tiny presets,
and (slow) its predictions against measured CPU peaks of fresh processes (memory only)."""

from __future__ import annotations

import os
import statistics

import pytest

from npu_ft.launch.estimate import (
    CPU_TRAIN_RUNTIME_BYTES,
    GIB,
    MODELS,
    ModelShape,
    cards_needed,
    estimate,
    layer_bytes,
    norm_bytes,
)


def test_parts_by_method_and_zero_stage():
    m = MODELS["qwen2.5-7b"]
    p = m.params
    head = m.vocab * m.hidden  # full fine-tuning builds the head's and the embedding's gradients apart
    full = estimate(m, "full", world_size=8, seq=1024)
    assert (full.weights, full.gradients, full.optimizer) == (4 * p, 4 * p + 8 * head, 8 * p)
    z2 = estimate(m, "full", zero=2, world_size=8, seq=1024)
    assert (z2.weights, z2.gradients, z2.optimizer) == (2 * p, (2 * p + 4 * head) / 8, 12 * p / 8)
    z3 = estimate(m, "full", zero=3, world_size=8, seq=1024)
    assert z3.weights == pytest.approx(2 * p / 8 + 4 * m.layer_params())
    assert z3.gradients == pytest.approx((2 * p + 4 * head) / 8)
    off = estimate(m, "full", zero=3, world_size=8, seq=1024, offload_optimizer=True, offload_param=True)
    assert off.optimizer == 0 and off.weights < z3.weights
    lora = estimate(m, "lora", seq=1024)
    qlora = estimate(m, "qlora", seq=1024)
    assert lora.optimizer == qlora.optimizer == 8 * m.lora_params(16)
    assert qlora.weights < 0.4 * lora.weights
    assert estimate(m, "lora", seq=1024, gradient_checkpointing=False).activations > 2.5 * lora.activations
    # selective checkpointing keeps q, k, v, o, gate, up, down and the attention output per layer
    sel = estimate(m, "lora", seq=1024, checkpoint_policy="selective")
    kept = 2 * m.q_dim + 2 * m.kv_dim + 2 * m.hidden + 2 * m.intermediate
    assert sel.activations - lora.activations == pytest.approx(m.layers * 1024 * 2 * kept)
    # transformers' modules (fused_kernels=False) keep more in every layer that is not checkpointed (with
    # checkpointing: the one recomputed and the one back-propagated): silu(gate), the fp32 copies of the
    # two norms' 16-bit inputs, and in full fine-tuning the two normalised tensors the norm weights need
    h, i, t = m.hidden, m.intermediate, 1024
    per_layer = t * (2 * i + 2 * (4 - 2) * h)
    unfused = estimate(m, "lora", seq=1024, fused_kernels=False)
    assert unfused.activations - lora.activations == pytest.approx(2 * per_layer)
    assert (estimate(m, "lora", seq=1024, checkpoint_policy="selective", fused_kernels=False).activations
            - unfused.activations) == pytest.approx(m.layers * 1024 * 2 * kept)  # selective reruns the fused ops
    no_gc = estimate(m, "lora", seq=1024, gradient_checkpointing=False)
    no_gc_unfused = estimate(m, "lora", seq=1024, gradient_checkpointing=False, fused_kernels=False)
    assert no_gc_unfused.activations - no_gc.activations == pytest.approx((m.layers + 1) * per_layer)
    full_unfused = estimate(m, "full", world_size=8, seq=1024, fused_kernels=False)
    # + the final norm (outside the layers, kept in full fine-tuning): its fp32 input copy and normalised tensor
    final_norm = t * ((4 - 2) * h + 2 * h)
    assert full_unfused.activations - full.activations == pytest.approx(2 * (per_layer + t * 2 * 2 * h) + final_norm)
    fp32 = estimate(m, "lora", seq=1024, dtype="fp32")
    fp32_unfused = estimate(m, "lora", seq=1024, dtype="fp32", fused_kernels=False)
    assert fp32_unfused.activations - fp32.activations == pytest.approx(2 * t * 4 * i)  # no fp32 copies
    with pytest.raises(ValueError, match="QLoRA with ZeRO-3"):
        estimate(m, "qlora", zero=3)


# -- what a decoder layer saves, counted --------------------------------------------------------
# layer_bytes lists the tensors autograd keeps per decoder layer; here they are counted on a tiny
# Qwen2 (h, q, kv, i and r all different) with saved_tensors_hooks, built as the bench builds it.
TINY = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
            num_key_value_heads=1, vocab_size=128)
TINY_SHAPE = ModelShape("tiny-48", 48, 80, 3, 3, 1, 128, True)


def _saved_bytes(method: str, fused: bool, tokens: int, adapter: str = "lora",
                 overrides: dict = TINY, targets: str = "all") -> tuple[list[int], int]:
    """Bytes autograd saves in each decoder layer's forward and in the final norm's: distinct
    storages, no parameters or buffers, storages saved in several layers (cos/sin) left out."""
    import torch

    from npu_ft.bench.shapes import build_model
    from npu_ft.modules.fused_blocks import apply_fused_kernels
    from npu_ft.modules.inject import apply_lora, apply_qlora, apply_vera

    model = build_model("tiny", 0, torch.float32, overrides)
    flags = dict(use_dora=adapter == "dora", lora_fa=adapter == "lora_fa")
    if adapter == "vera":
        assert method == "lora"
        apply_vera(model, targets, r=4)
    elif method == "lora":
        apply_lora(model, targets, r=4, **flags)
    elif method == "qlora":
        apply_qlora(model, targets, r=4, compute_dtype=torch.float32, **flags)
    else:
        model.requires_grad_(True)
    if fused:
        assert apply_fused_kernels(model)
    frozen = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    parts = [*model.model.layers, model.model.norm]
    where: list[int | None] = [None]
    for index, part in enumerate(parts):
        part.register_forward_pre_hook(lambda _m, _a, index=index: where.__setitem__(0, index))
        part.register_forward_hook(lambda _m, _a, _o: where.__setitem__(0, None))
    saved: dict[int, tuple[set, int]] = {}

    def pack(t):
        storage = t.untyped_storage()
        owners, _ = saved.setdefault(storage.data_ptr(), (set(), storage.nbytes()))
        owners.add(where[0])
        return t

    ids = torch.randint(0, TINY["vocab_size"], (1, tokens))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)
    per_part = [0] * len(parts)
    for ptr, (owners, nbytes) in saved.items():
        if ptr not in frozen and len(owners) == 1 and None not in owners:
            per_part[owners.pop()] += nbytes
    return per_part[:-1], per_part[-1]


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_layer_bytes_counts_saved_tensors(method, fused):
    tokens = 40
    layers, final_norm = _saved_bytes(method, fused, tokens)
    rank = None if method == "full" else 4
    expected = layer_bytes(TINY_SHAPE, tokens, 4, rank, fused)
    if method == "qlora":  # the dequantized absmax of each NF4 linear (estimate() adds it per layer)
        expected += 4 * TINY_SHAPE.linear_params / TINY_SHAPE.layers / 64
    # a middle layer: what layer_bytes lists, nothing more, nothing less
    assert layers[1] == pytest.approx(expected, rel=0.01)
    # with LoRA the first layer's input is kept by nobody (frozen embedding), and the final norm keeps
    # the last layer's output: together exactly layers x layer_bytes; full fine-tuning keeps both
    extra = norm_bytes(TINY_SHAPE.hidden, tokens, 4, True, fused) if method == "full" else 0
    assert sum(layers) + final_norm == pytest.approx(TINY_SHAPE.layers * expected + extra, rel=0.01)


#: q (heads x head_dim 20 = 60) unlike h (48), so a formula that mixed them up would fail
TINY_HD = dict(TINY, head_dim=20)
TINY_HD_SHAPE = ModelShape("tiny-48-hd20", 48, 80, 3, 3, 1, 128, True, head_dim=20)


@pytest.mark.parametrize("method, adapter", [("lora", "dora"), ("qlora", "dora"), ("lora", "lora_fa"),
                                             ("qlora", "lora_fa"), ("lora", "vera"), ("lora", "lora")])
def test_layer_bytes_counts_saved_tensors_of_each_adapter(method, adapter):
    tokens = 40
    layers, _ = _saved_bytes(method, True, tokens, adapter, TINY_HD)
    expected = layer_bytes(TINY_HD_SHAPE, tokens, 4, 4, True, adapter)
    if method == "qlora":  # the dequantized absmax of each NF4 linear (estimate() adds it per layer)
        expected += 4 * TINY_HD_SHAPE.linear_params / TINY_HD_SHAPE.layers / 64
    assert layers[1] == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("method, adapter, targets", [
    ("lora", "lora", "q_proj,v_proj"), ("lora", "dora", "k_proj,o_proj,down_proj"), ("lora", "lora", "gate_proj"),
    ("lora", "vera", "up_proj,down_proj"), ("lora", "lora_fa", "q_proj,o_proj"), ("qlora", "lora", "q_proj,v_proj"),
    ("qlora", "dora", "v_proj,up_proj")])
def test_layer_bytes_counts_saved_tensors_of_some_targets(method, adapter, targets):
    """With adapters on some linears only (lora_target), the frozen ones keep no input for backward."""
    tokens = 40
    layers, _ = _saved_bytes(method, True, tokens, adapter, TINY_HD, targets)
    names = tuple(targets.split(","))
    expected = layer_bytes(TINY_HD_SHAPE, tokens, 4, 4, True, adapter, names)
    if method == "qlora":  # the dequantized absmax of each NF4 linear; one without an adapter keeps no input
        expected += 4 * TINY_HD_SHAPE.linear_params / TINY_HD_SHAPE.layers / 64
    assert layers[1] == pytest.approx(expected, rel=0.01)
    if method == "lora":  # fewer adapters keep less than all seven
        assert expected < layer_bytes(TINY_HD_SHAPE, tokens, 4, 4, True, adapter)


def test_adapter_and_optimizer_states():
    m = MODELS["qwen2.5-0.5b"]
    kw = dict(seq=1024, dtype="fp32", lora_rank=16)
    lora, dora, fa, vera = (estimate(m, "lora", adapter=a, **kw) for a in ("lora", "dora", "lora_fa", "vera"))
    outputs = m.layers * sum(out for _, out in m.linear_shapes())
    assert dora.gradients - lora.gradients == 4 * outputs  # one magnitude per output feature
    assert fa.gradients == 4 * 16 * outputs and fa.weights == lora.weights  # B trains; A frozen, still there
    assert vera.gradients == 4 * (outputs + m.layers * 7 * 16)
    # without checkpointing every layer keeps what its adapted linears need
    lora, dora, fa = (estimate(m, "lora", adapter=a, gradient_checkpointing=False, **kw).activations
                      for a in ("lora", "dora", "lora_fa"))
    assert fa < lora < dora
    full32, full8 = (estimate(m, "full", optim=o, **kw) for o in ("adamw_torch", "adamw_8bit"))
    embedding = m.vocab * m.hidden  # keeps fp32 states
    assert full8.optimizer == pytest.approx(2 * (1 + 4 / 256) * (m.params - embedding) + 8 * embedding)
    assert 0.25 < full8.optimizer / full32.optimizer < 0.5
    paged = estimate(m, "full", optim="paged_adamw_8bit", **kw)
    assert paged.optimizer == pytest.approx(8 * embedding)  # the largest tensor's states, while updated
    with pytest.raises(ValueError, match="adapter"):
        estimate(m, "full", adapter="dora")
    with pytest.raises(ValueError, match="optim"):
        estimate(m, "lora", optim="sgd")


def test_fused_loss_chunk_and_backward_are_not_summed():
    """The fused loss makes its logits chunks in the forward and keeps only the [T, h] input gradient,
    so a chunk smaller than the backward's working layers adds nothing, a larger one its excess;
    transformers' loss keeps its logits through the backward and always adds them."""
    m = MODELS["qwen2.5-0.5b"]

    def acts(rows, fused=True):
        return estimate(m, "lora", seq=1024, dtype="fp32", loss_chunk_rows=rows, fused_cross_entropy=fused,
                        checkpoint_policy="full").activations

    chunk_row = m.vocab * 4  # one fp32 logits row
    assert acts(8) == acts(16)  # both chunks fit under the backward's working set
    assert acts(1024) - acts(512) == pytest.approx(512 * chunk_row)  # both above it: the excess grows
    assert acts(1024, fused=False) > acts(1024) + 1024 * chunk_row


def test_cards_needed():
    n, est = cards_needed("qwen2.5-72b", "full", zero=3, seq=2048)
    assert n == 32 and est.total <= 0.9 * 64 * GIB
    assert cards_needed("qwen2.5-72b", "lora", zero=0)[0] is None  # 145 GB of bf16 weights on one card
    assert cards_needed("qwen2.5-0.5b", "lora")[0] == 1


# -- measured on CPU ---------------------------------------------------------------------------
# The estimator's CPU terms (the 32 MiB runtime, the backward working layer, the full fine-tuning
# gradient buffers) were set from a 3-layer hidden-384 shape (docs/recipes.md); it is checked here on
# a shape and settings it was not tuned on: 4 layers, hidden 320, 5 heads / 1 KV head, vocabulary 10000.
OVERRIDES = dict(hidden_size=320, intermediate_size=896, num_hidden_layers=4, num_attention_heads=5,
                 num_key_value_heads=1, vocab_size=10000)
SHAPE = ModelShape("check-320", 320, 896, 4, 5, 1, 10000, True)
#: every prediction within +-15 % of the measured training increment (the issue's requirement)
BAND = (0.85, 1.15)
#: fresh processes per configuration (the median is checked); one suffices since the check fixes
#: glibc's mmap threshold (the same case then measures the same peak to 0.3 MiB in every process)
REPEATS = 1
#: methods x checkpointing policies x sequence lengths (x micro-batch)
CONFIGS = [("lora", "off", 384, 2), ("lora", "full", 640, 1), ("lora", "selective", 256, 2),
           ("lora", "selective", 896, 1), ("qlora", "full", 512, 2), ("qlora", "selective", 640, 1),
           ("qlora", "off", 256, 1), ("full", "full", 384, 1), ("full", "selective", 256, 2)]
#: members of the LoRA family (bench case setting ``adapter``), rank 8 (VeRA: the bench's 256)
ADAPTER_CONFIGS = [("lora", "off", 384, 2, "dora"), ("qlora", "off", 256, 1, "dora"),
                   ("lora", "full", 640, 1, "dora"), ("lora", "off", 384, 2, "lora_fa"),
                   ("lora", "off", 384, 2, "vera")]


@pytest.mark.slow
@pytest.mark.parametrize("method, policy, seq, batch, adapter", [(*c, "lora") for c in CONFIGS] + ADAPTER_CONFIGS)
def test_estimate_against_measured_cpu_peak(method, policy, seq, batch, adapter):
    from npu_ft.bench.measure import PROBE_ENV, tensor_increment
    from npu_ft.bench.runner import run_case_subprocess
    from npu_ft.bench.suite import BenchCase
    from npu_ft.ops.linear_cross_entropy import default_chunk_rows

    gc = policy != "off"
    case = BenchCase(suite="estimate-check", model="tiny", method=method, implementation="npu-ft", device="cpu",
                     seq_len=seq, batch_size=batch, steps=2, warmup=1, gradient_checkpointing=gc,
                     checkpoint_policy=policy if gc else "full", model_overrides=OVERRIDES, timeout_s=900,
                     adapter=adapter)
    # Measured as the bench's memory probe does. glibc raises its mmap threshold each time a large
    # block is freed, after which freed tensors stay in the heap and count in the resident set: lora
    # full 1x640 measured 80-110 MiB from process to process. With the threshold fixed every freed
    # tensor leaves the resident set, and the same case measures the same peak to 0.3 MiB in every
    # process.
    env = {**os.environ, **PROBE_ENV}
    runs = [run_case_subprocess(case, env=env) for _ in range(REPEATS)]
    for result in runs:
        assert result["status"] == "ok", result.get("error")
    result = runs[0]
    # the bench's npu-ft implementation trains with the fused loss, in CPU-sized chunks
    est = estimate(SHAPE, method, batch=batch, seq=seq, gradient_checkpointing=gc, dtype="fp32",
                   lora_rank=case.lora["vera_r" if adapter == "vera" else "r"],
                   loss_chunk_rows=default_chunk_rows(SHAPE.vocab, device="cpu"),
                   checkpoint_policy=policy if gc else "full", adapter=adapter)
    assert result["weight_bytes"] == pytest.approx(est.weights, rel=0.02)
    if result["mem_kind"] != "rss":
        pytest.skip(f"per-phase CPU peak not available here ({result['mem_kind']})")
    # ... and without the pages of library code the training phase ran first, which a fresh install
    # maps in larger pieces (npu_ft.bench.measure.file_rss_bytes: +17 MiB in fresh clones)
    measured = statistics.median(tensor_increment(r) for r in runs)
    ratio = measured / (est.train_bytes + CPU_TRAIN_RUNTIME_BYTES)
    assert BAND[0] <= ratio <= BAND[1], (
        f"{method} {adapter} {policy} {batch}x{seq}: measured {measured / 2**20:.1f} MiB, "
        f"estimated {(est.train_bytes + CPU_TRAIN_RUNTIME_BYTES) / 2**20:.1f} MiB, ratio {ratio:.3f}"
    )


def test_estimator_optimizers_match_npu_ft_optimizers():
    """estimate.OPTIMS (kept torch-free for the CLI) names every optimizer npu_ft.optim serves, with
    the state bits and paging that optimizer really has."""
    import torch

    from npu_ft.launch.estimate import OPTIMS
    from npu_ft.optim.names import NPU_FT_OPTIMS

    assert set(NPU_FT_OPTIMS) | {"adamw_torch"} == set(OPTIMS)
    for name, (cls, kwargs) in NPU_FT_OPTIMS.items():
        opt = cls([torch.nn.Parameter(torch.zeros(8))], **kwargs)
        assert OPTIMS[name] == (opt.optim_bits, opt.paged), name
