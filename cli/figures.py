"""The figures locate.py, finetune.py and plot.py draw: a circuit's heat map (and its text form), how circuits
overlap, fine-tuning runs' loss curves. matplotlib is imported on first use. plot.py's --help says what each
figure shows."""
import json
import os
import sys
import textwrap

from .exits import UsageError
from .json_records import read_json
from .run_folder import LOG, TRAINING
from headmap.files import atomic

# what each selector's scores are (locate's --selector)
SCORE_NAMES = {"conditioned": "loss with each head masked", "independent": "loss with each head masked alone",
               "attribution": "estimated loss increase from masking each head alone",
               "probe": "probe accuracy at telling the gold answer from a wrong one",
               "lofit": "norm of each head's learned scaling vector (LoFiT)", "random": "random draws"}
SCORE_SCALES = {"attribution": "estimated loss increase from masking the head alone (nats per sample)",
                "probe": "the head's probe accuracy, cross-validated (0.5 = chance)",
                "lofit": "the norm of the head's learned scaling vector (LoFiT's first stage)",
                "random": "the random draw that ranked each head (the control)"}
RUN_COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"]


def figure_format(path):
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    if ext not in ("svg", "png", "pdf"):
        raise UsageError(f"cannot tell the figure format of {path}; end the name in .svg, .png or .pdf")
    return ext


# ---------------------------------------------------------------- what is drawn

def head_set(result: dict) -> set[tuple[int, int]]:
    """The (layer, head) pairs of a heads.json's circuit, read by the library's one reader of the format."""
    from headmap.circuit import circuit_from
    return {(layer, h) for layer, heads in circuit_from(result).items() for h in heads}


def heat_map_data(result, view="marginal"):
    """The matrix to shade, its scale's label, the circuit's cells and the title, from locate.py's result; `view`
    is marginal (each head's own effect), cumulative or per-layer."""
    samples = len(result["sample_indices"])
    if "loss_matrix" not in result:  # a selector that masks nothing to score (attribution, random): its scores
        per = samples if result["selector"] == "attribution" else 1  # an estimate in nats, per sample as the others
        return ([[v / per for v in row] for row in result["score_matrix"]], SCORE_SCALES[result["selector"]],
                head_set(result), circuit_title(result, result["score_matrix"], samples))
    loss = result["loss_matrix"]
    if view == "marginal" and "circuit_below_loss" not in result:  # each head's own effect needs it: draw what is there
        print("note: this heads.json has no circuit_below_loss (an older locate.py wrote it), so each head's own "
              "effect is unknown; drawing --cumulative", file=sys.stderr)
        view = "cumulative"
    if view == "per-layer":
        values = [[(v - min(row)) / (max(row) - min(row)) if max(row) > min(row) else 0.0 for v in row]
                  for row in loss]
        scale = "loss with the head masked, per layer (0 = the layer's lowest, 1 = its highest)"
    elif view == "cumulative":
        values = [[(v - result["unmasked_loss"]) / samples for v in row] for row in loss]
        scale = "loss increase over the unmasked model (nats per sample)"
    else:
        values = [[(v - below) / samples for v in row] for row, below in zip(loss, result["circuit_below_loss"])]
        scale = "loss increase from the head alone, over the circuit below (nats per sample)"
    return values, scale, head_set(result), circuit_title(result, loss, samples)


def circuit_title(result: dict, matrix: list, samples: int) -> str:
    circuit, model = head_set(result), os.path.basename(os.path.normpath(result["model"]))
    chosen = "" if result.get("selector", "conditioned") == "conditioned" else f", chosen by {result['selector']}"
    return (f"Knowledge circuit of {model} on {result['dataset']} ({result['prompt']} prompts{chosen}): "
            f"{len(circuit)} of {len(matrix) * len(matrix[0])} heads (outlined), D = {samples} samples")


def overlap_data(results, labels):
    """(labels, Jaccard index of every two circuits' head sets, per (layer, head) how many circuits hold it, title)
    from heads.json results of one model."""
    shapes = {(r["layers"], r["heads"]) for r in results}
    if len(shapes) != 1:
        raise UsageError(f"the circuits come from models of different shapes {sorted(shapes)}; pass one model's")
    layers, heads = shapes.pop()
    sets = [head_set(r) for r in results]
    jaccard = [[len(a & b) / len(a | b) for b in sets] for a in sets]
    counts = [[sum((layer, h) in s for s in sets) for h in range(heads)] for layer in range(layers)]
    model = os.path.basename(os.path.normpath(results[0]["model"]))
    return labels, jaccard, counts, f"How the knowledge circuits of {model} overlap ({len(sets)} circuits)"


def read_run(path):
    """(label, training loss per step, validation loss per step) of one finetune.py run."""
    if os.path.isdir(path):
        record, log = os.path.join(path, TRAINING), os.path.join(path, LOG)
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


def heat_map_figure(values, scale, circuit, title, signed=True):
    """Signed effects (a head whose masking lowers the loss is negative) on a diverging map centred on zero, equal
    reach both ways, so that white is "no effect"; shares in [0, 1] (per-layer) on a sequential one."""
    plt = pyplot()
    from matplotlib.patches import Rectangle
    layers, heads = len(values), len(values[0])
    size = min(0.3, 9 / max(heads, layers))
    fig, ax = plt.subplots(figsize=(max(6.0, heads * size + 2.6), layers * size + 1.8), layout="constrained")
    if signed:
        reach = max(abs(v) for row in values for v in row) or 1.0
        limits = {"cmap": "RdBu_r", "vmin": -reach, "vmax": reach}
    else:
        limits = {"cmap": "viridis", "vmin": min(map(min, values)), "vmax": max(map(max, values))}
    image = ax.imshow(values, interpolation="nearest", aspect="equal", **limits)
    for layer, h in circuit:
        ax.add_patch(Rectangle((h - 0.5, layer - 0.5), 1, 1, fill=False, edgecolor="black" if signed else "#ff2a2a",
                               linewidth=1.2))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.9).set_label("\n".join(textwrap.wrap(scale, 28)), fontsize=8)
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


def overlap_figure(labels, jaccard, counts, title):
    plt = pyplot()
    layers, heads = len(counts), len(counts[0])
    fig, (left, right) = plt.subplots(1, 2, figsize=(4.2 + 0.45 * len(labels) + max(3.0, 0.25 * heads),
                                                       max(3.8, 0.45 * len(labels) + 1.6, 0.16 * layers + 1.6)),
                                      layout="constrained", width_ratios=[len(labels), max(3, heads * 0.6)])
    image = left.imshow(jaccard, cmap="viridis", vmin=0.0, vmax=1.0)
    for i, row in enumerate(jaccard):
        for j, v in enumerate(row):
            left.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
    left.set_xticks(range(len(labels)), labels, rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
    left.set_yticks(range(len(labels)), labels, fontsize=8)
    left.set_title("shared heads\n(Jaccard index)", fontsize=9)  # two short lines: the panel may be narrow
    fig.colorbar(image, ax=left, shrink=0.8)
    # counts are whole numbers: one colour each, on a colour bar of steps with a tick per count
    from matplotlib.colors import BoundaryNorm
    n = len(labels)
    held = right.imshow(counts, cmap=plt.get_cmap("magma", n + 1), norm=BoundaryNorm([k - 0.5 for k in range(n + 2)],
                        n + 1), aspect="auto", interpolation="nearest")
    right.set_xlabel("head")
    right.set_ylabel("layer")
    right.set_title("circuits holding\neach head", fontsize=9)
    bar = fig.colorbar(held, ax=right, shrink=0.8, ticks=range(n + 1))
    bar.set_label("circuits", fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, 80)), fontsize=10)
    fig.get_layout_engine().set(w_pad=6 / 72)  # the default 3 points let a tick label touch the canvas's edge
    return fig


# ---------------------------------------------------------------- writing

def save(path, fig) -> None:
    """Write a matplotlib figure in the format its path names, whole or not at all, and free it. The same figure
    gives the same bytes (no creation date, fixed SVG ids), so a committed figure redrawn from the same data does
    not change."""
    fmt = figure_format(path)
    metadata = {"svg": {"Date": None}, "pdf": {"CreationDate": None}}.get(fmt)
    with pyplot().rc_context({"svg.hashsalt": "headmap"}), atomic(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=200, metadata=metadata)
    pyplot().close(fig)


def heat_map(result, path, view="marginal"):
    save(path, heat_map_figure(*heat_map_data(result, view), signed=view != "per-layer"))


def overlap(results, path, labels):
    save(path, overlap_figure(*overlap_data(results, labels)))


def curves(paths, path, labels=None, title="Training and validation loss"):
    runs = [read_run(p) for p in paths]
    if labels:
        runs = [(label, train, val) for label, (_, train, val) in zip(labels, runs)]
    save(path, curves_figure(runs, title))


def print_heat_map(scores, circuit, selector="conditioned"):
    shades = " .:-=+*#%@"
    print(f"\n{SCORE_NAMES[selector]} (per layer, darker = higher); [ ] = circuit")
    for layer, row in enumerate(scores):
        lo, hi = min(row), max(row)
        cells = []
        for h, v in enumerate(row):
            c = shades[min(9, int(10 * (v - lo) / (hi - lo))) if hi > lo else 0]
            cells.append(f"[{c}]" if h in circuit.get(layer, []) else f" {c} ")
        print(f"L{layer:<3}" + "".join(cells))
