"""Value checks that every config schema uses; each raises a ConfigError naming the key."""

from __future__ import annotations

import re

from pneumonia.errors import ConfigError


def check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")


def check_fraction_key(key: str, value: float, high_inclusive: bool = False) -> None:
    if not (0.0 <= value < 1.0 or (high_inclusive and value == 1.0)):
        raise ConfigError(f"{key}={value} must be in [0, 1{']' if high_inclusive else ')'}")


def at_least(key: str, value: int, low: int, why: str = "") -> None:
    if value < low:
        raise ConfigError(f"{key}={value} must be at least {low}{why}")


def check_device(device: str) -> None:
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?|auto", device):
        raise ConfigError(f"device={device!r} is not one of: cpu, cuda, cuda:N (N a GPU index), "
                          "auto (the first GPU if there is one, else cpu)")
