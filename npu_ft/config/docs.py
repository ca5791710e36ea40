"""The config reference, generated from the fields' metadata::

    python -m npu_ft.config.docs > docs/config.md      # a test checks the file is up to date

:func:`keys_help` is the shorter listing ``npu-ft train --help`` prints, by group.
"""

from __future__ import annotations

import sys
import textwrap

from .sft import GROUPS, OPTIONS

__all__ = ["keys_help", "options_markdown"]

_GROUP_TITLES = {
    "model": "Model", "method": "Method", "data": "Data", "training": "Training",
    "npu_ft": "npu-ft only", "generation": "Generation", "other": "Other",
}


def options_markdown() -> str:
    """The config reference as Markdown (docs/config.md is generated from / checked against this)."""
    lines = ["# Configuration reference", "",
             "Generated from the config dataclasses in `npu_ft/config/` (`python -m npu_ft.config.docs > "
             "docs/config.md`). Keys are LLaMA-Factory 0.9.5's (`stage: sft`) plus npu-ft's own; `key=value` "
             "after the YAML file overrides it.", ""]
    for group in GROUPS:
        supported = [o for o in OPTIONS.values()
                     if o.group == group and o.curated and o.status == "supported"]
        if supported:
            lines += [f"## {_GROUP_TITLES[group]}", "", "| key | type | default | allowed | description |",
                      "|---|---|---|---|---|"]
            for o in supported:
                doc = o.doc.replace("|", "\\|")
                if o.unsupported_values:
                    doc += " Not yet: " + ", ".join(repr(k) for k in o.unsupported_values) + "."
                default = ",".join(o.default) if isinstance(o.default, list) else o.default
                lines.append(f"| `{o.name}` | {o.type} | `{default!r}` | {o.range_text()} | {doc} |")
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


def keys_help(width: int = 100) -> str:
    """The supported keys by group with their defaults, for ``npu-ft train --help``."""
    out = []
    for group in GROUPS:
        keys = [o for o in OPTIONS.values() if o.group == group and o.curated and o.status == "supported"]
        if not keys:
            continue
        items = ", ".join(f"{o.name}={','.join(o.default) if isinstance(o.default, list) else o.default}"
                          for o in keys)
        out.append(f"{_GROUP_TITLES[group]} keys:")
        out.append(textwrap.fill(items, width=width, initial_indent="  ", subsequent_indent="  "))
    out.append("Every other transformers TrainingArguments field is passed through; LLaMA-Factory keys npu-ft does "
               "not implement are listed in docs/config.md.")
    return "\n".join(out)


if __name__ == "__main__":
    sys.stdout.write(options_markdown())
