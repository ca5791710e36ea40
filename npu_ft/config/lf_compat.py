"""LLaMA-Factory 0.9.5 keys that npu-ft accepts but does not implement, in one place.

* ignored -- no effect on SFT training here (generation and inference-engine settings, hub tokens,
  multimodal processor sizes, settings of other stages, ...): accepted silently.
* unsupported -- would change training in a way npu-ft does not implement: accepted only at
  LLaMA-Factory's default value; anything else is "X is not supported by npu-ft yet".

When npu-ft implements one, its field moves to the group it belongs to (model, method, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .schema import config_field

__all__ = ["LlamaFactoryCompat"]

_MULTIMODAL = 'Multimodal processor setting (text models only).'
_EXPORT = 'Export setting (used by `npu-ft export`, not by training).'
_INFERENCE = 'Inference engine setting (chat/api only).'
_VISION = 'Vision-language setting (text models only).'
_PREFERENCE = 'Preference/RL setting (not used by stage sft).'
_OPTIMIZER_SETTING = 'Setting of an optimizer/tracker that is not supported (see its use_ key).'
_TF4 = 'transformers 4 key.'
_RAY = 'Ray setting (npu-ft launches with torchrun).'


def _ignored(default: Any, doc: str, group: str) -> Any:
    return config_field(default, doc, status="ignored", group=group)


def _unsupported(default: Any, doc: str, group: str) -> Any:
    return config_field(default, doc, status="unsupported", group=group)


@dataclass
class LlamaFactoryCompat:
    """Every LLaMA-Factory key npu-ft accepts without implementing it (its group in the metadata)."""

    GROUP = "other"
    # -- model ------------------------------------------------------------------------------------------
    adapter_name_or_path: Any = _unsupported(None, 'Start from existing adapter(s).', 'model')
    adapter_folder: Any = _ignored(None, 'Folder of adapter weights.', 'model')
    resize_vocab: Any = _unsupported(False, 'Resize the vocabulary and embeddings.', 'model')
    split_special_tokens: Any = _unsupported(False, 'Split special tokens when tokenizing.', 'model')
    add_tokens: Any = _unsupported(None, 'Extra tokens to add.', 'model')
    add_special_tokens: Any = _unsupported(None, 'Extra special tokens to add.', 'model')
    new_special_tokens_config: Any = _unsupported(None, 'YAML of special tokens with descriptions.', 'model')
    init_special_tokens: Any = _ignored('noise_init', 'Initialisation of new special tokens.', 'model')
    rope_scaling: Any = _unsupported(None, 'RoPE scaling strategy (linear, dynamic, yarn, llama3).', 'model')
    mixture_of_depths: Any = _unsupported(None, 'Mixture-of-depths conversion.', 'model')
    use_unsloth: Any = _unsupported(False, 'Unsloth LoRA optimisations.', 'model')
    use_unsloth_gc: Any = _unsupported(False, 'Unsloth gradient checkpointing.', 'model')
    moe_aux_loss_coef: Any = _unsupported(None, 'MoE router auxiliary loss coefficient.', 'model')
    upcast_layernorm: Any = _unsupported(False, 'Keep layer norms in fp32.', 'model')
    upcast_lmhead_output: Any = _unsupported(False, 'Upcast lm_head output to fp32.', 'model')
    train_from_scratch: Any = _unsupported(False, 'Random-initialise the weights.', 'model')
    use_v1_kernels: Any = _unsupported(False, 'LLaMA-Factory v1 kernels.', 'model')
    quantization_device_map: Any = _unsupported(None, 'Device map for 4-bit inference.', 'model')
    fp8: Any = _unsupported(False, 'FP8 mixed precision.', 'model')
    fp8_backend: Any = _ignored('auto', 'FP8 backend.', 'model')
    fp8_enable_fsdp_float8_all_gather: Any = _ignored(False, 'FP8 FSDP all-gather.', 'model')
    infer_backend: Any = _ignored('huggingface', 'Inference engine (chat/api only).', 'model')
    infer_dtype: Any = _ignored('auto', 'Inference dtype (chat/api only).', 'model')
    use_kv_cache: Any = _ignored(True, 'KV cache in generation.', 'model')
    offload_folder: Any = _ignored('offload', 'Offload folder.', 'model')
    hf_hub_token: Any = _ignored(None, 'Hugging Face token (npu-ft is offline).', 'model')
    ms_hub_token: Any = _ignored(None, 'ModelScope token (npu-ft is offline).', 'model')
    om_hub_token: Any = _ignored(None, 'Modelers token (npu-ft is offline).', 'model')
    image_max_pixels: Any = _ignored(589824, _MULTIMODAL, 'model')
    image_min_pixels: Any = _ignored(1024, _MULTIMODAL, 'model')
    image_do_pan_and_scan: Any = _ignored(False, _MULTIMODAL, 'model')
    crop_to_patches: Any = _ignored(False, _MULTIMODAL, 'model')
    video_max_pixels: Any = _ignored(65536, _MULTIMODAL, 'model')
    video_min_pixels: Any = _ignored(256, _MULTIMODAL, 'model')
    video_fps: Any = _ignored(2.0, _MULTIMODAL, 'model')
    video_maxlen: Any = _ignored(128, _MULTIMODAL, 'model')
    use_audio_in_video: Any = _ignored(False, _MULTIMODAL, 'model')
    audio_sampling_rate: Any = _ignored(16000, _MULTIMODAL, 'model')
    export_dir: Any = _ignored(None, _EXPORT, 'model')
    export_size: Any = _ignored(5, _EXPORT, 'model')
    export_device: Any = _ignored('cpu', _EXPORT, 'model')
    export_quantization_bit: Any = _ignored(None, _EXPORT, 'model')
    export_quantization_dataset: Any = _ignored(None, _EXPORT, 'model')
    export_quantization_nsamples: Any = _ignored(128, _EXPORT, 'model')
    export_quantization_maxlen: Any = _ignored(1024, _EXPORT, 'model')
    export_legacy_format: Any = _ignored(False, _EXPORT, 'model')
    export_hub_model_id: Any = _ignored(None, _EXPORT, 'model')
    vllm_maxlen: Any = _ignored(4096, _INFERENCE, 'model')
    vllm_gpu_util: Any = _ignored(0.7, _INFERENCE, 'model')
    vllm_enforce_eager: Any = _ignored(False, _INFERENCE, 'model')
    vllm_max_lora_rank: Any = _ignored(32, _INFERENCE, 'model')
    vllm_config: Any = _ignored(None, _INFERENCE, 'model')
    sglang_maxlen: Any = _ignored(4096, _INFERENCE, 'model')
    sglang_mem_fraction: Any = _ignored(0.7, _INFERENCE, 'model')
    sglang_tp_size: Any = _ignored(-1, _INFERENCE, 'model')
    sglang_config: Any = _ignored(None, _INFERENCE, 'model')
    sglang_lora_backend: Any = _ignored('triton', _INFERENCE, 'model')
    use_kt: Any = _ignored(False, _INFERENCE, 'model')
    kt_optimize_rule: Any = _ignored(None, _INFERENCE, 'model')
    cpu_infer: Any = _ignored(32, _INFERENCE, 'model')
    chunk_size: Any = _ignored(8192, _INFERENCE, 'model')
    mode: Any = _ignored('normal', _INFERENCE, 'model')
    kt_maxlen: Any = _ignored(4096, _INFERENCE, 'model')
    kt_use_cuda_graph: Any = _ignored(True, _INFERENCE, 'model')
    kt_mode: Any = _ignored('normal', _INFERENCE, 'model')
    kt_force_think: Any = _ignored(False, _INFERENCE, 'model')

    # -- method -----------------------------------------------------------------------------------------
    create_new_adapter: Any = _unsupported(False, 'New adapter on top of adapter_name_or_path.', 'method')
    freeze_trainable_layers: Any = _unsupported(2, 'Freeze tuning: trainable layers.', 'method')
    freeze_trainable_modules: Any = _unsupported('all', 'Freeze tuning: trainable modules.', 'method')
    freeze_extra_modules: Any = _unsupported(None, 'Freeze tuning: extra modules.', 'method')
    module_dropout: Any = _unsupported(0.0, 'OFT dropout.', 'method')
    oft_rank: Any = _unsupported(0, 'OFT rank.', 'method')
    oft_block_size: Any = _unsupported(32, 'OFT block size.', 'method')
    oft_target: Any = _unsupported('all', 'OFT targets.', 'method')
    pure_bf16: Any = _unsupported(False, 'Train purely in bf16 without AMP.', 'method')
    use_llama_pro: Any = _unsupported(False, 'LLaMA Pro block expansion.', 'method')
    use_adam_mini: Any = _unsupported(False, 'Adam-mini optimizer.', 'method')
    use_mca: Any = _unsupported(False, 'Megatron core adapter.', 'method')
    use_muon: Any = _unsupported(False, 'Muon optimizer.', 'method')
    use_dft_loss: Any = _unsupported(False, 'DFT loss.', 'method')
    use_galore: Any = _unsupported(False, 'GaLore.', 'method')
    use_apollo: Any = _unsupported(False, 'APOLLO.', 'method')
    use_badam: Any = _unsupported(False, 'BAdam.', 'method')
    use_swanlab: Any = _unsupported(False, 'SwanLab tracking.', 'method')
    compute_accuracy: Any = _unsupported(False, 'Token accuracy at evaluation.', 'method')
    early_stopping_steps: Any = _unsupported(None, 'Early stopping patience.', 'method')
    freeze_vision_tower: Any = _ignored(True, _VISION, 'method')
    freeze_multi_modal_projector: Any = _ignored(True, _VISION, 'method')
    freeze_language_model: Any = _ignored(False, _VISION, 'method')
    pref_beta: Any = _ignored(0.1, _PREFERENCE, 'method')
    pref_ftx: Any = _ignored(0.0, _PREFERENCE, 'method')
    pref_bco_weight: Any = _ignored(0.0, _PREFERENCE, 'method')
    pref_loss: Any = _ignored('sigmoid', _PREFERENCE, 'method')
    dpo_label_smoothing: Any = _ignored(0.0, _PREFERENCE, 'method')
    kto_chosen_weight: Any = _ignored(1.0, _PREFERENCE, 'method')
    kto_rejected_weight: Any = _ignored(1.0, _PREFERENCE, 'method')
    simpo_gamma: Any = _ignored(0.5, _PREFERENCE, 'method')
    ppo_buffer_size: Any = _ignored(1, _PREFERENCE, 'method')
    ppo_epochs: Any = _ignored(4, _PREFERENCE, 'method')
    ppo_score_norm: Any = _ignored(False, _PREFERENCE, 'method')
    ppo_target: Any = _ignored(6.0, _PREFERENCE, 'method')
    ppo_whiten_rewards: Any = _ignored(False, _PREFERENCE, 'method')
    ref_model: Any = _ignored(None, _PREFERENCE, 'method')
    ref_model_adapters: Any = _ignored(None, _PREFERENCE, 'method')
    ref_model_quantization_bit: Any = _ignored(None, _PREFERENCE, 'method')
    reward_model: Any = _ignored(None, _PREFERENCE, 'method')
    reward_model_adapters: Any = _ignored(None, _PREFERENCE, 'method')
    reward_model_quantization_bit: Any = _ignored(None, _PREFERENCE, 'method')
    reward_model_type: Any = _ignored('lora', _PREFERENCE, 'method')
    ld_alpha: Any = _ignored(None, _PREFERENCE, 'method')
    galore_target: Any = _ignored('all', _OPTIMIZER_SETTING, 'method')
    galore_rank: Any = _ignored(16, _OPTIMIZER_SETTING, 'method')
    galore_update_interval: Any = _ignored(200, _OPTIMIZER_SETTING, 'method')
    galore_scale: Any = _ignored(2.0, _OPTIMIZER_SETTING, 'method')
    galore_proj_type: Any = _ignored('std', _OPTIMIZER_SETTING, 'method')
    galore_layerwise: Any = _ignored(False, _OPTIMIZER_SETTING, 'method')
    apollo_target: Any = _ignored('all', _OPTIMIZER_SETTING, 'method')
    apollo_rank: Any = _ignored(16, _OPTIMIZER_SETTING, 'method')
    apollo_update_interval: Any = _ignored(200, _OPTIMIZER_SETTING, 'method')
    apollo_scale: Any = _ignored(32.0, _OPTIMIZER_SETTING, 'method')
    apollo_proj: Any = _ignored('random', _OPTIMIZER_SETTING, 'method')
    apollo_proj_type: Any = _ignored('std', _OPTIMIZER_SETTING, 'method')
    apollo_scale_type: Any = _ignored('channel', _OPTIMIZER_SETTING, 'method')
    apollo_layerwise: Any = _ignored(False, _OPTIMIZER_SETTING, 'method')
    apollo_scale_front: Any = _ignored(False, _OPTIMIZER_SETTING, 'method')
    badam_mode: Any = _ignored('layer', _OPTIMIZER_SETTING, 'method')
    badam_start_block: Any = _ignored(None, _OPTIMIZER_SETTING, 'method')
    badam_switch_mode: Any = _ignored('ascending', _OPTIMIZER_SETTING, 'method')
    badam_switch_interval: Any = _ignored(50, _OPTIMIZER_SETTING, 'method')
    badam_update_ratio: Any = _ignored(0.05, _OPTIMIZER_SETTING, 'method')
    badam_mask_mode: Any = _ignored('adjacent', _OPTIMIZER_SETTING, 'method')
    badam_verbose: Any = _ignored(0, _OPTIMIZER_SETTING, 'method')
    swanlab_project: Any = _ignored('llamafactory', _OPTIMIZER_SETTING, 'method')
    swanlab_workspace: Any = _ignored(None, _OPTIMIZER_SETTING, 'method')
    swanlab_run_name: Any = _ignored(None, _OPTIMIZER_SETTING, 'method')
    swanlab_mode: Any = _ignored('cloud', _OPTIMIZER_SETTING, 'method')
    swanlab_api_key: Any = _ignored(None, _OPTIMIZER_SETTING, 'method')
    swanlab_logdir: Any = _ignored(None, _OPTIMIZER_SETTING, 'method')
    swanlab_lark_webhook_url: Any = _ignored(None, _OPTIMIZER_SETTING, 'method')
    swanlab_lark_secret: Any = _ignored(None, _OPTIMIZER_SETTING, 'method')

    # -- data -------------------------------------------------------------------------------------------
    media_dir: Any = _ignored(None, 'Folder of images/videos/audio.', 'data')
    interleave_probs: Any = _unsupported(None, 'Sampling probabilities for interleaved mixing.', 'data')
    streaming: Any = _unsupported(False, 'Dataset streaming.', 'data')
    buffer_size: Any = _ignored(16384, 'Streaming shuffle buffer.', 'data')
    tokenized_path: Any = _unsupported(None, 'Save/load tokenised datasets.', 'data')
    eval_on_each_dataset: Any = _unsupported(False, 'Evaluate each eval dataset separately.', 'data')
    eval_num_beams: Any = _ignored(None, 'Beams for generation at evaluation.', 'data')
    ignore_pad_token_for_loss: Any = _ignored(True, 'Pad tokens are always ignored in the loss.', 'data')
    data_shared_file_system: Any = _ignored(False, 'Shared file system for multi-node preprocessing.', 'data')

    # -- training ---------------------------------------------------------------------------------------
    logging_dir: Any = _ignored(None, 'TensorBoard folder (transformers 4 key).', 'training')
    include_tokens_per_second: Any = _ignored(False, 'transformers 4 key; throughput is always logged.', 'training')
    no_cuda: Any = _ignored(False, 'transformers 4 key; use device: cpu.', 'training')
    half_precision_backend: Any = _ignored('auto', _TF4, 'training')
    use_ipex: Any = _ignored(False, _TF4, 'training')
    jit_mode_eval: Any = _ignored(False, _TF4, 'training')
    fp16_opt_level: Any = _ignored('O1', _TF4, 'training')
    past_index: Any = _ignored(-1, _TF4, 'training')
    sortish_sampler: Any = _ignored(False, 'Seq2seq sampler.', 'training')
    generation_max_length: Any = _ignored(None, 'Generation length at evaluation.', 'training')
    generation_num_beams: Any = _ignored(None, 'Beams at evaluation.', 'training')
    generation_config: Any = _ignored(None, 'Generation config at evaluation.', 'training')
    ray_run_name: Any = _ignored(None, _RAY, 'training')
    ray_storage_path: Any = _ignored('./saves', _RAY, 'training')
    ray_storage_filesystem: Any = _ignored(None, _RAY, 'training')
    ray_num_workers: Any = _ignored(1, _RAY, 'training')
    resources_per_worker: Any = _ignored(None, _RAY, 'training')
    placement_strategy: Any = _ignored('PACK', _RAY, 'training')
    ray_init_kwargs: Any = _ignored(None, _RAY, 'training')

