"""tests/forkserver.py: a command forked from the server behaves as the same command started by subprocess."""

import json
import signal
import subprocess
import sys

import pytest
from conftest import child_env, python_process, run_python

PROBE = """
import json, os, sys
print(json.dumps({"argv": sys.argv, "path0": sys.path[0], "cwd": os.getcwd(), "spec": __spec__ and __spec__.name,
                  "file": globals().get("__file__"), "env": os.environ.get("PROBE"), "main": __name__}))
sys.stderr.write("to stderr\\n")
what = sys.argv[1] if len(sys.argv) > 1 else ""
if what == "raise":
    raise ValueError("raised")
if what == "interrupt":
    raise KeyboardInterrupt
if what == "exit-text":
    sys.exit("bye")
sys.exit(3)
"""


def both(args: list, cwd) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    """`args` run by subprocess and by the fork server."""
    options = dict(cwd=cwd, env=child_env(PROBE="yes"), capture_output=True, text=True, timeout=120)
    return subprocess.run(args, **options), run_python(args, **options)


@pytest.mark.parametrize("what", ["", "raise", "interrupt", "exit-text"])
def test_a_forked_script_sees_and_ends_as_a_started_one(tmp_path, what):
    (tmp_path / "probe.py").write_text(PROBE)
    real, forked = both([sys.executable, "probe.py", *([what] if what else [])], tmp_path)
    assert forked.returncode == real.returncode and forked.stdout == real.stdout
    expected = {"": 3, "raise": 1, "interrupt": -signal.SIGINT, "exit-text": 1}[what]
    assert real.returncode == expected
    last = lambda text: text.strip().splitlines()[-1]  # noqa: E731  (a traceback's frames name the server's file)
    assert last(forked.stderr) == last(real.stderr) and ("Traceback" in forked.stderr) == ("Traceback" in real.stderr)


def test_a_forked_module_and_code_see_what_started_ones_do(tmp_path):
    (tmp_path / "probe_module.py").write_text(PROBE)
    for args in ([sys.executable, "-m", "probe_module"], [sys.executable, "-c", PROBE]):
        real, forked = both(args, tmp_path)
        assert (forked.returncode, forked.stdout) == (real.returncode, real.stdout), json.loads(real.stdout)


def test_a_forked_process_is_signalled_as_a_process_group_leader(tmp_path):
    import os

    (tmp_path / "wait.py").write_text("import sys, time\nprint('ready', flush=True)\ntime.sleep(60)\n")
    process = python_process(
        [sys.executable, "wait.py"], cwd=tmp_path, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert process.stdout.readline() == "ready\n"
    assert process.poll() is None and os.getpgid(process.pid) == process.pid
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=30) == -signal.SIGTERM


LAUNCHER = """
import json, os, subprocess, sys
from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler  # torchrun's
print(json.dumps({"group": os.getpgid(0), "torchrun": subprocess_handler.Popen.__name__}), flush=True)
for flags, new_session in (([], False), (["-u"], True)):
    child = subprocess.Popen([sys.executable, *flags, "rank.py"], start_new_session=new_session)
    assert child.wait() == 4, child.returncode
subprocess.Popen([sys.executable, "rank.py", "wait"]).wait()
"""

RANK = """
import json, os, sys, time
print(json.dumps({"preloaded": "torch" in sys.modules, "group": os.getpgid(0), "pid": os.getpid()}), flush=True)
if sys.argv[1:] == ["wait"]:
    time.sleep(60)
sys.exit(4)
"""


def test_a_forked_process_launches_its_ranks_forked_into_its_own_process_group(tmp_path):
    """Fabric's launcher (and torchrun, with -u) starting `python SCRIPT` from a forked process: the script is forked
    too, in the launcher's process group (a new one with start_new_session), so a signal to the group reaches it."""
    import os

    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "rank.py").write_text(RANK)
    process = python_process(
        [sys.executable, "launcher.py"], cwd=tmp_path, stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    launcher, same, own, waiting = (json.loads(process.stdout.readline()) for _ in range(4))
    assert launcher["group"] == process.pid and launcher["torchrun"] == "Launched"  # it imported Popen by name
    assert same["preloaded"] and same["group"] == process.pid  # forked, in the launcher's group
    assert own["preloaded"] and own["group"] == own["pid"]  # start_new_session: a group of its own
    assert waiting["group"] == process.pid
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and its rank, as a test kills a run
    assert process.wait(timeout=30) == -signal.SIGKILL
    assert ended(waiting["pid"])


def ended(pid: int, patience: float = 10) -> bool:
    """Whether process `pid` is gone within `patience` seconds (the server reaps its processes as they end)."""
    import os
    import time

    deadline = time.monotonic() + patience
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False
