"""Figures for a paper or a notebook: the heat map of a located circuit, and the loss curves of fine-tuning runs.
The output file's extension picks the format: .svg, .png or .pdf, all drawn by matplotlib (locate.py and
finetune.py write SVGs beside their outputs).

    python plot.py heatmap heads.json --out heads.png [--per-layer]
    python plot.py curves runs/lora runs/headmap --out curves.pdf [--labels LoRA,HeadMap]

Heat map: each cell is the summed loss of D's gold answers with that head masked on top of the circuit already
chosen in the layers below (docs/PROTOCOL.md's loss[l, h]), shown as the increase over the unmasked model in nats per
sample, on one scale for all layers. --per-layer shades each layer from its lowest to its highest cell instead,
which is how locate compares the heads of a layer. The circuit's heads are outlined.
Curves: the training loss of every step (thin line) and the validation loss (markers; step 0 is the base model).
A curve takes a finetune.py output folder, or a copy of its training.json with its log beside it as
<name>.log.jsonl (experiments/finetune/).
"""
import argparse
import json
import os
import sys
import textwrap

from cli import HelpFormatter, UsageError, read_json, run_script
from headmap.files import atomic

RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


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


# ---------------------------------------------------------------- drawing (matplotlib writes SVG, PNG and PDF alike)

def pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only, no window
    import matplotlib.pyplot as plt
    return plt


def heat_map_figure(values, scale, circuit, title):
    plt = pyplot()
    from matplotlib.patches import Rectangle
    layers, heads = len(values), len(values[0])
    size = min(0.3, 9 / max(heads, layers))
    fig, ax = plt.subplots(figsize=(max(6.0, heads * size + 2.6), layers * size + 1.8), layout="constrained")
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

def save(path, fig) -> None:
    """Write a matplotlib figure in the format its path names, whole or not at all, and free it."""
    with atomic(path) as tmp:
        fig.savefig(tmp, format=figure_format(path), dpi=200)
    pyplot().close(fig)


def heat_map(result, path, per_layer=False):
    save(path, heat_map_figure(*heat_map_data(result, per_layer)))


def curves(paths, path, labels=None, title="Training and validation loss"):
    runs = [read_run(p) for p in paths]
    if labels:
        runs = [(label, train, val) for label, (_, train, val) in zip(labels, runs)]
    save(path, curves_figure(runs, title))


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
