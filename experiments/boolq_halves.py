"""BoolQ for locating: the bundled train split has no passages, so harness prompts (which read the passage) cannot
be built from it. The validation split is cut in two instead: its first 1,000 rows become a "train" split (D is
chosen from them), the other 2,270 the "validation" split the circuit is checked on.

    python experiments/boolq_halves.py runs/boolq_halves     # -> runs/boolq_halves/boolq/{train,validation}.jsonl
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from data.commonsense import load_rows  # noqa: E402
from headmap.files import atomic  # noqa: E402

FIRST = 1000
rows = load_rows("boolq", "validation")
folder = os.path.join(sys.argv[1], "boolq")
for split, part in (("train", rows[:FIRST]), ("validation", rows[FIRST:])):
    with atomic(os.path.join(folder, f"{split}.jsonl")) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in part)
print(f"wrote {folder}: train = validation rows 0-{FIRST - 1}, validation = rows {FIRST}-{len(rows) - 1}")
