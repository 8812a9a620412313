"""Train one stage: python train.py model=vgg16 stage=binary data.root=/path/to/chest_xray"""

import hydra
from omegaconf import DictConfig

import pneumonia.config  # noqa: F401  (registers the typed config schemas)
from pneumonia.cli import run
from pneumonia.sweep import run_job
from pneumonia.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    # in a sweep a failed job is recorded, not raised
    result = run(lambda c: run_job(c, train), cfg)
    if result is None:
        return
    print(f"\nOutput folder:    {result['output_dir']}")
    if result["run_id"]:
        print(f"MLflow run id:    {result['run_id']}  ({result['tracking_uri']})")
    print(f"Best checkpoint:  {result['best_checkpoint']}")
    for name, value in result["metrics"].items():
        print(f"  {name:<32} {value:.4f}")


if __name__ == "__main__":
    main()
