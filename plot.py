"""Figures for a paper or a notebook: the heat map of a located circuit, how circuits overlap, and the loss curves
of fine-tuning runs. The output file's extension picks the format: .svg, .png or .pdf, all drawn by matplotlib
(locate.py and finetune.py write SVGs beside their outputs).

    python plot.py heatmap experiments/circuits/arc_easy.json --out heads.png       # --cumulative, --per-layer
    python plot.py overlap experiments/circuits/arc_easy.json experiments/circuits/piqa.json --out overlap.pdf
    python plot.py curves experiments/finetune/arc_easy_lora.json experiments/finetune/arc_easy_headmap_mha.json \\
        --out curves.pdf --labels LoRA,HeadMap

Heat map: loss[l, h] (docs/PROTOCOL.md) is the summed loss of D's gold answers with head h masked on top of the
circuit already chosen in the layers below. Each cell shows the head's own effect: loss[l, h] minus the loss
with only the circuit below masked (locate's "no head" candidate), in nats per sample, on one scale for all
layers. --cumulative shows loss[l, h] over the unmasked model instead, which grows with depth for every head
(the circuit below is masked too); --per-layer shades each layer from its lowest to its highest cell, which is
how locate compares the heads of a layer. The circuit's heads are outlined.
Overlap: the Jaccard index of every two circuits' head sets, and per layer how many of the circuits hold each head.
Curves: the training loss of every step (thin line) and the validation loss (markers; step 0 is the base model).
A curve takes a finetune.py output folder, or a copy of its training.json with its log beside it as
<name>.log.jsonl (experiments/finetune/).
"""
import argparse
import sys

from cli.arguments import HelpFormatter, add_out_arguments, user_path
from cli.exits import UsageError, refused, run_script
from cli.figures import curves, figure_format, head_set, heat_map, overlap
from cli.json_records import read_json
from cli.outputs import claim_out



def build_parser() -> argparse.ArgumentParser:
    """The script's options (parse_args checks the values)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="figure", required=True)
    h = sub.add_parser("heatmap", help="the circuit heat map of a heads.json written by locate.py")
    h.add_argument("circuit", type=user_path, help="heads.json from locate.py")
    add_out_arguments(h, "figure file: .svg, .png or .pdf", required=True)
    view = h.add_mutually_exclusive_group()
    view.add_argument("--cumulative", action="store_true", help="the increase over the unmasked model")
    view.add_argument("--per-layer", action="store_true", help="shade each layer on its own scale")
    o = sub.add_parser("overlap", help="how the circuits of several heads.json files overlap")
    o.add_argument("circuits", nargs="+", type=user_path, help="heads.json files of one model")
    add_out_arguments(o, "figure file: .svg, .png or .pdf", required=True)
    o.add_argument("--labels", help="comma-separated labels, one per circuit (default: each file's dataset)")
    c = sub.add_parser("curves", help="training and validation loss of one or more finetune.py runs")
    c.add_argument("runs", nargs="+", type=user_path, help="finetune.py output folders, or training.json copies")
    add_out_arguments(c, "figure file: .svg, .png or .pdf", required=True)
    c.add_argument("--labels", help="comma-separated legend labels, one per run (default: folder or file names)")
    c.add_argument("--title", default="Training and validation loss")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    figure_format(args.out)
    return args


def read_located(path: str, fields: tuple[str, ...]) -> dict:
    """A heads.json written by locate.py, with the fields a figure reads (a bare or official circuit has none of
    its measurements or the model's shape)."""
    result = read_json(path, "circuit file", "pass a heads.json written by locate.py")
    with refused(f"circuit file {path}", "pass a heads.json written by locate.py"):
        head_set(result)  # the circuit itself first (its indices integers), before any figure is drawn
    missing = [f for f in fields if f not in result]
    if missing:
        raise UsageError(f"{path} has no {', '.join(missing)}: pass a heads.json written by locate.py")
    return result


def main(argv=None):
    args = parse_args(argv)
    claim_out("file", args.out, args.overwrite, args)
    if args.figure == "heatmap":
        result = read_located(args.circuit, ("knowledge_circuit", "loss_matrix", "sample_indices", "unmasked_loss",
                                             "model", "dataset", "prompt"))
        heat_map(result, args.out, "cumulative" if args.cumulative else "per-layer" if args.per_layer else "marginal")
    elif args.figure == "overlap":
        results = [read_located(path, ("knowledge_circuit", "layers", "heads", "model")) for path in args.circuits]
        labels = args.labels.split(",") if args.labels else [r.get("dataset", "?") for r in results]
        if len(labels) != len(results):
            raise UsageError(f"--labels names {len(labels)} circuits but {len(results)} were given; give one label each")
        overlap(results, args.out, labels)
    else:
        labels = args.labels.split(",") if args.labels else None
        if labels and len(labels) != len(args.runs):
            raise UsageError(f"--labels names {len(labels)} runs but {len(args.runs)} were given; give one label each")
        curves(args.runs, args.out, labels, args.title)
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    run_script(main)
