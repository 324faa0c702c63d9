"""kibitz from a notebook, in a real Jupyter kernel (nbclient + ipykernel): the example notebook runs as a new user
would run it, and `train.train` with ddp_notebook forks its processes from the kernel, twice in a row, with the same
metrics as `fabric run --devices 2`, leaving no process behind."""

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, child_env, free_port, run_script, tiny_args

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")


def execute(notebook, cwd, timeout: int = 300):
    """Run every cell in a fresh kernel (the test's own Python), as Jupyter would; the notebook with its outputs."""
    client = nbclient.NotebookClient(
        notebook, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}
    )
    client.execute(env=child_env())
    return notebook


def outputs(notebook) -> list[dict]:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def assert_no_error(notebook) -> None:
    for output in outputs(notebook):
        assert output.output_type != "error", "\n".join(output.get("traceback", []))
        assert "Traceback" not in output.get("text", ""), output["text"][-2000:]


def redirected(notebook, anchor: str, line: str) -> None:
    """The test's runs go to its own folders: `line` added after the line that starts with `anchor`."""
    cells = [cell for cell in notebook.cells if anchor in cell.source]
    assert len(cells) == 1, anchor
    lines = cells[0].source.splitlines()
    at = next(i for i, text in enumerate(lines) if text.startswith(anchor))
    cells[0].source = "\n".join([*lines[: at + 1], line, *lines[at + 1 :]])


@pytest.mark.slow
def test_the_example_notebook_trains_shows_its_pictures_and_runs_a_task_of_its_own(prepared, tmp_path):
    notebook = nbformat.read(ROOT / "examples" / "notebook.ipynb", as_version=4)
    assert not outputs(notebook), "the example notebook is kept with its outputs cleared"
    out, data = repr(str(tmp_path)), repr(str(prepared))
    redirected(notebook, "cfg.log.logger", f"cfg.out_dir, cfg.data.dir = Path({out}), Path({data})")
    redirected(
        notebook,
        "cfg.log.logger",
        "cfg.train.max_steps, cfg.train.val_every, cfg.schedule.warmup_steps = 60, 20, 10  # the test's minute",
    )
    redirected(notebook, "mine.optim.lr", f"mine.out_dir = Path({out})")
    execute(notebook, ROOT / "examples")
    assert_no_error(notebook)
    results = [o for o in outputs(notebook) if o.output_type == "execute_result"]
    assert any("'l1'" in o.data["text/plain"] for o in results)  # the chess metrics, returned
    assert any("'mse'" in o.data["text/plain"] for o in results)  # the task written in a cell
    pictures = [o for o in outputs(notebook) if o.output_type == "display_data" and "image/png" in o.data]
    assert len(pictures) >= 2  # curves.png and the test picture, inline
    widgets = [o for o in outputs(notebook) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert widgets  # the progress bar is the notebook's own (tqdm's widget), not lines of text
    printed = "".join(o.get("text", "") for o in outputs(notebook))
    assert "test metrics" in printed and "\t" in printed  # evaluate's table; predict's FEN<TAB>prediction


DDP_CELL = """
import json, multiprocessing, os, sys
sys.path.insert(0, {root!r})
os.chdir({root!r})
import train
from kibitz import cli

def config(name, strategy="ddp_notebook"):
    return cli.parse([*{args!r}, "--run-name", name, "--fabric.accelerator", "cpu", "--fabric.devices", "2",
                      "--fabric.strategy", strategy])

task, _, cfg, _ = config("first")
first = train.train(cfg, task)
second = train.train(config("second")[2], task)  # a second run in the same kernel
def parent(pid):
    return open(f"/proc/{{pid}}/stat").read().rsplit(") ", 1)[1].split()[1]

children = [p for p in os.listdir("/proc") if p.isdigit() and parent(p) == str(os.getpid())]
try:  # ddp starts its processes by running the script again: a kernel has none
    train.train(config("third", "ddp")[2], task)
except Exception as exc:
    refused = f"{{type(exc).__name__}}: {{exc}}"
missing = config("fourth")[2]
missing.data.sources = [missing.data.sources[0].with_name("missing.pgn")]  # found missing in the forked processes
missing.data.dir = missing.data.dir.with_name("elsewhere")
try:
    train.train(missing, task)
except BaseException as exc:  # SystemExit: one line, as `train.py` would print it
    failed = f"{{type(exc).__name__}}: {{exc}}"
print(json.dumps({{"first": first.metrics, "second": second.metrics, "refused": refused, "failed": failed,
                   "children": children, "active": len(multiprocessing.active_children())}}))
"""


@pytest.mark.slow
def test_ddp_notebook_from_a_kernel_twice_equals_fabric_run_and_leaves_no_process(prepared, tmp_path):
    args = tiny_args(prepared, tmp_path)
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(DDP_CELL.format(root=str(ROOT), args=args))])
    execute(notebook, tmp_path)
    assert_no_error(notebook)
    printed = [o.text for o in outputs(notebook) if o.output_type == "stream" and o.name == "stdout"]
    result = json.loads("".join(printed).strip().splitlines()[-1])
    assert result["first"] == result["second"]  # the same config and seed: the same run
    assert result["children"] == [] and result["active"] == 0  # the forked processes are gone
    assert "2 processes" in "".join(printed)
    assert result["failed"].startswith("SystemExit: error: ") and "missing.pgn: no such file" in result["failed"]
    assert "\n" not in result["failed"], result["failed"]  # the forked process's one line, not its traceback
    assert result["refused"] == (
        "ConfigError: fabric.strategy: ddp starts its processes by running the script again, and a notebook has no "
        "script; use ddp_notebook, which forks this process once per device"
    )

    fabric = str(Path(sys.executable).parent / "fabric")  # the launcher, as the README runs it
    two = ["run", "--accelerator", "cpu", "--devices", "2", "--main-port", free_port()]
    launched = run_script([*two, "train.py", *args, "--run-name", "launched"], program=fabric)
    assert launched.returncode == 0, launched.stderr[-3000:]
    tested = json.loads((tmp_path / "launched" / "test_metrics.json").read_text())
    assert {f"test/{k}": v for k, v in result["first"].items()} == tested  # equal, bit for bit
