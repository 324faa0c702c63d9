"""Every command in the README runs as written: the short ones are run, a training command is parsed and checked in
full (`export-config` in its place: every flag and value, without the hour of training), a launcher's own flags are
looked up in its --help, and an extra that `pip install` names exists."""

import re
import shlex
import subprocess
import sys

import pytest
import tomllib
from conftest import ROOT, run_script

README = (ROOT / "README.md").read_text()
SHORT = {"examples/smallest.py", "--help"}  # run as written (a training run gets its own --out-dir)


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


@pytest.mark.parametrize("command", [c for c in commands() if c[0] != "pip" and c[:3] != ["python", "-m", "pytest"]],
                         ids=shlex.join)  # fmt: skip
def test_a_readme_command_runs_as_written(command, tmp_path):
    if command[0] in ("torchrun", "fabric"):  # the launcher's flags are its own; what it launches is checked below
        launcher = ["fabric", "run"] if command[0] == "fabric" else ["torchrun"]
        script = command.index("train.py")
        usage = subprocess.run([*launcher, "--help"], capture_output=True, text=True).stdout
        assert all(arg.split("=")[0] in usage for arg in command[len(launcher) : script] if arg.startswith("--"))
        command = ["python", *command[script:]]
    assert command[0] == "python", command
    args = command[1:]
    if any(word in SHORT for word in args):
        if "--help" not in args:
            args = [*args, "--out-dir", str(tmp_path)]
    else:  # python train.py TASK flags: everything parsed and checked, nothing trained
        at = 2 if len(args) > 1 and not args[1].startswith("--") else 1
        args = [*args[:at], "export-config", *args[at:]]
    result = run_script(args, timeout=240)
    assert result.returncode == 0, (args, result.stderr[-2000:])
    assert "Traceback" not in result.stderr


def test_the_readme_example_is_the_example_file():
    shown = re.search(r"```python\n(.*?)```", README, flags=re.S).group(1)
    code = (ROOT / "examples" / "smallest.py").read_text()
    for line in shown.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            assert line.split("  #")[0].rstrip() in code, line


def test_the_commands_were_found():
    assert len(commands()) >= 8 and sys.executable
