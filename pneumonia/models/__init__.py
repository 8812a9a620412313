from pneumonia.models.module import StageClassifier
from pneumonia.models.network import (
    PneumoniaNet,
    build_network,
    interpolation,
    normalization_stats,
)

__all__ = ["PneumoniaNet", "StageClassifier", "build_network", "interpolation",
           "normalization_stats"]
