"""The scripts' shared command-line layer: what locate.py, finetune.py, evaluate.py, merge.py and plot.py have in
common, and nothing the library (headmap/) or the tasks (data/) need. None of it imports torch at the top, so a
script answers --help and bad arguments at once.

    arguments.py     the options the scripts share, their checks, ~ in paths
    exits.py         how a script ends: UsageError as one line (exit 2), Ctrl-C and SIGTERM with the resume command
    outputs.py       claim_out, the one "may --out be written" check, and the inputs kept out of what a run replaces
    claim.py         the flock that keeps two live runs off one --out
    run_folder.py    finetune.py's run folder (its file names, checkpoint, log, resume state) and locate's progress
    json_records.py  the JSON records runs write and read, and the software versions they name
    earlier_runs.py  what an adapter or circuit recorded: options settled from it, its files checked
    loading.py       the model a script runs on: hub id, folder or GGUF file; device, dtype, device map
    gguf.py          a GGUF file checked and de-quantised once
    torchrun.py      the process group, --fsdp's sharding, and the refusals of both
    cards.py         the model cards of an adapter folder and a merged checkpoint
    trackers.py      --report-to: TensorBoard, Weights & Biases, MLflow
    selection.py     locate's --selector: the other ways of choosing heads, their options, --compare-exact
    figures.py       heat maps, overlaps and loss curves (plot.py, and beside locate's and finetune's outputs)
"""
