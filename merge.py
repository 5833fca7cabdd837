"""Fold a trained adapter into its base model: a plain Hugging Face checkpoint that any engine runs unchanged.

    python merge.py --adapter runs/adapter --out runs/merged
    python evaluate.py --dataset boolq --model runs/merged     # scores as --adapter runs/adapter does

LoRA becomes W0 + s B A, DoRA m (W0 + s B A) / ||W0 + s B A||. HeadMap's MHA map is affine in the o_proj input,
so it becomes extra o_proj weight columns plus an o_proj bias: the checkpoint switches its config's
attention_bias on (q/k/v biases zero), and loads with plain AutoModelForCausalLM in transformers,
lm-evaluation-harness or vLLM, with no custom code and no inference overhead. Refused, with the reason: the HS
variant, and architectures whose config cannot give o_proj a bias.
"""
import argparse
import json
import os
import shutil
import tempfile

from kernels.model import DEFAULT_MODEL, HelpFormatter, UsageError, run_script


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--adapter", required=True, help="a folder written by finetune.py, or a PEFT LoRA/DoRA folder")
    p.add_argument("--out", required=True, help="the folder to write (config, tokenizer, model.safetensors)")
    p.add_argument("--model", help="the base model (default: the one the adapter was trained on)")
    p.add_argument("--device", default="cpu", help="default cpu: merging is a few matrix products")
    p.add_argument("--dtype", default="fp32", help="dtype of the written weights (fp32, bf16, fp16)")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise UsageError(f"{args.adapter} has no adapter_config.json; pass a folder written by finetune.py")
    return args


if __name__ == "__main__":
    run_script(parse_args)  # --help and bad arguments answer at once, before torch and transformers load

from kernels.adapters import load_adapter, merge_adapter  # noqa: E402
from kernels.model import load_model  # noqa: E402


def base_model_of(folder: str) -> str | None:
    """The base model named by finetune.py's training.json, else by PEFT's adapter_config.json."""
    for name, key in (("training.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            with open(path) as f:
                value = json.load(f).get(key)
            if value:
                return value
    return None


def main(argv=None):
    args = parse_args(argv)
    model_name = args.model or base_model_of(args.adapter) or DEFAULT_MODEL
    model, tokenizer = load_model(model_name, args.device, args.dtype)
    try:
        adapter = load_adapter(model, args.adapter)
        merged = merge_adapter(model, adapter)
    except (KeyError, RuntimeError, ValueError) as err:
        raise UsageError(f"cannot merge {args.adapter} into {model_name}: {str(err).splitlines()[0]}") from None
    parent = os.path.dirname(os.path.abspath(args.out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-merge-")
    try:  # written aside, then renamed: a crash never leaves half a checkpoint under --out
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(args.out, ignore_errors=True)
        os.replace(tmp, args.out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"merged {adapter.method} from {args.adapter} into {model_name}; wrote {args.out}")


if __name__ == "__main__":
    run_script(main)
