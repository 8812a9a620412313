"""The model folder's Python model, as MLflow's "models from code" loads it: this file is run,
not unpickled. MLflow puts the folder's copy of the `pneumonia` package (`code/`) on the path
first, so the folder needs only its own requirements.txt."""

import mlflow

from pneumonia.serving import PipelineModel

mlflow.models.set_model(PipelineModel())
