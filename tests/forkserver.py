"""Start `python SCRIPT ARGS` in a fraction of a second: a server that has imported torch and Fabric once forks a
process for each command, and the fork runs the command as a fresh interpreter would.

Importing torch and Fabric costs a fresh interpreter about 6 seconds on the 2-core CI, and the suite starts a few
hundred commands. `Forked` is a `subprocess.Popen` whose process comes from this server instead of fork and exec, so
a test reads its output, signals its process group and waits for its exit code exactly as it does a real process's.
What differs from a real start is only what was imported before the command ran: the libraries in PRELOAD, never a
module of the repository. Tests of start-up itself (what a start imports, how long it takes) start real processes,
and so does anything other than `python [-u] SCRIPT`, `python -m MODULE` or `python -c CODE` (other interpreter flags,
other programs). A forked process's own `python SCRIPT` starts (a run's other ranks) are forked too (`Launched`).

The server runs in the background of one pytest worker: `python tests/forkserver.py SOCKET`. A client sends one line
of JSON (argv, cwd, env, process group) with its stdin, stdout and stderr as file descriptors; the server answers the
process id at once and the wait status when the process ends.
"""

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

# What a run imports that takes a fresh interpreter seconds. Not MLflow: its import starts a thread (jemalloc's), and
# a process that forks must have none.
PRELOAD = [
    "numpy",
    "torch",
    "lightning_fabric",
    "tyro",
    "torch.distributed.checkpoint",
    "matplotlib.figure",
    "matplotlib.backends.backend_agg",
    "wandb",
]


# ---------------------------------------------------------------- the client: a Popen whose process the server forks


def can_fork(args, preexec_fn=None, **_) -> bool:
    """Whether `subprocess.Popen(args, ...)` runs `python [-u] SCRIPT`, `python -m MODULE` or `python -c CODE` with this
    interpreter, and nothing before it (a `preexec_fn` is a function of the caller's, which the server cannot run)."""
    if preexec_fn is not None or not isinstance(args, (list, tuple)) or len(args) < 2 or args[0] != sys.executable:
        return False
    if args[1] == "-u":  # unbuffered output, which the fork sets up
        args = args[1:]
    return len(args) > 1 and (args[1] in ("-m", "-c") and len(args) > 2 or not args[1].startswith("-"))


class Forked(subprocess.Popen):
    """`subprocess.Popen(args, ...)` for `python SCRIPT ...`, its process forked by the server at `address` (None: a
    process started as usual). It leads a process group of its own, as with `start_new_session=True`."""

    def __init__(self, address: str | None, args, **kwargs):
        self._address = address
        super().__init__(args, **kwargs)

    def _execute_child(self, args, executable, preexec_fn, close_fds, pass_fds, cwd, env, *rest):
        if self._address is None:
            return super()._execute_child(args, executable, preexec_fn, close_fds, pass_fds, cwd, env, *rest)
        startupinfo, *rest = rest
        creationflags, shell, p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite = rest[:8]
        standard = [fd if fd != -1 else default for fd, default in ((p2cread, 0), (c2pwrite, 1), (errwrite, 2))]
        request = {"argv": list(args[1:]), "cwd": str(cwd or os.getcwd()), "env": dict(env or os.environ)}
        request["group"] = self._group(*rest[8:])
        self._connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._connection.connect(self._address)
        socket.send_fds(self._connection, [json.dumps(request).encode() + b"\n"], standard)
        self._answers = self._connection.makefile("rb")
        self.pid = int(self._answers.readline())
        self._child_created = True
        self._close_pipe_fds(p2cread, p2cwrite, c2pread, c2pwrite, errread, errwrite)

    def _group(self, *_) -> int:
        return 0  # a group of its own

    def _try_wait(self, wait_flags):
        if self._address is None:
            return super()._try_wait(wait_flags)
        if wait_flags & os.WNOHANG and not select.select([self._connection], [], [], 0)[0]:
            return 0, 0
        status = self._answers.readline()
        self._connection.close()
        return self.pid, int(status) if status else 255 << 8  # a server gone: exit code 255

    def _internal_poll(self, _deadstate=None, **kwargs):
        if self._address is None:
            return super()._internal_poll(_deadstate, **kwargs)
        if self.returncode is None and self._waitpid_lock.acquire(False):
            try:
                if self.returncode is None:
                    pid, status = self._try_wait(os.WNOHANG)
                    if pid == self.pid:
                        self._handle_exitstatus(status)
            finally:
                self._waitpid_lock.release()
        return self.returncode


class Launched(Forked):
    """`subprocess.Popen` inside a forked process. A `python [-u] SCRIPT` whose script is not the environment's
    (Fabric's launcher starting the other ranks of a run, torchrun its workers) is forked by the same server, into the
    caller's process group or, with `start_new_session`, a new one, as a started process would be; anything else
    (Ray's and Jupyter's processes, `python -m`, other programs) is started as usual."""

    def __init__(self, args, *positional, **kwargs):
        command = list(args[1:]) if not positional and can_fork(args, **kwargs) else ["-"]
        script = command[1] if command[0] == "-u" else command[0]
        ours = not script.startswith("-") and not os.path.realpath(script).startswith(sys.prefix + os.sep)
        super().__init__(_server["address"] if ours else None, args, **kwargs)

    def _group(self, restore_signals, gid, gids, uid, umask, start_new_session, process_group=-1, *_) -> int:
        return 0 if start_new_session or process_group == 0 else os.getpgid(0)


_server: dict = {}


def address(env: dict) -> str:
    """The socket of this process's server, started with `env` on first use (it imports PRELOAD first) and stopped,
    its folder removed, when this process exits."""
    if not _server:
        import atexit
        import shutil
        import tempfile

        folder = tempfile.mkdtemp(prefix="kibitz-fork-")
        path = os.path.join(folder, "socket")
        server = subprocess.Popen(
            [sys.executable, __file__, path], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        )
        atexit.register(lambda: (server.kill(), server.wait(), shutil.rmtree(folder, ignore_errors=True)))
        deadline = time.time() + 300
        while not os.path.exists(path):
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"the fork server did not start: {server.poll()}")
            time.sleep(0.05)
        _server["address"] = path
    return _server["address"]


# ---------------------------------------------------------------- the server


def serve(path: str) -> None:
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path + ".binding")
    listener.listen(64)
    os.rename(path + ".binding", path)  # the path appears once the server accepts
    _server["address"] = path  # for the processes it forks, which fork theirs through it too
    parent, waiting = os.getppid(), {}
    while os.getppid() == parent:  # the pytest worker that started it is gone: so is the server
        if select.select([listener], [], [], 0.05)[0]:
            connection = listener.accept()[0]
            pid = fork_one(connection, listener, waiting)
            answer(connection, pid)
            waiting[pid] = connection
        while waiting:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            connection = waiting.pop(pid)
            answer(connection, status)
            connection.close()


def answer(connection: socket.socket, number: int) -> None:
    try:
        connection.sendall(b"%d\n" % number)
    except OSError:  # the client is gone (killed, say): nobody is waiting for this process
        pass


def fork_one(connection: socket.socket, listener: socket.socket, waiting: dict) -> int:
    data, fds, _, _ = socket.recv_fds(connection, 1 << 20, 3)
    while not data.endswith(b"\n"):
        data += connection.recv(1 << 20)
    request = json.loads(data)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        for fd in fds:
            os.close(fd)
        join(pid, request["group"])  # here too, so a signal to the group right after the start reaches it
        return pid
    listener.close()
    connection.close()
    for other in waiting.values():
        other.close()
    if not join(0, request["group"]):  # the group it was to join has ended
        os._exit(255)
    launch_through_server()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os._exit(run_as_main(request["argv"], request["cwd"], request["env"]))


def launch_through_server() -> None:
    """Make `Launched` this process's Popen: `subprocess.Popen` (Fabric's launcher calls it) and the name in every
    module that imported it before (torchrun's worker handler: `from subprocess import Popen`)."""
    started = subprocess.Popen
    for module in list(sys.modules.values()):
        if getattr(module, "__dict__", {}).get("Popen") is started:  # its own names: no lazy attribute loads
            module.Popen = Launched


def join(pid: int, group: int) -> bool:
    """Put process `pid` (0: this one) in process `group` (0: a new one it leads). Every forked process shares the
    server's session, so one it forks can join the group of the process that asked for it."""
    try:
        os.setpgid(pid, group)  # the server and the child both do it: the first one to run does
        return True
    except OSError:  # the group has ended, or (in the server) the child already has
        return False


def run_as_main(argv: list[str], cwd: str, env: dict) -> int:
    """Run `python ARGV` in this process as the interpreter would, and return its exit code."""
    import atexit
    import importlib
    import threading

    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    importlib.invalidate_caches()  # files written since the server started
    if "numpy" in sys.modules:  # a fresh interpreter seeds numpy's global generator from the OS
        sys.modules["numpy"].random.seed()
    if argv[0] == "-u":
        argv = argv[1:]
        unbuffered_output()
    interrupted, code = False, 0
    try:
        if argv[0] == "-m":
            run_module(argv[1], argv[2:])
        elif argv[0] == "-c":
            run_code(argv[1], argv[2:])
        else:
            run_script(argv[0], argv[1:])
    except SystemExit as exc:
        code = exit_code(exc.code)
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        interrupted = True
    except BaseException:
        sys.excepthook(*sys.exc_info())
        code = 1
    threading._shutdown()  # as the interpreter ends: its threads, then atexit
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if interrupted:  # the interpreter ends an uncaught KeyboardInterrupt by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def unbuffered_output() -> None:
    """stdout and stderr written through to their files, as `python -u` opens them."""
    import io

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        stream.flush()
        raw = io.FileIO(stream.fileno(), "w", closefd=False)
        setattr(sys, name, io.TextIOWrapper(raw, stream.encoding, stream.errors, write_through=True))


def exit_code(code) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def run_script(path: str, args: list[str]) -> None:
    from importlib.machinery import SourceFileLoader

    sys.argv = [path, *args]
    sys.path[0] = os.path.dirname(os.path.realpath(path))
    main = new_main(__file__=os.path.abspath(path), __cached__=None, __loader__=SourceFileLoader("__main__", path))
    with open(path, "rb") as f:
        code = compile(f.read(), path, "exec")
    exec(code, main.__dict__)


def run_code(source: str, args: list[str]) -> None:
    from importlib.machinery import BuiltinImporter

    sys.argv = ["-c", *args]
    sys.path[0] = ""
    exec(compile(source, "<string>", "exec"), new_main(__loader__=BuiltinImporter).__dict__)


def new_main(**attributes):
    """A new `__main__` module in sys.modules, as the interpreter makes one for the code it runs."""
    import types

    main = types.ModuleType("__main__")
    main.__spec__ = None
    for name, value in attributes.items():
        setattr(main, name, value)
    sys.modules["__main__"] = main
    return main


def run_module(name: str, args: list[str]) -> None:
    import runpy

    sys.argv = ["-m", *args]
    sys.path[0] = os.getcwd()
    runpy._run_module_as_main(name, alter_argv=True)


if __name__ == "__main__":
    serve(sys.argv[1])
