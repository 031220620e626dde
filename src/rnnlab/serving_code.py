"""The code MLflow stores as every serving model's definition ("models from code"): loading a serving model
runs this file instead of unpickling the wrapper object. The network inside it is still a pickled torch
module (loaded with mlflow.pytorch.load_model, which unpickles): load models only from stores you trust."""

from mlflow.models import set_model

from rnnlab.serving import RnnlabModel

set_model(RnnlabModel())
