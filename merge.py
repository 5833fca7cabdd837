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

from cli.arguments import HelpFormatter, add_model_arguments, user_path
from cli.exits import UsageError, refused, run_script
from cli.loading import DEFAULT_MODEL
from cli.outputs import MERGE_RECORD, claim_out, merged_files
from cli.run_folder import TRAINING
from headmap.files import ADAPTER_CONFIG, atomic, space_for


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


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked: a wrong value is one line here, before anything is read or written."""
    args = build_parser().parse_args(argv)
    if not os.path.isfile(os.path.join(args.adapter, ADAPTER_CONFIG)):
        raise UsageError(f"{args.adapter} has no {ADAPTER_CONFIG}; pass a folder written by finetune.py")
    return args


def main(argv=None):
    args = parse_args(argv)
    claim_out("merged", args.out, args.overwrite, args, adapter=args.adapter)
    from cli.earlier_runs import check_adapter_weights, recorded, settle
    from cli.json_records import read_json
    from cli.loading import load_model
    from headmap.saving import load_adapter
    from headmap.merging import merge_adapter
    # the adapter's own base model unless --model says otherwise (merging into another model is the user's call)
    model_name = settle("model", args.model, recorded(args.adapter)["model"], DEFAULT_MODEL, strict=False)
    check_adapter_weights(args.adapter)
    model, tokenizer = load_model(model_name, args.device, args.dtype, trust_remote_code=args.trust_remote_code)
    with refused(f"cannot merge {args.adapter} into {model_name}"):
        adapter = load_adapter(model, args.adapter)
        merged = merge_adapter(model, adapter)
    training = os.path.join(args.adapter, TRAINING)
    adapter_record = read_json(training, "adapter record") if os.path.exists(training) else None
    write_merged(merged, tokenizer, args.out, {"adapter": args.adapter, "base_model": model_name,
                                               "method": adapter.method, "trust_remote_code": args.trust_remote_code},
                 adapter_record)
    print(f"merged {adapter.method} from {args.adapter} into {model_name}; wrote {args.out}")


def write_merged(model, tokenizer, out: str, record: dict, adapter_record: dict | None) -> None:
    """The merged checkpoint written aside, then moved in whole: a new or empty --out, or a previous merge's, is swapped
    for it in one step (a crash leaves the old checkpoint or the new one, never a mix); a folder of the user's
    (--overwrite) gets its files one by one, each replaced whole, the marker last, its other files kept."""
    from cli.cards import write_merged_card

    def save(folder):
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        write_merged_card(folder, out, record, adapter_record)  # README.md: the model card
        files = sorted(os.listdir(folder))
        with open(os.path.join(folder, MERGE_RECORD), "w") as f:
            json.dump({**record, "files": files}, f, indent=1)
        return files

    # the weights' bytes (a tied embedding once): refused at once where the disk has less free
    size = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    ours = merged_files(out) if os.path.isdir(out) else None
    if not os.path.isdir(out) or set(os.listdir(out)) <= set(ours or []):
        with atomic(out, folder=True, size=size) as tmp:
            save(tmp)
        return
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(out)), prefix=".tmp-merge-") as tmp:
        with space_for(out, tmp, size):
            files = save(tmp)
        for name in files + [MERGE_RECORD]:
            with atomic(os.path.join(out, name)) as target:
                os.replace(os.path.join(tmp, name), target)




if __name__ == "__main__":
    run_script(main)
