"""The automatic choice of accelerator, devices, strategy and precision (pneumonia.hardware),
for mocked machines and on this one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf

from pneumonia import hardware
from tests.conftest import REPO


def _machine(monkeypatch, gpus: int = 0, capability: tuple[int, int] | None = (9, 0),
             native_bf16: bool = False) -> None:
    """Pretend to run on a machine with `gpus` GPUs of `capability` and the given CPU."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA Test GPU")
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native_bf16)


@pytest.mark.parametrize("gpus, capability, native_bf16, expected", [
    (0, None, False, ("cpu", 1, "auto", "32-true")),
    (0, None, True, ("cpu", 1, "auto", "bf16-mixed")),
    (1, (7, 0), False, ("gpu", 1, "auto", "16-mixed")),
    (1, (9, 0), False, ("gpu", 1, "auto", "bf16-mixed")),
    (4, (8, 0), False, ("gpu", 4, "ddp", "bf16-mixed")),
    (4, (7, 5), True, ("gpu", 4, "ddp", "16-mixed")),
])
def test_auto_follows_the_machine(monkeypatch, gpus, capability, native_bf16, expected):
    _machine(monkeypatch, gpus, capability, native_bf16)
    assert hardware.choose("auto", "auto", "auto", "auto") == expected


@pytest.mark.parametrize("given, expected", [
    (("auto", 2, "auto", "auto"), ("gpu", 2, "ddp", "bf16-mixed")),        # trainer.devices=N
    (("auto", [1, 3], "auto", "auto"), ("gpu", [1, 3], "ddp", "bf16-mixed")),
    (("gpu", -1, "32-true", "ddp"), ("gpu", 4, "ddp", "32-true")),         # trainer=ddp, fp32
    (("cpu", "auto", "auto", "auto"), ("cpu", 1, "auto", "32-true")),      # a GPU machine's CPU
    (("cpu", 2, "auto", "auto"), ("cpu", 2, "ddp", "32-true")),            # gloo DDP on a CPU
    (("auto", "auto", "bf16-mixed", "ddp_spawn"), ("gpu", 4, "ddp_spawn", "bf16-mixed")),
    (("auto", 1, 32, "auto"), ("gpu", 1, "auto", 32)),
])
def test_explicit_values_are_kept(monkeypatch, given, expected):
    _machine(monkeypatch, gpus=4, capability=(9, 0), native_bf16=False)
    assert hardware.choose(*given) == expected


def test_an_explicit_gpu_on_a_machine_without_one_is_left_to_lightning(monkeypatch):
    _machine(monkeypatch, gpus=0)
    assert hardware.choose("gpu", 1, "bf16-mixed") == ("gpu", 1, "auto", "bf16-mixed")


def test_tags_and_log_line_name_the_hardware(monkeypatch):
    _machine(monkeypatch, gpus=4)
    choice = hardware.choose()
    assert hardware.tags(choice) == {
        "hardware/accelerator": "gpu", "hardware/devices": "4", "hardware/strategy": "ddp",
        "hardware/precision": "bf16-mixed", "hardware/device_name": "4x NVIDIA Test GPU"}
    assert hardware.describe(choice) == ("accelerator=gpu, devices=4, strategy=ddp, "
                                         "precision=bf16-mixed on 4x NVIDIA Test GPU")
    _machine(monkeypatch, gpus=0)
    assert hardware.tags(hardware.choose())["hardware/device_name"] == hardware.cpu_description()


@pytest.mark.parametrize("gpus, capability, native, device, precision", [
    (0, (9, 0), True, "cpu", "bf16"),
    (0, (9, 0), False, "cpu", "32"),
    (1, (9, 0), False, "cuda", "bf16"),
    (1, (7, 0), True, "cuda", "32"),
])
def test_evaluate_and_explain_resolve_auto(monkeypatch, gpus, capability, native, device,
                                           precision):
    _machine(monkeypatch, gpus=gpus, capability=capability, native_bf16=native)
    assert hardware.resolve_device("auto") == device
    assert hardware.inference_precision(device, "auto") == precision
    assert hardware.resolve_device("cuda:1") == "cuda:1"
    assert hardware.inference_precision(device, "32") == "32"


def test_native_bf16_agrees_with_this_cpu():
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = set(next(line for line in lines if line.startswith("flags")).split(":", 1)[1].split())
    assert hardware.cpu_has_native_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})
    described = hardware.cpu_description()
    for flag in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"):
        assert (flag in described) == (flag in flags)


def test_cpu_description_without_cpuinfo(monkeypatch, tmp_path):
    monkeypatch.setattr(hardware, "CPUINFO", tmp_path / "missing")
    assert hardware.cpu_description()  # the platform's name, never empty
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9454P 48-Core Processor\n"
                    "flags\t\t: fpu avx2 avx512f avx512_bf16 sse\n\nprocessor\t: 1\n")
    monkeypatch.setattr(hardware, "CPUINFO", info)
    assert hardware.cpu_description() == ("AMD EPYC 9454P 48-Core Processor "
                                          "(avx2, avx512f, avx512_bf16)")


@pytest.mark.parametrize("multirun, launcher, strategy", [
    (False, None, "ddp"),
    (True, "hydra._internal.core_plugins.basic_launcher.BasicLauncher", "ddp_spawn"),
    (True, "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher", "ddp"),
])
def test_a_chosen_ddp_inside_a_local_multirun_is_spawned(monkeypatch, multirun, launcher, strategy):
    from pneumonia import train

    _machine(monkeypatch, gpus=4)
    monkeypatch.setattr(train, "in_multirun", lambda: multirun)
    monkeypatch.setattr(train.HydraConfig, "get",
                        staticmethod(lambda: OmegaConf.create(
                            {"launcher": {"_target_": launcher}})))
    overrides = train._trainer_overrides(hardware.choose())
    assert overrides == {"accelerator": "gpu", "devices": 4, "strategy": strategy,
                         "precision": "bf16-mixed"}


DDP_ARGS = ["experiment=demo", "data.synthetic=null", "data.num_workers=0", "data.batch_size=8",
            "model.input_size=64", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=2", "log_best_checkpoint=false",
            "trainer.accelerator=cpu", "trainer.devices=2"]


@pytest.mark.slow
def test_an_automatic_ddp_run_writes_one_folder_one_run_and_its_checkpoints_once(synthetic_root,
                                                                                tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run([sys.executable, str(REPO / "train.py"), *DDP_ARGS,
                           f"data.root={synthetic_root}", f"paths.cache_dir={tmp_path}/cache"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    precision = "bf16-mixed" if hardware.cpu_has_native_bf16() else "32-true"
    line = f"Hardware: accelerator=cpu, devices=2, strategy=ddp, precision={precision} on "
    assert done.stdout.count(line) == 1, done.stdout[-3000:]  # said once, by rank 0

    # the default run dir is stamped to the microsecond: a rank resolving its own would differ
    folders = list((tmp_path / "outputs").glob("*/*/*"))
    assert len(folders) == 1, folders
    assert (folders[0] / "train_ddp_process_1.log").is_file()  # rank 1 ran in rank 0's folder
    checkpoints = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.ckpt"))
    assert [p.name for p in checkpoints] == sorted(["last.ckpt", checkpoints[0].name])
    assert all(p.parent == folders[0].relative_to(tmp_path) / "checkpoints" for p in checkpoints)

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    tags = runs[0].data.tags
    assert {k: tags[k] for k in tags if k.startswith("hardware/")} == {
        "hardware/accelerator": "cpu", "hardware/devices": "2", "hardware/strategy": "ddp",
        "hardware/precision": precision, "hardware/device_name": hardware.cpu_description()}
    assert runs[0].info.status == "FINISHED"
