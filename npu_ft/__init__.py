"""npu-ft: LoRA / QLoRA / full fine-tuning of Qwen models on Ascend NPU, CUDA and CPU.

Importing ``npu_ft`` is cheap and never touches an accelerator: the device layer and the ops are
loaded on first use (``npu_ft.device``, ``npu_ft.ops``).
"""

__version__ = "0.1.0"
