"""What serving needs besides the network, one module per task: a `TaskPredictor` that turns raw inputs
(review texts, prompts, WAV files, recent rows of a series) into the network's input and its output into
predictions. rnnlab.serving wraps a run's network and its task's predictor into the MLflow pyfunc.

Predictors read their task's data module and rnnlab.models, never MLflow: they refuse bad input with
DataError, which rnnlab.serving turns into the 400 answer of `mlflow models serve`.
"""
