"""Fold a trained adapter into its base model: a plain Hugging Face checkpoint that any engine runs unchanged.

    python finetune.py --heads experiments/circuits/arc_easy.json --out runs/adapter
    python merge.py --adapter runs/adapter --out runs/merged
    python evaluate.py --dataset arc_easy --model runs/merged --prompt harness  # as --adapter runs/adapter scores

LoRA becomes W0 + s B A, DoRA m (W0 + s B A) / ||W0 + s B A||. HeadMap's MHA map is affine in the o_proj input,
so it becomes extra o_proj weight columns plus an o_proj bias: the checkpoint switches its config's
attention_bias on (q/k/v biases zero), and loads with plain AutoModelForCausalLM in transformers,
lm-evaluation-harness or vLLM, with no custom code and no inference overhead. Refused, with the reason: the HS
variant, and architectures whose config cannot give o_proj a bias.
"""
import argparse
import json
import os
import tempfile

from cli import HelpFormatter, UsageError, add_model_arguments, run_script, user_path
from models import DEFAULT_MODEL
from runs import check_inputs_kept, hold_output, input_paths, lies_in


def build_parser() -> argparse.ArgumentParser:
    """The script's options (parse_args checks the values)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--adapter", required=True, type=user_path, help="a folder written by finetune.py, or a PEFT "
                   "LoRA/DoRA folder")
    p.add_argument("--out", required=True, type=user_path, help="the folder to write (config, tokenizer, "
                   "model.safetensors)")
    add_model_arguments(p, None, "the base model (default: the one the adapter was trained on)", device="cpu",
                        dtype="fp32", device_map=False, data=False)
    p.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files (they are "
                   "kept; files of the same name are replaced)")
    return p


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise UsageError(f"{args.adapter} has no adapter_config.json; pass a folder written by finetune.py")
    hold_output(args.out)
    check_out(args.out, args.adapter, args.overwrite)
    check_inputs_kept({"--out": args.out}, input_paths(args))
    return args


CHECKPOINT_FILES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".md")  # what save_pretrained writes:
# the config, weights (one file or shards and their index), tokenizer, chat template; and the card
MARKER = "merge.json"  # what merge.py writes beside the checkpoint: its files, the adapter and the base model


def check_out(out: str, adapter: str, overwrite: bool) -> None:
    """Refuse an --out that would put anything the user made at risk: the adapter's folder or one above it, the
    current or home folder or one above them, never; a folder holding files this script did not write, unless
    --overwrite (and even then only files of the checkpoint's own names are replaced)."""
    for what, path in (("the adapter folder", adapter), ("the current folder", os.getcwd()),
                       ("your home folder", os.path.expanduser("~"))):
        if lies_in(path, out):
            same = os.path.realpath(path) == os.path.realpath(out)
            raise UsageError(f"--out {out} is {what}" + ("" if same else f" or holds it ({path})") +
                             "; pass a new folder for the merged checkpoint")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; pass a folder")
    clash = sorted(name for name in (os.listdir(out) if os.path.isdir(out) else [])
                   if name.endswith(CHECKPOINT_FILES) and os.path.isdir(os.path.join(out, name)))
    if clash:  # --overwrite writes the checkpoint's files one by one into the user's folder: not over a folder
        raise UsageError(f"--out {out} holds a folder {clash[0]}, where the checkpoint writes a file of that name; "
                         "move it away, or pass a new folder")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        ours = own_files(out)
        others = sorted(set(os.listdir(out)) - set(ours or []))
        if ours is None or others:
            shown = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
            raise UsageError(f"--out {out} exists and holds files merge.py did not write ({shown}); pass a new "
                             "folder, or --overwrite to write into it (other files are kept)")


def own_files(folder: str) -> list[str] | None:
    """The files a previous merge wrote into `folder` (its marker included), or None where it has no marker."""
    try:
        with open(os.path.join(folder, MARKER)) as f:
            return list(json.load(f)["files"]) + [MARKER]
    except (OSError, ValueError, KeyError, TypeError):
        return None


if __name__ == "__main__":
    run_script(parse_args)  # --help and bad arguments answer at once, before torch and transformers load

from cli import refused  # noqa: E402
from models import load_model  # noqa: E402
from records import check_adapter_weights, recorded, settle  # noqa: E402
from cards import write_merged_card  # noqa: E402
from runs import read_json  # noqa: E402
from headmap.adapters import load_adapter, merge_adapter  # noqa: E402
from headmap.files import atomic, space_for  # noqa: E402


def main(argv=None):
    args = parse_args(argv)
    # the adapter's own base model unless --model says otherwise (merging into another model is the user's call)
    model_name = settle("model", args.model, recorded(args.adapter)["model"], DEFAULT_MODEL, strict=False)
    check_adapter_weights(args.adapter)
    model, tokenizer = load_model(model_name, args.device, args.dtype, trust_remote_code=args.trust_remote_code)
    with refused(f"cannot merge {args.adapter} into {model_name}"):
        adapter = load_adapter(model, args.adapter)
        merged = merge_adapter(model, adapter)
    training = os.path.join(args.adapter, "training.json")
    adapter_record = read_json(training, "adapter record") if os.path.exists(training) else None
    write_checkpoint(merged, tokenizer, args.out, {"adapter": args.adapter, "base_model": model_name,
                                                   "method": adapter.method, "trust_remote_code": args.trust_remote_code},
                     adapter_record)
    print(f"merged {adapter.method} from {args.adapter} into {model_name}; wrote {args.out}")


def write_checkpoint(model, tokenizer, out: str, record: dict, adapter_record: dict | None) -> None:
    """The checkpoint written aside, then moved in whole: a new or empty --out, or a previous merge's, is swapped
    for it in one step (a crash leaves the old checkpoint or the new one, never a mix); a folder of the user's
    (--overwrite) gets its files one by one, each replaced whole, the marker last, its other files kept."""
    def save(folder):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_merged_card(folder, out, record, adapter_record)  # README.md: the model card
        files = sorted(os.listdir(folder))
        with open(os.path.join(folder, MARKER), "w") as f:
            json.dump({**record, "files": files}, f, indent=1)
        return files

    # the weights' bytes (a tied embedding once): refused at once where the disk has less free
    size = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    ours = own_files(out) if os.path.isdir(out) else None
    if not os.path.isdir(out) or set(os.listdir(out)) <= set(ours or []):
        with atomic(out, folder=True, size=size) as tmp:
            save(tmp)
        return
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out)), prefix=".tmp-merge-") as tmp:
        with space_for(out, tmp, size):
            files = save(tmp)
        for name in files + [MARKER]:
            with atomic(os.path.join(out, name)) as target:
                os.replace(os.path.join(tmp, name), target)


if __name__ == "__main__":
    run_script(main)
