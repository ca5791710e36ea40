"""Every fault through the real ``npu-ft`` entry point, in a subprocess (issue #11).

Each row: the arguments, the exit code (1 = bad input or unavailable device, 2 = usage), text the
message must contain (the file, key, line or variable), and paths that must not exist afterwards
(no partial output). Every row also checks: no ``Traceback``; for exit code 1 exactly one line on
stderr, ``npu-ft <command>: error: ...``; for exit code 2 a usage line and the error line (argparse's
form); nothing on stderr that npu-ft did not print. Every row
fails before a model is loaded, so the table takes seconds per row.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from ._cli import ROOT, cli_env, foreign_lines, npu_ft

SUITE = str(ROOT / "bench" / "suites" / "smoke.yaml")
NO_CUDA = "needs a machine without CUDA"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model, a good recipe and one broken copy of each input."""
    from npu_ft.config.trackers import TRACKER_MODULES
    from npu_ft.model.loading import load_model
    from npu_ft.model.tiny import build_tiny_model
    from npu_ft.modules.inject import apply_lora
    from npu_ft.train.adapter_io import save_adapter
    from tests.launch._helpers import tiny_recipe, toy_dataset, write_yaml

    root = tmp_path_factory.mktemp("faults")
    model = build_tiny_model(root / "tiny", arch="qwen2", seed=0)
    data = toy_dataset(root / "data")
    paths = {"root": str(root), "model": str(model), "suite": SUITE}
    recipe = tiny_recipe(model, data, root / "out")
    paths["ok"] = str(write_yaml(root / "ok.yaml", recipe))
    paths["badkey"] = str(write_yaml(root / "bad-key.yaml", {**recipe, "lora_rnak": 4}))
    (root / "broken.yaml").write_text("model_name_or_path: m\ndataset: [a, b\nlora_rank: 8\n")
    paths["broken"] = str(root / "broken.yaml")

    notok = root / "no-tokenizer"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model / name, notok / name)
    paths["notok"] = str(notok)
    for name, info, files in (
        ("nofile", {"toy": {"file_name": "missing.json"}}, {}),
        ("baddata", {"toy": {"file_name": "toy.jsonl"}}, {"toy.jsonl": '{"instruction": "a", "output": "b"}\n' * 2
                                                        + "{oops\n"}),
    ):
        folder = root / name
        folder.mkdir()
        (folder / "dataset_info.json").write_text(json.dumps(info))
        for file_name, text in files.items():
            (folder / file_name).write_text(text)
        paths[name] = str(folder)

    adapter = save_adapter(apply_lora(load_model(str(model), dtype="float32"), "all", r=4), root / "adapter")
    paths["adapter"] = str(adapter)
    junk = shutil.copytree(adapter, root / "junk-adapter")
    (junk / "adapter_model.safetensors").write_bytes(b"\x00junk" * 64)
    paths["junk"] = str(junk)
    missing = [name for name, pkgs in TRACKER_MODULES.items()
               if pkgs and not any(importlib.util.find_spec(p) for p in pkgs)]
    paths["tracker"] = missing[0]
    return paths


#: (id, args, env, exit code, fragments, must not exist afterwards, needs no CUDA)
CASES = [
    # usage: exit 2
    ("no-command", [], {}, 2, ["usage: npu-ft COMMAND", "npu-ft: error: a command is required"], [], False),
    ("unknown-command", ["bogus"], {}, 2, ["unknown command 'bogus'"], [], False),
    ("train-no-recipe", ["train"], {}, 2, ["recipe is missing"], [], False),
    ("train-unknown-flag", ["train", "{ok}", "--foo"], {}, 2, ["unknown option '--foo'"], ["{root}/out"], False),
    ("train-nproc-0", ["train", "--nproc-per-node", "0", "{ok}"], {}, 2, ["--nproc-per-node '0'"], ["{root}/out"],
     False),
    ("export-no-args", ["export"], {}, 2, ["usage: npu-ft export", "npu-ft export: error:"], [], False),
    ("demo-steps-0", ["demo", "--steps", "0", "--output-dir", "{root}/demo"], {}, 2,
     ["argument --steps: expected a positive integer, got '0'"], ["{root}/demo"], False),
    ("demo-device-bogus", ["demo", "--device", "bogus", "--output-dir", "{root}/demo"], {}, 2,
     ["argument --device: invalid choice: 'bogus'"], ["{root}/demo"], False),
    ("doctor-device-bogus", ["doctor", "--device", "bogus"], {}, 2, ["argument --device: invalid choice"], [], False),
    ("env-device-bogus", ["env", "--device", "bogus"], {}, 2, ["argument --device: invalid choice"], [], False),
    ("bench-repeats-0", ["bench", "{suite}", "--repeats", "0", "--out", "{root}/bench"], {}, 2,
     ["argument --repeats: expected a positive integer"], ["{root}/bench"], False),
    # bad input: exit 1, one line
    ("train-missing-yaml", ["train", "{root}/missing.yaml"], {}, 1, ["missing.yaml: file not found"], [], False),
    ("train-invalid-yaml", ["train", "{broken}"], {}, 1, ["broken.yaml:3: invalid YAML"], [], False),
    ("train-unknown-key", ["train", "{badkey}"], {}, 1, ["bad-key.yaml", "key 'lora_rnak'", "lora_rank"],
     ["{root}/out"], False),
    ("train-bad-override", ["train", "{ok}", "learning_rate=fast"], {}, 1, ["learning_rate=fast"], ["{root}/out"],
     False),
    ("train-no-model", ["train", "{ok}", "model_name_or_path={root}/no-model"], {}, 1, ["ok.yaml", "no-model"],
     ["{root}/out"], False),
    ("train-no-tokenizer", ["train", "{ok}", "model_name_or_path={notok}"], {}, 1,
     ["ok.yaml", "no-tokenizer", "no tokenizer files"], ["{root}/out"], False),
    ("train-dataset-not-in-info", ["train", "{ok}", "dataset=nope"], {}, 1, ["'nope'", "dataset_info.json"],
     ["{root}/out"], False),
    ("train-missing-data-file", ["train", "{ok}", "dataset_dir={nofile}"], {}, 1, ["missing.json"], ["{root}/out"],
     False),
    ("train-malformed-jsonl", ["train", "{ok}", "dataset_dir={baddata}"], {}, 1, ["toy.jsonl:3"], ["{root}/out"],
     False),
    ("train-unknown-template", ["train", "{ok}", "template=llama9"], {}, 1,
     ["override 'template=llama9'", "key 'template'", "llama9"], ["{root}/out"], False),
    ("train-tracker-missing", ["train", "{ok}", "report_to={tracker}"], {}, 1,
     ["override 'report_to=", "key 'report_to'", "not installed"], ["{root}/out"], False),
    ("train-device-unavailable", ["train", "{ok}", "device=cuda"], {}, 1, ["key 'device'", "cuda unavailable"],
     ["{root}/out"], True),
    ("train-bad-device-env", ["train", "{ok}", "device=auto"], {"NPU_FT_DEVICE": "foo"}, 1,
     ["NPU_FT_DEVICE='foo'", "auto, cpu, cuda, npu"], ["{root}/out"], False),
    ("train-launcher-bad-data", ["train", "--nproc-per-node", "2", "{ok}", "dataset_dir={baddata}"], {}, 1,
     ["toy.jsonl:3"], ["{root}/out"], False),
    ("env-bad-device-env", ["env"], {"NPU_FT_DEVICE": "foo"}, 1, ["npu-ft env:", "NPU_FT_DEVICE='foo'"], [], False),
    ("doctor-bad-device-env", ["doctor", "--json", "{root}/doctor.json"], {"NPU_FT_DEVICE": "foo"}, 1,
     ["npu-ft doctor:", "NPU_FT_DEVICE='foo'"], ["{root}/doctor.json"], False),
    ("demo-bad-device-env", ["demo", "--device", "auto", "--output-dir", "{root}/demo"], {"NPU_FT_DEVICE": "foo"}, 1,
     ["npu-ft demo:", "NPU_FT_DEVICE='foo'"], ["{root}/demo"], False),
    ("bench-bad-device-env", ["bench", "--list", "{suite}"], {"NPU_FT_DEVICE": "foo"}, 1,
     ["npu-ft bench:", "NPU_FT_DEVICE='foo'"], [], False),
    ("doctor-device-unavailable", ["doctor", "--device", "cuda", "--json", "{root}/doctor.json"], {}, 1,
     ["npu-ft doctor:", "cuda unavailable"], ["{root}/doctor.json"], True),
    ("demo-device-unavailable", ["demo", "--device", "cuda", "--output-dir", "{root}/demo"], {}, 1,
     ["npu-ft demo:", "cuda unavailable"], ["{root}/demo"], True),
    ("export-size-0", ["export", "model_name_or_path={model}", "adapter_name_or_path={adapter}",
                       "export_dir={root}/merged", "export_size=0"], {}, 1, ["key 'export_size'"], ["{root}/merged"],
     False),
    ("export-garbage-adapter", ["export", "model_name_or_path={model}", "adapter_name_or_path={junk}",
                                "export_dir={root}/merged"], {}, 1, ["junk-adapter/adapter_model.safetensors"],
     ["{root}/merged"], False),
    ("export-over-the-model", ["export", "model_name_or_path={model}", "adapter_name_or_path={adapter}",
                               "export_dir={model}"], {}, 1, ["key 'export_dir'", "model_name_or_path folder"], [],
     False),
    ("export-no-model", ["export", "model_name_or_path={root}/no-model", "adapter_name_or_path={adapter}",
                         "export_dir={root}/merged"], {}, 1, ["no-model"], ["{root}/merged"], False),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fault(world, case):
    name, args, env, code, fragments, absent, needs_no_cuda = case
    if needs_no_cuda and torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    proc = npu_ft(*(a.format(**world) for a in args), env=cli_env(**env))
    err = proc.stderr
    assert proc.returncode == code, f"{name}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{err[-4000:]}"
    assert "Traceback" not in err + proc.stdout, err
    ours = [line for line in err.splitlines() if line.startswith("npu-ft")]
    prog = f"npu-ft {args[0]}" if args and code == 1 else "npu-ft"
    assert ours and ours[-1].startswith(prog) and ": error: " in ours[-1], err
    if code == 1:
        assert len(ours) == 1, err
    text = ours[-1] if code == 1 else err
    for fragment in fragments:
        assert fragment.format(**world) in text, (fragment, err)
    for path in absent:
        assert not Path(path.format(**world)).exists(), f"{name} left {path.format(**world)}"
    assert not foreign_lines(err), err


def test_help_anywhere_starts_nothing(world):
    """``--help`` after the launcher flags and the recipe prints help; no torchrun, no output."""
    proc = npu_ft("train", "--nproc-per-node", "2", world["ok"], "--help")
    assert proc.returncode == 0 and proc.stdout.startswith("usage: npu-ft train"), proc.stderr
    assert proc.stderr == "" and not Path(world["root"], "out").exists()
