"""The machine a run uses: one rule that turns `auto` into an accelerator, devices, a strategy
and a precision, for train.py, evaluate.py and explain.py alike.

Several visible GPUs: DDP over all of them; one GPU: that GPU; none: the CPU. Precision `auto`:
bf16-mixed on GPUs of compute capability 8.0 or more, 16-mixed (with Lightning's loss scaler) on
older GPUs; on a CPU bf16-mixed only where bf16 is native (AVX512-BF16 or AMX), else 32-true,
since emulated bf16 is far slower than fp32 (docs/scaling.md).
"""

from __future__ import annotations

import platform
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import torch

CPUINFO = Path("/proc/cpuinfo")
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones that decide speed here
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_CAPABILITY = (8, 0)  # Ampere and later compute bf16 natively
GPU_ACCELERATORS = ("gpu", "cuda")


class Choice(NamedTuple):
    """The Trainer arguments a run uses."""

    accelerator: str
    devices: Any  # a count, or a list of device indices
    strategy: str
    precision: Any


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields in /proc/cpuinfo; empty where there is no such file."""
    try:
        first = CPUINFO.read_text().split("\n\n")[0]
    except OSError:
        return {}
    fields = {}
    for line in first.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX), as oneDNN sees it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the query
        return bool(set(_cpuinfo().get("flags", "").split()) & set(NATIVE_BF16_FLAGS))


def cpu_description() -> str:
    """The CPU's model name and its speed-relevant flags, e.g. 'AMD EPYC 9454P (avx2, avx512f)'."""
    info = _cpuinfo()
    name = info.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    flags = [flag for flag in SPEED_FLAGS if flag in info.get("flags", "").split()]
    return f"{name} ({', '.join(flags)})" if flags else name


def _gpu_indices(devices: Any) -> list[int]:
    return list(devices) if isinstance(devices, (list, tuple)) else list(range(devices))


def _precision(accelerator: str, devices: Any) -> str:
    """The automatic precision on `devices` of `accelerator`."""
    if accelerator in GPU_ACCELERATORS:
        capabilities = [torch.cuda.get_device_capability(i) for i in _gpu_indices(devices)]
        return "bf16-mixed" if all(c >= BF16_CAPABILITY for c in capabilities) else "16-mixed"
    if accelerator == "cpu" and cpu_has_native_bf16():
        return "bf16-mixed"
    return "32-true"


def choose(accelerator: str = "auto", devices: Any = "auto", precision: Any = "auto",
           strategy: str = "auto") -> Choice:
    """The accelerator, devices, strategy and precision for a run; `auto` values are decided by
    the machine, values given explicitly are kept as given."""
    gpus = torch.cuda.device_count()
    if accelerator == "auto":
        accelerator = "gpu" if gpus else "cpu"
    # `auto` (and -1 on GPUs) as a count: one CPU process, or every visible GPU (if any)
    if accelerator not in GPU_ACCELERATORS:
        devices = 1 if devices == "auto" else devices
    elif devices in ("auto", -1) and gpus > 0:
        devices = gpus
    count = len(devices) if isinstance(devices, (list, tuple)) else devices
    if strategy == "auto" and isinstance(count, int) and count > 1:
        strategy = "ddp"
    if precision == "auto":
        precision = _precision(accelerator, devices)
    return Choice(accelerator, devices, strategy, precision)


def device_name(choice: Choice) -> str:
    """The GPU model(s) a choice runs on (e.g. '4x NVIDIA H200'), or the CPU's description."""
    if choice.accelerator not in GPU_ACCELERATORS or not torch.cuda.device_count():
        return cpu_description()
    names = Counter(torch.cuda.get_device_name(i) for i in _gpu_indices(choice.devices))
    return ", ".join(name if n == 1 else f"{n}x {name}" for name, n in names.items())


def tags(choice: Choice) -> dict[str, str]:
    """The choice as MLflow tags (hardware/accelerator, ..., hardware/device_name)."""
    values = {**choice._asdict(), "device_name": device_name(choice)}
    return {f"hardware/{key}": str(value) for key, value in values.items()}


def describe(choice: Choice) -> str:
    """One line for the start-up log."""
    fields = ", ".join(f"{key}={value}" for key, value in choice._asdict().items())
    return f"{fields} on {device_name(choice)}"


def resolve_device(name: str) -> str:
    """A torch device for evaluate and explain: `auto` is the first GPU if there is one, else
    cpu; other names are kept."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.device_count() else "cpu"


def inference_precision(device: str, precision: str) -> str:
    """explain's precision ("32" or "bf16") on `device`: `auto` is bf16 where it is native."""
    if precision != "auto":
        return precision
    where = torch.device(device)
    accelerator = "gpu" if where.type == "cuda" else where.type
    return "bf16" if _precision(accelerator, [where.index or 0]) == "bf16-mixed" else "32"
