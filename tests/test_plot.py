"""The figures: everything drawn inside the canvas, the colour scale's ends equal to the data's range, the circuit
marked, at model sizes from a tiny model to 64 heads x 80 layers, written as SVG, PNG and PDF."""
import json
import random
import xml.etree.ElementTree as ET

import pytest
import torch

from cli import figures
from tests.conftest import assert_usage_error, run

SVG = "{http://www.w3.org/2000/svg}"
SIZES = [(2, 4), (16, 9), (30, 9), (32, 32), (80, 64)]  # (layers, heads): a tiny model ... a 70B-like one


def locate_result(layers, heads, seed=0):
    """A heads.json as locate.py writes it, with a random loss matrix that climbs with the layer."""
    g = random.Random(seed)
    matrix = [[50.0 + 3 * layer + g.uniform(-5, 20) for _ in range(heads)] for layer in range(layers)]
    per_layer = max(1, heads // 4)
    circuit = {str(layer): {"retain_heads": sorted(g.sample(range(heads), per_layer))} for layer in range(layers)}
    below = [50.0 + 3 * layer for layer in range(layers)]  # the "no head" row: the circuit below alone
    return {"knowledge_circuit": circuit, "loss_matrix": matrix, "circuit_below_loss": below, "unmasked_loss": 55.0,
            "sample_indices": list(range(8)), "model": "/models/some-very-long-model-name-7b-instruct-v2",
            "dataset": "arc_challenge", "prompt": "harness", "layers": layers, "heads": heads}


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


@pytest.mark.parametrize("layers,heads", SIZES)
@pytest.mark.parametrize("view", ["marginal", "cumulative", "per-layer"])
def test_heat_map_fits_its_canvas_and_its_scale_is_the_data_range(layers, heads, view, tmp_path):
    result = locate_result(layers, heads)
    values, scale, circuit, title = figures.heat_map_data(result, view)
    # the values shaded: each head's own effect (over the circuit below alone) or the increase over the unmasked
    # model, per sample; or each layer rescaled to 0..1
    matrix = result["loss_matrix"]
    expect = {"marginal": [[(v - (50.0 + 3 * layer)) / 8 for v in r] for layer, r in enumerate(matrix)],
              "cumulative": [[(v - 55.0) / 8 for v in r] for r in matrix],
              "per-layer": [[(v - min(r)) / (max(r) - min(r)) for v in r] for r in matrix]}[view]
    assert [v for row in values for v in row] == pytest.approx([v for row in expect for v in row])
    fig = figures.heat_map_figure(values, scale, circuit, title, signed=view != "per-layer")
    assert_drawn_inside(fig)
    ax = fig.axes[0]
    assert ax.get_title().startswith(title[:20]) and ax.get_xlabel() == "head" and ax.get_ylabel() == "layer"
    image = ax.images[0]
    reach = max(abs(v) for row in expect for v in row)  # signed effects: centred on zero, equal reach both ways
    assert image.get_clim() == pytest.approx((-reach, reach) if view != "per-layer" else (0.0, 1.0))
    assert image.get_array().shape == (layers, heads)
    outlined = {(round(p.get_y() + 0.5), round(p.get_x() + 0.5)) for p in ax.patches}
    assert outlined == {(int(layer), h) for layer, e in result["knowledge_circuit"].items() for h in e["retain_heads"]}
    figures.pyplot().close(fig)
    for ext, magic in (("svg", b"<?xml"), ("png", b"\x89PNG"), ("pdf", b"%PDF")):
        figures.heat_map(result, str(tmp_path / f"heads.{ext}"), view)
        assert (tmp_path / f"heads.{ext}").read_bytes().startswith(magic)
    assert ET.parse(tmp_path / "heads.svg").getroot().tag == SVG + "svg"


def test_heat_map_of_an_older_heads_json_draws_the_cumulative_view_it_holds(tmp_path, capsys):
    result = locate_result(4, 4)
    del result["circuit_below_loss"]
    assert figures.heat_map_data(result)[:2] == figures.heat_map_data(result, "cumulative")[:2]
    assert "no circuit_below_loss (an older locate.py wrote it)" in capsys.readouterr().err
    figures.heat_map(result, str(tmp_path / "h.svg"))
    assert (tmp_path / "h.svg").read_bytes().startswith(b"<?xml")


def pixel(png, fig, ax, x, y):
    """The RGB of data point (x, y) of `ax` in the PNG `png` that `fig` was saved to at its own dpi."""
    import matplotlib.image
    px, py = ax.transData.transform((x, y))
    image = matplotlib.image.imread(png)
    return image[image.shape[0] - 1 - int(py), int(px), :3]


def test_heat_map_file_shows_negative_effects_blue_none_white_and_positive_red(tmp_path):
    result = locate_result(3, 4)
    result["loss_matrix"] = [[50.0, 50.0, 58.0, 42.0], [53.0, 53.0, 61.0, 45.0], [56.0, 56.0, 56.0, 56.0]]
    fig = figures.heat_map_figure(*figures.heat_map_data(result), signed=True)
    fig.canvas.draw()
    png = str(tmp_path / "h.png")
    fig.savefig(png, dpi=fig.dpi)
    ax = fig.axes[0]
    none, up, down = (pixel(png, fig, ax, h + 0.3, 0) for h in (0, 2, 3))  # off the outline at the cell's edge
    assert min(none) > 0.95  # no effect: white
    # a loss 1 nat higher per sample red, 1 nat lower blue, both at the ends of one diverging scale centred on zero
    red, blue = (figures.pyplot().get_cmap("RdBu_r")(end)[:3] for end in (1.0, 0.0))
    assert up == pytest.approx(red, abs=0.02) and down == pytest.approx(blue, abs=0.02)
    assert up[0] > up[2] and down[2] > down[0]
    figures.pyplot().close(fig)


def boxes_apart(a, b) -> bool:
    return a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0


@pytest.mark.parametrize("circuits", [2, 6])
def test_overlap_titles_fit_their_panels_and_counts_get_a_colour_each(circuits, tmp_path):
    results = [locate_result(6, 8, seed) for seed in range(circuits)]
    fig = figures.overlap_figure(*figures.overlap_data(results, [f"circuit {k}" for k in range(circuits)]))
    assert_drawn_inside(fig)
    renderer = fig.canvas.get_renderer()
    left, left_bar, right, right_bar = fig.axes
    for ax, others in ((left, (left_bar, right, right_bar)), (right, (left, left_bar, right_bar))):
        title = ax.title.get_window_extent(renderer)
        assert all(boxes_apart(title, o.get_window_extent(renderer)) for o in others), ax.get_title()
        assert all(boxes_apart(title, o.title.get_window_extent(renderer)) for o in others if o.get_title())
    assert "Jaccard index)" in left.get_title()
    assert list(right_bar.get_yticks()) == list(range(circuits + 1))  # a tick per count
    png = str(tmp_path / "o.png")
    fig.savefig(png, dpi=fig.dpi)
    colours = {tuple(pixel(png, fig, right_bar, 0.5, k).round(2)) for k in range(circuits + 1)}
    steps = {tuple(pixel(png, fig, right_bar, 0.5, k + d).round(2)) for k in range(circuits + 1) for d in (-0.3, 0.3)}
    assert len(colours) == circuits + 1 and steps == colours  # one flat colour per whole count, no gradient
    figures.pyplot().close(fig)


def test_overlap_of_circuits(tmp_path):
    a, b, c = (locate_result(6, 8, seed) for seed in range(3))
    a["knowledge_circuit"] = {"0": {"retain_heads": [0, 1]}, "1": {"retain_heads": [2, 3]}}
    b["knowledge_circuit"] = {"0": {"retain_heads": [1, 2]}, "1": {"retain_heads": [2, 3]}}
    c["knowledge_circuit"] = {"5": {"retain_heads": [7]}}
    labels, jaccard, counts, title = figures.overlap_data([a, b, c], ["a", "b", "c"])
    assert jaccard[0][1] == jaccard[1][0] == pytest.approx(3 / 5)  # {0:0,0:1,1:2,1:3} and {0:1,0:2,1:2,1:3}
    assert jaccard[0][2] == 0.0 and jaccard[2][2] == 1.0
    assert counts[0][:3] == [1, 2, 1] and counts[1][2:4] == [2, 2] and counts[5][7] == 1 and sum(map(sum, counts)) == 9
    fig = figures.overlap_figure(labels, jaccard, counts, title)
    assert_drawn_inside(fig)
    figures.pyplot().close(fig)
    for ext in ("svg", "png"):
        figures.overlap([a, b, c], str(tmp_path / f"o.{ext}"), labels)
    with pytest.raises(figures.UsageError, match="models of different shapes"):
        figures.overlap_data([a, locate_result(7, 8)], ["a", "x"])


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


def test_training_curves(tmp_path):
    runs = [training_run(tmp_path / name, steps, i) for i, (name, steps) in
            enumerate([("arc_easy_headmap_mha_seed0", 282), ("lora", 282), ("a", 3)])]
    read = [figures.read_run(r) for r in runs]
    assert [len(val) for _, _, val in read] == [1 + 57, 1 + 57, 1 + 1]  # step 0 (the base model) and every validation
    assert read[0][2][0] == (0, 2.7) and len(read[0][1]) == 282
    fig = figures.curves_figure(read, "ARC-Easy: HeadMap against LoRA, full protocol")
    assert_drawn_inside(fig)
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["arc_easy_headmap_mha_seed0", "lora", "a"]
    figures.pyplot().close(fig)
    figures.curves(runs, str(tmp_path / "curves.svg"), title="ARC-Easy")
    assert ET.parse(tmp_path / "curves.svg").getroot().tag == SVG + "svg"


def test_plot_cli(tmp_path):
    heads = tmp_path / "heads.json"
    heads.write_text(json.dumps(locate_result(30, 9)))
    for view in ("--per-layer", "--cumulative"):
        done = run("plot.py", "heatmap", str(heads), "--out", str(tmp_path / "h.png"), view, "--overwrite")
        assert done.returncode == 0, done.stderr
        assert (tmp_path / "h.png").read_bytes().startswith(b"\x89PNG")
    done = run("plot.py", "overlap", str(heads), str(heads), "--out", str(tmp_path / "o.pdf"))
    assert done.returncode == 0 and (tmp_path / "o.pdf").read_bytes().startswith(b"%PDF"), done.stderr
    assert_usage_error(run("plot.py", "heatmap", str(heads), "--out", str(tmp_path / "h.jpg")),
                       "cannot tell the figure format of")
    bare = tmp_path / "bare.json"  # a circuit alone: none of locate's measurements, no model shape
    bare.write_text(json.dumps({"knowledge_circuit": {"0": {"retain_heads": [1]}}}))
    assert_usage_error(run("plot.py", "overlap", str(heads), str(bare), "--out", str(tmp_path / "o.svg")),
                       "bare.json has no layers, heads, model: pass a heads.json written by locate.py")
    official = tmp_path / "official.pt"
    torch.save({"knowledge_circuit": {0: {"retain_heads": [1]}}}, official)
    assert_usage_error(run("plot.py", "heatmap", str(official), "--out", str(tmp_path / "h.svg")),
                       "official.pt cannot be read (UnicodeDecodeError")
    assert_usage_error(run("plot.py", "curves", str(tmp_path), "--out", str(tmp_path / "c.svg")),
                       "no training log")
    assert_usage_error(run("plot.py", "curves", training_run(tmp_path / "r", 4, 0), "--labels", "a,b",
                           "--out", str(tmp_path / "c.svg")), "--labels names 2 runs but 1 were given")


@pytest.mark.parametrize("ext", ["svg", "pdf", "png"])
def test_the_same_figure_gives_the_same_bytes(tmp_path, ext):
    """A committed figure redrawn from the same data does not change: no creation date, fixed SVG ids."""
    for name in ("a", "b"):
        figures.heat_map(locate_result(4, 4), str(tmp_path / f"{name}.{ext}"))
    assert (tmp_path / f"a.{ext}").read_bytes() == (tmp_path / f"b.{ext}").read_bytes()
