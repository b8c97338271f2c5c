"""A point's process forked from a server that has imported torch and transformers once.

A fresh interpreter per point spends about 3 s importing torch and transformers before it measures anything (a
profile of a smollm2 smoke point: torch 1.3 s, transformers and the model's module about 2 s). The server pays
that once per sweep; each point is still a process of its own (`os.fork` of the server, a new session, its own
memory), so a crash, an OOM kill or a signal ends only that point, as before. The server never runs a tensor
operation or starts a thread, so no OpenMP pool or CUDA context is forked.

Protocol, over a Unix socket pair (the server holds one end as fd 3): the sweep sends one JSON line per point
with the write end of a pipe attached (SCM_RIGHTS); the server forks, the child makes that pipe its stdout and
stderr and runs `runners.child.main`, and the server answers {"pid"} and, when the child ends,
{"returncode"} (negative: the signal that killed it, as subprocess reports it).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

# What every point imports first. The model's own module (modeling_llama, ...) is left to the point: a sweep's
# models are known only per point, and each costs a fraction of a second once transformers is in.
PRELOAD = (
    "torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.generation.utils",
    "harness.engines.transformers",
    "runners.point",
    "runners.child",
)
SERVER_FD = 3
_MAX_MESSAGE = 1 << 20


# -- the server (python -m runners.forkserver) -------------------------------------------------------------------
def _child(request: dict[str, Any], out_fd: int) -> None:
    """In the forked process: become the point's process, run it, and never return."""
    code = 1
    try:
        os.setsid()  # a process group of its own: a signal or a cancel reaches it and what it starts, nothing else
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        os.close(out_fd)
        os.close(SERVER_FD)
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_DFL)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        for entry in reversed(request["env"].get("PYTHONPATH", "").split(os.pathsep)):
            if entry and entry not in sys.path:
                sys.path.insert(0, entry)
        sys.argv = ["runners", request["out_dir"]]
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        sys.stderr.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        from runners.child import main

        code = main(Path(request["out_dir"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def _send(sock: socket.socket, message: dict[str, Any]) -> None:
    sock.sendall(json.dumps(message).encode() + b"\n")


def serve() -> int:
    from harness.processes import die_with_parent

    die_with_parent()  # SIGTERM when the sweep dies
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the sweep's to handle; the socket's end stops us
    sock = socket.socket(fileno=SERVER_FD)
    for name in PRELOAD:
        importlib.import_module(name)
    try:
        _send(sock, {"ready": True})
        while True:
            data, fds, _, _ = socket.recv_fds(sock, _MAX_MESSAGE, 1)
            if not data:
                return 0  # the sweep has closed its end
            request = json.loads(data)
            pid = os.fork()
            if pid == 0:
                _child(request, fds[0])
            os.close(fds[0])
            _send(sock, {"pid": pid})
            _, status = os.waitpid(pid, 0)
            _send(sock, {"returncode": os.waitstatus_to_exitcode(status)})
    except OSError:  # the sweep has gone (it ended before its first point, or was killed): so do we
        return 0


# -- the sweep's side ------------------------------------------------------------------------------------------
class ForkedPoint:
    """What runners.execute needs of a point's process, as subprocess.Popen offers it: pid, stdout, wait()."""

    def __init__(self, server: ForkServer, pid: int, stdout: Any) -> None:
        self._server = server
        self.pid = pid
        self.stdout = stdout
        self.returncode: int | None = None

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            message = self._server.receive(timeout)
            if message is None:
                raise subprocess.TimeoutExpired(f"point process {self.pid}", timeout or 0)
            self.returncode = int(message["returncode"])
        return self.returncode


class ForkServer:
    def __init__(self) -> None:
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buffer = b""
        # Its own stdout/stderr are the sweep's; fd 3 is its end of the socket.
        self.process = subprocess.Popen(
            [sys.executable, "-c", f"import os; os.dup2({theirs.fileno()}, {SERVER_FD}); "
             "from runners.forkserver import serve; raise SystemExit(serve())"],
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        theirs.close()
        self.ready = False

    def wait_ready(self) -> None:
        if not self.ready:
            message = self.receive(timeout=300)
            if not message or not message.get("ready"):
                self.close()
                raise RuntimeError("the point fork server did not start")
            self.ready = True

    def receive(self, timeout: float | None) -> dict[str, Any] | None:
        self._sock.settimeout(timeout)
        while b"\n" not in self._buffer:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise RuntimeError("the point fork server exited")
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return json.loads(line)

    def start(self, out_dir: Path) -> ForkedPoint:
        read_fd, write_fd = os.pipe()
        request = {"out_dir": str(out_dir), "cwd": os.getcwd(), "env": dict(os.environ)}
        try:
            socket.send_fds(self._sock, [json.dumps(request).encode()], [write_fd])
        finally:
            os.close(write_fd)
        stdout = os.fdopen(read_fd, "r", buffering=1)
        message = self.receive(timeout=60)
        if message is None or "pid" not in message:
            stdout.close()
            raise RuntimeError("the point fork server did not start the point")
        return ForkedPoint(self, int(message["pid"]), stdout)

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


_server: list[ForkServer] = []


def prestart() -> None:
    """Start this process's fork server now, so its imports overlap whatever the sweep does before its first
    point (Hydra composing the config); fork_server() then finds it ready or nearly."""
    if not _server:
        with contextlib.suppress(OSError):
            server = ForkServer()
            _server.append(server)
            atexit.register(server.close)


def fork_server() -> ForkServer | None:
    """This process's fork server, started on first use; None when it cannot start (points are then spawned)."""
    if not (_server and _server[0].alive()):
        _server.clear()
        prestart()
    try:
        if not _server:
            raise RuntimeError("it could not be started")
        _server[0].wait_ready()
    except (OSError, RuntimeError) as exc:
        print(f"warning: points run in fresh interpreters (the fork server failed: {exc}).", file=sys.stderr)
        _server.clear()
        return None
    return _server[0]


if __name__ == "__main__":
    sys.exit(serve())
