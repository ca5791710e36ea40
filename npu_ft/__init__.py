"""npu-ft: LoRA / QLoRA / full fine-tuning of Qwen models on Ascend NPU, CUDA and CPU.

With ``import npu_ft`` the ``torch.ops.npu_ft.*`` ops are there whenever torch is (schemas, fake and
reference kernels, autograd, and the cpu kernels), as with ``import bitsandbytes``: registered now
if torch is already imported, else right after torch's import. ``import npu_ft`` itself imports
neither torch nor anything else heavy (reading a recipe stays torch-free), probes no device and
builds nothing: the device layer loads on first use (``npu_ft.device``), cuda / npu kernels
register on the first op call with such a tensor, and the native CPU kernels compile on their
first call (see docs/ops.md).
"""

__version__ = "0.1.0"

from ._import_hook import when_imported  # noqa: E402


def _register_ops() -> None:
    import npu_ft.ops  # noqa: F401  (defines the ops, registers the cpu kernels)


when_imported("torch", _register_ops)
