"""The process backend end to end: real children in both launch modes, real outcomes."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

from sandbox_kit import RUN_PATH, script, spec_for

from privsep.sandbox import (
    ExitReason,
    Limits,
    ProcessBackend,
    SandboxSpec,
    SetupStep,
)

REPORT = """
    import json, os, sys
    print(json.dumps({
        "pid": os.getpid(),
        "ids": [os.getresuid(), os.getresgid(), os.getgroups()],
        "cwd": os.getcwd(),
        "env": dict(os.environ),
        "argv": sys.argv[1:],
        "payload": privsep_payload.decode(),
        "root": sorted(os.listdir("/")),
        "wd_mode": oct(os.stat(".").st_mode & 0o7777),
    }))
"""


def report(handle_output: str) -> dict[str, object]:
    line = next(x for x in handle_output.splitlines() if x.startswith("{"))
    return json.loads(line)  # type: ignore[no-any-return]


def test_child_runs_isolated_and_reports(backend: ProcessBackend, bundle: Path) -> None:
    path = script(bundle, "report.py", REPORT)
    spec = spec_for(bundle, path, "a", "b", env={"LANG": "C.UTF-8"}, payload=b"data")
    handle = backend.launch(spec)
    assert handle.wait_running(30)
    status = handle.wait(30)
    assert status is not None and status.ok, (status, handle.output().text)
    assert status.exit_code == 0 and status.cpu_seconds is not None
    got = report(handle.output().text)
    uid = handle.uid
    assert uid in backend.uid_pool
    assert got["pid"] == 1  # PID 1 of its own namespace
    assert got["ids"] == [[uid] * 3, [uid] * 3, []]
    assert got["cwd"] == spec.workdir
    assert got["env"] == {"LANG": "C.UTF-8"}
    assert got["argv"] == ["a", "b"]
    assert got["payload"] == "data"
    assert "home" not in got["root"] and "run" not in got["root"] and "sys" not in got["root"]
    assert got["wd_mode"] == "0o700"
    # On reap: uid back in the pool, work dir root-owned again.
    assert uid not in backend.uid_pool.in_use()
    st = os.stat(spec.workdir)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)


def test_exit_code_and_traceback(backend: ProcessBackend, bundle: Path) -> None:
    code3 = backend.launch(spec_for(bundle, script(bundle, "e3.py", "raise SystemExit(3)")))
    boom = backend.launch(spec_for(bundle, script(bundle, "boom.py", "1/0")))
    status3, status_boom = code3.wait(30), boom.wait(30)
    assert status3 is not None and status3.reason is ExitReason.FAILED
    assert (status3.exit_code, str(status3)) == (3, "failed: exited with code 3")
    assert status_boom is not None and status_boom.exit_code == 1
    assert "ZeroDivisionError: division by zero" in boom.output().text


def test_setup_failure_is_named(backend: ProcessBackend, bundle: Path) -> None:
    spec = SandboxSpec(
        kind="parse",
        entry_point="privsep.sandbox.entrypoints:no_such_function",
        workdir=str(bundle.parent / "w"),
    )
    handle = backend.launch(spec)
    status = handle.wait(30)
    assert status is not None and status.reason is ExitReason.SETUP_FAILED
    assert status.setup_step is SetupStep.ENTRY_POINT
    assert str(status).startswith(
        "setup-failed: entry point could not be loaded: cannot load "
        "privsep.sandbox.entrypoints:no_such_function: AttributeError("
    )
    assert not handle.wait_running(0)
    assert "privsep: entry point could not be loaded" in handle.output().text


def test_filesystem_step_failure_names_the_path(backend: ProcessBackend, bundle: Path) -> None:
    os.mkfifo(bundle / "fifo")
    path = script(bundle, "ok.py", "pass")
    handle = backend.launch(spec_for(bundle, path, hidden_paths=(str(bundle / "fifo"),)))
    status = handle.wait(30)
    assert status is not None and status.setup_step is SetupStep.FILESYSTEM
    assert status.detail == (
        "building the sandbox filesystem view failed: "
        f"cannot hide {bundle}/fifo: neither a plain file nor a directory"
    )


def test_wall_timeout_escalates_to_sigkill(backend: ProcessBackend, bundle: Path) -> None:
    stubborn = script(
        bundle,
        "stubborn.py",
        """
        import time
        print("started", flush=True)
        while True:
            try:
                time.sleep(60)
            except SystemExit:
                print("ignoring SIGTERM", flush=True)
        """,
    )
    limits = Limits(wall_seconds=0.5, kill_grace_seconds=0.3)
    handle = backend.launch(spec_for(bundle, stubborn, limits=limits))
    status = handle.wait(30)
    assert status is not None and status.reason is ExitReason.TIMEOUT
    assert str(status) == "timeout: wall-clock limit of 0.5 s reached; sandbox killed"
    assert "ignoring SIGTERM" in handle.output().text


def test_kill_on_request(backend: ProcessBackend, bundle: Path) -> None:
    path = script(bundle, "sleep.py", "import time\ntime.sleep(60)")
    handle = backend.launch(spec_for(bundle, path))
    assert handle.wait_running(30)
    handle.kill(grace=0)
    status = handle.wait(30)
    assert status is not None and status.reason is ExitReason.KILLED
    handle.kill()  # idempotent


def test_credential_socket_reaches_only_its_sandbox(backend: ProcessBackend, bundle: Path) -> None:
    run_dir = bundle.parent / "run"
    run_dir.mkdir(mode=0o700)
    sock_path = run_dir / "cred.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(sock_path))
    server.listen(1)
    server.settimeout(30)
    client = script(
        bundle,
        "client.py",
        """
        import os, socket
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(os.environ["PRIVSEP_CREDENTIAL_SOCKET"])
        s.sendall(b"hello")
        print(s.recv(10).decode())
        """,
    )
    handle = backend.launch(spec_for(bundle, client, credential_socket=str(sock_path)))
    conn, _ = server.accept()
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    peer_uid = int.from_bytes(creds[4:8], sys.byteorder)
    assert peer_uid == handle.uid
    assert conn.recv(5) == b"hello"
    conn.sendall(b"token")
    conn.close()
    server.close()
    status = handle.wait(30)
    assert status is not None and status.ok, handle.output().text
    assert handle.output().text.strip() == "token"


def test_concurrent_launches_get_distinct_uids(backend: ProcessBackend, bundle: Path) -> None:
    path = script(bundle, "wait.py", "import time\ntime.sleep(0.3)")
    handles = []
    lock = threading.Lock()

    def go(i: int) -> None:
        spec = spec_for(bundle, path, sandbox_id=f"conc{i}-{backend.launch_mode}")
        h = backend.launch(
            SandboxSpec(**{**spec.__dict__, "workdir": str(bundle.parent / f"w{i}")})
        )
        with lock:
            handles.append(h)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uids = {h.uid for h in handles}
    assert len(uids) == 8
    for h in handles:
        status = h.wait(30)
        assert status is not None and status.ok, h.output().text
    assert not uids & backend.uid_pool.in_use()


def test_supervisor_can_make_itself_non_dumpable() -> None:
    code = (
        "from privsep.sandbox import set_non_dumpable\n"
        "set_non_dumpable()\n"
        "print(open('/proc/self/status').read().count('x'), end='')\n"
        "import ctypes; print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))\n"
    )
    out = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().endswith("0")


def test_entry_point_runs_user_script_via_run_path(bundle: Path) -> None:
    assert RUN_PATH == "privsep.sandbox.entrypoints:run_path"


def test_unsafe_inline_mode_is_loud_and_never_default(bundle: Path) -> None:
    assert ProcessBackend.__init__.__kwdefaults__["unsafe_inline"] is False  # type: ignore[index]
    with ProcessBackend(launch_mode="spawn", unsafe_inline=True) as backend:
        assert backend.describe() == "process backend: UNSAFE-INLINE (no isolation)"
        path = script(bundle, "inline.py", "import os\nprint('uid', os.getuid())")
        handle = backend.launch(spec_for(bundle, path))
        status = handle.wait(30)
        assert status is not None and status.ok, handle.output().text
        text = handle.output().text
        assert text.startswith("privsep: UNSAFE-INLINE MODE: this child runs WITHOUT namespaces")
        assert text.endswith(f"uid {os.getuid()}\n")


def test_done_callbacks_run_once_when_the_status_is_final(
    backend: ProcessBackend, bundle: Path
) -> None:
    """What the supervisor's loop waits on instead of a thread per sandbox."""
    path = script(bundle, "gate.py", "import time\ntime.sleep(60)\n")  # ends on our kill
    handle = backend.launch(spec_for(bundle, path))
    assert handle.wait_running(30)
    seen: list[tuple[str, object]] = []
    done = threading.Event()

    def failing() -> None:
        raise RuntimeError("a broken callback must not stop the others")

    handle.add_done_callback(lambda: seen.append(("first", handle.status)))
    handle.add_done_callback(failing)
    handle.add_done_callback(lambda: (seen.append(("second", handle.status)), done.set()))
    assert seen == []  # still running
    handle.kill(grace=0)
    assert done.wait(30)
    status = handle.wait(30)
    assert status is not None
    assert seen == [("first", status), ("second", status)]  # once each, with the final status
    caller = threading.current_thread()
    handle.add_done_callback(lambda: seen.append(("late", threading.current_thread())))
    assert seen[-1] == ("late", caller)  # already ended: called at once, in the caller
