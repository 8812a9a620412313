"""Evaluate the two-stage pipeline, or compare finished runs.

python evaluate.py binary=<checkpoint or run id> subtype=<checkpoint or run id> [data.root=...]
python evaluate.py compare=true
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from pneumonia.cli import run
from pneumonia.compare import compare, format_table
from pneumonia.evaluate import evaluate
from pneumonia.report import STAGE_TITLES


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    output_dir = Path(cfg.paths.output_dir)
    if cfg.compare:
        rows, files = run(compare, cfg)
        print(f"{format_table(rows)}\n\nSaved: {', '.join(map(str, files))}")
        return
    result = run(evaluate, cfg)
    m = result["metrics"]
    print(f"\nReport: {output_dir / 'report.md'}")
    if result["run_id"]:
        print(f"MLflow evaluation run: {result['run_id']}; pipeline model: {result['model_uri']}")
    if result.get("model_version"):
        print(f"Registered: models:/{cfg.register}@{cfg.register_alias} "
              f"(version {result['model_version']})" if cfg.register_alias
              else f"Registered: models:/{cfg.register}/{result['model_version']}")
    for section in STAGE_TITLES:
        values = m[section]["metrics"]
        ci = m[section]["ci"]["accuracy"]
        auroc = f", AUROC {values['auroc']:.3f}" if "auroc" in values else ""
        print(f"  {STAGE_TITLES[section]}: accuracy {values['accuracy']:.3f} "
              f"(95 % CI {ci[0]:.3f}-{ci[1]:.3f}){auroc}")


if __name__ == "__main__":
    main()
