"""The report's plots: point labels stay inside the axes and clear of each other, and every loss
group shows its relative differences (to the reference, or to its first lane)."""

from __future__ import annotations

import json

import pytest

from npu_ft.bench import plots


def test_labels_stay_inside_the_axes_and_apart():
    plt = plots._plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    # a point on the right edge (its label would run into the legends beside the axes), and a cluster
    points = [(8000, 69, "off b1 s1024"), (1000, 62, "full b1 s1024"), (4400, 84, "selective b2 s1024"),
              (4450, 80, "selective b1 s1024"), (4460, 79, "full b2 s1024")]
    ax.scatter([x for x, _, _ in points], [y for _, y, _ in points])
    ax.set_xlim(800, 8100)
    ax.set_ylim(50, 95)
    anns = plots.place_labels(ax, points)
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    boxes = [plots._text_box(a, renderer) for a in anns]
    for box, (_, _, text) in zip(boxes, points, strict=True):
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1, text
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            assert not a.overlaps(b)
    # the edge point's label ends at the point, on its left
    assert anns[0].get_horizontalalignment() == "right"
    plt.close(fig)


def _row(impl, policy, losses, key="g"):
    return {"implementation": impl, "policy": policy, "device": "cpu", "losses": json.dumps(losses),
            "parity_key": key, "case_id": f"{impl}-{policy}", "status": "ok", "model": "m", "method": "lora",
            "dtype": "float32", "data": "random", "seq_len": 8, "batch_size": 1}


@pytest.mark.parametrize("rows, baseline", [
    ([_row("npu-ft", "selective", [1.0]), _row("reference", "selective", [1.0]), _row("reference", "full", [1.0])],
     ("reference", "full")),
    ([_row("npu-ft", "selective", [1.0]), _row("reference", "selective", [1.0])], ("reference", "selective")),
    ([_row("npu-ft", "selective", [1.0]), _row("llamafactory", "full", [1.0])], ("npu-ft", "selective")),
])
def test_loss_differences_have_a_baseline_in_every_group(rows, baseline):
    base = plots._loss_baseline(rows)
    assert (base["implementation"], base["policy"]) == baseline


def test_loss_curves_without_a_reference(tmp_path):
    rows = [_row("npu-ft", "selective", [2.0, 1.5, 1.2], "a"), _row("llamafactory", "full", [2.0, 1.5, 1.2000001], "a"),
            _row("reference", "full", [3.0, 2.0], "b"), _row("npu-ft", "full", [3.0, 2.0001], "b")]
    out = tmp_path / "loss.png"
    plots.plot_loss_curves(rows, out)
    assert out.stat().st_size > 10_000
