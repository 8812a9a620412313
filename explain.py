"""Explain every X-ray of a folder: \
python explain.py input=/path/to/folder binary=... subtype=..."""

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from pneumonia.cli import run
from pneumonia.explain.run import explain


@hydra.main(version_base="1.3", config_path="conf", config_name="explain")
def main(cfg: DictConfig) -> None:
    result = run(explain, cfg)
    out = Path(result["output_dir"])
    print(f"\nReports: {out / 'index.html'}  (summary: {out / 'summary.csv'})")
    if result["run_id"]:
        print(f"MLflow explain run: {result['run_id']}")
    if result["withheld"]:
        print(f"{result['withheld']} image(s) got no diagnosis by decision "
              "(not a chest radiograph, or out of distribution); see summary.csv",
              file=sys.stderr)
    if result["failed"]:
        print(f"{result['failed']} file(s) could not be explained; see summary.csv",
              file=sys.stderr)
        sys.exit(1)  # Hydra drops a task's return value; the exit status tells scripts


if __name__ == "__main__":
    main()
