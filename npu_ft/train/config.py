"""Training configuration: LLaMA-Factory 0.9.5 YAML keys for ``stage: sft``, checked up front.

A recipe is one YAML file with LLaMA-Factory's flat keys; ``key=value`` overrides from the command
line are merged over it (values read as YAML scalars, as ``llamafactory-cli train x.yaml k=v`` does).

>>> cfg = build_config({"model_name_or_path": "m", "lora_rank": 4})
>>> cfg.lora_alpha, cfg.lora_target, cfg.finetuning_type
(8, ['all'], 'lora')

Every key is described once, in :data:`OPTIONS` (name, group, type, default, range, doc, status).
That table drives validation, the defaults, the error messages and the generated reference
(:func:`options_markdown`, which is what ``docs/config.md`` is checked against). A key has one of
three statuses:

* ``supported``   -- npu-ft honours it.
* ``ignored``     -- LLaMA-Factory knows it but it has no effect on SFT training here (generation
  settings, inference engines, hub tokens, multimodal processor sizes, ...); accepted silently.
* ``unsupported`` -- it would change training in a way npu-ft does not implement; accepted only
  at LLaMA-Factory's default value, anything else raises "X is not supported by npu-ft yet".

Every field of the installed ``transformers.TrainingArguments`` that is not listed by hand is also
known (status ``supported``, group ``training``) and passed through to
:func:`to_training_arguments`.

Errors are :class:`ConfigError` (a ``ValueError``) and always name the file (or the command-line
override) and the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "GROUPS",
    "OPTIONS",
    "Option",
    "SftConfig",
    "build_config",
    "load_config",
    "option",
    "options_markdown",
    "parse_overrides",
    "to_data_arguments",
    "to_training_arguments",
]

GROUPS = ("model", "method", "data", "training", "npu_ft", "generation", "other")


class ConfigError(ValueError):
    """A recipe problem: names the file (or override), the key, and what is wrong."""

    def __init__(self, message: str, *, source: str | None = None, key: str | None = None):
        self.source = source
        self.key = key
        where = []
        if source:
            where.append(source)
        if key:
            where.append(f"key '{key}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)




@dataclass(frozen=True)
class Option:
    """One config key.

    ``type`` is one of: ``bool``, ``int``, ``float``, ``str``, ``list`` (a comma-separated string
    or a YAML list of strings, normalised to ``list[str]``), ``str_or_dict``, ``any``.
    """

    name: str
    group: str
    type: str
    default: Any
    doc: str
    status: str = "supported"  # supported | ignored | unsupported
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    exclusive_maximum: bool = False
    nullable: bool | None = None  # None: nullable iff default is None
    #: values that are valid in LLaMA-Factory but not implemented here -> short reason
    unsupported_values: Mapping[Any, str] | None = None
    #: False for keys that are npu-ft's own (not in LLaMA-Factory)
    lf: bool = True
    #: curated by hand (True) or taken from transformers.TrainingArguments (False)
    curated: bool = True

    @property
    def allows_none(self) -> bool:
        return self.default is None if self.nullable is None else self.nullable

    def range_text(self) -> str:
        parts = []
        if self.choices is not None:
            parts.append(" / ".join(str(c) for c in self.choices))
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '>='} {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.exclusive_maximum else '<='} {self.maximum:g}")
        return ", ".join(parts)


def _o(name, group, type_, default, doc, **kw) -> Option:
    return Option(name=name, group=group, type=type_, default=default, doc=doc, **kw)


def _unsup(name, group, default, doc, type_="any") -> Option:
    return Option(name=name, group=group, type=type_, default=default, doc=doc, status="unsupported")


def _ign(name, group, default, doc, type_="any") -> Option:
    return Option(name=name, group=group, type=type_, default=default, doc=doc, status="ignored")


_NOT_YET = "not supported by npu-ft yet"

_CURATED: list[Option] = [
    # ------------------------------------------------------------------ model
    _o("model_name_or_path", "model", "str", None,
       "Local folder with config.json + *.safetensors (npu-ft never downloads). Required.",
       nullable=False),
    _o("trust_remote_code", "model", "bool", False, "Allow the model folder's own Python code."),
    _o("cache_dir", "model", "str", None, "Passed to from_pretrained (local files only)."),
    _o("flash_attn", "model", "str", "auto",
       "Attention kernel: auto (transformers default), disabled (eager), sdpa, fa2, fa3.",
       choices=("auto", "disabled", "sdpa", "fa2", "fa3")),
    _o("disable_gradient_checkpointing", "model", "bool", False,
       "LLaMA-Factory turns gradient checkpointing on by default; true turns it off."),
    _o("use_reentrant_gc", "model", "bool", True, "Reentrant gradient checkpointing."),
    _o("use_fast_tokenizer", "model", "bool", True, "Use the fast (Rust) tokenizer.",
       unsupported_values={False: "slow tokenizers are " + _NOT_YET}),
    _o("model_revision", "model", "str", "main", "Hub revision; only 'main' (local folders).",
       unsupported_values=None),
    _o("low_cpu_mem_usage", "model", "bool", True, "Memory-efficient loading."),
    _o("print_param_status", "model", "bool", False, "Print every parameter's dtype/device/grad."),
    _o("quantization_bit", "model", "int", None,
       "On-the-fly quantization of the base model for QLoRA; only 4 (NF4 like bitsandbytes).",
       choices=(4,), unsupported_values={8: "8-bit quantization is " + _NOT_YET,
                                         2: "2-bit quantization is " + _NOT_YET,
                                         3: "3-bit quantization is " + _NOT_YET,
                                         5: "5-bit quantization is " + _NOT_YET,
                                         6: "6-bit quantization is " + _NOT_YET}),
    _o("quantization_method", "model", "str", "bnb",
       "Quantization method; npu-ft implements the bitsandbytes NF4 format itself.",
       choices=("bnb",), unsupported_values={m: f"quantization_method '{m}' is " + _NOT_YET
                                            for m in ("gptq", "awq", "aqlm", "quanto", "eetq", "hqq",
                                                      "mxfp4", "fp8")}),
    _o("quantization_type", "model", "str", "nf4", "4-bit data type.",
       choices=("nf4",), unsupported_values={"fp4": "quantization_type 'fp4' is " + _NOT_YET}),
    _o("double_quantization", "model", "bool", True, "Quantize the absmax constants again (bnb nested)."),
    _unsup("adapter_name_or_path", "model", None, "Start from existing adapter(s)."),
    _ign("adapter_folder", "model", None, "Folder of adapter weights."),
    _unsup("resize_vocab", "model", False, "Resize the vocabulary and embeddings."),
    _unsup("split_special_tokens", "model", False, "Split special tokens when tokenizing."),
    _unsup("add_tokens", "model", None, "Extra tokens to add."),
    _unsup("add_special_tokens", "model", None, "Extra special tokens to add."),
    _unsup("new_special_tokens_config", "model", None, "YAML of special tokens with descriptions."),
    _ign("init_special_tokens", "model", "noise_init", "Initialisation of new special tokens."),
    _unsup("rope_scaling", "model", None, "RoPE scaling strategy (linear, dynamic, yarn, llama3)."),
    _unsup("shift_attn", "model", False, "LongLoRA shift short attention."),
    _unsup("mixture_of_depths", "model", None, "Mixture-of-depths conversion."),
    _unsup("use_unsloth", "model", False, "Unsloth LoRA optimisations."),
    _unsup("use_unsloth_gc", "model", False, "Unsloth gradient checkpointing."),
    _o("enable_liger_kernel", "model", "bool", False,
       "LLaMA-Factory's switch for Liger-Kernel's patched modules (needs liger-kernel installed, else the recipe is "
       "refused); npu-ft's own fused kernels (fused_kernels) are then not applied."),
    _unsup("moe_aux_loss_coef", "model", None, "MoE router auxiliary loss coefficient."),
    _unsup("upcast_layernorm", "model", False, "Keep layer norms in fp32."),
    _unsup("upcast_lmhead_output", "model", False, "Upcast lm_head output to fp32."),
    _unsup("train_from_scratch", "model", False, "Random-initialise the weights."),
    _unsup("use_v1_kernels", "model", False, "LLaMA-Factory v1 kernels."),
    _unsup("quantization_device_map", "model", None, "Device map for 4-bit inference."),
    _unsup("fp8", "model", False, "FP8 mixed precision."),
    _ign("fp8_backend", "model", "auto", "FP8 backend."),
    _ign("fp8_enable_fsdp_float8_all_gather", "model", False, "FP8 FSDP all-gather."),
    _ign("infer_backend", "model", "huggingface", "Inference engine (chat/api only)."),
    _ign("infer_dtype", "model", "auto", "Inference dtype (chat/api only)."),
    _ign("use_kv_cache", "model", True, "KV cache in generation."),
    _ign("offload_folder", "model", "offload", "Offload folder."),
    _ign("hf_hub_token", "model", None, "Hugging Face token (npu-ft is offline)."),
    _ign("ms_hub_token", "model", None, "ModelScope token (npu-ft is offline)."),
    _ign("om_hub_token", "model", None, "Modelers token (npu-ft is offline)."),
    *[_ign(n, "model", d, "Multimodal processor setting (text models only).")
      for n, d in (("image_max_pixels", 768 * 768), ("image_min_pixels", 32 * 32),
                   ("image_do_pan_and_scan", False), ("crop_to_patches", False),
                   ("video_max_pixels", 256 * 256), ("video_min_pixels", 16 * 16), ("video_fps", 2.0),
                   ("video_maxlen", 128), ("use_audio_in_video", False),
                   ("audio_sampling_rate", 16000))],
    *[_ign(n, "model", d, "Export setting (used by `npu-ft export`, not by training).")
      for n, d in (("export_dir", None), ("export_size", 5), ("export_device", "cpu"),
                   ("export_quantization_bit", None), ("export_quantization_dataset", None),
                   ("export_quantization_nsamples", 128), ("export_quantization_maxlen", 1024),
                   ("export_legacy_format", False), ("export_hub_model_id", None))],
    *[_ign(n, "model", d, "Inference engine setting (chat/api only).")
      for n, d in (("vllm_maxlen", 4096), ("vllm_gpu_util", 0.7), ("vllm_enforce_eager", False),
                   ("vllm_max_lora_rank", 32), ("vllm_config", None), ("sglang_maxlen", 4096),
                   ("sglang_mem_fraction", 0.7), ("sglang_tp_size", -1), ("sglang_config", None),
                   ("sglang_lora_backend", "triton"), ("use_kt", False), ("kt_optimize_rule", None),
                   ("cpu_infer", 32), ("chunk_size", 8192), ("mode", "normal"), ("kt_maxlen", 4096),
                   ("kt_use_cuda_graph", True), ("kt_mode", "normal"), ("kt_force_think", False))],
    # ------------------------------------------------------------------ method
    _o("stage", "method", "str", "sft", "Training stage; npu-ft implements supervised fine-tuning.",
       choices=("sft",), unsupported_values={s: f"stage '{s}' is " + _NOT_YET
                                            for s in ("pt", "rm", "ppo", "dpo", "kto")}),
    _o("finetuning_type", "method", "str", "lora", "lora (also QLoRA with quantization_bit: 4) or full.",
       choices=("lora", "full"), unsupported_values={"freeze": "finetuning_type 'freeze' is " + _NOT_YET,
                                                     "oft": "finetuning_type 'oft' is " + _NOT_YET}),
    _o("lora_target", "method", "list", "all",
       "Modules that get LoRA: 'all' = every nn.Linear except the output head, or a comma list of "
       "module-name suffixes (q_proj,v_proj,...)."),
    _o("lora_rank", "method", "int", 8, "LoRA rank r.", minimum=1),
    _o("lora_alpha", "method", "int", None, "LoRA alpha; default 2 x lora_rank.", minimum=1),
    _o("lora_dropout", "method", "float", 0.0, "Dropout on the LoRA input.", minimum=0.0, maximum=1.0,
       exclusive_maximum=True),
    _o("additional_target", "method", "list", None,
       "Extra modules trained in full and saved with the adapter (PEFT modules_to_save), comma list."),
    _o("use_rslora", "method", "bool", False, "Rank-stabilised scaling alpha / sqrt(r)."),
    _o("loraplus_lr_ratio", "method", "float", None, "LoRA+: learning rate of B = ratio x lr.",
       minimum=0.0, exclusive_minimum=True),
    _o("loraplus_lr_embedding", "method", "float", 1e-6, "LoRA+ learning rate of embedding adapters.",
       minimum=0.0),
    _unsup("use_dora", "method", False, "Weight-decomposed LoRA (DoRA)."),
    _unsup("pissa_init", "method", False, "PiSSA adapter initialisation."),
    _ign("pissa_iter", "method", 16, "PiSSA FSVD iterations."),
    _unsup("pissa_convert", "method", False, "Convert a PiSSA adapter to LoRA."),
    _unsup("create_new_adapter", "method", False, "New adapter on top of adapter_name_or_path."),
    _unsup("freeze_trainable_layers", "method", 2, "Freeze tuning: trainable layers."),
    _unsup("freeze_trainable_modules", "method", "all", "Freeze tuning: trainable modules."),
    _unsup("freeze_extra_modules", "method", None, "Freeze tuning: extra modules."),
    _unsup("module_dropout", "method", 0.0, "OFT dropout."),
    _unsup("oft_rank", "method", 0, "OFT rank."),
    _unsup("oft_block_size", "method", 32, "OFT block size."),
    _unsup("oft_target", "method", "all", "OFT targets."),
    _unsup("pure_bf16", "method", False, "Train purely in bf16 without AMP."),
    _unsup("use_llama_pro", "method", False, "LLaMA Pro block expansion."),
    _unsup("use_adam_mini", "method", False, "Adam-mini optimizer."),
    _unsup("use_mca", "method", False, "Megatron core adapter."),
    _unsup("use_muon", "method", False, "Muon optimizer."),
    _unsup("use_dft_loss", "method", False, "DFT loss."),
    _unsup("use_galore", "method", False, "GaLore."),
    _unsup("use_apollo", "method", False, "APOLLO."),
    _unsup("use_badam", "method", False, "BAdam."),
    _unsup("use_swanlab", "method", False, "SwanLab tracking."),
    _unsup("compute_accuracy", "method", False, "Token accuracy at evaluation."),
    _unsup("early_stopping_steps", "method", None, "Early stopping patience."),
    _o("disable_shuffling", "method", "bool", False, "Keep the training set in order."),
    _o("plot_loss", "method", "bool", False, "Write training_loss.png at the end."),
    _o("include_effective_tokens_per_second", "method", "bool", False,
       "Report effective (non-padding) tokens per second."),
    *[_ign(n, "method", d, "Vision-language setting (text models only).")
      for n, d in (("freeze_vision_tower", True), ("freeze_multi_modal_projector", True),
                   ("freeze_language_model", False))],
    *[_ign(n, "method", d, "Preference/RL setting (not used by stage sft).")
      for n, d in (("pref_beta", 0.1), ("pref_ftx", 0.0), ("pref_bco_weight", 0.0), ("pref_loss", "sigmoid"),
                   ("dpo_label_smoothing", 0.0), ("kto_chosen_weight", 1.0), ("kto_rejected_weight", 1.0),
                   ("simpo_gamma", 0.5), ("ppo_buffer_size", 1), ("ppo_epochs", 4),
                   ("ppo_score_norm", False), ("ppo_target", 6.0), ("ppo_whiten_rewards", False),
                   ("ref_model", None), ("ref_model_adapters", None), ("ref_model_quantization_bit", None),
                   ("reward_model", None), ("reward_model_adapters", None),
                   ("reward_model_quantization_bit", None), ("reward_model_type", "lora"), ("ld_alpha", None))],
    *[_ign(n, "method", d, "Setting of an optimizer/tracker that is not supported (see its use_ key).")
      for n, d in (("galore_target", "all"), ("galore_rank", 16), ("galore_update_interval", 200),
                   ("galore_scale", 2.0), ("galore_proj_type", "std"), ("galore_layerwise", False),
                   ("apollo_target", "all"), ("apollo_rank", 16), ("apollo_update_interval", 200),
                   ("apollo_scale", 32.0), ("apollo_proj", "random"), ("apollo_proj_type", "std"),
                   ("apollo_scale_type", "channel"), ("apollo_layerwise", False), ("apollo_scale_front", False),
                   ("badam_mode", "layer"), ("badam_start_block", None), ("badam_switch_mode", "ascending"),
                   ("badam_switch_interval", 50), ("badam_update_ratio", 0.05), ("badam_mask_mode", "adjacent"),
                   ("badam_verbose", 0), ("swanlab_project", "llamafactory"), ("swanlab_workspace", None),
                   ("swanlab_run_name", None), ("swanlab_mode", "cloud"), ("swanlab_api_key", None),
                   ("swanlab_logdir", None), ("swanlab_lark_webhook_url", None), ("swanlab_lark_secret", None))],
    # ------------------------------------------------------------------ data
    _o("dataset", "data", "list", None, "Dataset name(s) from dataset_info.json, comma list."),
    _o("eval_dataset", "data", "list", None, "Evaluation dataset name(s), comma list."),
    _o("dataset_dir", "data", "str", "data", "Folder holding dataset_info.json and the data files."),
    _ign("media_dir", "data", None, "Folder of images/videos/audio."),
    _o("template", "data", "str", None, "Chat template (qwen, qwen3, ...)."),
    _o("cutoff_len", "data", "int", 2048, "Maximum tokens per example (budget split source/target).",
       minimum=1),
    _o("train_on_prompt", "data", "bool", False, "Also learn the prompt tokens."),
    _o("mask_history", "data", "bool", False, "Learn only the last turn (not with train_on_prompt)."),
    _o("packing", "data", "bool", None, "Pack examples into cutoff_len sequences (None = off for sft)."),
    _o("neat_packing", "data", "bool", False, "Packing without cross-example attention (turns packing on)."),
    _o("default_system", "data", "str", None, "System prompt used when an example has none."),
    _o("enable_thinking", "data", "bool", True, "Thinking mode for reasoning templates (qwen3)."),
    _o("tool_format", "data", "str", None, "Tool-call format for function calling examples."),
    _o("val_size", "data", "float", 0.0, "Validation split: fraction in [0,1) or a count >= 1.", minimum=0.0),
    _o("max_samples", "data", "int", None, "Use at most this many examples per dataset.", minimum=1),
    _o("preprocessing_num_workers", "data", "int", None, "Processes for tokenisation.", minimum=1),
    _o("preprocessing_batch_size", "data", "int", 1000, "Examples per tokenisation batch.", minimum=1),
    _o("overwrite_cache", "data", "bool", False, "Re-tokenise even if a cache exists."),
    _o("mix_strategy", "data", "str", "concat", "How several datasets are mixed.", choices=("concat",),
       unsupported_values={"interleave_under": "mix_strategy 'interleave_under' is " + _NOT_YET,
                           "interleave_over": "mix_strategy 'interleave_over' is " + _NOT_YET}),
    _unsup("interleave_probs", "data", None, "Sampling probabilities for interleaved mixing."),
    _unsup("streaming", "data", False, "Dataset streaming."),
    _ign("buffer_size", "data", 16384, "Streaming shuffle buffer."),
    _unsup("tokenized_path", "data", None, "Save/load tokenised datasets."),
    _unsup("eval_on_each_dataset", "data", False, "Evaluate each eval dataset separately."),
    _ign("eval_num_beams", "data", None, "Beams for generation at evaluation."),
    _ign("ignore_pad_token_for_loss", "data", True, "Pad tokens are always ignored in the loss."),
    _ign("data_shared_file_system", "data", False, "Shared file system for multi-node preprocessing."),
    # ------------------------------------------------------------------ training (HF TrainingArguments)
    _o("output_dir", "training", "str", None, "Where checkpoints, the adapter and logs go."),
    _o("overwrite_output_dir", "training", "bool", False, "Allow writing into a non-empty output_dir."),
    _o("do_train", "training", "bool", False, "Run training (LLaMA-Factory recipes set true)."),
    _o("do_eval", "training", "bool", False, "Run evaluation."),
    _o("per_device_train_batch_size", "training", "int", 8, "Micro-batch size per device.", minimum=1),
    _o("per_device_eval_batch_size", "training", "int", 8, "Eval batch size per device.", minimum=1),
    _o("gradient_accumulation_steps", "training", "int", 1, "Micro-batches per optimizer step.", minimum=1),
    _o("learning_rate", "training", "float", 5e-5, "Peak learning rate.", minimum=0.0, exclusive_minimum=True),
    _o("num_train_epochs", "training", "float", 3.0, "Epochs (ignored when max_steps > 0).", minimum=0.0),
    _o("max_steps", "training", "int", -1, "Total optimizer steps; -1 = from epochs.", minimum=-1),
    _o("lr_scheduler_type", "training", "str", "linear", "Learning-rate schedule (transformers names)."),
    _o("warmup_ratio", "training", "float", 0.0, "Warm-up as a fraction of total steps.",
       minimum=0.0, maximum=1.0),
    _o("warmup_steps", "training", "float", 0, "Warm-up steps (wins over warmup_ratio when > 0).", minimum=0.0),
    _o("weight_decay", "training", "float", 0.0, "AdamW weight decay.", minimum=0.0),
    _o("optim", "training", "str", "adamw_torch", "Optimizer (transformers names)."),
    _o("max_grad_norm", "training", "float", 1.0, "Gradient clipping norm (0 = off).", minimum=0.0),
    _o("bf16", "training", "bool", False, "bf16 mixed precision."),
    _o("fp16", "training", "bool", False, "fp16 mixed precision."),
    _o("logging_steps", "training", "float", 500, "Log every N steps.", minimum=0.0, exclusive_minimum=True),
    _o("save_steps", "training", "float", 500, "Checkpoint every N steps.", minimum=0.0, exclusive_minimum=True),
    _o("save_strategy", "training", "str", "steps", "When to checkpoint.", choices=("no", "steps", "epoch", "best")),
    _o("save_total_limit", "training", "int", None, "Keep at most N checkpoints.", minimum=1),
    _o("save_only_model", "training", "bool", False, "Checkpoints without optimizer state."),
    _o("seed", "training", "int", 42, "Random seed.", minimum=0),
    _o("deepspeed", "training", "str_or_dict", None, "DeepSpeed config (path to JSON or a dict)."),
    _o("resume_from_checkpoint", "training", "any", None,
       "Checkpoint folder to resume from, or true for the latest checkpoint-N in output_dir."),
    _o("report_to", "training", "list", "none", "Experiment trackers (none, tensorboard, wandb, ...)."),
    _o("ddp_timeout", "training", "int", 1800, "Distributed timeout in seconds.", minimum=1),
    _o("dataloader_num_workers", "training", "int", 0, "DataLoader worker processes.", minimum=0),
    _o("eval_strategy", "training", "str", "no", "When to evaluate.", choices=("no", "steps", "epoch")),
    _o("eval_steps", "training", "float", None, "Evaluate every N steps.", minimum=0.0, exclusive_minimum=True),
    _o("gradient_checkpointing", "training", "bool", None,
       "Ignored in favour of disable_gradient_checkpointing (LLaMA-Factory semantics)."),
    _ign("logging_dir", "training", None, "TensorBoard folder (transformers 4 key)."),
    _o("save_safetensors", "training", "bool", True, "Checkpoints are always safetensors.",
       unsupported_values={False: "save_safetensors: false (pickle checkpoints) is " + _NOT_YET}),
    _ign("include_tokens_per_second", "training", False, "transformers 4 key; throughput is always logged."),
    _ign("no_cuda", "training", False, "transformers 4 key; use device: cpu."),
    _ign("half_precision_backend", "training", "auto", "transformers 4 key."),
    _ign("use_ipex", "training", False, "transformers 4 key."),
    _ign("jit_mode_eval", "training", False, "transformers 4 key."),
    _ign("fp16_opt_level", "training", "O1", "transformers 4 key."),
    _ign("past_index", "training", -1, "transformers 4 key."),
    _unsup("predict_with_generate", "training", False, "Generate at prediction time."),
    _ign("sortish_sampler", "training", False, "Seq2seq sampler."),
    _ign("generation_max_length", "training", None, "Generation length at evaluation."),
    _ign("generation_num_beams", "training", None, "Beams at evaluation."),
    _ign("generation_config", "training", None, "Generation config at evaluation."),
    *[_ign(n, "training", d, "Ray setting (npu-ft launches with torchrun).")
      for n, d in (("ray_run_name", None), ("ray_storage_path", "./saves"), ("ray_storage_filesystem", None),
                   ("ray_num_workers", 1), ("resources_per_worker", None), ("placement_strategy", "PACK"),
                   ("ray_init_kwargs", None))],
    # ------------------------------------------------------------------ generation (chat/eval only)
    *[_ign(n, "generation", d, "Generation setting (chat/eval only).")
      for n, d in (("do_sample", True), ("temperature", 0.95), ("top_p", 0.7), ("top_k", 50), ("num_beams", 1),
                   ("max_length", 1024), ("max_new_tokens", 1024), ("repetition_penalty", 1.0),
                   ("length_penalty", 1.0), ("skip_special_tokens", True))],
    # ------------------------------------------------------------------ npu-ft's own
    _o("device", "npu_ft", "str", "auto",
       "npu-ft: device kind: auto (npu > cuda > cpu, or $NPU_FT_DEVICE), cpu, cuda, npu.",
       choices=("auto", "cpu", "cuda", "npu"), lf=False),
    _o("fused_cross_entropy", "npu_ft", "bool", True,
       "npu-ft: compute the loss with the chunked fused linear + cross-entropy: only the positions with "
       "a label go through the output head, in chunks, so the [tokens, vocab] fp32 logits, log-softmax "
       "and their gradient are never materialised (same loss and gradients). Qwen2/Qwen3 with a plain "
       "lm_head; otherwise (or false) transformers' loss.", lf=False),
    _o("gradient_checkpointing_policy", "npu_ft", "str", "full",
       "npu-ft: what a checkpointed decoder layer keeps for its backward pass. full (transformers' "
       "behaviour): only its inputs, and its whole forward is rerun. selective: also the outputs of its "
       "GEMMs and attention, so only norms, RoPE and activations are rerun (LoRA on Qwen2.5-0.5B: ~1.3x "
       "faster steps; +53 KiB per token per layer in fp32 for that shape; same numerics). Needs "
       "non-reentrant checkpointing, which it then uses whatever use_reentrant_gc says.",
       choices=("full", "selective"), lf=False),
    _o("fused_kernels", "npu_ft", "bool", True,
       "npu-ft: run the decoder blocks of Qwen2/Qwen3 (and Llama/Mistral) models on npu-ft's fused ops: RMSNorm "
       "(with the residual add before it), RoPE on q and k in one call, SwiGLU; native CPU kernels, Triton on "
       "CUDA, torch_npu's npu_rms_norm / npu_rotary_mul / npu_swiglu on Ascend. Same loss and gradients "
       "(fp32: 1e-5 relative), less kept for backward, fewer passes over memory. false: transformers' modules. "
       "Ignored with enable_liger_kernel: true.", lf=False),
    _o("cpu_malloc_tuning", "npu_ft", "bool", True,
       "npu-ft: on CPU (glibc), raise malloc's mmap/trim thresholds before training so the large "
       "per-step buffers (embedding/head gradients, activations) are reused instead of being "
       "page-faulted in and zeroed again every step (~1.5x faster steps on small models; same peak). "
       "No effect on other devices or C libraries.", lf=False),
]


def _hf_training_fields() -> list[Option]:
    """Every transformers.TrainingArguments field that is not curated above, passed through."""
    try:
        from transformers import TrainingArguments
    except Exception:  # pragma: no cover - transformers is an install requirement
        return []
    out = []
    for f in dataclasses.fields(TrainingArguments):
        if not f.init or f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        if hasattr(default, "value") and not isinstance(default, (int, float, str)):
            default = default.value  # enums -> plain values
        type_ = _simple_type(f.type)
        doc = (f.metadata or {}).get("help", "") if isinstance(f.metadata, Mapping) else ""
        doc = " ".join(str(doc).split())[:200]
        out.append(Option(name=f.name, group="training", type=type_, default=default,
                          doc=doc or "transformers TrainingArguments field.", nullable=True, curated=False))
    return out


def _simple_type(annotation: Any) -> str:
    text = annotation if isinstance(annotation, str) else str(annotation)
    text = text.replace("typing.", "").replace("<class '", "").replace("'>", "")
    parts = {p.strip() for p in re.split(r"[|,\[\]]|Optional|Union", text) if p.strip()}
    parts.discard("None")
    parts.discard("NoneType")
    if parts == {"bool"}:
        return "bool"
    if parts == {"int"}:
        return "int"
    if parts == {"float"}:
        return "float"
    if parts == {"str"}:
        return "str"
    return "any"


def _build_options() -> dict[str, Option]:
    table: dict[str, Option] = {}
    for opt in _CURATED:
        if opt.name in table:  # pragma: no cover - guarded by a test
            raise RuntimeError(f"duplicate config option {opt.name}")
        if opt.group not in GROUPS:  # pragma: no cover
            raise RuntimeError(f"bad group for {opt.name}")
        table[opt.name] = opt
    for opt in _hf_training_fields():
        table.setdefault(opt.name, opt)
    return table


#: every known key -> its :class:`Option` (the single source of truth)
OPTIONS: dict[str, Option] = _build_options()


def option(name: str) -> Option:
    return OPTIONS[name]


# ---------------------------------------------------------------------------------------------
# the config object
# ---------------------------------------------------------------------------------------------
class SftConfig:
    """Validated recipe: every known key is an attribute (defaults filled in).

    ``source`` is the file it came from; ``explicit`` the keys the recipe or overrides set.
    Derived values follow LLaMA-Factory: ``lora_alpha`` None -> 2 x rank; ``lora_target``,
    ``additional_target``, ``dataset``, ``eval_dataset``, ``report_to`` become lists;
    ``neat_packing`` turns ``packing`` on; ``packing`` None -> False for sft. ``cutoff_len`` is kept
    as written (LLaMA-Factory subtracts 1 when packing; see :attr:`effective_cutoff_len`).
    """

    def __init__(self, values: dict[str, Any], source: str = "<dict>", explicit: Iterable[str] = ()):
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "source", source)
        object.__setattr__(self, "explicit", frozenset(explicit))

    def __getattr__(self, name: str) -> Any:
        values = object.__getattribute__(self, "_values")
        try:
            return values[name]
        except KeyError:
            raise AttributeError(f"SftConfig has no key {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in OPTIONS:
            raise AttributeError(f"unknown config key {name!r}")
        self._values[name] = value

    def __contains__(self, name: str) -> bool:
        return name in self._values

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SftConfig) and self._values == other._values

    def __repr__(self) -> str:
        shown = {k: self._values[k] for k in sorted(self.explicit)}
        return f"SftConfig(source={self.source!r}, {shown})"

    def get(self, name: str, default: Any = None) -> Any:
        return self._values.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)

    def group(self, group: str) -> dict[str, Any]:
        """Values of one group (``model``, ``method``, ``data``, ``training``, ``npu_ft``, ...)."""
        return {k: v for k, v in self._values.items() if OPTIONS[k].group == group}

    @property
    def is_qlora(self) -> bool:
        return self.finetuning_type == "lora" and self.quantization_bit == 4

    @property
    def method(self) -> str:
        """``lora``, ``qlora`` or ``full``."""
        return "qlora" if self.is_qlora else self.finetuning_type

    @property
    def gradient_checkpointing_enabled(self) -> bool:
        return not self.disable_gradient_checkpointing

    @property
    def effective_cutoff_len(self) -> int:
        """LLaMA-Factory's cutoff after its packing adjustment (cutoff_len - 1 when packing)."""
        return self.cutoff_len - 1 if self.packing else self.cutoff_len


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------
def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> SftConfig:
    """Read a LLaMA-Factory style YAML recipe, merge ``key=value`` overrides, validate."""
    from npu_ft.config.yaml_io import YamlError, load_yaml_mapping

    source = str(path)
    try:
        data = load_yaml_mapping(path)
    except YamlError as exc:
        raise ConfigError(str(exc)) from None
    sources = {key: source for key in data}
    merged = dict(data)
    for key, value, text in parse_overrides(overrides):
        merged[key] = value
        sources[key] = f"command-line override '{text}'"
    return build_config(merged, source=source, sources=sources)


def parse_overrides(overrides: Sequence[str]) -> list[tuple[str, Any, str]]:
    """``["lora_rank=16", "bf16=true"]`` -> ``[("lora_rank", 16, ...), ("bf16", True, ...)]``."""
    out = []
    for text in overrides:
        if "=" not in text:
            raise ConfigError(f"override {text!r} is not of the form key=value", source="command line")
        key, raw = text.split("=", 1)
        key = key.strip().lstrip("-")
        if not key:
            raise ConfigError(f"override {text!r} has an empty key", source="command line")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        if isinstance(value, (dict, list)) and not raw.strip().startswith(("[", "{")):
            value = raw  # "a: b" style strings stay strings
        out.append((key, value, text))
    return out


def build_config(mapping: Mapping[str, Any], source: str = "<dict>",
                 sources: Mapping[str, str] | None = None) -> SftConfig:
    """Validate a flat ``{key: value}`` mapping (already merged) into an :class:`SftConfig`."""
    sources = dict(sources or {})

    def where(key: str) -> str:
        return sources.get(key, source)

    values = {name: _copy_default(opt.default) for name, opt in OPTIONS.items()}
    for key, raw in mapping.items():
        opt = OPTIONS.get(key)
        if opt is None:
            raise ConfigError(_unknown_key_message(key), source=where(key), key=key)
        value = _coerce(opt, raw, where(key))
        if opt.status == "unsupported" and not _same(value, opt.default):
            raise ConfigError(f"{key} is not supported by npu-ft yet ({opt.doc.rstrip('.')}); "
                              f"remove it or set it to {opt.default!r}", source=where(key), key=key)
        values[key] = value
    _derive_and_check(values, where)
    return SftConfig(values, source=source, explicit=mapping.keys())


def _copy_default(value: Any) -> Any:
    return list(value) if isinstance(value, list) else dict(value) if isinstance(value, dict) else value


def _same(a: Any, b: Any) -> bool:
    """Equal as config values (a list equals its comma string; booleans never equal numbers)."""
    if isinstance(a, list) and isinstance(b, str):
        return [x.strip() for x in b.split(",")] == a
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


def _unknown_key_message(key: str) -> str:
    close = difflib.get_close_matches(key, list(OPTIONS), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{key}' (not a LLaMA-Factory 0.9.5 sft key or an npu-ft key){hint}"


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_error(opt: Option, raw: Any, src: str, expected: str) -> ConfigError:
    return ConfigError(f"expected {expected}, got {raw!r} ({type(raw).__name__})", source=src, key=opt.name)


def _coerce(opt: Option, raw: Any, src: str) -> Any:
    if raw is None:
        if opt.allows_none or opt.status != "supported" or opt.type == "any":
            return None
        raise ConfigError("must be set (got null)", source=src, key=opt.name)
    t = opt.type
    if t == "bool":
        if isinstance(raw, bool):
            value = raw
        elif isinstance(raw, str) and raw.strip().lower() in _TRUE | _FALSE:
            value = raw.strip().lower() in _TRUE
        else:
            raise _type_error(opt, raw, src, "true or false")
    elif t == "int":
        if isinstance(raw, bool):
            raise _type_error(opt, raw, src, "an integer")
        if isinstance(raw, int):
            value = raw
        elif isinstance(raw, float) and raw.is_integer():
            value = int(raw)
        elif isinstance(raw, str) and re.fullmatch(r"\s*[-+]?\d+\s*", raw):
            value = int(raw)
        else:
            raise _type_error(opt, raw, src, "an integer")
    elif t == "float":
        if isinstance(raw, bool):
            raise _type_error(opt, raw, src, "a number")
        if isinstance(raw, (int, float)):
            value = raw
        elif isinstance(raw, str):
            try:
                value = float(raw)  # "1e-4" is a string to YAML 1.1, a float to LLaMA-Factory
            except ValueError:
                raise _type_error(opt, raw, src, "a number") from None
        else:
            raise _type_error(opt, raw, src, "a number")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"must be a finite number, got {raw!r}", source=src, key=opt.name)
    elif t == "str":
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise _type_error(opt, raw, src, "a string")
        value = str(raw) if not isinstance(raw, str) else raw
    elif t == "list":
        if isinstance(raw, str):
            value = [item.strip() for item in raw.split(",") if item.strip()]
        elif isinstance(raw, (list, tuple)) and all(isinstance(x, str) for x in raw):
            value = [x.strip() for x in raw]
        else:
            raise _type_error(opt, raw, src, "a comma-separated string or a list of strings")
        if not value:
            raise ConfigError("must not be empty", source=src, key=opt.name)
    elif t == "str_or_dict":
        if not isinstance(raw, (str, dict)):
            raise _type_error(opt, raw, src, "a path string or a mapping")
        value = raw
    else:
        value = raw

    if opt.unsupported_values:
        for bad, why in opt.unsupported_values.items():
            if _same(value, bad):
                raise ConfigError(why, source=src, key=opt.name)
    if opt.choices is not None and value not in opt.choices:
        allowed = ", ".join(repr(c) for c in opt.choices)
        raise ConfigError(f"must be one of {allowed}, got {raw!r}", source=src, key=opt.name)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi = opt.minimum, opt.maximum
        if lo is not None and (value < lo or (opt.exclusive_minimum and value == lo)):
            raise ConfigError(f"must be {'>' if opt.exclusive_minimum else '>='} {lo:g}, got {raw!r}",
                              source=src, key=opt.name)
        if hi is not None and (value > hi or (opt.exclusive_maximum and value == hi)):
            raise ConfigError(f"must be {'<' if opt.exclusive_maximum else '<='} {hi:g}, got {raw!r}",
                              source=src, key=opt.name)
    return value


def _derive_and_check(v: dict[str, Any], where) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(message, source=where(key), key=key)

    if not v["model_name_or_path"]:
        fail("model_name_or_path", "is required (a local model folder)")
    if v["lora_alpha"] is None:
        v["lora_alpha"] = v["lora_rank"] * 2
    if v["quantization_bit"] is not None and v["finetuning_type"] != "lora":
        fail("quantization_bit", f"quantization is only compatible with finetuning_type: lora "
                                 f"(got finetuning_type: {v['finetuning_type']})")
    if v["finetuning_type"] != "lora":
        for key in ("loraplus_lr_ratio", "use_rslora"):
            if v[key] not in (None, False):
                fail(key, f"{key} is only valid for finetuning_type: lora")
    if v["mask_history"] and v["train_on_prompt"]:
        fail("mask_history", "mask_history cannot be combined with train_on_prompt")
    if v["enable_liger_kernel"] and importlib.util.find_spec("liger_kernel") is None:
        fail("enable_liger_kernel", "true needs Liger-Kernel, which is not installed (pip install liger-kernel); "
                                    "or remove the key: npu-ft's own fused kernels (fused_kernels: true) cover "
                                    "the same ops")
    if v["neat_packing"]:
        v["packing"] = True
    if v["packing"] is None:
        v["packing"] = v["stage"] == "pt"
    if v["bf16"] and v["fp16"]:
        fail("fp16", "bf16 and fp16 cannot both be true")
    if v["val_size"] >= 1 and not float(v["val_size"]).is_integer():
        fail("val_size", "must be a fraction in [0, 1) or a whole number of examples")
    if v["val_size"] > 1e-6 and v["dataset"] is None:
        fail("val_size", "val_size needs a dataset")
    if v["val_size"] > 1e-6 and v["eval_dataset"] is not None:
        fail("val_size", "cannot set both val_size and eval_dataset")
    if v["do_train"] and v["dataset"] is None:
        fail("dataset", "do_train is true but no dataset is given")
    if v["do_eval"] and v["eval_dataset"] is None and v["val_size"] <= 1e-6:
        fail("do_eval", "do_eval needs eval_dataset or val_size > 0")
    if v["warmup_ratio"] and v["warmup_steps"]:
        pass  # transformers: warmup_steps wins; LLaMA-Factory behaves the same
    for name, opt in OPTIONS.items():  # defaults of list keys are written as comma strings
        if opt.type == "list" and isinstance(v[name], str):
            v[name] = [item.strip() for item in v[name].split(",") if item.strip()]
    if v["lora_target"] is not None and "all" in v["lora_target"] and len(v["lora_target"]) > 1:
        fail("lora_target", "'all' cannot be combined with other module names")


# ---------------------------------------------------------------------------------------------
# transformers.TrainingArguments
# ---------------------------------------------------------------------------------------------
#: curated training keys that are LLaMA-Factory/npu-ft concepts, not TrainingArguments fields
_NOT_HF = {"overwrite_output_dir", "warmup_ratio", "gradient_checkpointing"}


def to_training_arguments(cfg: SftConfig, **changes: Any):
    """``transformers.TrainingArguments`` from the ``training`` group (DeepSpeed left as given).

    LLaMA-Factory post-processing is applied: ``remove_unused_columns=False``, ``label_names=
    ['labels']`` for LoRA, gradient checkpointing is left off here (the trainer enables it on the
    model unless ``disable_gradient_checkpointing``), ``warmup_ratio`` becomes a fractional
    ``warmup_steps`` (transformers 5 dropped ``warmup_ratio``), ``device: cpu`` sets ``use_cpu``.
    ``changes`` override anything.
    """
    import importlib.util

    from transformers import TrainingArguments

    if cfg.deepspeed and "deepspeed" not in changes and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("DeepSpeed is configured but the deepspeed package is not installed "
                          "(pip install deepspeed, or remove the key)", source=cfg.source, key="deepspeed")
    hf_fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in cfg.to_dict().items():
        opt = OPTIONS[name]
        if opt.group != "training" or opt.status != "supported" or name in _NOT_HF or name not in hf_fields:
            continue
        if value == opt.default and not opt.curated:
            continue  # leave transformers' own default
        kwargs[name] = value
    if not kwargs.get("warmup_steps") and cfg.warmup_ratio:
        # a float < 1 is read by transformers 5 as a fraction of the total steps
        kwargs["warmup_steps"] = min(float(cfg.warmup_ratio), 1.0 - 1e-12)
    kwargs["remove_unused_columns"] = False
    if cfg.finetuning_type == "lora":
        kwargs["label_names"] = ["labels"]
    if cfg.device == "cpu":
        kwargs["use_cpu"] = True
    if kwargs.get("output_dir") is None:
        kwargs.pop("output_dir", None)
    kwargs.update(changes)
    return TrainingArguments(**kwargs)


def to_data_arguments(cfg: SftConfig):
    """``npu_ft.data.args.DataArguments`` from the config (the fields both know)."""
    from npu_ft.data.args import DataArguments

    names = {f.name for f in dataclasses.fields(DataArguments) if f.init}
    return DataArguments(**{k: v for k, v in cfg.to_dict().items() if k in names})


# ---------------------------------------------------------------------------------------------
# reference documentation
# ---------------------------------------------------------------------------------------------
_GROUP_TITLES = {
    "model": "Model", "method": "Method", "data": "Data", "training": "Training",
    "npu_ft": "npu-ft only", "generation": "Generation", "other": "Other",
}


def options_markdown() -> str:
    """The config reference as Markdown (docs/config.md is generated from / checked against this)."""
    lines = ["# Configuration reference", "",
             "Generated from `npu_ft/train/config.py` (`OPTIONS`). Keys are LLaMA-Factory 0.9.5's "
             "(`stage: sft`) plus npu-ft's own; `key=value` after the YAML file overrides it.", ""]
    for group in GROUPS:
        supported = [o for o in OPTIONS.values() if o.group == group and o.curated and o.status == "supported"]
        if supported:
            lines += [f"## {_GROUP_TITLES[group]}", "", "| key | type | default | allowed | description |",
                      "|---|---|---|---|---|"]
            for o in supported:
                doc = o.doc.replace("|", "\\|")
                if o.unsupported_values:
                    doc += " Not yet: " + ", ".join(repr(k) for k in o.unsupported_values) + "."
                lines.append(f"| `{o.name}` | {o.type} | `{o.default!r}` | {o.range_text()} | {doc} |")
            lines.append("")
    unsup = [o for o in OPTIONS.values() if o.status == "unsupported"]
    lines += ["## Known but not supported yet", "",
              "Accepted only at their LLaMA-Factory default; any other value is an error.", "",
              "| key | group | default | description |", "|---|---|---|---|"]
    lines += [f"| `{o.name}` | {o.group} | `{o.default!r}` | {o.doc} |" for o in unsup]
    ign = [o for o in OPTIONS.values() if o.status == "ignored"]
    lines += ["", "## Accepted and ignored", "",
              "LLaMA-Factory keys with no effect on SFT training in npu-ft: "
              + ", ".join(f"`{o.name}`" for o in ign) + ".", "",
              "Every other `transformers.TrainingArguments` field is accepted and passed through.", ""]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m npu_ft.train.config > docs/config.md
    print(options_markdown(), end="")
