"""Fine-tune the HeadMap adapter, or a LoRA/DoRA baseline (not implemented yet)."""
import sys

if __name__ == "__main__":
    print("error: finetune.py is not implemented yet", file=sys.stderr)
    sys.exit(2)
