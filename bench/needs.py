"""Exit with one line naming the packages that are missing, before a run that needs them starts (bench/gpu.sh's
dry run checks every path, so it needs every reference the claims are timed against).

    python bench/needs.py peft lm_eval accelerate
"""
import importlib.util
import sys

if __name__ == "__main__":
    missing = [name for name in sys.argv[1:] if importlib.util.find_spec(name) is None]
    sys.exit(f"error: {', '.join(missing)} not installed: pip install -r requirements-test.txt" if missing else 0)
