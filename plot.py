"""Figures for a paper or a notebook: the heat map of a located circuit, and the loss curves of fine-tuning runs.
The output file's extension picks the format: .svg is written by hand, with no dependency (locate.py and
finetune.py write these beside their outputs); .png and .pdf are drawn by matplotlib (pip install matplotlib).

    python plot.py heatmap heads.json --out heads.png [--per-layer]
    python plot.py curves runs/lora runs/headmap --out curves.pdf [--labels LoRA,HeadMap]

Heat map: each cell is the summed loss of D's gold answers with that head masked on top of the circuit already
chosen in the layers below (PROTOCOL's loss[l, h]), shown as the increase over the unmasked model in nats per
sample, on one scale for all layers. --per-layer shades each layer from its lowest to its highest cell instead,
which is how locate compares the heads of a layer. The circuit's heads are outlined.
Curves: the training loss of every step (thin line) and the validation loss (markers; step 0 is the base model).
A curve takes a finetune.py output folder, or a copy of its training.json with its log beside it as
<name>.log.jsonl (experiments/finetune/).
"""
import argparse
import json
import math
import os
import sys
import textwrap

from data.files import atomic, read_json
from kernels.model import HelpFormatter, UsageError, run_script

# viridis at nine even steps: perceptually uniform, readable in grey and by colour-blind readers
VIRIDIS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"]
RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]
CHAR_EM = 0.6  # width of an average sans-serif character in em, used to lay out SVG text (tests use it too)
MARGIN = 12


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True)
    h = sub.add_parser("heatmap", help="the circuit heat map of a heads.json written by locate.py")
    h.add_argument("circuit", help="heads.json from locate.py")
    h.add_argument("--out", required=True, help="figure file: .svg, .png or .pdf")
    h.add_argument("--per-layer", action="store_true", help="shade each layer on its own scale")
    c = sub.add_parser("curves", help="training and validation loss of one or more finetune.py runs")
    c.add_argument("runs", nargs="+", help="finetune.py output folders, or training.json copies")
    c.add_argument("--out", required=True, help="figure file: .svg, .png or .pdf")
    c.add_argument("--labels", help="comma-separated legend labels, one per run (default: folder or file names)")
    c.add_argument("--title", default="Training and validation loss")
    args = p.parse_args(argv)
    figure_format(args.out)
    return args


def figure_format(path):
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in ("svg", "png", "pdf"):
        raise UsageError(f"cannot tell the figure format of {path}; end the name in .svg, .png or .pdf")
    return ext


# ---------------------------------------------------------------- what is drawn

def heat_map_data(result, per_layer=False):
    """The matrix to shade, its scale's label, the circuit's cells and the title, from locate.py's result."""
    loss, samples = result["loss_matrix"], len(result["sample_indices"])
    if per_layer:
        values = [[(v - min(row)) / (max(row) - min(row)) if max(row) > min(row) else 0.0 for v in row]
                  for row in loss]
        scale = "loss with the head masked, per layer (0 = the layer's lowest, 1 = its highest)"
    else:
        values = [[(v - result["unmasked_loss"]) / samples for v in row] for row in loss]
        scale = "loss increase over the unmasked model (nats per sample)"
    circuit = {(int(layer), h) for layer, e in result["knowledge_circuit"].items() for h in e["retain_heads"]}
    model = os.path.basename(os.path.normpath(result["model"]))
    title = (f"Knowledge circuit of {model} on {result['dataset']} ({result['prompt']} prompts): "
             f"{len(circuit)} of {len(loss) * len(loss[0])} heads (outlined), D = {samples} samples")
    return values, scale, circuit, title


def read_run(path):
    """(label, training loss per step, validation loss per step) of one finetune.py run."""
    if os.path.isdir(path):
        record, log = os.path.join(path, "training.json"), os.path.join(path, "log.jsonl")
    else:
        record, log = path, os.path.splitext(path)[0] + ".log.jsonl"
    if not os.path.exists(log):
        raise UsageError(f"no training log {log} for run {path}; pass a finetune.py output folder")
    before = read_json(record, "run record").get("val_loss_before") if os.path.exists(record) else None
    with open(log) as f:
        entries = [json.loads(line) for line in f if line.strip()]
    train = [(e["step"], e["loss"]) for e in entries]
    val = ([(0, before)] if before is not None else []) + [(e["step"], e["val_loss"]) for e in entries if "val_loss" in e]
    return os.path.basename(os.path.normpath(path)).removesuffix(".json"), train, val


# ---------------------------------------------------------------- SVG, by hand

def text_width(s, size):
    return len(s) * size * CHAR_EM


def wrap(s, size, width):
    return textwrap.wrap(s, max(8, int(width / (size * CHAR_EM))))


def svg_text(x, y, s, size, anchor="start", rotate=False, weight="normal"):
    turn = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if rotate else ""
    s = s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" '
            f'font-weight="{weight}"{turn}>{s}</text>')


def svg_document(width, height, parts):
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
                      f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="Helvetica, Arial, sans-serif">',
                      f'<rect width="{width:.0f}" height="{height:.0f}" fill="white"/>', *parts, "</svg>"])


def colour(t):
    """viridis at t in [0, 1]."""
    t = min(1.0, max(0.0, t)) * (len(VIRIDIS) - 1)
    i = min(int(t), len(VIRIDIS) - 2)
    a, b = (tuple(int(c[k:k + 2], 16) for k in (1, 3, 5)) for c in VIRIDIS[i:i + 2])
    return "#" + "".join(f"{round(x + (t - i) * (y - x)):02x}" for x, y in zip(a, b))


def tick_step(size_px, label_px):
    """Label every k-th row or column, k in 1, 2, 5, 10, ..., so that labels do not overlap."""
    for k in (1, 2, 5, 10, 20, 50):
        if k * size_px >= label_px + 2:
            return k
    return 100


def nice_ticks(lo, hi, count=5):
    span = (hi - lo) or abs(hi) or 1.0
    raw = span / count
    step = next(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10) if m * 10 ** math.floor(math.log10(raw)) >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [round(first + i * step, 12) for i in range(int((hi - first) / step + 1e-9) + 1)]


def heat_map_svg(values, scale, circuit, title):
    layers, heads = len(values), len(values[0])
    lo, hi = min(map(min, values)), max(map(max, values))
    cell = max(6, min(24, 720 // max(heads, layers)))
    tick, label, head_size = 10, 12, 14
    grid_w, grid_h = heads * cell, layers * cell
    left = MARGIN + label * 1.2 + text_width(str(layers - 1), tick) + 6
    bar_x = left + grid_w + 16
    bar_labels = [f"{v:.3g}" for v in nice_ticks(lo, hi, 4) + [lo, hi]]
    scale_lines = wrap(scale, label, grid_h)
    width = bar_x + 14 + 4 + max(text_width(s, tick) for s in bar_labels) + 6 + len(scale_lines) * label * 1.2 + MARGIN
    width = max(width, 360)
    title_lines = wrap(title, head_size, width - 2 * MARGIN)
    top = MARGIN + len(title_lines) * head_size * 1.25 + 10
    height = top + grid_h + tick * 1.3 + label * 1.6 + MARGIN
    parts = [svg_text(MARGIN, MARGIN + (i + 0.8) * head_size * 1.25, s, head_size, weight="bold")
             for i, s in enumerate(title_lines)]
    for layer, row in enumerate(values):
        for h, v in enumerate(row):
            t = (v - lo) / (hi - lo) if hi > lo else 0.0
            parts.append(f'<rect x="{left + h * cell:.1f}" y="{top + layer * cell:.1f}" width="{cell}" height="{cell}" '
                         f'fill="{colour(t)}" shape-rendering="crispEdges"><title>layer {layer}, head {h}: {v:.4g}</title></rect>')
    outline = max(1.5, cell / 8)
    for layer, h in sorted(circuit):  # drawn last, so that no neighbouring cell covers the outline
        parts.append(f'<rect x="{left + h * cell + outline / 2:.1f}" y="{top + layer * cell + outline / 2:.1f}" '
                     f'width="{cell - outline:.1f}" height="{cell - outline:.1f}" fill="none" stroke="#ff2a2a" '
                     f'stroke-width="{outline:.1f}"/>')
    step = tick_step(cell, tick)
    for layer in range(0, layers, step):
        parts.append(svg_text(left - 4, top + (layer + 0.5) * cell + tick * 0.35, str(layer), tick, "end"))
    step = tick_step(cell, text_width(str(heads - 1), tick))
    for h in range(0, heads, step):
        parts.append(svg_text(left + (h + 0.5) * cell, top + grid_h + tick * 1.2, str(h), tick, "middle"))
    parts.append(svg_text(left + grid_w / 2, top + grid_h + tick * 1.3 + label * 1.2, "head", label, "middle"))
    parts.append(svg_text(MARGIN + label, top + grid_h / 2, "layer", label, "middle", rotate=True))
    # the colour bar: top = the largest value, bottom = the smallest, so its ends are the data's range
    parts.append('<defs><linearGradient id="scale" x1="0" y1="1" x2="0" y2="0">'
                 + "".join(f'<stop offset="{i / (len(VIRIDIS) - 1):.3f}" stop-color="{c}"/>' for i, c in enumerate(VIRIDIS))
                 + "</linearGradient></defs>")
    parts.append(f'<rect id="colour-bar" data-min="{lo!r}" data-max="{hi!r}" x="{bar_x:.1f}" y="{top:.1f}" '
                 f'width="14" height="{grid_h}" fill="url(#scale)"/>')
    label_x = bar_x + 18
    ticks = [v for v in nice_ticks(lo, hi, 4) if hi > lo and abs(v - lo) > 0.08 * (hi - lo) and abs(hi - v) > 0.08 * (hi - lo)]
    for v in [lo, *ticks, hi]:
        y = top + (grid_h if hi == lo else (hi - v) / (hi - lo) * grid_h)
        parts.append(f'<line x1="{bar_x + 14:.1f}" x2="{bar_x + 17:.1f}" y1="{y:.1f}" y2="{y:.1f}" stroke="black"/>')
        parts.append(svg_text(label_x, y + tick * 0.35, f"{v:.3g}", tick))
    scale_x = label_x + max(text_width(s, tick) for s in bar_labels) + 6 + label
    for i, s in enumerate(scale_lines):
        parts.append(svg_text(scale_x + i * label * 1.2, top + grid_h / 2, s, label, "middle", rotate=True))
    return svg_document(width, height, parts)


def curves_svg(runs, title):
    plot_w, plot_h, tick, label, head_size = 560, 320, 10, 12, 14
    points = [p for _, train, val in runs for p in train + val]
    x_hi = max(1, max(s for s, _ in points))
    y_lo, y_hi = min(v for _, v in points), max(v for _, v in points)
    pad = 0.05 * ((y_hi - y_lo) or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    x_ticks, y_ticks = nice_ticks(0, x_hi, 6), nice_ticks(y_lo, y_hi, 5)
    left = MARGIN + label * 1.2 + max(text_width(f"{v:g}", tick) for v in y_ticks) + 6
    legend = [name for name, _, _ in runs] + ["training (line)", "validation (dots)"]
    width = left + plot_w + 16 + 26 + max(text_width(s, tick) for s in legend) + MARGIN
    title_lines = wrap(title, head_size, width - 2 * MARGIN)
    top = MARGIN + len(title_lines) * head_size * 1.25 + 10
    height = top + plot_h + tick * 1.3 + label * 1.6 + MARGIN

    def x(step):
        return left + step / x_hi * plot_w

    def y(v):
        return top + (y_hi - v) / (y_hi - y_lo) * plot_h
    parts = [svg_text(MARGIN, MARGIN + (i + 0.8) * head_size * 1.25, s, head_size, weight="bold")
             for i, s in enumerate(title_lines)]
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="black"/>')
    for v in x_ticks:
        parts.append(f'<line x1="{x(v):.1f}" x2="{x(v):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 3}" stroke="black"/>')
        parts.append(svg_text(x(v), top + plot_h + tick * 1.3, f"{v:g}", tick, "middle"))
    for v in y_ticks:
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#ddd"/>')
        parts.append(svg_text(left - 4, y(v) + tick * 0.35, f"{v:g}", tick, "end"))
    parts.append(svg_text(left + plot_w / 2, top + plot_h + tick * 1.3 + label * 1.2, "optimizer step", label, "middle"))
    parts.append(svg_text(MARGIN + label, top + plot_h / 2, "loss (nats per token)", label, "middle", rotate=True))
    for i, (name, train, val) in enumerate(runs):
        c = RUN_COLOURS[i % len(RUN_COLOURS)]
        line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in train)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{c}" stroke-opacity="0.45" stroke-width="1"/>')
        if val:
            line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in val)
            parts.append(f'<polyline points="{line}" fill="none" stroke="{c}" stroke-width="2"/>')
            parts += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="3.5" fill="{c}"><title>{name} step {s}: '
                      f'{v:.4f}</title></circle>' for s, v in val]
        ly = top + 8 + i * tick * 1.6
        parts.append(f'<circle cx="{left + plot_w + 24}" cy="{ly - tick * 0.35:.1f}" r="4" fill="{c}"/>')
        parts.append(svg_text(left + plot_w + 32, ly, name, tick))
    ly = top + 8 + (len(runs) + 0.5) * tick * 1.6
    parts.append(svg_text(left + plot_w + 16, ly, "training (line)", tick))
    parts.append(svg_text(left + plot_w + 16, ly + tick * 1.6, "validation (dots)", tick))
    return svg_document(width, height, parts)


# ---------------------------------------------------------------- PNG and PDF, by matplotlib

def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UsageError("PNG and PDF figures need matplotlib: pip install matplotlib, or name the output .svg") from None
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    return plt


def heat_map_figure(values, scale, circuit, title):
    plt = pyplot()
    from matplotlib.patches import Rectangle
    layers, heads = len(values), len(values[0])
    size = min(0.3, 9 / max(heads, layers))
    fig, ax = plt.subplots(figsize=(max(5.0, heads * size + 2.6), layers * size + 1.8), layout="constrained")
    image = ax.imshow(values, cmap="viridis", interpolation="nearest", aspect="equal",
                      vmin=min(map(min, values)), vmax=max(map(max, values)))
    for layer, h in circuit:
        ax.add_patch(Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="#ff2a2a", linewidth=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.9).set_label("\n".join(textwrap.wrap(scale, 40)), fontsize=8)
    return fig


def curves_figure(runs, title):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.2), layout="constrained")
    for i, (name, train, val) in enumerate(runs):
        c = RUN_COLOURS[i % len(RUN_COLOURS)]
        ax.plot(*zip(*train), color=c, alpha=0.45, linewidth=0.8)
        if val:
            ax.plot(*zip(*val), color=c, marker="o", markersize=4, linewidth=1.8, label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats per token)")
    ax.set_title("\n".join(textwrap.wrap(title, 70)), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title="validation (dots), training (thin)", fontsize=8, title_fontsize=8, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    return fig


# ---------------------------------------------------------------- writing

def save(path, svg, figure):
    """Write the figure in the format named by the path: `svg()` gives the SVG text, `figure()` a matplotlib
    figure (called only when needed, so that SVG never imports matplotlib)."""
    fmt = figure_format(path)
    with atomic(path) as tmp:
        if fmt == "svg":
            with open(tmp, "w") as f:
                f.write(svg())
        else:
            fig = figure()
            fig.savefig(tmp, format=fmt, dpi=200)
            pyplot().close(fig)


def heat_map(result, path, per_layer=False):
    data = heat_map_data(result, per_layer)
    save(path, lambda: heat_map_svg(*data), lambda: heat_map_figure(*data))


def curves(paths, path, labels=None, title="Training and validation loss"):
    runs = [read_run(p) for p in paths]
    if labels:
        runs = [(label, train, val) for label, (_, train, val) in zip(labels, runs)]
    save(path, lambda: curves_svg(runs, title), lambda: curves_figure(runs, title))


def main(argv=None):
    args = parse_args(argv)
    if args.figure == "heatmap":
        result = read_json(args.circuit, "circuit file")
        if "loss_matrix" not in result:
            raise UsageError(f"{args.circuit} has no loss matrix; pass a heads.json written by locate.py")
        heat_map(result, args.out, args.per_layer)
    else:
        labels = args.labels.split(",") if args.labels else None
        if labels and len(labels) != len(args.runs):
            raise UsageError(f"--labels names {len(labels)} runs but {len(args.runs)} were given; give one label each")
        curves(args.runs, args.out, labels, args.title)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
