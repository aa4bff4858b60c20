"""A fork server for the tests' rank processes: one Python that has imported torch and the trainer
once forks a fresh process for each rank of a test job, as multiprocessing's forkserver does.

Why: a rank started as `python -m train_kernel.cli run ...` spends about 1.5-2.5 s of CPU importing
torch and the project before it does anything (measured: `import train_kernel.cli` 1.4-2.3 s user on
a 2-core AMD EPYC), and the suite starts a few hundred of them on 2 cores. A forked rank is still a
real process (its own pid, sockets, gloo group, signals and exit code) running the same module as
`__main__` with its own argv, environment and working folder; only the interpreter start is shared.
`TEST_ZYGOTE=0` starts every rank as a fresh interpreter instead (what torchrun does).

The server never runs a torch op or starts a thread before it forks (it refuses to serve if an
import started one), so no lock or thread pool is copied half-held into a child. A request whose
import-time environment (OMP_*, MKL_*, TORCH_*, ...) differs from the server's is not forked: the
caller starts a fresh interpreter for it.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PRELOAD = ("train_kernel.cli", "train_kernel.train.trainer", "torch.distributed")
# Variables read when a library loads (thread pools, ISA choices, allocators): a child forked from
# a server that loaded them under other values would not behave as a fresh process would.
IMPORT_TIME_PREFIXES = (
    "OMP_",
    "MKL_",
    "KMP_",
    "GOMP_",
    "ATEN_",
    "ONEDNN_",
    "DNNL_",
    "TORCH_",
    "PYTORCH_",
    "PYTHON",
    "LD_",
    "CUDA_",
    "NCCL_",
    "GLOO_",
)
SERVER_ENV = {"OMP_NUM_THREADS": "1"}  # what every rank of the tests' jobs runs with


def import_time_env(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith(IMPORT_TIME_PREFIXES)}


# ---------------------------------------------------------------- server (its own process)


def serve() -> None:
    for module in PRELOAD:
        __import__(module)
    others = _foreign_threads()
    if others or threading.active_count() != 1:
        _send({"refused": f"threads {others} after the imports: forking would copy them half-held"})
        return
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # pytest's Ctrl-C is for pytest; it kills us after
    _send({"ready": os.getpid()})
    pending = b""
    while True:
        ready, _, _ = select.select([0], [], [], 0.05)
        if ready:
            chunk = os.read(0, 65536)
            if not chunk:  # the test session ended
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                request = json.loads(line)
                server_pid = os.getpid()
                pid = os.fork()
                if pid == 0:
                    _become(request, server_pid)  # never returns: the child runs the module and exits
                _send({"id": request["id"], "pid": pid})
        _reap()


def _foreign_threads() -> list[str]:
    """Threads besides the main one, but for jemalloc's background purger (pyarrow's allocator):
    jemalloc takes its locks around fork() and restarts that thread in the child."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir() if int(task.name) != os.getpid()]
    return [name for name in names if name != "jemalloc_bg_thd"]


def _die_with(server_pid: int) -> None:
    """The kernel kills this child when the server ends (killed, or stdin closed at the session's
    end): no rank outlives the session, and none is left running unseen once nobody reports its
    exit. Linux's PR_SET_PDEATHSIG; a server gone before it took effect ends the child now."""
    import ctypes

    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL) != 0:
        os._exit(70)
    if os.getppid() != server_pid:
        os._exit(70)


def _send(message: dict) -> None:
    os.write(1, (json.dumps(message) + "\n").encode())


def _reap() -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _send({"exited": pid, "code": os.waitstatus_to_exitcode(status)})


def _become(request: dict, server_pid: int) -> None:
    """Turns the forked child into `python -m <module> <args>` with the request's environment,
    folder and output file, then leaves through the interpreter's normal exit (threads joined,
    atexit handlers run, streams flushed), as a fresh process would."""
    import runpy

    _die_with(server_pid)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for name in ("SIGTERM", "SIGCHLD", "SIGHUP", "SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    output = os.open(request["out"], flags, 0o600)
    errors = os.open(request["err"], flags, 0o600) if request.get("err") else output
    os.dup2(output, 1)
    os.dup2(errors, 2)
    for descriptor in {null, output, errors}:
        os.close(descriptor)
    module, *args = request["argv"]
    sys.argv = [module, *args]
    sys.path[0] = os.getcwd()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        raise
    except BaseException:
        import traceback

        traceback.print_exc()
        raise SystemExit(1) from None
    raise SystemExit(0)


# ---------------------------------------------------------------- client (in pytest's process)


class ForkedProcess:
    """The parts of subprocess.Popen the launchers use: pid, poll, wait, kill, returncode."""

    def __init__(self, server: Zygote, pid: int, output_path: Path) -> None:
        self._server = server
        self.pid = pid
        self.output_path = output_path

    @property
    def returncode(self) -> int | None:
        return self._server.exit_code(self.pid)

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        code = self._server.wait_exit(self.pid, timeout)
        if code is None and self._server.dead:
            raise RuntimeError(
                f"the test fork server died before forked rank {self.pid} ended (the rank died with it)"
            )
        if code is None:
            raise subprocess.TimeoutExpired(f"forked rank {self.pid}", timeout or 0)
        return code

    def kill(self) -> None:
        if self.returncode is not None:
            return  # reaped already: its pid may be another process's by now (as Popen.kill checks)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")


class Zygote:
    def __init__(self) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-c", "import tests.zygote as z; z.serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env={**os.environ, **SERVER_ENV},
        )
        self.env = import_time_env({**os.environ, **SERVER_ENV})
        self._lock = threading.Condition()
        self._pids: dict[int, int] = {}
        self._exits: dict[int, int] = {}
        self._next_id = 0
        self._dead = False
        # Its imports take seconds; one that hangs must not hang the session (then: fresh interpreters).
        answered, _, _ = select.select([self._process.stdout], [], [], 120)
        line = self._process.stdout.readline() if answered else b'{"refused": "no answer within 120 s"}'
        try:
            first = json.loads(line or b'{"refused": "the server died"}')
        except ValueError:
            first = {"refused": f"it wrote {line[:200]!r}"}
        if "ready" not in first:
            self._process.kill()
            raise RuntimeError(f"the test fork server refused: {first.get('refused')}")
        threading.Thread(target=self._read, daemon=True, name="zygote-reader").start()

    def _read(self) -> None:
        for line in self._process.stdout:
            message = json.loads(line)
            with self._lock:
                if "pid" in message:
                    # The pid of a rank that ended earlier (its exit already recorded) comes back
                    # once pids wrap around (pid_max can be 32768): that exit is not this one's.
                    self._exits.pop(message["pid"], None)
                    self._pids[message["id"]] = message["pid"]
                else:
                    self._exits[message["exited"]] = message["code"]
                self._lock.notify_all()
        with self._lock:
            self._dead = True
            self._lock.notify_all()

    @property
    def dead(self) -> bool:
        """Whether the server's output ended: it exited or was killed (its ranks with it)."""
        with self._lock:
            return self._dead

    def can_fork(self, env: dict[str, str]) -> bool:
        return not self.dead and import_time_env(env) == self.env

    def spawn(
        self,
        argv: list[str],
        env: dict[str, str],
        output_path: Path,
        error_path: Path | None = None,
        cwd: str | None = None,
    ) -> ForkedProcess:
        """Starts `python -m <argv>`; stdout (and stderr unless `error_path`) go to `output_path`."""
        for check in START_CHECKS:
            check([sys.executable, "-m", *argv], env)
        with self._lock:
            request_id = self._next_id
            self._next_id += 1
        request = {
            "id": request_id,
            "argv": argv,
            "env": env,
            "cwd": str(cwd or os.getcwd()),
            "out": str(output_path),
            "err": str(error_path) if error_path else None,
        }
        self._process.stdin.write((json.dumps(request) + "\n").encode())
        self._process.stdin.flush()
        with self._lock:
            if not self._lock.wait_for(lambda: request_id in self._pids or self._dead, timeout=60):
                raise RuntimeError("the test fork server did not answer within 60 s")
            if self._dead:
                raise RuntimeError("the test fork server died")
            return ForkedProcess(self, self._pids.pop(request_id), output_path)

    def exit_code(self, pid: int) -> int | None:
        with self._lock:
            return self._exits.get(pid)

    def wait_exit(self, pid: int, timeout: float | None) -> int | None:
        with self._lock:
            self._lock.wait_for(lambda: pid in self._exits or self._dead, timeout=timeout)
            return self._exits.get(pid)

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()


# Called with (command line, environment) before each fork: tests/conftest.py keeps its marker
# rule (a test that starts ranks is marked `distributed`) true for forked ranks too.
START_CHECKS: list = []

_server: list[Zygote | None] = []


def server() -> Zygote | None:
    """The session's fork server, started on first use; None when TEST_ZYGOTE=0 or it refused."""
    if not _server:
        zygote = None
        if os.environ.get("TEST_ZYGOTE", "1") != "0":
            try:
                zygote = Zygote()
                atexit.register(zygote.close)
            except RuntimeError as error:
                print(f"tests/zygote.py: starting ranks as fresh interpreters: {error}", file=sys.stderr)
        _server.append(zygote)
    return _server[0]
