"""torchrun worker for the DeepSpeed tests: the launch hook, then ``run_sft`` with a callback that
writes this rank's view of the trained weights (gathered under ZeRO-3) and losses to
``output_dir/rank<RANK>.json``, so the test can check that the ranks agree."""
import json
import os
import sys

from transformers import TrainerCallback

from npu_ft.launch import launch_or_init

argv = sys.argv[1:]
rc = launch_or_init(argv)
if rc is not None:
    sys.exit(rc)
from npu_ft.config import load_config  # noqa: E402 - after the launch hook
from npu_ft.train.run import run_sft  # noqa: E402


class CB(TrainerCallback):
    def on_train_end(self, args, state, control, model=None, **kw):
        import deepspeed
        params = [p for p in model.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params):
            s = [float(p.detach().double().sum()) for p in params]
            n = [float(p.detach().double().norm()) for p in params]
        losses = [h["loss"] for h in state.log_history if "loss" in h]
        with open(os.path.join(args.output_dir, f"rank{os.environ['RANK']}.json"), "w") as f:
            json.dump(
                {
                    "sums": s,
                    "norms": n,
                    "losses": losses,
                    "numel": [p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params],
                },
                f,
            )


cfg = load_config(argv[0], argv[1:])
run_sft(cfg, callbacks=[CB()])
