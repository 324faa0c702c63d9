"""Tracking: a run's loggers (loggers.py) and the sinks they fan out to (sinks.py: metrics.csv, wandb, TensorBoard;
mlflow_sink.py: MLflow, from a thread of its own)."""
