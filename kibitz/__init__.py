"""The trainer's machinery, one concern a module, beside the loop that train.py keeps at the root: checkpoints and
their storage, run folders, config files, distributed set-up, the non-finite guard, monitoring, evaluation, the task
contract, the command line and the tools; tracking/ holds the loggers and their sinks (metrics.csv, wandb,
TensorBoard, MLflow)."""
