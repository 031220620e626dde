"""The code MLflow stores as every serving model's definition ("models from code"): loading a model runs
this file instead of unpickling an object, so neither MLflow's pickle warning nor its risk applies."""

from mlflow.models import set_model

from rnnlab.serving import RnnlabModel

set_model(RnnlabModel())
