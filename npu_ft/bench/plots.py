"""The report's plots (matplotlib, Agg): tokens/s against training memory with each implementation's
frontier, and the loss curves with their relative difference to the reference (or, in a group
without one, to its first lane).

Colour is the method (``method_name``: "dora", "qdora", "full+adamw_8bit", ...), the marker the
implementation (one legend for each); panels come in the order the report's tables list them; point
labels are placed where they do not cover another label. A panel with several methods labels each
point with its method and trainable parameters.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from .frontier import frontier, method_label, point_label

METHOD_COLOURS = {"lora": "tab:blue", "qlora": "tab:orange", "full": "tab:green", "dora": "tab:purple",
                  "qdora": "tab:pink", "pissa": "tab:brown", "lora_fa": "tab:cyan", "vera": "tab:olive",
                  "qlora_fa": "teal", "qvera": "goldenrod", "full+adamw_8bit": "tab:red",
                  "full+adamw_8bit_all": "darkred"}
IMPL_MARKERS = {"npu-ft": "o", "reference": "s", "llamafactory": "D", "llamafactory+npu-ft": "^"}
IMPL_LINES = {"npu-ft": "-", "reference": "--", "llamafactory": ":", "llamafactory+npu-ft": "-."}
#: label offsets (points) tried in turn until one overlaps no placed label and stays inside the axes:
#: beside the point first, then stacked further above and below it (a label line apart, up to 12
#: lines: dense clusters), right before left; a label left of its point ends there (right-aligned),
#: one away from its point gets a thin leader line
_OFFSETS = [(dx, dy) for k in range(13) for dx in (6, -6) for dy in ((4 + 11 * k), (-12 - 11 * k))]
_LEADER_BEYOND = 16


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _ok(rows: Iterable[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") not in (None, "failed")]


def _ordered(keys: Iterable[tuple]) -> list[tuple]:
    """Distinct keys in first-seen order (the report's order)."""
    return list(dict.fromkeys(keys))


def place_labels(ax, points: list[tuple[float, float, str]], fontsize: int = 7) -> list:
    """Annotate ``(x, y, text)`` points, each at the first offset whose box overlaps no label placed
    before it and no point's marker and lies inside the axes (where the legends beside them cannot cover it); when none
    does, the first offset inside the axes, else the first. Returns the annotations."""
    from matplotlib.transforms import Bbox

    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    inside = ax.get_window_extent(renderer)
    # the markers are obstacles too (a label may not run over another point)
    placed: list = [Bbox.from_extents(px - 5, py - 5, px + 5, py + 5)
                    for px, py in ax.transData.transform([(x, y) for x, y, _ in points])] if points else []
    out = []
    for x, y, text in points:
        fits = []  # (overlaps nothing, inside the axes) per offset
        for dx, dy in _OFFSETS:
            ann = _annotate(ax, x, y, text, dx, dy, fontsize)
            box = _text_box(ann, renderer)
            ann.remove()
            within = (box.x0 >= inside.x0 and box.x1 <= inside.x1 and box.y0 >= inside.y0 and box.y1 <= inside.y1)
            fits.append((within and not any(box.overlaps(b) for b in placed), within))
        choice = next((i for i, (free, _) in enumerate(fits) if free),
                      next((i for i, (_, within) in enumerate(fits) if within), 0))
        ann = _annotate(ax, x, y, text, *_OFFSETS[choice], fontsize)
        placed.append(_text_box(ann, renderer))
        out.append(ann)
    return out


def _text_box(ann, renderer):
    """The box of an annotation's text, without its leader line."""
    from matplotlib.text import Text

    ann.update_positions(renderer)
    return Text.get_window_extent(ann, renderer)


def _place_after_layout(fig, pending: list[tuple]) -> None:
    """Lay the figure out, then label each ``(ax, points)``: labels are placed in screen space, so
    the axes must not move or rescale after them (a later tight_layout would push them together)."""
    fig.tight_layout()
    for ax, points in pending:
        place_labels(ax, points)


def _annotate(ax, x: float, y: float, text: str, dx: float, dy: float, fontsize: int):
    leader = dict(arrowstyle="-", lw=0.5, color="gray", shrinkA=0, shrinkB=4) if abs(dy) > _LEADER_BEYOND else None
    return ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), fontsize=fontsize,
                       ha="left" if dx >= 0 else "right", arrowprops=leader)


def _params(n: float) -> str:
    """4.4e6 -> "4.4M" trainable parameters."""
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}k"


def _point_label(row: dict, methods: bool, settings: bool) -> str:
    """A point's label: its method and trainable parameters (several methods in the panel), and its
    checkpointing, batch and sequence (when those vary in the panel)."""
    parts = []
    if methods:  # the implementation too where it is not npu-ft (the marker alone is easy to miss there)
        who = "" if row["implementation"] == "npu-ft" else f"{row['implementation']}: "
        parts.append(f"{who}{method_label(row)} {_params(row['trainable_params'])}")
    if settings or not methods:
        parts.append(point_label(row))
    return ", ".join(parts)


def _point(ax, row: dict, mem_key: str) -> tuple[float, float]:
    """Draw ``row`` at (``row[mem_key]`` in MiB, tokens/s) with its min-max tokens/s as a bar, coloured
    by method and marked by implementation; returns the point."""
    x, y = row[mem_key] / 2**20, row["tokens_per_s"]
    ax.errorbar(x, y, yerr=[[y - row["tokens_per_s_min"]], [row["tokens_per_s_max"] - y]],
                fmt=IMPL_MARKERS.get(row["implementation"], "v"), color=METHOD_COLOURS.get(method_label(row), "gray"),
                markersize=7, capsize=3)
    return x, y


def _legends(ax, methods: list[str], impls: list[str]) -> None:
    from matplotlib.lines import Line2D

    colour = [Line2D([], [], color=METHOD_COLOURS.get(m, "gray"), marker="o", linestyle="", label=m) for m in methods]
    marker = [Line2D([], [], color="black", marker=IMPL_MARKERS.get(i, "v"), linestyle=IMPL_LINES.get(i, "-"),
                     label=i) for i in impls]
    # outside the axes, right of it: a legend never covers a point
    first = ax.legend(handles=colour, title="colour: method", fontsize=7, title_fontsize=7, loc="upper left",
                      bbox_to_anchor=(1.02, 1.0), borderaxespad=0)
    ax.add_artist(first)
    ax.legend(handles=marker, title="marker, line: implementation", fontsize=7, title_fontsize=7,
              loc="upper left", bbox_to_anchor=(1.02, 0.55), borderaxespad=0)


def plot_memory_vs_throughput(rows, path) -> None:
    """A panel per (model, device, dtype, data): tokens/s against training memory, a point per case
    (bars: min-max tokens/s), each implementation's frontier per method as a step line."""
    plt = _plt()
    ok = [r for r in _ok(rows) if r.get("train_mem_bytes") is not None]
    panels = _ordered((r["model"], r["device"], r["dtype"], r.get("data", "random")) for r in ok)
    n = max(1, len(panels))
    fig, axes = plt.subplots(1, n, figsize=(8.5 * n, 5.2), squeeze=False)
    pending = []
    for ax, panel in zip(axes[0], panels, strict=False):
        members = [r for r in ok if (r["model"], r["device"], r["dtype"], r.get("data", "random")) == panel]
        labels = []
        several_methods = len({method_label(r) for r in members}) > 1
        several_settings = len({(r.get("policy"), r["batch_size"], r["seq_len"]) for r in members}) > 1
        for r in members:
            x, y = _point(ax, r, "train_mem_bytes")
            labels.append((x, y, _point_label(r, several_methods, several_settings)))
        for method, impl in _ordered((method_label(r), r["implementation"]) for r in members):
            line = frontier([r for r in members if method_label(r) == method and r["implementation"] == impl])
            if len(line) > 1:
                ax.step([r["train_mem_bytes"] / 2**20 for r in line], [r["tokens_per_s"] for r in line], where="post",
                        color=METHOD_COLOURS.get(method, "gray"), linestyle=IMPL_LINES.get(impl, "-"), alpha=0.6)
        model, dev, dt, data = panel
        ax.set_title(f"{model} on {dev}, {dt}, data {data}", fontsize=9)
        ax.set_xlabel("training memory: peak - post-build baseline (MiB)")
        ax.set_ylabel("tokens/s (median, bars: min-max)")
        ax.grid(alpha=0.3)
        _legends(ax, _ordered(method_label(r) for r in members), _ordered(r["implementation"] for r in members))
        pending.append((ax, labels))
    _place_after_layout(fig, pending)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_methods(rows, path) -> None:
    """Every method as one point per implementation, labelled with its method and trainable
    parameters: tokens/s against the absolute peak (where QLoRA's and QDoRA's smaller weights show)
    and against the training increment. When full fine-tuning is among them, npu-ft's adapter methods
    get panels of their own (they sit close together, far from full fine-tuning and the reference).
    For suites that compare methods (``adapter`` / ``optim`` settings)."""
    plt = _plt()
    ok = [r for r in _ok(rows) if r.get("train_mem_bytes") is not None]
    adapters = [r for r in ok if r["method"] != "full" and r["implementation"] == "npu-ft"]
    peak = ("peak_mem_bytes", "peak memory, absolute (MiB; CPU: resident set)")
    train = ("train_mem_bytes", "training memory: peak - post-build baseline (MiB)")
    if adapters and len(adapters) < len(ok):
        panels = [(peak, ok, "every method"), (peak, adapters, "npu-ft's adapter methods"),
                  (train, adapters, "npu-ft's adapter methods")]
    else:
        panels = [(peak, ok, "every method"), (train, ok, "every method")]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 6), squeeze=False)
    first = ok[0] if ok else {}
    pending = []
    for ax, ((key, xlabel), members, what) in zip(axes[0], panels, strict=True):
        labels = []
        for r in members:
            x, y = _point(ax, r, key)
            who = "" if r["implementation"] == "npu-ft" else f"{r['implementation']}: "
            # the checkpointing only where it tells two points of one method and implementation apart
            twins = {o.get("policy") for o in ok
                     if (method_label(o), o["implementation"]) == (method_label(r), r["implementation"])}
            policy = f" ({r.get('policy')})" if len(twins) > 1 else ""
            labels.append((x, y, f"{who}{method_label(r)}{policy} {_params(r['trainable_params'])}"))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("tokens/s (median, bars: min-max)")
        ax.grid(alpha=0.3)
        ax.set_title(f"{what}: {first.get('model', '')}, {first.get('device', '')}, {first.get('dtype', '')}, "
                     f"{first.get('seq_len', '')}×{first.get('batch_size', '')} tokens/step", fontsize=9)
        pending.append((ax, labels))
    _legends(axes[0][-1], _ordered(method_label(r) for r in ok), _ordered(r["implementation"] for r in ok))
    fig.suptitle("label: method and trainable parameters", fontsize=9)
    _place_after_layout(fig, pending)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _lane(row: dict) -> str:
    return f"{row['implementation']} ({row.get('policy', '')}, {row['device']})"


def _loss_baseline(members: list[dict]) -> dict:
    """The lane the others' losses are compared with: the reference at full checkpointing, any
    reference, else the group's first lane (a group without a reference still shows its spread)."""
    refs = [r for r in members if r["implementation"] == "reference"]
    return next((r for r in refs if r.get("policy") == "full"), refs[0] if refs else members[0])


def plot_loss_curves(rows, path) -> None:
    """A column per parity group: overlaid loss curves, and under them each curve's relative
    difference to the group's baseline (:func:`_loss_baseline`, named in the panel; log scale, exact
    zeros drawn at the axis floor)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    ok = _ok(rows)
    groups = _ordered(r.get("parity_key") or r["case_id"] for r in ok)
    n = max(1, len(groups))
    cols = min(3, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(2 * nrows, cols, figsize=(5.2 * cols, 5.4 * nrows), squeeze=False,
                             gridspec_kw={"height_ratios": [2, 1] * nrows})
    for i, key in enumerate(groups):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        members = [r for r in ok if (r.get("parity_key") or r["case_id"]) == key]
        ref = _loss_baseline(members)
        ref_losses = json.loads(ref["losses"])
        floor = 1e-10
        for r in members:
            losses = json.loads(r["losses"])
            label = _lane(r)
            style = dict(linestyle=IMPL_LINES.get(r["implementation"], "-"),
                         marker=IMPL_MARKERS.get(r["implementation"], "v"), markersize=4)
            (line,) = top.plot(range(len(losses)), losses, label=label, **style)
            if r is not ref:  # the same colour as its loss curve above
                diffs = [max(abs(a - b) / max(abs(b), 1e-12), floor) for a, b in zip(losses, ref_losses, strict=False)]
                bottom.plot(range(len(diffs)), diffs, label=label, color=line.get_color(), **style)
        m = members[0]
        top.set_title(f"{m['model']} {method_label(m)} {m['dtype']} {m.get('data', '')} seq {m['seq_len']}×"
                      f"{m['batch_size']}", fontsize=9)
        top.set_ylabel("loss")
        top.legend(fontsize=6)
        bottom.set_yscale("log")
        bottom.set_ylabel("|loss - ref| / ref", fontsize=8)
        bottom.set_xlabel("step")
        bottom.set_title(f"ref: {_lane(ref)}" if len(members) > 1 else "one lane: nothing to compare", fontsize=7)
        for ax in (top, bottom):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
    for j in range(n, nrows * cols):
        axes[2 * (j // cols), j % cols].axis("off")
        axes[2 * (j // cols) + 1, j % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
