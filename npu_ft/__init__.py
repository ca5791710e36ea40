"""npu-ft: LoRA / QLoRA / full fine-tuning of Qwen models on Ascend NPU, CUDA and CPU.

``import npu_ft`` defines the ``torch.ops.npu_ft.*`` ops (schemas, fake and reference kernels,
autograd) and registers the cpu kernels, as ``import bitsandbytes`` does. It never touches an
accelerator, imports no training library and builds nothing: the device layer is loaded on first
use (``npu_ft.device``), cuda / npu kernels register on the first op call with such a tensor, and
the native CPU kernels are compiled on their first call (see docs/ops.md).
"""

__version__ = "0.1.0"

from . import ops  # noqa: E402, F401  (registers the ops)
