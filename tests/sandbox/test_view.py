"""check-perms' helper agrees with what a real sandbox can read."""

from __future__ import annotations

from pathlib import Path

from sandbox_kit import script, spec_for

from privsep.sandbox import ProcessBackend
from privsep.sandbox.view import unreadable_by_sandbox


def test_reports_what_the_sandbox_uid_cannot_read(bundle: Path) -> None:
    (bundle / "ok.py").write_text("x = 1\n")
    (bundle / "ok.py").chmod(0o644)
    secret = bundle / "private.py"
    secret.write_text("y = 2\n")
    secret.chmod(0o600)
    closed = bundle / "closed"
    closed.mkdir(mode=0o700)
    found = {str(u) for u in unreadable_by_sandbox([str(bundle)])}
    fix = f"(fix: chmod -R o+rX {bundle})"
    assert found == {
        f"{secret}: file mode 0600 lacks o+r {fix}",
        f"{closed}: directory mode 0700 lacks o+rx {fix}",
    }


def test_the_report_matches_a_real_sandbox(backend: ProcessBackend, bundle: Path) -> None:
    secret = bundle / "private.py"
    secret.write_text("y = 2\n")
    secret.chmod(0o600)
    assert [u.path for u in unreadable_by_sandbox([str(bundle)])] == [str(secret)]
    reader = script(
        bundle,
        "reader.py",
        f"""
        try:
            open({str(secret)!r}).read()
            print("read")
        except PermissionError:
            print("denied")
        """,
    )
    handle = backend.launch(spec_for(bundle, reader))
    status = handle.wait(30)
    assert status is not None and status.ok, handle.output().text
    assert handle.output().text == "denied\n"
