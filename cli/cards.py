"""The model cards (README.md) beside what the scripts share: an adapter's, from its run's training.json, and a
merged checkpoint's, as the Hugging Face Hub reads them. They hold run records, which the library does not know, so
they live here, not in headmap/."""
import os

from .run_folder import CARD, RESUME_DIR

HUB_PLACEHOLDER = "YOUR-NAME/YOUR-REPO"  # the Hub id an upload gets, which the card cannot know


def _with_error(share: float, rows: int) -> str:
    from data.scoring import stderr
    return f"{share:.3f} ± {stderr(share, rows):.3f}"


def _weights_row(record: dict) -> list[tuple[str, str]]:
    """The card row saying which weights were trained on where they are not the hub's (a de-quantised GGUF file)."""
    weights = record.get("base_weights")
    if not weights:
        return []
    return [("weights trained on", f"`{os.path.basename(weights['gguf_file'])}` (sha256 `{weights['sha256'][:16]}…`, "
                                   f"{weights['quantisation']}), de-quantised to {weights['dequantised_to']}: not the "
                                   "hub's full-precision weights, so scores on those differ a little")]


def _write_card(folder: str, front: list[str], body: list[str]) -> None:
    from headmap.files import atomic
    with atomic(os.path.join(folder, CARD)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(["---", *front, "---", "", *body, ""]))


def write_model_card(folder: str, record: dict) -> None:
    """README.md beside an adapter, from its training.json `record`, as PEFT's save_pretrained writes one: YAML front
    matter for the Hugging Face Hub, what was trained (on which weights), its numbers with their standard errors,
    and how to load it from `folder` as the user named it and, once uploaded, from the Hub."""
    from headmap.saving import HS_NOT_PEFT
    config, method = record["adapter"], record["method"]
    base = config.get("base_model_name_or_path") or record["base_model"]
    hs = method == "headmap" and config["variant"] == "hs"
    task = record["dataset"].removeprefix("lm-eval:")
    named = os.path.sep not in task and not task.endswith((".yaml", ".yml"))  # a dataset or task name, not a file
    tags = list(dict.fromkeys(["headmap", "knowledge-circuit", method] + ([task] if named else [])))
    if method == "headmap":
        heads = sum(map(len, config["heads"].values()))
        what = (f"HeadMap ({config['variant'].upper()} variant{', on random heads' if record['random_heads'] else ''}): "
                f"a rank-{config['rank']} map from {heads} heads in {len(config['heads'])} layers "
                f"(circuit file `{record.get('circuit_file')}`), scaling {config['scaling']}")
    else:
        what = (f"{method.upper()} baseline: r = {config['r']}, alpha = {config['lora_alpha']}, on "
                f"{', '.join(config['target_modules'])}")
    hp, rows = record["hyper_parameters"], record["eval_rows"]
    table = [("method", what), ("base model", f"`{record['base_model']}`"), *_weights_row(record),
             ("data", f"{record['dataset']} ({record['split']}; prompt style {record['prompt']})"),
             ("trainable parameters", f"{record['trainable_parameters']:,}"), ("steps", f"{record['steps']:,}"),
             ("learning rate", f"{hp['lr']:g} (batch {hp['batch_size']}, warm-up {hp['warmup']})"),
             ("best validation loss", f"{record['best_val_loss']:.4f} at step {record['best_step']} (base model "
                                      f"{record['val_loss_before']:.4f})"),
             (f"{record['metric']} on {rows} rows of {record['eval_split']} (± standard error)",
              f"{_with_error(record['accuracy_before'], rows)} before, {_with_error(record['accuracy_after'], rows)} "
              "after")]
    python = f"""```python
from transformers import AutoModelForCausalLM
from headmap import load_adapter
model = AutoModelForCausalLM.from_pretrained("{base}")
adapter = load_adapter(model, "{folder}")  # from the Hub: huggingface_hub.snapshot_download("{HUB_PLACEHOLDER}")
```"""
    loading = (f"This adapter uses HeadMap's own layout: {HS_NOT_PEFT}.\n\n{python}" if hs else f"""With PEFT (the \
HeadMap map is saved as the LoRA on o_proj it equals: `lora_bias`), from this folder or, once uploaded, the Hub:

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base}"), "{folder}")  # or "{HUB_PLACEHOLDER}"
```

With lm-evaluation-harness, no code of ours:

```bash
lm_eval --model hf --model_args pretrained={base},peft={folder} --tasks {task if named else "TASK"}
```

With headmap (`load_adapter` builds the {method} modules back; merge.py folds them into the weights):

{python}""")
    upload = (f"Upload: `huggingface-cli upload {HUB_PLACEHOLDER} {folder} --exclude \"{RESUME_DIR}/*\"` (the "
              f"`{RESUME_DIR}/` folder holds what `finetune.py --resume` needs, not the adapter).")
    _write_card(folder, [f"base_model: {base}"] + ([] if hs else ["library_name: peft"]) + ["tags:"]
                + [f"- {tag}" for tag in tags],
                [f"# {method} adapter for {base} on {record['dataset']}", "",
                 "Trained by `finetune.py` of the HeadMap reference implementation (Wang et al., \"HeadMap: Locating "
                 "and Enhancing Knowledge Circuits in LLMs\", ICLR 2025); written from the run's `training.json`.", "",
                 "| | |", "|---|---|", *[f"| {key} | {value} |" for key, value in table], "", "## Load it", "",
                 loading, "", upload])


def write_merged_card(folder: str, out: str, record: dict, adapter_record: dict | None) -> None:
    """README.md of a merged checkpoint written into `folder` for --out `out`: the base model, the adapter folded in
    (as the user named it), the method, what merging changed in the weights, and the adapter's own numbers where
    its training.json has them."""
    method, base = record["method"], record["base_model"]
    changed = {"headmap": "each circuit layer's o_proj weight gained s W_up W_down on the circuit heads' columns and "
                          "o_proj a bias s (W_up b_down + b_up) (the config's attention_bias switched on where the "
                          "model had none)",
               "lora": "each adapted layer's weight became W0 + s B A (and its bias gained s b_B where the adapter "
                       "has lora_bias)",
               "dora": "each adapted layer's weight became m (W0 + s B A) / ||W0 + s B A||, row by row"}[method]
    table = [("base model", f"`{base}`"), ("adapter", f"`{record['adapter']}` ({method})"), ("merging", changed)]
    if adapter_record:
        table += _weights_row(adapter_record)
        rows = adapter_record["eval_rows"]
        table.append((f"{adapter_record['metric']} of the adapter on {rows} rows of {adapter_record['eval_split']} "
                      "(± standard error)", f"{_with_error(adapter_record['accuracy_before'], rows)} before, "
                                            f"{_with_error(adapter_record['accuracy_after'], rows)} after"))
    _write_card(folder, [f"base_model: {adapter_record['adapter'].get('base_model_name_or_path') or base}"
                         if adapter_record else f"base_model: {base}", "base_model_relation: merge", "tags:",
                         "- headmap", "- knowledge-circuit", f"- {method}"],
                [f"# {base} with the {method} adapter {record['adapter']} merged in", "",
                 "Written by `merge.py` of the HeadMap reference implementation: a plain transformers checkpoint that "
                 "computes what the base model with the adapter attached computes (to float rounding), with no code "
                 "of ours.", "", "| | |", "|---|---|", *[f"| {key} | {value} |" for key, value in table], "",
                 "## Load it", "", "```python", "from transformers import AutoModelForCausalLM",
                 f"model = AutoModelForCausalLM.from_pretrained(\"{out}\")  # or \"{HUB_PLACEHOLDER}\" once "
                 "uploaded", "```"])
