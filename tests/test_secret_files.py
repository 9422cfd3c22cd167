"""``privsep.secrets.files`` and ``privsep.secrets.keys`` on real files in ``tmp_path``.

``tmp_path``'s parents are root-owned 0700 directories and the sticky ``/tmp``, so the parent
rule passes unless a test breaks it on purpose.
"""

from __future__ import annotations

import os
import stat
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from helpers import make_dir, mode_of, write_file
from privsep.secrets.files import (
    MAX_SECRET_BYTES,
    Finding,
    InsecureFileError,
    check_secret_dir,
    check_secret_file,
    make_private_dir,
    read_secret_file,
    write_private_file,
)
from privsep.secrets.keys import KeyFormatError, generate_ed25519_pem, load_private_key

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")

OTHER_UID = 12345


@pytest.fixture
def private_dir(tmp_path: Path) -> Path:
    return make_dir(tmp_path / "secrets", 0o700)


@pytest.fixture
def umask() -> Iterator[Callable[[int], None]]:
    """Set the process umask for one test and put the old one back afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


# --- reading --------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_reads_a_good_file(private_dir: Path, mode: int) -> None:
    path = write_file(private_dir / "token", b"s3cret\n", mode=mode)
    assert read_secret_file(str(path)) == b"s3cret\n"
    assert check_secret_file(str(path)) == []


def test_reads_an_empty_file(private_dir: Path) -> None:
    path = write_file(private_dir / "empty", b"")
    assert read_secret_file(str(path)) == b""


def test_reads_a_file_of_exactly_the_limit(private_dir: Path) -> None:
    data = os.urandom(MAX_SECRET_BYTES)
    path = write_file(private_dir / "big", data)
    assert read_secret_file(str(path)) == data


def test_missing_file_raises_file_not_found(private_dir: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_secret_file(str(private_dir / "absent"))
    with pytest.raises(FileNotFoundError):
        check_secret_file(str(private_dir / "absent"))


def _loose(d: Path, mode: int) -> str:
    return str(write_file(d / "token", mode=mode))


def _symlink(d: Path) -> str:
    write_file(d / "real")
    (d / "token").symlink_to(d / "real")
    return str(d / "token")


def _dangling_symlink(d: Path) -> str:
    (d / "token").symlink_to(d / "nowhere")
    return str(d / "token")


def _hard_link(d: Path) -> str:
    write_file(d / "token")
    os.link(d / "token", d / "second-name")
    return str(d / "token")


def _fifo(d: Path) -> str:
    os.mkfifo(d / "token", 0o600)
    return str(d / "token")


def _directory(d: Path) -> str:
    return str(make_dir(d / "token", 0o700))


def _other_owner(d: Path) -> str:
    path = write_file(d / "token")
    os.chown(path, OTHER_UID, OTHER_UID)
    return str(path)


def _writable_parent(d: Path) -> str:
    path = write_file(d / "token")
    os.chmod(d, 0o777)
    return str(path)


def _parent_owned_by_other(d: Path) -> str:
    path = write_file(d / "token")
    os.chown(d, OTHER_UID, OTHER_UID)
    return str(path)


def _too_big(d: Path) -> str:
    return str(write_file(d / "token", b"x" * (MAX_SECRET_BYTES + 1)))


def case(name: str, build, problem: str | None, names: str | None, *, root: bool = False):
    """One refusal: how to build it, what the finding says, whether it names the file or parent."""
    return pytest.param(build, problem, names, id=name, marks=[requires_root] if root else [])


REFUSALS = [
    case("mode 0644", lambda d: _loose(d, 0o644), "has mode 0644", "file"),
    case("mode 0640", lambda d: _loose(d, 0o640), "has mode 0640", "file"),
    case("mode 0604", lambda d: _loose(d, 0o604), "has mode 0604", "file"),
    case("mode 0700", lambda d: _loose(d, 0o700), None, None),  # owner-only bits are fine
    case("symlink", _symlink, "is a symbolic link", "file"),
    case("dangling symlink", _dangling_symlink, "is a symbolic link", "file"),
    case("hard link", _hard_link, "has 2 hard links", "file"),
    case("fifo", _fifo, "is a FIFO, not a regular file", "file"),
    case("directory", _directory, "is a directory, not a regular file", "file"),
    case("other owner", _other_owner, "is owned by", "file", root=True),
    case("writable parent", _writable_parent, "writable by group or others (mode 0777)", "parent"),
    case(
        "parent owner", _parent_owned_by_other, "parent directory is owned by", "parent", root=True
    ),
]


@pytest.mark.parametrize(("build", "problem", "names"), REFUSALS)
def test_each_refusal_is_a_finding(
    private_dir: Path, build, problem: str | None, names: str | None
) -> None:
    path = build(private_dir)
    findings = check_secret_file(path)
    if problem is None:
        assert findings == []
        assert read_secret_file(path) == b"secret\n"
        return
    expected_path = path if names == "file" else os.path.realpath(private_dir)
    matching = [f for f in findings if problem in f.problem]
    assert matching, findings
    finding = matching[0]
    assert isinstance(finding, Finding)
    assert finding.path == expected_path
    assert finding.fix  # every finding carries a command that fixes it
    assert str(finding) == f"{finding.path}: {finding.problem} (fix: {finding.fix})"

    with pytest.raises(InsecureFileError) as caught:
        read_secret_file(path)
    assert any(problem in f.problem and f.path == expected_path for f in caught.value.findings)
    assert expected_path in str(caught.value)


def test_refuses_an_oversized_file(private_dir: Path) -> None:
    path = _too_big(private_dir)
    assert check_secret_file(path) == []  # size is judged only while reading
    with pytest.raises(InsecureFileError) as caught:
        read_secret_file(path)
    (finding,) = caught.value.findings
    assert finding.path == path
    assert f"larger than {MAX_SECRET_BYTES} bytes" in finding.problem


def test_fixes_name_the_right_command(private_dir: Path) -> None:
    loose = write_file(private_dir / "loose", mode=0o644)
    read_only = write_file(private_dir / "read-only", mode=0o440)
    (f1,) = check_secret_file(str(loose))
    (f2,) = check_secret_file(str(read_only))
    assert f1.fix == f"chmod 600 {loose}"
    assert f2.fix == f"chmod 400 {read_only}"
    assert f1.as_dict() == {"path": str(loose), "problem": f1.problem, "fix": f1.fix}


def test_several_problems_are_all_reported(private_dir: Path) -> None:
    path = write_file(private_dir / "token", mode=0o666)
    os.link(path, private_dir / "other")
    os.chmod(private_dir, 0o757)
    problems = " | ".join(f.problem for f in check_secret_file(str(path)))
    assert "hard links" in problems
    assert "mode 0666" in problems
    assert "writable by group or others" in problems


def test_sticky_root_owned_parent_is_allowed(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("the sticky exemption is for root-owned directories")
    shared = make_dir(tmp_path / "shared", 0o1777)
    path = write_file(shared / "token")
    assert check_secret_file(str(path)) == []
    assert read_secret_file(str(path)) == b"secret\n"


# --- the check and the read use one descriptor ------------------------------------------------


def test_symlink_swapped_in_during_reads_is_never_followed(tmp_path: Path) -> None:
    """Race a real attacker: the path flips between a good file and a symlink to EVIL.

    Every swap is an atomic ``rename``, so the path always exists. Whatever the interleaving,
    ``read_secret_file`` must return GOOD or refuse the symlink, never return EVIL.
    """
    d = make_dir(tmp_path / "race", 0o700)
    target = str(d / "token")
    evil = write_file(tmp_path / "evil", b"EVIL")  # itself a perfectly valid 0600 secret
    assert read_secret_file(str(evil)) == b"EVIL"
    write_file(target, b"GOOD")

    stop = threading.Event()
    swaps = 0

    def attacker() -> None:
        nonlocal swaps
        deadline = time.monotonic() + 2.0
        link_tmp, file_tmp = str(d / ".link.tmp"), str(d / ".file.tmp")
        while not stop.is_set() and time.monotonic() < deadline:
            os.symlink(evil, link_tmp)
            os.rename(link_tmp, target)
            write_file(file_tmp, b"GOOD")
            os.rename(file_tmp, target)
            swaps += 1
        stop.set()

    outcomes = {"good": 0, "symlink": 0}
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # interleave the two threads as finely as the GIL allows
    thread = threading.Thread(target=attacker, daemon=True)
    thread.start()
    try:
        while not stop.is_set():
            try:
                data = read_secret_file(target)
            except InsecureFileError as exc:
                assert len(exc.findings) == 1, exc.findings
                assert "symbolic link" in exc.findings[0].problem, exc
                outcomes["symlink"] += 1
            else:
                assert data == b"GOOD", data  # never EVIL, never a half-written file
                outcomes["good"] += 1
            if min(outcomes.values()) >= 200:
                break
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(old_interval)

    assert swaps > 0
    # Both outcomes seen: the race really ran against the reads.
    assert outcomes["good"] > 0 and outcomes["symlink"] > 0, outcomes


# --- secret directories -----------------------------------------------------------------------


def test_private_directory_is_clean(private_dir: Path) -> None:
    assert check_secret_dir(str(private_dir)) == []


def test_directory_with_forbidden_bits_is_a_finding(private_dir: Path) -> None:
    ring = make_dir(private_dir / "ring", 0o755)
    (finding,) = check_secret_dir(str(ring))
    assert "directory has mode 0755" in finding.problem
    assert finding.fix == f"chmod 700 {ring}"
    assert check_secret_dir(str(ring), forbidden=0o022) == []


@pytest.mark.parametrize(("kind", "word"), [("symlink", "symbolic link"), ("file", "file")])
def test_non_directory_is_a_finding(private_dir: Path, kind: str, word: str) -> None:
    path = private_dir / "ring"
    if kind == "symlink":
        path.symlink_to(make_dir(private_dir / "real", 0o700))
    else:
        write_file(path)
    (finding,) = check_secret_dir(str(path))
    assert finding.problem == f"is a {word}, not a directory"


def test_missing_directory_raises_file_not_found(private_dir: Path) -> None:
    with pytest.raises(FileNotFoundError):
        check_secret_dir(str(private_dir / "absent"))


# --- writing --------------------------------------------------------------------------------


def test_writes_a_private_file(private_dir: Path) -> None:
    path = private_dir / "new"
    write_private_file(str(path), b"data")
    assert path.read_bytes() == b"data"
    assert mode_of(path) == 0o600
    assert stat.S_ISREG(os.lstat(path).st_mode)
    assert read_secret_file(str(path)) == b"data"


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o277, 0o777])
def test_mode_is_exact_whatever_the_umask(private_dir: Path, umask, mask: int) -> None:
    umask(mask)
    path = private_dir / "new"
    write_private_file(str(path), b"data")
    assert mode_of(path) == 0o600


def test_mode_argument_is_honoured(private_dir: Path, umask) -> None:
    umask(0)
    path = private_dir / "ro"
    write_private_file(str(path), b"data", mode=0o400)
    assert mode_of(path) == 0o400


def test_refuses_an_existing_file(private_dir: Path) -> None:
    path = write_file(private_dir / "existing", b"original", mode=0o600)
    with pytest.raises(FileExistsError):
        write_private_file(str(path), b"new")
    assert path.read_bytes() == b"original"


@pytest.mark.parametrize("target_exists", [True, False])
def test_refuses_a_planted_symlink(tmp_path: Path, private_dir: Path, target_exists: bool) -> None:
    target = tmp_path / "victim"
    if target_exists:
        write_file(target, b"victim", mode=0o644)
    link = private_dir / "key"
    link.symlink_to(target)
    with pytest.raises(FileExistsError):
        write_private_file(str(link), b"attacker-chosen")
    assert link.is_symlink()
    if target_exists:
        assert target.read_bytes() == b"victim"
        assert mode_of(target) == 0o644
    else:
        assert not target.exists()


def test_creates_missing_parents_at_0700(tmp_path: Path, umask) -> None:
    umask(0)
    path = tmp_path / "a" / "b" / "key"
    write_private_file(str(path), b"data")
    assert mode_of(tmp_path / "a") == 0o700
    assert mode_of(tmp_path / "a" / "b") == 0o700
    assert mode_of(path) == 0o600
    assert read_secret_file(str(path)) == b"data"


def test_leaves_an_existing_parent_alone(tmp_path: Path) -> None:
    parent = make_dir(tmp_path / "shared", 0o755)
    write_private_file(str(parent / "key"), b"data")
    assert mode_of(parent) == 0o755


def test_make_private_dir(tmp_path: Path, umask) -> None:
    umask(0o777)
    make_private_dir(str(tmp_path / "x" / "y"))
    assert mode_of(tmp_path / "x") == 0o700
    assert mode_of(tmp_path / "x" / "y") == 0o700
    make_private_dir(str(tmp_path / "x" / "y"))  # existing: no error, no change


# --- keys -----------------------------------------------------------------------------------


def _public_raw(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def test_loads_a_good_key(private_dir: Path) -> None:
    private_pem, public_pem = generate_ed25519_pem()
    path = private_dir / "supervisor.key"
    write_private_file(str(path), private_pem)
    key = load_private_key(str(path))
    public = serialization.load_pem_public_key(public_pem)
    assert _public_raw(key) == public.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert b"PRIVATE KEY" in private_pem and b"PRIVATE KEY" not in public_pem


@pytest.mark.parametrize("content", ["garbage", "valid key"])
def test_refuses_a_loose_key_before_parsing(private_dir: Path, content: str) -> None:
    data = b"not a key at all\n" if content == "garbage" else generate_ed25519_pem()[0]
    path = write_file(private_dir / "supervisor.key", data, mode=0o644)
    # InsecureFileError, not KeyFormatError: garbage is refused before anyone parses it.
    with pytest.raises(InsecureFileError) as caught:
        load_private_key(str(path))
    assert "has mode 0644" in str(caught.value)


def test_refuses_a_symlinked_key(private_dir: Path) -> None:
    real = private_dir / "real.key"
    write_private_file(str(real), generate_ed25519_pem()[0])
    link = private_dir / "supervisor.key"
    link.symlink_to(real)
    with pytest.raises(InsecureFileError, match="symbolic link"):
        load_private_key(str(link))


@pytest.mark.parametrize(
    "data",
    [b"garbage\n", b"", b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
    ids=["garbage", "empty", "bad base64 body"],
)
def test_garbage_is_a_key_format_error(private_dir: Path, data: bytes) -> None:
    path = write_file(private_dir / "supervisor.key", data)
    with pytest.raises(KeyFormatError, match="not an unencrypted PEM private key"):
        load_private_key(str(path))


def test_non_ed25519_key_is_a_key_format_error(private_dir: Path) -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    path = write_file(private_dir / "supervisor.key", pem)
    with pytest.raises(KeyFormatError, match="not an Ed25519 key"):
        load_private_key(str(path))


def test_missing_key_raises_file_not_found(private_dir: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_private_key(str(private_dir / "absent.key"))
