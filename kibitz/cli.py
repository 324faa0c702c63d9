"""The command line: which task, which tool, and the config, from `train.py [TASK] [TOOL] [--config FILE]
[flags]`. A task is a name in the built-in registry (the `tasks` module, found by name so that no
trainer module imports it) or a file that defines `TASK` (a config.Task), such as examples/charlm.py."""

import dataclasses
import importlib
import importlib.util
import itertools
import os
import shlex
import sys
import traceback
import typing
from pathlib import Path

import tyro

import config
from config import ConfigError, Task
from kibitz import configfile, runs, tools
from kibitz.contract import task_file

REGISTRY = "tasks"  # the module whose TASKS dict `python train.py NAME` looks NAME up in; the first is the default


def registry() -> dict[str, Task]:
    return importlib.import_module(REGISTRY).TASKS


def task_from_file(path: str | Path) -> Task:
    """The TASK a Python file defines (its `if __name__ == "__main__"` block does not run)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"task: {path}: no such task file")
    own_modules_first(path)
    spec = importlib.util.spec_from_file_location(f"kibitz_task_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        raise ConfigError(f"task: {path}: line {exc.lineno}: SyntaxError: {exc.msg}") from None
    except TypeError as exc:  # Task(...) in an older order of its fields, say
        where = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if Path(frame.filename) == path]
        line = f" line {where[-1]}" if where else ""
        if "unexpected keyword argument 'train_fields'" in str(exc):  # a field until 2026-12
            dropped = "Task.train_fields: no longer a field; name the values train_step logs: (loss, {name: value})"
            raise ConfigError(f"task: {path}:{line} {dropped}") from None
        if "Task.__init__()" in str(exc):
            raise ConfigError(f"task: {path}:{line} expected {config.POSITIONAL} ({exc})") from None
        raise ConfigError(f"task: {path}:{line} cannot be imported (TypeError: {exc})") from None
    except Exception as exc:  # a missing import, a NameError at module level: the file's own bug, in one line
        raise ConfigError(f"task: {path}: cannot be imported ({type(exc).__name__}: {exc})") from None
    if not isinstance(getattr(module, "TASK", None), Task):
        raise ConfigError(f"task: {path}: expected a module-level TASK = config.Task(...)")
    config.check_task(module.TASK)
    return module.TASK


def own_modules_first(task_file: Path) -> None:
    """The task file's folder first on the import path, so its own model.py, losses.py, utils.py are the ones it
    imports (train.shadowing has refused a folder that holds a module named like one of the trainer's)."""
    folder = str(Path(task_file).resolve().parent)
    if sys.path[:1] != [folder]:
        sys.path.insert(0, folder)


def task_file_of(task: Task) -> str:
    """The file that defines a task, relative to here where it is below (for the messages that say how to resume)."""
    file = task_file(task)
    return os.path.relpath(file) if file.is_relative_to(Path.cwd()) else str(file)


def overview(prog: str, tasks: dict[str, Task] | None) -> str:
    lines = [f"usage: {prog} {'[TASK] ' if tasks else ''}[TOOL] [--config FILE] [flags]", ""]
    if tasks:
        lines += ["tasks (the first is the default; or a file defining TASK, like examples/charlm.py):"]
        lines += [f"  {name:<19}{(task.config.__doc__ or '').strip().splitlines()[0]}" for name, task in tasks.items()]
        lines += [""]
    lines += ["tools:"] + [f"  {name:<19}{what}" for name, what in tools.TOOLS.items()] + [""]
    lines += [
        "  --config FILE   start from a saved config.json (flags after it override it)",
        "",
        f"the flags of {'the default task' if tasks else 'training'} follow ({prog} TOOL --help for a tool's):",
        "",
    ]
    return "\n".join(lines)


def choice_fields(cls, prefix: str = "") -> dict[str, tuple[str, tuple, bool]]:
    """{flag: (field, choices, whether it takes several)} for every Literal field of a config class and its
    sections."""
    found = {}
    for name, hint, _ in config.leaf_fields(cls, prefix):
        if choices := config.literal_choices(hint):
            found[f"--{name}".replace("_", "-")] = (name, choices, False)
        elif typing.get_origin(hint) is tuple and (choices := config.literal_choices(typing.get_args(hint)[0])):
            found[f"--{name}".replace("_", "-")] = (name, choices, True)  # one or several
    return found


def refuse_bad_choices(cls, args: list[str], prefix: str = "") -> None:
    """A value outside a Literal's choices, as a one-line error naming the field (tyro's is a box)."""
    for flag, (name, choices, several) in choice_fields(cls, prefix).items():
        for spelling in {flag, "--" + flag[2:].replace("-", "_")}:
            for value in flag_values(args, spelling, several):
                if value not in [str(c) for c in choices]:
                    raise ConfigError(f"{name}: expected one of {', '.join(map(str, choices))}, got {value!r}")


def flag_values(args: list[str], flag: str, several: bool = False) -> list[str]:
    """Every value given to `flag`, as `--flag value` (`several`: `--flag value value ...`) or `--flag=value`."""
    values = []
    for i, arg in enumerate(args):
        if arg == flag and several:
            values.extend(itertools.takewhile(lambda value: not value.startswith("--"), args[i + 1 :]))
        elif arg == flag and i + 1 < len(args):
            values.append(args[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg[len(flag) + 1 :])
    return values


def checkpoint_task(ckpt: str, given: Task | None, out_dir: Path) -> Task:
    """The task of `evaluate --ckpt`: the one named on the command line, else the checkpoint's own
    (a registry name, else the task file it records)."""
    if given is not None:
        return given
    name, file = tools.checkpoint_task(Path(ckpt), out_dir)
    if name is None:
        raise ConfigError(f"ckpt: {ckpt} cannot be loaded as a kibitz checkpoint")
    if name in registry():
        return registry()[name]
    # A task file is code: the file a checkpoint names runs only when the user names it.
    command = shlex.join(["python", "train.py", file or "TASKFILE.py", "evaluate", "--ckpt", ckpt])
    raise ConfigError(
        f"ckpt: {ckpt} is a checkpoint of the {name!r} task, defined in a task file, which is code that kibitz runs "
        f"only when you name it; if you trust {file or 'the task file'}, run: {command}"
    )


def parse(argv: list[str], task: Task | None = None) -> tuple[Task, str | None, object, str]:
    """-> (task, tool or None for training, the parsed config or tool arguments, the program's name)."""
    argv = list(argv)
    given = [arg.split("=", 1)[0] for arg in argv]
    task, tasks, prog = pick_task(argv, task)
    tool = argv.pop(0) if argv and argv[0] in tools.TOOLS else None
    if tool == "evaluate":
        return parse_evaluate(argv, task or next(iter(tasks.values())), task is None, prog)
    if tool == "export-checkpoint":
        return task, tool, tyro.cli(tools.ExportArgs, args=argv, prog=f"{prog} export-checkpoint"), prog
    if tool == "convert-checkpoint":
        return task, tool, tyro.cli(tools.ConvertArgs, args=argv, prog=f"{prog} convert-checkpoint"), prog
    task = task or next(iter(tasks.values()))
    default, argv = config_given(argv, task)
    refuse_bad_choices(task.config, argv)
    if tool is None and "--config" not in given and (saved := config_resumed(argv, task)) is not None:
        return task, tool, resumed_as_configured(saved, argv, task, prog), prog
    if tool == "lr-find":
        lr_find = tools.LRFindArgs(run=default)
        args = tyro.cli(tools.LRFindArgs[task.config], default=lr_find, args=argv, prog=f"{prog} lr-find")
        return task, tool, args, prog
    return task, tool, tyro.cli(task.config, default=default, args=argv, prog=prog), prog


def pick_task(argv: list[str], task: Task | None) -> tuple[Task | None, dict | None, str]:
    """The task (a file, a registry name, the one given, or None for the default), the registry when no task was
    given, and the program's name; what named the task is taken off argv."""
    prog = None
    if task is None and argv and argv[0].endswith(".py"):  # a task file: the built-in tasks are never imported
        prog = shlex.join(["train.py", argv[0]])
        task = task_from_file(argv.pop(0))
    elif task is not None:
        config.check_task(task)
        own_modules_first(task_file(task))
    tasks = registry() if task is None else None
    prog = prog or ("train.py" if task is None else shlex.quote(task_file_of(task)))
    if argv and argv[0] in ("-h", "--help"):
        print(overview(prog, tasks))
    if task is None and argv and not argv[0].startswith("-") and argv[0] not in tools.TOOLS:
        name = argv.pop(0)
        if name not in tasks:
            raise ConfigError(
                f"task: expected one of {', '.join(tasks)}, a task file (path/to/task.py) or a tool "
                f"({', '.join(tools.TOOLS)}), got {name!r}"
            )
        task, prog = tasks[name], f"train.py {name}"
    return task, tasks, prog


def parse_evaluate(argv: list[str], task: Task, default_task: bool, prog: str) -> tuple[Task, str, object, str]:
    """`evaluate --ckpt ...`: the checkpoint's task and config (its data section's flags apply)."""
    ckpt, prog = (flag_values(argv, "--ckpt") or [None])[-1], f"{prog} evaluate"
    if ckpt is None or "-h" in argv or "--help" in argv:  # the help: --ckpt is required
        data = task.config().data
        args = tyro.cli(
            tools.EvaluateArgs[type(data)], default=tools.EvaluateArgs(tyro.MISSING, data), args=argv, prog=prog
        )
        return task, "evaluate", args, prog
    out_dir = Path((flag_values(argv, "--out-dir") or [config.OUT_DIR])[-1])
    task = checkpoint_task(ckpt, None if default_task else task, out_dir)
    cfg, _ = tools.load_checkpoint(Path(ckpt), task, out_dir)
    refuse_bad_choices(tools.EvaluateArgs, argv)
    refuse_bad_choices(type(cfg.data), argv, "data.")
    default = tools.EvaluateArgs(ckpt=Path(ckpt), data=cfg.data)
    return task, "evaluate", tyro.cli(tools.EvaluateArgs[type(cfg.data)], default=default, args=argv, prog=prog), prog


# What a resumed run trains on: changing these under a run mixes two runs in one folder, so a flag that changes one
# is refused (the run's config.json, given by --config and then changed, says that it is meant).
TRAINS_ON = ("data.", "model.")
MAY_CHANGE = ("data.batch_size", "data.eval_batch_size", "data.num_workers", "data.on_device")


def config_resumed(argv: list[str], task: Task) -> Path | None:
    """The config.json of the run a `--resume` continues (its folder by --run-name, by the checkpoint it names, or
    the newest run of the task under --out-dir for `auto`), or None: a first start."""
    resume = (flag_values(argv, "--resume") or [None])[-1]
    if resume is None or resume.startswith("wandb:"):
        return None
    out_dir = Path((flag_values(argv, "--out-dir") or [config.OUT_DIR])[-1])
    run_name = (flag_values(argv, "--run-name") or [None])[-1]
    if run_name and config.is_plain_name(run_name):
        folder = out_dir / run_name
    elif resume != "auto":
        folder = Path(resume).parent.parent  # RUN/checkpoints/FILE
    else:
        folder = runs.newest_run(out_dir, task.name)
    found = folder / "config.json" if folder is not None else None
    return found if found is not None and found.is_file() and not found.is_symlink() else None


WHERE_IT_RUNS = ("accelerator", "devices", "num_nodes", "strategy")


def where_it_runs_from_the_command_line(saved, task: Task):
    """A run resumes on the machine it is started on (a launcher's, or the flags'), not on the one it was saved on:
    8 GPUs' checkpoints resume on a laptop, 2 processes' on 1."""
    here = config.for_task(task.config(), task).fabric
    fabric = dataclasses.replace(saved.fabric, **{name: getattr(here, name) for name in WHERE_IT_RUNS})
    return dataclasses.replace(saved, fabric=fabric)


def resumed_as_configured(saved: Path, argv: list[str], task: Task, prog: str):
    """The run's own config with the flags on top; what the flags change is printed, and a change to what the run
    trains on is refused."""
    if (found := runs.run_task(saved.parent)) not in (None, task.name):  # before its config is read as this task's
        raise ConfigError(f"resume: {saved.parent} is a run of the {found!r} task, not of {task.name!r}")
    default = where_it_runs_from_the_command_line(configfile.load_json(saved, task.config, task.name), task)
    cfg = tyro.cli(task.config, default=default, args=argv, prog=prog)
    before = {name: value for name, _, value in config.leaf_fields(default)}
    changed = {name: (before[name], value) for name, _, value in config.leaf_fields(cfg) if before[name] != value}
    changed = {name: values for name, values in changed.items() if name not in ("resume", "run_name", "out_dir")}
    trained_on = [name for name in changed if name.startswith(TRAINS_ON) and name not in MAY_CHANGE]
    if trained_on:
        old, new = changed[trained_on[0]]
        raise ConfigError(
            f"resume: --{trained_on[0].replace('_', '-')} changes what the run in {saved.parent} trains on ({old!r} "
            f"-> {new!r}); resume it as it was, start another run, or say it is meant: --config {saved} with the flag"
        )
    what = "; ".join(f"{name} {old!r} -> {new!r}" for name, (old, new) in changed.items()) or "nothing"
    if int(os.environ.get("RANK", "0")) == 0:  # a launcher's ranks each parse the command line: one says it
        print(f"resuming {saved.parent} as configured ({saved.name}); the flags change {what}", flush=True)
    return cfg


def config_given(argv: list[str], task: Task) -> tuple[object, list[str]]:
    """The config the flags change: the task's defaults, or the file `--config FILE` names; argv without it."""
    default = config.for_task(task.config(), task)
    argv = [part for arg in argv for part in (arg.split("=", 1) if arg.startswith("--config=") else [arg])]
    if argv.count("--config") > 1:
        raise ConfigError("--config: given twice; start from one config.json and change it with flags after it")
    if "--config" in argv:
        at = argv.index("--config")
        if at + 1 >= len(argv):
            raise ConfigError("--config: expected a JSON file written by a run (config.json)")
        default = configfile.load_json(Path(argv[at + 1]), task.config, task.name)
        argv = argv[:at] + argv[at + 2 :]
    return default, argv
