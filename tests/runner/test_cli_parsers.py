"""Duration options are parsed one way: a negative or non-numeric number of seconds is a usage
error (exit 2, one line naming the option) before any command runs."""

from __future__ import annotations

import pytest

from privsep.runner.cli.main import main


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["runs", "trigger", "wf", "--wait", "--timeout", "-1"], "'-1' must be zero or more"),
        (["runs", "trigger", "wf", "--timeout", "soon"], "'soon' is not a number of seconds"),
        (["health", "--max-age", "inf"], "'inf' must be zero or more"),
        (["health", "--max-age", "nan"], "'nan' must be zero or more"),
    ],
)
def test_bad_durations_are_usage_errors(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err
    assert ("--timeout" if "--timeout" in argv else "--max-age") in err
