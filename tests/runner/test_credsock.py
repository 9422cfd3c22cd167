"""The credential socket, attacked with real processes (run as root).

Every "sandbox" here is a real process tree: a root process forked from this test (uid 0, like
the process backend's monitor) whose children drop to the sandbox uid with
``drop_privileges`` before they connect. Outsiders are forked from the test itself, so they are
not in the tree. Replies are read off the real socket; "gets nothing" means the connection
closed with zero bytes received.

Pid reuse is not simulated: ``/proc/sys/kernel/ns_last_pid`` makes the kernel hand a new process
exactly the pid of one that has exited, and the test checks the stale pid earns nothing.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import socket
import stat
import tempfile
import time
from typing import Any

import pytest
from credsock_kit import (
    _HEADER,
    PROXY_REQ,
    TOKEN_REQ,
    Harness,
    Lines,
    Sandbox,
    _cannot_set_up,
    _close_fds_except,
    _emit,
    _fork_at_pid,
    _out_of_turn,
    _read_reply,
    _run_probe,
    _tree_main,
    _uids,
    assert_got_nothing,
    frame,
    only_reply,
    outsider,
    raw_frame,
    state_of,
)

from privsep.client._wire import MAX_FRAME, ProxyRequest, TokenRequest, parse_request
from privsep.runner.supervisor import credconn, peercheck
from privsep.runner.supervisor.credsock import (
    ALLOWED,
    SandboxState,
)
from privsep.sandbox.privdrop import drop_privileges

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: drops to sandbox uids")


# --- the happy path ------------------------------------------------------------------------


def test_descendant_with_sandbox_uid_gets_the_token(harness: Harness) -> None:
    sb = harness.sandbox()
    reply = only_reply(sb.probe(sends=[TOKEN_REQ]))
    assert reply["kind"] == "frame"
    assert reply["obj"]["type"] == "token"
    assert reply["obj"]["token"] == sb.token
    # Deeper in the tree, and through the real client SDK.
    deep = sb.probe(depth=3, mode="client_token")
    assert deep["token"] == sb.token
    assert sb.entry.counters.tokens_served == 2
    assert sb.entry.counters.peer_rejected == 0


def test_many_requests_on_one_connection_and_a_refreshed_token(harness: Harness) -> None:
    sb = harness.sandbox()
    result = sb.probe(sends=[TOKEN_REQ, TOKEN_REQ, TOKEN_REQ])
    assert [r["obj"]["token"] for r in result["replies"]] == [sb.token] * 3
    assert sb.entry.set_token("tok-refreshed", int(time.time()) + 60)
    assert only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]["token"] == "tok-refreshed"


def test_socket_directory_and_file_belong_to_the_sandbox_uid(harness: Harness) -> None:
    sb = harness.sandbox()
    d = os.lstat(sb.entry.directory)
    s = os.lstat(sb.path)
    assert stat.S_ISDIR(d.st_mode) and stat.S_IMODE(d.st_mode) == 0o700
    assert (d.st_uid, d.st_gid) == (sb.uid, sb.uid)
    assert stat.S_ISSOCK(s.st_mode) and stat.S_IMODE(s.st_mode) == 0o600
    assert (s.st_uid, s.st_gid) == (sb.uid, sb.uid)
    assert sb.path == os.path.join(harness.root, sb.entry.sandbox_id, "cred.sock")
    harness.server.close_socket(sb.entry.sandbox_id)
    assert not os.path.exists(sb.entry.directory)
    harness.server.close_socket(sb.entry.sandbox_id)  # idempotent


def test_uid_given_only_at_bind_hands_the_directory_over_then(harness: Harness) -> None:
    """The process backend picks the uid at launch: open_socket cannot know it yet."""
    uid = next(_uids)
    entry = harness.server.open_socket(f"late{uid}", directory_root=harness.root)
    assert os.lstat(entry.directory).st_uid == 0
    assert os.lstat(entry.path).st_uid == 0
    tree = harness.tree()
    entry.bind_process(tree.pid, uid, uid)
    entry.set_token("tok-late", int(time.time()) + 60)
    assert os.lstat(entry.directory).st_uid == uid
    assert os.lstat(entry.path).st_uid == uid
    sb = Sandbox(entry, tree, uid, "tok-late")
    assert only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]["token"] == "tok-late"


def test_open_socket_refuses_a_writable_root_and_a_bad_id(harness: Harness) -> None:
    loose = tempfile.mkdtemp(prefix="csl", dir="/tmp")
    try:
        os.chmod(loose, 0o777)
        with pytest.raises(PermissionError, match="not writable by group or others"):
            harness.server.open_socket("x1", directory_root=loose, uid=120_999)
    finally:
        os.rmdir(loose)
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="safe identifier"):
            harness.server.open_socket(bad, directory_root=harness.root, uid=120_999)
    harness.server.open_socket("dup", directory_root=harness.root, uid=120_999)
    with pytest.raises(ValueError, match="already has"):
        harness.server.open_socket("dup", directory_root=harness.root, uid=120_999)


# --- peer checks ---------------------------------------------------------------------------


def test_another_uid_in_the_tree_gets_nothing(harness: Harness) -> None:
    sb = harness.sandbox()
    other = next(_uids)
    # With the real permissions the other uid cannot even reach the socket...
    blocked = sb.probe(uid=other, sends=[TOKEN_REQ])
    assert blocked.get("connect_errno") == errno.EACCES
    # ...and if it could (permissions opened up), the peer check still refuses it.
    os.chmod(sb.entry.directory, 0o711)
    os.chmod(sb.path, 0o666)
    result = sb.probe(uid=other, sends=[TOKEN_REQ])
    assert "connect_errno" not in result
    assert_got_nothing(result)
    # Root itself, in the tree, is not the sandbox uid either.
    assert_got_nothing(sb.probe(uid=None, sends=[TOKEN_REQ]))
    assert sb.entry.counters.peer_rejected == 2
    assert sb.entry.counters.tokens_served == 0
    assert harness.violations == []


def test_right_uid_outside_the_tree_gets_nothing(harness: Harness) -> None:
    sb = harness.sandbox()
    result = outsider({"uid": sb.uid, "path": sb.path, "sends": [TOKEN_REQ.hex()]})
    assert "connect_errno" not in result  # the filesystem let it in; the peer check did not
    assert_got_nothing(result)
    # A sibling sandbox's tree is "outside" too, even with this sandbox's uid.
    other = harness.sandbox()
    assert_got_nothing(other.probe(uid=sb.uid, path=sb.path, sends=[TOKEN_REQ]))
    assert sb.entry.counters.peer_rejected == 2
    assert harness.violations == []


def test_a_new_process_on_the_dead_roots_pid_is_not_the_root(harness: Harness) -> None:
    """bind_process(pid); the root exits; a new process gets the very same pid."""
    sb = harness.sandbox()
    assert only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]["token"] == sb.token
    old = sb.tree.pid
    sb.tree.close()

    # (a) the impostor on the root's pid connects itself, as the sandbox uid
    res_r, res_w = os.pipe()
    spec = {"uid": sb.uid, "path": sb.path, "sends": [TOKEN_REQ.hex()]}
    pid = _fork_at_pid(old, lambda: _run_probe(spec, res_w), (res_w,))
    os.close(res_w)
    if pid is None:
        _cannot_set_up("could not get the old pid back from ns_last_pid")
    result = Lines(res_r).until_done()
    os.waitpid(pid, 0)
    os.close(res_r)
    assert result["pid"] == old
    assert_got_nothing(result)

    # (b) a child of an impostor root (a whole new tree on the old pid) connects
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = _fork_at_pid(old, lambda: _tree_main(cmd_r, res_w), (cmd_r, res_w))
    os.close(cmd_r)
    os.close(res_w)
    if pid is None:
        _cannot_set_up("could not get the old pid back from ns_last_pid")
    os.write(cmd_w, (json.dumps({**spec, "depth": 1}) + "\n").encode())
    result = Lines(res_r).until_done()
    os.write(cmd_w, b'{"exit": true}\n')
    os.waitpid(pid, 0)
    os.close(cmd_w)
    os.close(res_r)
    assert_got_nothing(result)
    assert sb.entry.counters.peer_rejected == 2
    assert sb.entry.counters.tokens_served == 1


@pytest.mark.parametrize("guard", ["so_peerpidfd", "pidfd_open_and_start_time", "none"])
def test_the_connecting_pid_reused_by_a_tree_process_gets_nothing(
    harness: Harness, monkeypatch: pytest.MonkeyPatch, guard: str
) -> None:
    """An outsider connects, hands the socket to its child and exits; a process of the
    sandbox's tree is then born on the outsider's pid. SO_PEERCRED still names that pid.

    ``none`` disables the connecting-pid guard to show the attack is real: then it works.
    """
    if guard == "so_peerpidfd" and peercheck._SO_PEERPIDFD is None:
        _cannot_set_up("no SO_PEERPIDFD on this architecture")
    if guard != "so_peerpidfd":
        monkeypatch.setattr(peercheck, "_SO_PEERPIDFD", None)
    if guard == "none":

        def unguarded(sock: socket.socket, pid: int, accepted_ticks: int) -> int:
            return os.pidfd_open(pid)

        monkeypatch.setattr(peercheck, "_peer_pidfd", unguarded)
    sb = harness.sandbox(bind=False)
    uid = sb.uid
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    outer = os.fork()
    if outer == 0:
        try:
            _close_fds_except(go_r, res_w)
            drop_privileges(uid, uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(sb.path)
            if os.fork() == 0:  # the accomplice keeps the connection
                try:
                    sock.settimeout(5.0)
                    os.read(go_r, 1)
                    try:
                        sock.sendall(TOKEN_REQ)
                        reply = _read_reply(sock)
                    except OSError:  # already closed on us: EPIPE
                        reply = {"kind": "eof", "bytes": 0}
                    _emit(res_w, {**reply, "done": True})
                finally:
                    os._exit(0)
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(res_w)
    os.waitpid(outer, 0)  # the connecting process is gone; its pid is free
    time.sleep(0.1)  # more than a clock tick after the accept
    squatter = sb.tree.run({"squat": outer, "uid": uid})["pid"]
    if squatter is None:
        _cannot_set_up("could not get the outsider's pid back from ns_last_pid")
    try:
        assert peercheck.read_stat(squatter).ppid == sb.tree.pid
        sb.entry.bind_process(sb.tree.pid)  # the parked connection is checked now
        sb.entry.set_token(sb.token, int(time.time()) + 60)
        os.write(go_w, b"g")
        result = Lines(res_r).until_done()
    finally:
        os.kill(squatter, signal.SIGKILL)
        os.close(go_w)
        os.close(res_r)
    if guard == "none":
        assert result["kind"] == "frame" and result["obj"]["token"] == sb.token
        return
    assert result == {"kind": "eof", "bytes": 0, "done": True}
    assert sb.entry.counters.peer_rejected == 1


def test_a_fake_parent_in_comm_does_not_fool_the_stat_parser() -> None:
    """``comm`` is the process's to choose; the walk must read the kernel's ppid, not one
    smuggled into the name (the classic ``/proc/<pid>/stat`` parsing bug)."""
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with open("/proc/self/comm", "w") as f:
                f.write("x) S 1 1 1 1 (")
            os.write(ready_w, b"k")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"k"
        st = peercheck.read_stat(pid)
        assert st.ppid == os.getpid()
        assert st.state in ("S", "R")
    finally:
        os.write(done_w, b"x")
        os.waitpid(pid, 0)
        for fd in (ready_r, ready_w, done_r, done_w):
            os.close(fd)


def _scripted_proc(
    monkeypatch: pytest.MonkeyPatch, table: dict[int, tuple[int, int]]
) -> peercheck.ProcessRecord:
    """Script /proc: ``table`` maps pid -> (ppid, start_ticks); the root is pid 100."""

    def fake_stat(pid: int) -> peercheck.ProcStat:
        if pid not in table:
            raise ProcessLookupError(pid)
        ppid, start = table[pid]
        return peercheck.ProcStat(pid=pid, ppid=ppid, start_ticks=start, state="S")

    monkeypatch.setattr(peercheck, "read_stat", fake_stat)
    return peercheck.ProcessRecord(100, table[100][1], None)


def test_walk_rejects_an_ancestor_younger_than_its_child(monkeypatch: pytest.MonkeyPatch) -> None:
    """A walk step onto a pid that was freed and reused reaches a process born after the
    child it came from: no real parent is younger than its child."""
    root = _scripted_proc(
        monkeypatch, {100: (1, 1000), 200: (100, 1100), 300: (200, 1200), 400: (300, 1300)}
    )
    peercheck._walk_to_root(400, root)  # a sound chain passes
    _scripted_proc(monkeypatch, {100: (1, 1000), 200: (100, 1500), 300: (200, 1200)})
    with pytest.raises(peercheck.PeerRejected, match="reused"):
        peercheck._walk_to_root(300, root)
    _scripted_proc(monkeypatch, {100: (1, 1300), 300: (100, 1200)})
    with pytest.raises(peercheck.PeerRejected, match="younger"):
        peercheck._walk_to_root(300, peercheck.ProcessRecord(100, 1300, None))
    _scripted_proc(monkeypatch, {100: (1, 1000), 500: (1, 1200)})
    with pytest.raises(peercheck.PeerRejected, match="not in the sandbox"):
        peercheck._walk_to_root(500, root)
    _scripted_proc(monkeypatch, {100: (1, 1000), 600: (700, 1200), 700: (600, 1200)})
    with pytest.raises(peercheck.PeerRejected, match="ancestors"):
        peercheck._walk_to_root(600, root)


# --- the state table -----------------------------------------------------------------------


def test_state_table_shape() -> None:
    assert ALLOWED[SandboxState.WAITING] == {}
    assert set(ALLOWED[SandboxState.RUNNING]) == {TokenRequest, ProxyRequest}
    assert set(ALLOWED[SandboxState.ENDED]) == {TokenRequest}


@pytest.mark.parametrize("order", ["bind_first", "token_first"])
def test_waiting_parks_the_connection_until_process_and_token(harness: Harness, order: str) -> None:
    """A child that connects before the supervisor has called bind_process and set_token
    waits, unread, and is then checked and served, whichever call comes first."""
    sb = harness.sandbox(bind=False)
    sb.tree.send({"uid": sb.uid, "path": sb.path, "sends": [TOKEN_REQ.hex()], "timeout": 10.0})
    with pytest.raises(TimeoutError):
        sb.tree.lines.read(timeout=0.5)  # nothing answered while WAITING
    if order == "bind_first":
        sb.entry.bind_process(sb.tree.pid)
    else:
        sb.entry.set_token(sb.token, int(time.time()) + 60)
    with pytest.raises(TimeoutError):
        sb.tree.lines.read(timeout=0.3)  # still one of the two missing
    if order == "bind_first":
        with pytest.raises(RuntimeError, match="already bound"):
            sb.entry.bind_process(sb.tree.pid)
    assert state_of(sb.entry) is SandboxState.WAITING
    if order == "bind_first":
        sb.entry.set_token(sb.token, int(time.time()) + 60)
    else:
        sb.entry.bind_process(sb.tree.pid)
    assert state_of(sb.entry) is SandboxState.RUNNING
    result = sb.tree.lines.until_done()
    assert only_reply(result)["obj"]["token"] == sb.token
    with pytest.raises(RuntimeError, match="cannot bind"):
        sb.entry.bind_process(sb.tree.pid)


def test_waiting_connections_time_out_and_never_bound_is_refused(sockroot: str) -> None:
    h = Harness(sockroot, idle_timeout=0.5)
    try:
        sb = h.sandbox(bind=False)
        result = sb.probe(sends=[TOKEN_REQ])
        assert_got_nothing(result)
        assert 0.4 < result["elapsed"] < 5
        assert sb.entry.counters.timeouts == 1
        sb.entry.end()  # ended without ever being bound: nobody can be checked
        assert_got_nothing(sb.probe(sends=[TOKEN_REQ]))
        assert sb.entry.counters.peer_rejected == 1
        assert h.violations == []
    finally:
        h.close()


def test_ended_answers_no_token_and_keeps_no_token(harness: Harness) -> None:
    sb = harness.sandbox()
    sb.entry.end()
    reply = only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]
    assert reply["type"] == "error" and reply["code"] == "no_token"
    assert sb.entry.set_token("tok-too-late", int(time.time()) + 60) is False
    assert only_reply(sb.probe(sends=[TOKEN_REQ]))["obj"]["code"] == "no_token"
    assert harness.violations == []
    with pytest.raises(RuntimeError, match="cannot bind"):
        sb.entry.bind_process(sb.tree.pid)


def test_an_expired_token_is_a_refusal(harness: Harness) -> None:
    sb = harness.sandbox(token="tok-old", ttl=-1)
    reply = sb.probe(mode="client_token")
    assert reply["exc"] == "Refused" and reply["code"] == "no_token"
    assert "expired" in reply["msg"] and "tok-old" not in reply["msg"]


BAD_FRAMES: dict[str, tuple[list[bytes], bool]] = {
    # name: (what is sent, half-close after sending)
    "oversized_header": ([_HEADER.pack(2 * 1024 * 1024)], False),
    "just_over_max_frame": ([_HEADER.pack(MAX_FRAME + 1)], False),
    "truncated_frame": ([_HEADER.pack(100) + b'{"type": "tok'], True),
    "truncated_header": ([b"\x00\x00"], True),
    "empty_frame": ([_HEADER.pack(0)], False),
    "unknown_type": ([frame({"type": "bogus"})], False),
    "reply_type_from_child": ([frame({"type": "token", "token": "x", "expires_at": 1})], False),
    "extra_field": ([frame({"type": "token", "scope": "admin"})], False),
    "not_json": ([raw_frame(b"\xff\xfe not json")], False),
    "json_array": ([raw_frame(b'["token"]')], False),
    "duplicate_key": ([raw_frame(b'{"type": "token", "type": "token"}')], False),
    "nan": ([raw_frame(b'{"type": "proxy", "method": "GET", "path": NaN, "body": 1}')], False),
    "proxy_operator_route": (
        [frame({"type": "proxy", "method": "GET", "path": "/v1/operator/runs", "body": None})],
        False,
    ),
    "proxy_dotdot": (
        [frame({"type": "proxy", "method": "GET", "path": "/v1/task/%2e%2e/x", "body": None})],
        False,
    ),
    "proxy_bad_method": (
        [frame({"type": "proxy", "method": "PATCH", "path": "/v1/task/context", "body": None})],
        False,
    ),
    "good_then_bad": ([TOKEN_REQ, frame({"type": "bogus"})], False),
}


@pytest.mark.parametrize("name", sorted(BAD_FRAMES))
@pytest.mark.parametrize("state", [SandboxState.RUNNING, SandboxState.ENDED])
def test_speaking_out_of_turn_drops_and_reports(
    harness: Harness, state: SandboxState, name: str
) -> None:
    sb = harness.sandbox()
    if state is SandboxState.ENDED:
        sb.entry.end()
    sends, shut_wr = BAD_FRAMES[name]
    _out_of_turn(harness, sb, sends, shut_wr)
    assert sb.entry.counters.violations == 1


@pytest.mark.parametrize("state", [SandboxState.RUNNING, SandboxState.ENDED])
def test_every_request_type_a_state_does_not_allow(harness: Harness, state: SandboxState) -> None:
    requests_by_type = {TokenRequest: TOKEN_REQ, ProxyRequest: PROXY_REQ}
    harness.proxy = lambda m, p, b, t: (200, {"ok": True})
    disallowed = [t for t in requests_by_type if t not in ALLOWED[state]]
    if state is SandboxState.RUNNING:
        assert disallowed == []
    for kind in disallowed:
        sb = harness.sandbox()
        if state is SandboxState.ENDED:
            sb.entry.end()
        _out_of_turn(harness, sb, [requests_by_type[kind]], False)
        assert "not allowed while ended" in harness.violations[-1][1]


def test_a_violation_closes_the_sandboxs_other_connections(harness: Harness) -> None:
    """One connection is checked and served; a second one of the same sandbox speaks out of
    turn; the first is then closed too, and the token is gone."""
    sb = harness.sandbox()
    result = sb.probe(mode="two_conns", bad=frame({"type": "bogus"}).hex())
    assert "error" not in result, result
    served, bad, after = result["replies"]
    assert served["obj"]["token"] == sb.token
    assert bad == {"kind": "eof", "bytes": 0}
    assert after["kind"] in ("eof", "send_error") and after.get("bytes", 0) == 0
    assert harness.wait_violation(1)[0][0] == sb.entry.sandbox_id
    assert sb.entry.state is SandboxState.ENDED


def test_server_side_proxy_path_check_holds_without_the_parser(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Even if parse_request let a path through, the server re-checks it before forwarding."""
    called: list[str] = []

    def recording(method: str, path: str, body: Any, token: str) -> tuple[int, Any]:
        called.append(path)
        return 200, None

    harness.proxy = recording

    strict_parse = parse_request

    def lax_parse(obj: dict[str, Any]) -> Any:
        if obj.get("type") != "proxy":
            return strict_parse(obj)
        req = object.__new__(ProxyRequest)
        for k in ("method", "path", "body", "type"):
            object.__setattr__(req, k, obj[k])
        return req

    monkeypatch.setattr(credconn, "parse_request", lax_parse)
    sb = harness.sandbox()
    bad = frame({"type": "proxy", "method": "GET", "path": "/v1/operator/runs", "body": None})
    _out_of_turn(harness, sb, [bad], False)
    assert called == []
    assert "proxy refused" in harness.violations[-1][1]


def test_connect_and_say_nothing_is_dropped(sockroot: str) -> None:
    h = Harness(sockroot, idle_timeout=0.5)
    try:
        sb = h.sandbox()
        result = sb.probe()  # connects, sends nothing, reads
        assert_got_nothing(result)
        assert 0.4 < result["elapsed"] < 5
        # A frame started and never finished is dropped the same way (and is not a kill).
        result = sb.probe(sends=[_HEADER.pack(50) + b'{"ty'])
        assert_got_nothing(result)
        assert sb.entry.counters.timeouts == 2
        assert h.violations == []
    finally:
        h.close()


def test_connections_per_sandbox_are_capped(sockroot: str, caplog: Any) -> None:
    caplog.set_level(logging.WARNING, logger="privsep")
    h = Harness(sockroot, max_connections=4)
    try:
        sb = h.sandbox()
        items = [{"uid": sb.uid, "path": sb.path}] * 6
        sb.tree.send({"mode": "fanout", "items": items})
        collected = sb.tree.lines.read()
        sb.tree.lines.until_done()
        kinds = sorted(r["kind"] for r in collected["results"])
        assert kinds == ["eof", "eof", "frame", "frame", "frame", "frame"]
        assert sb.entry.counters.over_capacity == 2
        # Counted every time, logged once a second: a connect loop cannot flood the log.
        assert caplog.text.count("already 4 open") == 1
    finally:
        h.close()
