"""Print the zero-shot results (results/zero_shot_*.json, made by results/zero_shot.sh) as a markdown table."""
import json
from pathlib import Path

here = Path(__file__).resolve().parent
rows = {}
for style in ("paper", "harness"):
    for part in ("seven", "hellaswag"):
        for name, r in json.loads((here / f"zero_shot_{style}_{part}.json").read_text())["results"].items():
            rows.setdefault(name, {})[style] = r
print("| dataset | split | rows | paper acc | paper acc_norm | harness acc | harness acc_norm |")
print("|---|---|---|---|---|---|---|")
for name, r in rows.items():
    p, h = r["paper"], r["harness"]
    print(f"| {name} | {p['split']} | {p['n']} | {p['acc']:.3f} | {p['acc_norm']:.3f} | {h['acc']:.3f} | {h['acc_norm']:.3f} |")
