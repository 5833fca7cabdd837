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
    p.add_argument("--overwrite", action="store_true", help="write into an --out that holds other files (they are "
                   "kept; files of the same name are replaced)")
    args = p.parse_args(argv)
    if not os.path.isfile(os.path.join(args.adapter, "adapter_config.json")):
        raise UsageError(f"{args.adapter} has no adapter_config.json; pass a folder written by finetune.py")
    check_out(args.out, args.adapter, args.overwrite)
    return args


MARKER = "merge.json"  # what merge.py writes beside the checkpoint: its files, the adapter and the base model


def check_out(out: str, adapter: str, overwrite: bool) -> None:
    """Refuse an --out that would put anything the user made at risk: the adapter's folder or one above it, the
    current or home folder or one above them, never; a folder holding files this script did not write, unless
    --overwrite (and even then only files of the checkpoint's own names are replaced)."""
    target = os.path.realpath(out)
    for what, path in (("the adapter folder", adapter), ("the current folder", os.getcwd()),
                       ("your home folder", os.path.expanduser("~"))):
        inside = os.path.realpath(path)
        if inside == target or inside.startswith(target.rstrip(os.sep) + os.sep):
            raise UsageError(f"--out {out} is {what}" + ("" if inside == target else f" or holds it ({path})") +
                             "; pass a new folder for the merged checkpoint")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"--out {out} is a file; pass a folder")
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

from data.files import check_adapter_weights, current_umask, read_json  # noqa: E402
from kernels.adapters import load_adapter, merge_adapter  # noqa: E402
from kernels.model import load_model  # noqa: E402


def base_model_of(folder: str) -> str | None:
    """The base model named by finetune.py's training.json, else by PEFT's adapter_config.json."""
    for name, key in (("training.json", "base_model"), ("adapter_config.json", "base_model_name_or_path")):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            value = read_json(path, "adapter record").get(key)
            if value:
                return value
    return None


def main(argv=None):
    args = parse_args(argv)
    model_name = args.model or base_model_of(args.adapter) or DEFAULT_MODEL
    check_adapter_weights(args.adapter)
    model, tokenizer = load_model(model_name, args.device, args.dtype)
    try:
        adapter = load_adapter(model, args.adapter)
        merged = merge_adapter(model, adapter)
    except (KeyError, RuntimeError, ValueError) as err:
        raise UsageError(f"cannot merge {args.adapter} into {model_name}: {str(err).splitlines()[0]}") from None
    write_checkpoint(merged, tokenizer, args.out, {"adapter": os.path.abspath(args.adapter), "base_model": model_name,
                                                   "method": adapter.method})
    print(f"merged {adapter.method} from {args.adapter} into {model_name}; wrote {args.out}")


def write_checkpoint(model, tokenizer, out: str, record: dict) -> None:
    """The checkpoint written aside, then moved in whole: a new or empty --out, or a previous merge's, is swapped
    for it in one step (a crash leaves the old checkpoint or the new one, never a mix); a folder of the user's
    (--overwrite) gets its files one by one, each replaced whole, the marker last, its other files kept."""
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-merge-")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        files = sorted(os.listdir(tmp))
        with open(os.path.join(tmp, MARKER), "w") as f:
            json.dump({**record, "files": files}, f, indent=1)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes the folder private; a checkpoint should read like any other
        ours = own_files(out) if os.path.isdir(out) else None
        if not os.path.isdir(out) or not os.listdir(out):
            if os.path.isdir(out):
                os.rmdir(out)  # empty: nothing of the user's in it
            os.replace(tmp, out)
        elif ours is not None and set(os.listdir(out)) <= set(ours):
            exchange(tmp, out)  # tmp now holds the previous checkpoint, removed below
        else:
            for name in files + [MARKER]:
                os.replace(os.path.join(tmp, name), os.path.join(out, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def exchange(a: str, b: str) -> None:
    """Swap two folders in one step (Linux renameat2 RENAME_EXCHANGE); elsewhere, two renames."""
    import ctypes
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        at_fdcwd, rename_exchange = -100, 2
        if libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0:
            return
    except (AttributeError, OSError):
        pass
    aside = a + ".old"
    os.replace(b, aside)
    os.replace(a, b)
    os.replace(aside, a)


if __name__ == "__main__":
    run_script(main)
