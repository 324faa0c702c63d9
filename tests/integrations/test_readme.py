"""Every command in the README runs as written: the short ones are run, a training command is parsed and checked in
full (`export-config` in its place: every flag and value, without the hour of training), a launcher's own flags are
looked up in its --help, and an extra that `pip install` names exists."""

import json
import re
import shlex
import subprocess
import sys

import pytest
import tomllib
from conftest import ROOT, run_script

README = (ROOT / "README.md").read_text()


def commands() -> list[list[str]]:
    found = []
    for block in re.findall(r"```bash\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            found.extend(shlex.split(part) for part in line.split(" && ") if part)
    return found


def test_the_readme_is_a_front_door_of_at_most_200_lines():
    assert len(README.splitlines()) <= 200
    for page in re.findall(r"\]\((docs/[^)#]+)", README):
        assert (ROOT / page).is_file(), page


def test_the_readme_installs_extras_that_exist():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = [re.search(r"\[(\w+)\]", arg) for cmd in commands() if cmd[:2] == ["pip", "install"] for arg in cmd]
    assert {m.group(1) for m in named if m} <= set(extras) and named


def launched(command: list[str]) -> list[str]:
    """What a launcher line runs (`python train.py ...`), its own flags checked against the launcher's --help."""
    while "=" in command[0]:  # RAY_ADDRESS=HEAD:6379 python ...: the environment of the command
        command = command[1:]
    if command[0] not in ("torchrun", "fabric"):
        return command
    script = command.index("train.py")
    if command[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        usage = get_args_parser().format_help()
    else:  # Fabric's launcher is a click command: its --help, in a process of its own
        usage = subprocess.run(["fabric", "run", "--help"], capture_output=True, text=True).stdout
    flags = [arg for arg in command[1:script] if arg.startswith("--")]
    assert flags and all(flag in usage for flag in flags), (flags, usage[-2000:])
    return ["python", *command[script:]]


TOOLS = ("mlflow", "ray")  # another program's command: its flags are looked up in its --help


@pytest.mark.parametrize("command", [c for c in commands() if c[0] in TOOLS], ids=shlex.join)
def test_a_tool_command_in_the_readme_has_flags_the_tool_knows(command):
    usage = subprocess.run([*command[:2], "--help"], capture_output=True, text=True, timeout=120)
    flags = [arg for arg in command[2:] if arg.startswith("--")]
    assert usage.returncode == 0 and flags and all(flag in usage.stdout for flag in flags), (flags, usage.stdout)


def test_the_readme_sweep_commands_parse(capsys):
    """The sweep's own options as its parser reads them, and the flags after `--` as every trial's, in full."""
    import importlib.util

    import tyro

    spec = importlib.util.spec_from_file_location("sweep", ROOT / "examples" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    import train

    found = [launched(c)[1:] for c in commands() if "examples/sweep.py" in c]
    for args in found:
        own, trials = (args[1 : args.index("--")], args[args.index("--") + 1 :]) if "--" in args else (args[1:], [])
        parsed = tyro.cli(sweep.SweepArgs, args=own)
        assert train.main([parsed.task, "export-config", *trials]) == 0, capsys.readouterr().err[-2000:]
    assert len(found) >= 2


@pytest.mark.slow  # runs each command in a process of its own, as typed
@pytest.mark.parametrize(
    "command",
    [
        c
        for c in commands()
        if c[0] not in ("pip", *TOOLS) and c[:3] != ["python", "-m", "pytest"] and "examples/sweep.py" not in c
    ],
    ids=shlex.join,
)
def test_a_readme_command_runs_as_written(command, tmp_path, capsys):
    """The example file is run as written, in a process of its own; the other commands in this process (a process
    each would cost seconds of imports): a training command through `export-config` in its place, which parses and
    checks every flag and value and stops before anything trains."""
    import train

    command = launched(command)
    assert command[0] == "python", command
    args = command[1:]
    if args[0] == "examples/smallest.py":
        result = run_script([*args, "--out-dir", str(tmp_path)], timeout=240)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-2000:]
        (run,) = tmp_path.iterdir()
        assert json.loads((run / "test_metrics.json").read_text())["test/mse"] < 0.02  # it fits: the noise is 0.01
        return
    assert args[0] == "train.py", args
    args = args[1:]
    if "--help" in args:
        with pytest.raises(SystemExit) as exit:
            train.main(args)
        assert exit.value.code == 0 and "usage" in capsys.readouterr().out
        return
    at = 1 if args and not args[0].startswith("--") else 0  # after the task (a name, or a task file: imported)
    args = [*args[:at], "export-config", *args[at:]]
    assert train.main(args) == 0, capsys.readouterr().err[-2000:]
    assert "Traceback" not in capsys.readouterr().err


def test_the_readme_example_is_the_example_file():
    shown = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    code = (ROOT / "examples" / "smallest.py").read_text()
    for line in shown.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert line.split("  #")[0].rstrip() in code, line


def test_the_commands_were_found():
    assert len(commands()) >= 8 and sys.executable
