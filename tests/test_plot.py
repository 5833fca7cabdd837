"""The figures: every text element inside the canvas, the colour scale's ends equal to the data's range, the
circuit marked, at model sizes from a tiny model to 64 heads x 80 layers, as SVG (by hand) and PNG/PDF
(matplotlib)."""
import json
import random
import sys
import xml.etree.ElementTree as ET

import pytest

import plot
from tests.test_cli import assert_usage_error, run

SVG = "{http://www.w3.org/2000/svg}"
SIZES = [(2, 4), (16, 9), (30, 9), (32, 32), (80, 64)]  # (layers, heads): a tiny model ... a 70B-like one


def locate_result(layers, heads, seed=0):
    """A heads.json as locate.py writes it, with a random loss matrix that climbs with the layer."""
    g = random.Random(seed)
    matrix = [[50.0 + 3 * layer + g.uniform(-5, 20) for _ in range(heads)] for layer in range(layers)]
    per_layer = max(1, heads // 4)
    circuit = {str(layer): {"retain_heads": sorted(g.sample(range(heads), per_layer))} for layer in range(layers)}
    return {"knowledge_circuit": circuit, "loss_matrix": matrix, "unmasked_loss": 55.0,
            "sample_indices": list(range(8)), "model": "/models/some-very-long-model-name-7b-instruct-v2",
            "dataset": "arc_challenge", "prompt": "harness", "layers": layers, "heads": heads}


def text_boxes(root):
    """(x0, y0, x1, y1) of each SVG text element, from its anchor, size and length: the same character width
    plot.py lays out with, since no renderer is installed here."""
    for t in root.iter(SVG + "text"):
        x, y, size = float(t.get("x")), float(t.get("y")), float(t.get("font-size"))
        w = len(t.text) * size * plot.CHAR_EM
        start = {"start": 0.0, "middle": -w / 2, "end": -w}[t.get("text-anchor")]
        if t.get("transform"):  # rotate(-90) about (x, y): the text runs upwards, its glyphs left of x
            yield x - size, y - start - w, x + 0.25 * size, y - start
        else:
            yield x + start, y - size, x + start + w, y + 0.25 * size


def assert_texts_inside(root):
    width, height = float(root.get("width")), float(root.get("height"))
    boxes = list(text_boxes(root))
    assert boxes
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 and x1 <= width and 0 <= y0 and y1 <= height, ((x0, y0, x1, y1), (width, height))


@pytest.mark.parametrize("layers,heads", SIZES)
@pytest.mark.parametrize("per_layer", [False, True])
def test_heat_map_svg_fits_its_canvas_and_its_scale_is_the_data_range(layers, heads, per_layer, tmp_path):
    result = locate_result(layers, heads)
    path = tmp_path / "heads.svg"
    plot.heat_map(result, str(path), per_layer)
    root = ET.parse(path).getroot()
    assert_texts_inside(root)
    # the values shaded: loss increase over the unmasked model per sample, or each layer rescaled to 0..1
    matrix = result["loss_matrix"]
    if per_layer:
        expect = [[(v - min(r)) / (max(r) - min(r)) for v in r] for r in matrix]
    else:
        expect = [[(v - 55.0) / 8 for v in r] for r in matrix]
    lo, hi = min(map(min, expect)), max(map(max, expect))
    bar = next(r for r in root.iter(SVG + "rect") if r.get("id") == "colour-bar")
    assert float(bar.get("data-min")) == pytest.approx(lo) and float(bar.get("data-max")) == pytest.approx(hi)
    labels = [float(t.text) for t in root.iter(SVG + "text") if float(t.get("x")) > float(bar.get("x"))
              and not t.get("transform")]
    assert min(labels) == pytest.approx(lo, rel=1e-2, abs=1e-3) and max(labels) == pytest.approx(hi, rel=1e-2)
    cells = [r for r in root.iter(SVG + "rect") if r.find(SVG + "title") is not None]
    assert len(cells) == layers * heads
    fills = {c.find(SVG + "title").text: c.get("fill") for c in cells}
    low_layer, low_head = min(((lay, h) for lay in range(layers) for h in range(heads)), key=lambda p: expect[p[0]][p[1]])
    high_layer, high_head = max(((lay, h) for lay in range(layers) for h in range(heads)), key=lambda p: expect[p[0]][p[1]])
    assert next(f for t, f in fills.items() if t.startswith(f"layer {low_layer}, head {low_head}:")) == plot.VIRIDIS[0]
    assert next(f for t, f in fills.items() if t.startswith(f"layer {high_layer}, head {high_head}:")) == plot.VIRIDIS[-1]
    outlined = [r for r in root.iter(SVG + "rect") if r.get("stroke") == "#ff2a2a"]
    assert len(outlined) == sum(len(e["retain_heads"]) for e in result["knowledge_circuit"].values())


def assert_drawn_inside(fig):
    """Everything matplotlib draws (the tight box of all artists, tick labels in view only) and every label,
    title, legend and colour-bar text lies inside the figure's canvas."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    tight = fig.get_tightbbox(renderer)  # inches
    assert tight.x0 >= 0 and tight.y0 >= 0, tight
    assert tight.x1 <= fig.get_figwidth() and tight.y1 <= fig.get_figheight(), (tight, fig.get_size_inches())
    labels = [t for ax in fig.axes for t in (ax.title, ax.xaxis.label, ax.yaxis.label)]  # colour bar's too
    labels += [t for ax in fig.axes if ax.get_legend() for t in [*ax.get_legend().get_texts(), ax.get_legend().get_title()]]
    for t in labels:
        if t.get_visible() and t.get_text():
            box = t.get_window_extent(renderer)
            assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, t.get_text()


@pytest.mark.parametrize("layers,heads", [(2, 4), (32, 32), (80, 64)])
def test_heat_map_png_fits_its_canvas_and_its_scale_is_the_data_range(layers, heads, tmp_path):
    result = locate_result(layers, heads)
    values, scale, circuit, title = plot.heat_map_data(result)
    fig = plot.heat_map_figure(values, scale, circuit, title)
    assert_drawn_inside(fig)
    assert fig.axes[0].get_title().startswith(title[:20]) and fig.axes[0].get_xlabel() == "head"
    image = fig.axes[0].images[0]
    assert image.get_clim() == (min(map(min, values)), max(map(max, values)))
    assert image.get_clim()[0] == pytest.approx(min(min(r) for r in result["loss_matrix"]) / 8 - 55.0 / 8)
    plot.pyplot().close(fig)
    for ext, magic in (("png", b"\x89PNG"), ("pdf", b"%PDF")):
        plot.heat_map(result, str(tmp_path / f"heads.{ext}"))
        assert (tmp_path / f"heads.{ext}").read_bytes().startswith(magic)


def training_run(folder, steps, seed, every=5):
    g = random.Random(seed)
    folder.mkdir()
    (folder / "training.json").write_text(json.dumps({"val_loss_before": 2.7, "dataset": "arc_easy"}))
    lines = []
    for step in range(1, steps + 1):
        entry = {"step": step, "loss": 2.6 - step / steps + g.uniform(-0.2, 0.2)}
        if step % every == 0 or step == steps:
            entry["val_loss"] = 2.5 - 0.5 * step / steps
        lines.append(json.dumps(entry))
    (folder / "log.jsonl").write_text("\n".join(lines) + "\n")
    return str(folder)


def test_training_curves_svg_and_png(tmp_path):
    runs = [training_run(tmp_path / name, steps, i) for i, (name, steps) in
            enumerate([("arc_easy_headmap_mha_seed0", 282), ("lora", 282), ("a", 3)])]
    plot.curves(runs, str(tmp_path / "curves.svg"), title="ARC-Easy: HeadMap against LoRA, full protocol")
    root = ET.parse(tmp_path / "curves.svg").getroot()
    assert_texts_inside(root)
    dots = [c for c in root.iter(SVG + "circle") if c.find(SVG + "title") is not None]
    assert len(dots) == (1 + 57) * 2 + (1 + 1)  # step 0 (the base model) and every validation
    legend = [t.text for t in root.iter(SVG + "text")]
    assert {"arc_easy_headmap_mha_seed0", "lora", "a"} <= set(legend)
    fig = plot.curves_figure([plot.read_run(r) for r in runs], "ARC-Easy")
    assert_drawn_inside(fig)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["arc_easy_headmap_mha_seed0", "lora", "a"]
    plot.pyplot().close(fig)


def test_plot_cli(tmp_path):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps(locate_result(30, 9)))
    done = run("plot.py", "heatmap", str(heads), "--out", str(tmp_path / "h.png"), "--per-layer")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "h.png").read_bytes().startswith(b"\x89PNG")
    assert_usage_error(run("plot.py", "heatmap", str(heads), "--out", str(tmp_path / "h.jpg")),
                       "cannot tell the figure format of")
    assert_usage_error(run("plot.py", "curves", str(tmp_path), "--out", str(tmp_path / "c.svg")),
                       "no training log")
    assert_usage_error(run("plot.py", "curves", training_run(tmp_path / "r", 4, 0), "--labels", "a,b",
                           "--out", str(tmp_path / "c.svg")), "--labels names 2 runs but 1 were given")


def test_png_without_matplotlib_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(plot.UsageError, match="PNG and PDF figures need matplotlib: pip install matplotlib"):
        plot.heat_map(locate_result(2, 4), str(tmp_path / "h.png"))
    assert not list(tmp_path.iterdir())  # nothing half-written
    plot.heat_map(locate_result(2, 4), str(tmp_path / "h.svg"))  # SVG needs nothing
