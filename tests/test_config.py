"""Typed config schemas: bad values fail at start-up, naming the key."""

import pytest

from pneumonia.config import validate
from pneumonia.train import train
from tests.conftest import compose_train


@pytest.mark.parametrize("override, key", [
    ("model.input_size=abc", "model.input_size"),
    ("data.batch_size=1.5", "data.batch_size"),
    ("data.cache=maybe", "data.cache"),
    ("trainer.max_epochs=ten", "trainer.max_epochs"),
    ("trainer.sync_batchnorm=often", "trainer.sync_batchnorm"),
])
def test_wrong_type_fails_at_composition_naming_the_key(tmp_path, override, key):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose_train(tmp_path, ["data.root=/data", override])
    assert key in str(err.value) + str(err.value.__cause__)


def test_unknown_key_fails_at_composition(tmp_path):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match="model.adaptr"):
        compose_train(tmp_path, ["data.root=/data", "model.adaptr=conv"])
    with pytest.raises(ConfigCompositionException, match="trainer.max_epoch"):
        compose_train(tmp_path, ["data.root=/data", "trainer.max_epoch=3"])


@pytest.mark.parametrize("override", [
    "model.norm=group", "model.mixstyle=0.5", "data.equalize=true", "data.balanced=true",
    "data.augment.stretch=0.1", "data.augment.sharpness=[-0.7,0.5]",
    "loss.mixup=0.4",
])
def test_retired_options_are_unknown_keys(tmp_path, override):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=override.split("=")[0].split(".")[-1]):
        compose_train(tmp_path, ["data.root=/data", override])


@pytest.mark.parametrize("override, message", [
    ("model.backbone=vgg61", r"model.backbone=.vgg61. is not a timm model.*conf/model/"),
    ("model.head=mlp", r"model.head='mlp' is not one of: linear, deep_mlp"),
    ("model.input_size=8", r"model.input_size=8 is too small"),
    ("optimizer.lr=-0.01", r"optimizer.lr=-0.01 must be a positive number"),
    ("data.crop.width=1.2", r"data.crop.width=1.2 must be in \[0, 1\)"),
    ("data.val_fraction=1.5", r"data.val_fraction=1.5 must be in \[0, 1\)"),
    ("data.split=kfold", r"data.split='kfold' is not one of: official, random"),
    ("data.augment.brightness=[0.1,-0.1]",
     r"data.augment.brightness=\[0.1, -0.1\] must be \[low, high\]"),
    ("stage=subtype stage.name=tertiary", r"stage.name='tertiary' is not one of: binary, subtype"),
    ("trainer.max_epochs=0", r"trainer.max_epochs=0 must be a positive integer"),
    ("trainer.precision=bf32", r"trainer.precision='bf32' is not one of: 64, 32"),
    ("trainer.accelerator=gpuu", r"trainer.accelerator='gpuu' is not one of: cpu, gpu"),
    ("trainer.devices=0", r"trainer.devices=0 must be a positive count"),
])
def test_bad_value_fails_before_any_work_naming_the_key(tmp_path, override, message):
    cfg = compose_train(tmp_path, ["data.root=/nonexistent", "logger=none", *override.split()])
    with pytest.raises(ValueError, match=message):
        validate(cfg)
    with pytest.raises(ValueError, match=message):
        train(cfg)  # before the (missing) data folder is even looked at
    assert not (tmp_path / "run").exists()


def test_every_shipped_experiment_validates(tmp_path):
    from tests.conftest import CONF

    for experiment in sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")):
        validate(compose_train(tmp_path, [f"experiment={experiment}", "data.root=/data"]))


def test_each_default_lives_in_the_yaml_and_the_schemas_only_type_and_check(tmp_path):
    """One rule for every config: a schema field holds no default, so each value comes from
    conf/; and every option of every group composes to a complete config."""
    import dataclasses

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from pneumonia import config, evaluate
    from pneumonia.explain import run
    from tests.conftest import CONF

    schemas = [config.ModelConfig, config.CropConfig, config.AugmentConfig, config.DataConfig,
               config.SyntheticConfig, config.StageConfig, config.TrainerConfig,
               evaluate.BootstrapConfig, evaluate.EvaluateConfig, run.ExplainConfig]
    for schema in schemas:
        for f in dataclasses.fields(schema):
            assert f.default is f.default_factory is dataclasses.MISSING, (schema.__name__, f.name)
    groups = {group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
              for group in ("model", "data", "trainer", "stage", "experiment", "debug")}
    for group, options in groups.items():
        for option in options:
            cfg = compose_train(tmp_path, ["data.root=/data", f"{group}={option}"])
            assert OmegaConf.missing_keys(cfg) == set(), (group, option)
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for script, missing in (("evaluate", set()), ("explain", {"input"})):
            values = compose(script)
            values.paths = {}  # Hydra's runtime interpolations resolve only in a run
            assert OmegaConf.missing_keys(values) == missing, script


def test_the_docs_list_exactly_the_model_configs():
    # conf/model/ is the one list of backbone configs; the two tables that show it follow it
    import re

    from tests.conftest import CONF, REPO

    configs = {p.stem for p in (CONF / "model").glob("*.yaml")}
    for doc in (REPO / "README.md", REPO / "docs" / "options.md"):
        row = next(line for line in doc.read_text().splitlines() if line.startswith("| `model` |"))
        listed = set(re.findall(r"`([a-z0-9_]+)`", row.split("|")[2]))
        assert listed == configs, doc
