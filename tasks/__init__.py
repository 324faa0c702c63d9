"""The built-in tasks, one file each; `python train.py NAME` looks NAME up in TASKS (the first is the default). A
task of your own needs no entry here: a file like examples/charlm.py is run directly (see the README)."""

from tasks.chess import CHESS
from tasks.dvae import DVAE

TASKS = {"chess": CHESS, "dvae": DVAE}
