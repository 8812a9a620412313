"""Evaluate the two-stage pipeline: python evaluate.py binary=<checkpoint or run id>
subtype=<checkpoint or run id> [data.root=...] (the same as pneumonia-evaluate; pneumonia/cli.py)"""

from pneumonia.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
