"""A fork server for the workflow's heavy jobs on one machine: torch, torchvision and spbench
imported once, each job a fork of that process instead of a fresh interpreter.

On a small grid a fine-tune job's own work is seconds, and a fresh Python that imports torch,
torchvision (which pulls in torch._dynamo) and spbench spends several more before it starts
(4 to 9 s on a 2-core machine): paid by every job, it is much of the demo's time. A local
``snakemake`` run (not a cluster run: there each job is on its own node) therefore starts one
server (:func:`start`, from the Snakefile's ``onstart``) that imports those modules and then
waits on a Unix socket. A job's script calls :func:`delegate` first thing: it sends the server
its command line, working directory, environment and standard streams; the server forks, the
child runs the job's script as ``__main__`` in that setting, and the job's own process waits
and exits with the child's status. Signals sent to the job (SIGTERM on preemption or
cancellation, SIGINT on Ctrl-C) are forwarded to the child; a job killed outright (SIGKILL)
closes its connection, on which the server sends the child SIGTERM.

Nothing else changes: the child's output goes to the job's own streams and log files, and its
results are the same as in a fresh process (every job seeds its generators itself; a test
checks the records). :func:`delegate` runs the job in its own process instead, silently, when
there is no server (``SPBENCH_FORKSERVER`` unset, a cluster job, ``forkserver: false`` in the
config), when the server cannot be reached, or when the job runs another Python (a conda
environment): the server serves only its own interpreter.

This module imports nothing heavy itself, so that a job asks the server before it pays for
torch.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["ENV", "PRELOAD", "start", "stop", "serve", "delegate", "in_worker"]

#: The environment variable that names the server's socket, for the jobs.
ENV = "SPBENCH_FORKSERVER"

#: What the server imports before it serves: what the heavy jobs' scripts import.
PRELOAD = ("torch", "torchvision", "torch._dynamo", "spbench.pipeline", "spbench.methods", "spbench.fisher",
           "spbench.analysis")

#: Signals a waiting job forwards to its child.
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)

_HEADER = struct.Struct("!I")
_IN_WORKER = False


def _kill(pid: int, sig: int = signal.SIGTERM) -> None:
    """Send ``sig`` to ``pid``, which may have exited already."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def in_worker() -> bool:
    """Whether this process is a job forked by the server."""
    return _IN_WORKER


# -- the job's side ---------------------------------------------------------------------------------


def delegate(argv: list[str] | None = None) -> None:
    """Run this job's script (``argv``, default ``sys.argv``, its first item the script) in a
    fork of the server named by ``$SPBENCH_FORKSERVER``, wait for it and leave with its exit
    status (``SystemExit``). Returns at once, so that the caller runs the script itself, in
    the forked child, where there is no server, or where the server will not take the job."""
    path = os.environ.get(ENV)
    if _IN_WORKER or not path:
        return
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and os.path.exists(path + ".starting") and time.monotonic() < deadline:
        time.sleep(0.05)  # the server is still importing: about what this job would spend itself
    argv = list(sys.argv if argv is None else argv)
    request = {"argv": [os.path.abspath(argv[0]), *argv[1:]], "cwd": os.getcwd(), "env": dict(os.environ),
               "executable": os.path.realpath(sys.executable), "prefix": sys.prefix}
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.settimeout(30)
        conn.connect(path)
        _send(conn, request, fds=[0, 1, 2])
        reply = _recv(conn)
    except (OSError, ValueError) as err:
        print(f"spbench.forkserver: {path} not usable ({err}); running the job in its own process", file=sys.stderr)
        return
    if "pid" not in reply:  # refused: another interpreter
        return
    raise SystemExit(_wait_for_child(conn, reply["pid"]))


def _wait_for_child(conn: socket.socket, pid: int) -> int:
    """Forward signals to ``pid`` until the server reports its exit; its exit code (128 + the
    signal for a child killed by one, as a shell reports it)."""

    def forward(signum, _frame):
        _kill(pid, signum)

    for sig in FORWARDED:
        signal.signal(sig, forward)
    conn.settimeout(None)
    try:
        reply = _recv(conn)  # a forwarded signal does not interrupt it (PEP 475)
    except (OSError, ValueError):
        # the server is gone: the child's fate is unknown; stop it rather than leave it
        forward(signal.SIGTERM, None)
        print("spbench.forkserver: lost the server while the job ran", file=sys.stderr)
        return 1
    code = reply["exit"]
    return 128 - code if code < 0 else code


# -- the server's side -------------------------------------------------------------------------------


def start(directory: str | Path, preload=PRELOAD, wait: bool = True, timeout_s: float = 120.0) -> tuple[subprocess.Popen, str]:
    """Start a server (a child of this process) whose socket lies in ``directory``; (the
    process, the socket's path). With ``wait``, return once it has imported ``preload`` and
    listens; else at once: a job that asks it meanwhile waits while ``<path>.starting``
    exists. The server exits by itself when this process does."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = str(directory.resolve() / f"forkserver-{os.getpid()}.sock")
    if len(path.encode()) > 100:  # a Unix socket's path has at most 107 bytes
        import tempfile

        path = os.path.join(tempfile.mkdtemp(prefix="spbench-"), "forkserver.sock")
    Path(path).unlink(missing_ok=True)
    Path(path + ".starting").touch()
    proc = subprocess.Popen([sys.executable, "-m", "spbench.forkserver", path, ",".join(preload)],
                            stdin=subprocess.DEVNULL, start_new_session=True)
    began = time.monotonic()
    while wait and not os.path.exists(path):
        if proc.poll() is not None:
            raise RuntimeError(f"the fork server exited ({proc.returncode}) before it listened")
        if time.monotonic() - began > timeout_s:
            stop(proc, path)
            raise RuntimeError(f"the fork server did not listen within {timeout_s:.0f} s")
        time.sleep(0.05)
    return proc, path


def stop(proc: subprocess.Popen, path: str, timeout_s: float = 10.0) -> None:
    """Stop a server from :func:`start` (its running children get SIGTERM) and remove its socket."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    Path(path).unlink(missing_ok=True)
    Path(path + ".starting").unlink(missing_ok=True)


def serve(path: str, preload=PRELOAD, parent: int | None = None) -> None:
    """Import ``preload``, listen on ``path`` and fork a child per job until SIGTERM, or until
    ``parent`` (default: the process that started this one) is gone. The server itself runs
    no tensor operation and starts no thread, so that its forks are as clean as a fresh start."""
    import importlib

    parent = os.getppid() if parent is None else parent
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    try:
        for name in preload:
            if name:
                importlib.import_module(name)
        import threading

        if threading.active_count() > 1:  # a fork keeps only this thread: the others' locks would hang
            names = sorted(t.name for t in threading.enumerate() if t is not threading.current_thread())
            raise RuntimeError(f"preloading {list(preload)} started threads {names}; not serving")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        tmp = f"{path}.{os.getpid()}"
        listener.bind(tmp)
        listener.listen(64)
        os.replace(tmp, path)  # the path appears only once it listens
    finally:  # listening or failed: jobs need not wait any longer
        Path(path + ".starting").unlink(missing_ok=True)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}
    journal = open(path + ".log", "a", buffering=1)  # a line per job: what ran here, and how it ended
    try:
        while not stopping and _alive(parent):
            for key, _ in sel.select(timeout=0.2):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    pid = _accept_job(conn, listener, children, journal)
                    if pid is not None:
                        children[pid] = conn
                        sel.register(conn, selectors.EVENT_READ, pid)
                else:  # a waiting job's connection is readable only when it closed: it died
                    _kill(key.data)
                    sel.unregister(key.fileobj)
            _reap(children, sel, journal)
    finally:
        for pid in children:
            _kill(pid)
        listener.close()
        journal.close()
        if os.path.exists(path):
            os.unlink(path)


def _alive(pid: int) -> bool:
    return os.getppid() == pid


def _accept_job(conn: socket.socket, listener: socket.socket, children, journal) -> int | None:
    """Read a job's request from ``conn`` and fork its child; the child's pid, or None when
    the request is refused or broken."""
    conn.settimeout(10)
    try:
        request, fds = _recv(conn, with_fds=3)
    except (OSError, ValueError):
        conn.close()
        return None
    ours = request.get("executable") == os.path.realpath(sys.executable) and request.get("prefix") == sys.prefix
    if not ours or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        journal.write(f"{time.strftime('%H:%M:%S')} refused {request.get('argv', ['?'])[0]} "
                      f"({request.get('executable')})\n")
        try:
            _send(conn, {"refused": "another interpreter" if not ours else "no standard streams"})
        finally:
            conn.close()
        return None
    pid = os.fork()
    if pid == 0:  # the child never returns
        listener.close()
        journal.close()
        for other in children.values():
            other.close()
        conn.close()
        _run_job(request, fds)
    journal.write(f"{time.strftime('%H:%M:%S')} job {pid} started: {' '.join(request['argv'])[:300]}\n")
    for fd in fds:
        os.close(fd)
    try:
        _send(conn, {"pid": pid})
    except OSError:
        _kill(pid)
    return pid


def _reap(children: dict[int, socket.socket], sel: selectors.BaseSelector, journal) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = children.pop(pid, None)
        if conn is None:
            continue
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        code = os.waitstatus_to_exitcode(status)
        journal.write(f"{time.strftime('%H:%M:%S')} job {pid} exited {code}\n")
        try:
            _send(conn, {"exit": code})
        except OSError:
            pass
        conn.close()


def _run_job(request: dict, fds: list[int]) -> None:
    """In the forked child: take the job's streams, directory, environment and command line,
    run its script as ``__main__``, and exit with its status."""
    global _IN_WORKER
    code = 1
    try:
        _IN_WORKER = True
        for sig in (*FORWARDED, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.setpgid(0, 0)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.pop(ENV, None)  # the job's own subprocesses start afresh
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0 and "torch" in sys.modules:
            # OpenMP read the server's environment when torch loaded; a fresh job reads its own
            sys.modules["torch"].set_num_threads(int(threads))
        import tempfile

        tempfile.tempdir = None  # re-read from the job's TMPDIR
        sys.argv = list(request["argv"])
        sys.path[0] = os.path.dirname(sys.argv[0])
        import runpy

        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, (int, type(None))):
                print(exit_.code, file=sys.stderr)
        except BaseException:
            import traceback

            traceback.print_exc()
            code = 1
    finally:
        try:
            import logging

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


# -- framing: a length, then JSON; file descriptors ride with the first bytes -------------------------


def _send(conn: socket.socket, message: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(message).encode()
    payload = _HEADER.pack(len(data)) + data
    if fds:
        sent = socket.send_fds(conn, [payload], fds)
        payload = payload[sent:]
    if payload:  # (an empty send to a peer that has answered and closed would fail)
        conn.sendall(payload)


def _recv(conn: socket.socket, with_fds: int = 0):
    """One message from ``conn`` (and, with ``with_fds``, the descriptors sent with it:
    (message, fds)); ValueError when the peer closed before a whole one."""
    fds: list[int] = []
    if with_fds:
        head, got, _flags, _addr = socket.recv_fds(conn, _HEADER.size, with_fds)
        fds = list(got)
    else:
        head = b""
    head += _recv_exactly(conn, _HEADER.size - len(head))
    (size,) = _HEADER.unpack(head)
    message = json.loads(_recv_exactly(conn, size))
    return (message, fds) if with_fds else message


def _recv_exactly(conn: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = conn.recv(n)
        if not chunk:
            raise ValueError("connection closed")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


if __name__ == "__main__":
    # serve from the importable module, not from this __main__ copy of it: the jobs' scripts
    # import spbench.forkserver, whose in_worker() must say True in the children
    from spbench import forkserver

    forkserver.serve(sys.argv[1], [m for m in sys.argv[2].split(",") if m] if len(sys.argv) > 2 else PRELOAD)
