"""The shape of the code: the trainer knows no task, and no module imports itself round a cycle."""

import ast
import subprocess
import sys
from pathlib import Path

from conftest import ROOT

ROOT_TRAINER = ("train", "config", "data", "schedules", "callbacks")  # the trainer a reader reads first
ROOT_TASK = ("model", "losses")  # the built-in tasks' network and losses
TASK_CODE = ("chessdata", "chess", "model", "losses", "tasks", "examples")  # never imported by the trainer
TASK_NAMES = ("chess", "dvae", "charlm")


def project_modules() -> dict[str, Path]:
    """Every module of the project by its import name: the root's, kibitz/ (tracking/ too), tasks/, chessdata/,
    examples/."""
    files = [*ROOT.glob("*.py"), *ROOT.glob("kibitz/**/*.py"), *ROOT.glob("tasks/*.py")]
    files += [*ROOT.glob("chessdata/*.py"), *ROOT.glob("examples/*.py")]
    names = {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in files}
    return {name.removesuffix(".__init__"): path for name, path in names.items()}


def trainer_modules() -> dict[str, Path]:
    """The trainer: the five root modules a reader reads first and every module of the kibitz package."""
    return {n: p for n, p in project_modules().items() if n in ROOT_TRAINER or n.split(".")[0] == "kibitz"}


def test_the_root_holds_the_design_cards_modules_and_the_rest_lies_in_folders():
    assert sorted(p.stem for p in ROOT.glob("*.py")) == sorted(ROOT_TRAINER + ROOT_TASK)
    assert len(ROOT_TRAINER + ROOT_TASK) <= 8
    assert (ROOT / "kibitz/tracking").is_dir() and (ROOT / "tasks/chess.py").is_file()


def imports_of(path: Path) -> set[str]:
    """Every module an import statement names, also inside functions ('from a import b' gives a and a.b)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_trainer_modules_import_no_task_code_and_name_no_task():
    modules = trainer_modules()
    assert len(modules) > len(ROOT_TRAINER) + 10 and "kibitz.tracking.sinks" in modules, "the walk found the trainer"
    for name, path in modules.items():
        imported = {i.split(".")[0] for i in imports_of(path)}
        assert not imported & set(TASK_CODE), f"{name} imports {imported & set(TASK_CODE)}"
        tree = ast.parse(path.read_text())
        docs = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}  # docstrings may explain
        strings = {
            node.value
            for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
        }
        named = {
            task
            for task in TASK_NAMES
            for s in strings
            if task in s.replace("python-chess", "").split() or s == task or f"val/{task}" in s
        }
        assert not named, f"{name}.py names the task(s) {named}"
        assert not any(s.startswith(("val/l1", "val/token_acc", "val/bpc")) for s in strings), name


def test_no_import_cycles():
    modules = project_modules()
    # A submodule naming its own package (`from tasks import figures` in tasks/chess.py) imports a sibling, not a cycle.
    graph = {
        name: {i for i in imports_of(path) if i in modules and i != name and not name.startswith(i + ".")}
        for name, path in modules.items()
    }
    done, path = set(), []

    def visit(node: str) -> None:
        assert node not in path, "import cycle: " + " -> ".join([*path[path.index(node) :], node])
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for name in sorted(graph):
        visit(name)
    assert "chessdata.prepare" in graph and graph["train"], "the walk found the project's modules"


def test_the_walk_sees_an_import_inside_a_function(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from chessdata.folder import SPLITS\n    import tasks\n")
    assert {"chessdata.folder", "chessdata.folder.SPLITS", "tasks"} <= imports_of(probe)


def test_help_lists_tasks_tools_and_config():
    result = subprocess.run(
        [sys.executable, "train.py", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    for word in ("chess ", "dvae ", "evaluate", "lr-find", "export-config", "--config FILE", "examples/charlm.py"):
        assert word in result.stdout, word


def test_a_bad_choice_is_refused_naming_the_choices(capsys):
    import train

    assert train.main(["dvae", "--dvae.quantizer", "gumbal"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: dvae.quantizer: expected one of gumbel, reinmax, softmax, got 'gumbal'"
    assert train.main(["--schedule.kind=cosin"]) == 2
    assert capsys.readouterr().err.startswith("error: schedule.kind: expected one of constant, cosine, noam")
    assert train.main(["knight"]) == 2
    assert "task: expected one of chess, dvae, a task file" in capsys.readouterr().err


def test_a_tasks_help_shows_its_own_sections_only(capsys, monkeypatch):
    import pytest

    import train

    monkeypatch.setenv("COLUMNS", "200")
    helps = {}
    for task in ("chess", "dvae"):
        with pytest.raises(SystemExit):
            train.main([task, "--help"])
        helps[task] = capsys.readouterr().out
    assert "--data.target" in helps["chess"] and "--log.predictions" in helps["chess"]
    assert "--dvae.quantizer" in helps["dvae"] and "--data.dir" in helps["dvae"]
    assert not any(flag in helps["dvae"] for flag in ("--data.target", "--data.flip", "--log.predictions"))


def test_a_config_built_in_code_is_checked_against_its_choices():
    import pytest

    import config
    from tasks import chess, dvae

    cfg = chess.ChessConfig()
    cfg.data.target = "centipawns"
    with pytest.raises(config.ConfigError, match="^data.target: expected one of pawns, win_prob, got 'centipawns'$"):
        config.check(cfg, chess.CHESS)
    cfg = dvae.DVAEConfig()
    cfg.checkpoint.rank_by = "val/l1"  # a chess metric: not one of this task's
    with pytest.raises(config.ConfigError, match="^checkpoint.rank_by: expected one of val/token_acc"):
        config.check(cfg, dvae.DVAE)


def test_an_ordinary_step_enters_the_files_docs_layout_names(tmp_path):
    """Profile one step of a one-file task between two `after_step` calls (no log, no validation, no checkpoint) and
    count the project files it enters: docs/layout.md says the number, and cannot drift from it."""
    import dataclasses
    import re

    from tiny_task import TinyConfig, mistaken

    import train

    entered, calls = set(), {"after_step": 0}

    def record(frame, event, arg) -> None:
        path = Path(frame.f_code.co_filename)
        if event == "call" and path.is_relative_to(ROOT) and ".venv" not in path.parts:
            entered.add(str(path.relative_to(ROOT)))

    def after_step(run) -> None:
        calls["after_step"] += 1
        sys.setprofile(record if calls["after_step"] == 2 else None)  # from after step 2 to after step 3

    cfg = TinyConfig(out_dir=tmp_path, run_name="r")
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=6, val_every=None))
    cfg = dataclasses.replace(cfg, log=dataclasses.replace(cfg.log, every=100, logger=("csv",), progress_bar=False))
    train.train(cfg, mistaken(hooks=lambda cfg, datasets: {"after_step": [after_step]}))
    sys.setprofile(None)
    entered.discard("tests/test_layout.py")  # the profiling hook itself
    stated = re.search(
        r"An ordinary step of a one-file task enters (\d+) project files", (ROOT / "docs/layout.md").read_text()
    )
    assert stated and int(stated[1]) == len(entered), ", ".join(sorted(entered))


def test_starting_imports_no_tracker_plotting_or_chess_library():
    """`--help` and a run's parsing import what they use: matplotlib, wandb, MLflow, TensorBoard and python-chess
    are imported where they are used, and the test environment has no Lightning (which makes Fabric import
    torchmetrics; bench/overhead.py's Lightning arm has an environment of its own)."""
    probe = (
        "import sys, contextlib, io\n"
        "import train\n"
        "from kibitz import cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        train.main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "cli.parse(['chess', '--train.max-steps', '1'])\n"
        "cli.parse(['dvae', '--train.max-steps', '1'])\n"
        "print(' '.join(sorted({name.split('.')[0] for name in sys.modules})))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    imported = set(result.stdout.split())
    assert "torch" in imported and "tyro" in imported, "the probe ran"
    heavy = {"matplotlib", "wandb", "mlflow", "tensorboard", "chess", "torchmetrics", "lightning", "ray", "datasets"}
    assert not imported & heavy, imported & heavy


def test_docs_layout_names_every_file_and_no_file_that_is_gone():
    """docs/layout.md's tables are the tree: every module (root, kibitz/, tasks/, chessdata/, examples/, bench/) has
    its row, and every file a row names exists."""
    import re

    text = (ROOT / "docs/layout.md").read_text()
    rows = set(re.findall(r"^\| `([\w/.]+\.(?:py|ipynb))` \|", text, flags=re.M))
    files = {p for p in ROOT.glob("**/*.py") if not {".venv", "tests", "data"} & set(p.parts)}
    files = {str(p.relative_to(ROOT)) for p in files if p.name != "__init__.py" or p.parent.name == "tasks"}
    files -= {"chessdata/__main__.py"}  # `python -m chessdata`, named with chessdata/cli.py
    assert files - rows == set(), "files without a row"
    assert {row for row in rows if not (ROOT / row).is_file()} == set(), "rows without a file"
