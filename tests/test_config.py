"""Configuration: precedence, masking, ``_cmd``/``_file`` forms and every error path.

The loader is exercised both directly and through the real ``runner`` CLI, because the error
text and the exit status are the interface people see.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from privsep.runner.config.loader import ConfigError, load_config
from privsep.runner.config.rendering import render_default_toml
from privsep.runner.config.schema import OPTIONS

SRC_DEFAULT = Path(__file__).parent.parent / "src/privsep/runner/config/default_config.toml"


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRIVSEP")}
    env["PRIVSEP_HOME"] = str(home)
    env.update(extra)
    return env


def write(path: Path, text: str | bytes, mode: int = 0o600) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
    path.chmod(mode)
    return path


def runner(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "privsep", *args],
        env=env,
        text=True,
        capture_output=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    h.mkdir(mode=0o700)
    return h


# --- the shipped default ------------------------------------------------------------------


def test_shipped_default_file_is_the_rendered_schema() -> None:
    assert SRC_DEFAULT.read_text() == render_default_toml(), (
        "regenerate with: runner config default > src/privsep/runner/config/default_config.toml"
    )


def test_every_key_has_a_one_line_description() -> None:
    lines = render_default_toml().splitlines()
    for opt in OPTIONS:
        section = lines.index(f"[{opt.section}]")
        key_line = next(
            i for i in range(section, len(lines)) if lines[i].startswith(f"{opt.key} = ")
        )
        assert lines[key_line - 1].startswith("# "), opt.name
        assert opt.description in lines[key_line - 1]


def test_the_default_file_loads_cleanly_as_a_config(home: Path) -> None:
    write(home / "privsep.toml", render_default_toml())
    cfg = load_config(environ=clean_env(home))
    assert all(s.origin == "file" for s in cfg.settings.values())
    for opt in OPTIONS:
        assert cfg.settings[opt.name].value == opt.default


# --- locations ------------------------------------------------------------------------------


def test_home_defaults_to_dot_privsep(tmp_path: Path) -> None:
    env = {"HOME": str(tmp_path)}
    cfg = load_config(environ=env)
    assert cfg.home == tmp_path / ".privsep"
    assert cfg.path == tmp_path / ".privsep" / "privsep.toml"
    assert not cfg.file_exists


def test_privsep_config_and_flag_choose_the_file(home: Path, tmp_path: Path) -> None:
    a = write(tmp_path / "a.toml", "[supervisor]\nparallelism = 3\n")
    b = write(tmp_path / "b.toml", "[supervisor]\nparallelism = 5\n")
    env = clean_env(home, PRIVSEP_CONFIG=str(a))
    assert load_config(environ=env).get("supervisor.parallelism") == 3
    assert load_config(str(b), environ=env).get("supervisor.parallelism") == 5


def test_an_explicit_config_file_must_exist(home: Path) -> None:
    proc = runner("--config", str(home / "nope.toml"), "config", "list", env=clean_env(home))
    assert proc.returncode == 2
    assert "nope.toml: configuration file does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


# --- precedence -----------------------------------------------------------------------------


def test_precedence_env_over_env_cmd_over_file_over_file_cmd_over_default(home: Path) -> None:
    cfg_file = home / "privsep.toml"
    write(cfg_file, '[database]\nurl = "from-file"\nurl_cmd = "echo from-file-cmd"\n')
    base = clean_env(home)

    def url(env: dict[str, str]) -> tuple[object, str]:
        s = load_config(environ=env).settings["database.url"]
        return s.value, s.origin

    everything = dict(
        base, PRIVSEP__DATABASE__URL="from-env", PRIVSEP__DATABASE__URL_CMD="echo from-env-cmd"
    )
    assert url(everything) == ("from-env", "env")
    del everything["PRIVSEP__DATABASE__URL"]
    assert url(everything) == ("from-env-cmd", "env_cmd")
    assert url(base) == ("from-file", "file")
    write(cfg_file, '[database]\nurl_cmd = "echo from-file-cmd"\n')
    assert url(base) == ("from-file-cmd", "file_cmd")
    write(cfg_file, "[core]\n")
    assert url(base) == ("", "default")


def test_a_lower_form_never_runs_when_a_higher_one_is_set(home: Path, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    write(home / "privsep.toml", f'[database]\nurl_cmd = "touch {marker}"\n')
    load_config(environ=clean_env(home, PRIVSEP__DATABASE__URL="x"))
    assert not marker.exists()


def test_env_values_are_typed(home: Path) -> None:
    cfg = load_config(
        environ=clean_env(
            home,
            PRIVSEP__SUPERVISOR__PARALLELISM="7",
            PRIVSEP__CORE__STRICT_PERMISSIONS="false",
            PRIVSEP__CORE__COMMAND_TIMEOUT="2.5",
        )
    )
    assert cfg.get("supervisor.parallelism") == 7
    assert cfg.get("core.strict_permissions") is False
    assert cfg.get("core.command_timeout") == 2.5


def test_relative_paths_resolve_under_home(home: Path) -> None:
    cfg = load_config(environ=clean_env(home))
    assert cfg.path_of("supervisor.credential") == home / "credentials/supervisor.key"


# --- _cmd and _file --------------------------------------------------------------------------


def test_cmd_takes_the_first_line_and_uses_no_shell(home: Path) -> None:
    write(
        home / "privsep.toml",
        "[database]\nurl_cmd = \"printf 'line-one\\\\nline-two\\\\n'\"\n"
        '[server]\nfernet_key_cmd = "echo $HOME;id"\n',
    )
    cfg = load_config(environ=clean_env(home))
    assert cfg.get("database.url") == "line-one"
    assert cfg.get("server.fernet_key") == "$HOME;id"  # no shell: nothing was expanded


def test_file_form_reads_a_permission_checked_file(home: Path, tmp_path: Path) -> None:
    secret = write(tmp_path / "db-url", "postgresql+psycopg://u:pw@h/db\nignored\n", 0o600)
    cfg = load_config(environ=clean_env(home, PRIVSEP__DATABASE__URL_FILE=str(secret)))
    assert cfg.get("database.url") == "postgresql+psycopg://u:pw@h/db"
    secret.chmod(0o644)
    with pytest.raises(ConfigError, match=r"PRIVSEP__DATABASE__URL_FILE: refusing secret file"):
        cfg.get("database.url")


def test_cmd_is_only_for_secret_keys(home: Path) -> None:
    write(home / "privsep.toml", '[server]\nbind_cmd = "echo 0.0.0.0:1"\n')
    with pytest.raises(ConfigError, match=r"privsep.toml:2: unknown key 'bind_cmd' in \[server\]"):
        load_config(environ=clean_env(home))


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ("false", "command false failed with exit status 1"),
        ("/nonexistent/bin/vault read", "command not found: /nonexistent/bin/vault"),
        ("true", "command true printed nothing"),
        ("sleep 5", "command sleep did not finish within 0.5 s"),
        ("'unbalanced", "cannot split the command line"),
    ],
)
def test_a_failing_cmd_is_an_error_naming_file_line_and_key(
    home: Path, command: str, reason: str
) -> None:
    cmd_literal = command.replace("\\", "\\\\").replace('"', '\\"')
    write(
        home / "privsep.toml",
        f'[core]\ncommand_timeout = 0.5\n\n[database]\nurl_cmd = "{cmd_literal}"\n',
    )
    proc = runner("config", "list", env=clean_env(home))
    assert proc.returncode == 2, proc.stderr
    assert f"privsep.toml:5: key database.url_cmd: {reason}" in proc.stderr
    assert proc.stderr.startswith("runner: configuration error: ")
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_cmd_output_is_never_shown(home: Path) -> None:
    write(home / "privsep.toml", '[database]\nurl_cmd = "echo hunter2-db-password"\n')
    for args in (
        ("config", "list"),
        ("config", "list", "--json"),
        ("config", "get", "database.url"),
    ):
        proc = runner(*args, env=clean_env(home))
        assert proc.returncode == 0, proc.stderr
        assert "hunter2" not in proc.stdout + proc.stderr
        assert "***" in proc.stdout


def test_a_failing_env_cmd_names_the_variable(home: Path) -> None:
    proc = runner("config", "list", env=clean_env(home, PRIVSEP__SERVER__FERNET_KEY_CMD="false"))
    assert proc.returncode == 2
    assert "environment variable PRIVSEP__SERVER__FERNET_KEY_CMD: command false failed" in (
        proc.stderr
    )


# --- config list / get -------------------------------------------------------------------------


def test_list_shows_value_source_and_masks_secrets(home: Path) -> None:
    write(
        home / "privsep.toml",
        '[database]\nurl = "sqlite:///secret-path.db"\n[supervisor]\nparallelism = 4\n',
    )
    proc = runner(
        "config", "list", "--json", env=clean_env(home, PRIVSEP__SERVER__BIND="0.0.0.0:9000")
    )
    assert proc.returncode == 0, proc.stderr
    rows = {r["key"]: r for r in json.loads(proc.stdout)["settings"]}
    assert rows["database.url"]["value"] == "***"
    assert rows["database.url"]["source"] == f"{home / 'privsep.toml'}:2"
    assert rows["supervisor.parallelism"] == {
        "key": "supervisor.parallelism",
        "value": "4",
        "source": f"{home / 'privsep.toml'}:4",
    }
    assert rows["server.bind"]["source"] == "env PRIVSEP__SERVER__BIND"
    assert rows["sandbox.uid_first"]["source"] == "default"
    assert "secret-path" not in proc.stdout
    text = runner("config", "list", env=clean_env(home))
    assert "secret-path" not in text.stdout
    assert "database.url" in text.stdout and "***" in text.stdout


def test_get_shows_one_key(home: Path) -> None:
    proc = runner("config", "get", "sandbox.network", env=clean_env(home))
    assert proc.returncode == 0
    assert proc.stdout == "none\t[default]\n"
    proc = runner(
        "config", "get", "server.fernet_key", env=clean_env(home, PRIVSEP__SERVER__FERNET_KEY="abc")
    )
    assert proc.stdout == "***\t[env PRIVSEP__SERVER__FERNET_KEY]\n"


def test_get_unknown_key_suggests_and_exits_2(home: Path) -> None:
    proc = runner("config", "get", "supervisor.paralelism", env=clean_env(home))
    assert proc.returncode == 2
    assert "unknown key 'supervisor.paralelism' (did you mean supervisor.parallelism?)" in (
        proc.stderr
    )


# --- errors in the file ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[core]\nstate_dir = 'a'\n\n[nope]\nx = 1\n", "privsep.toml:4: unknown section [nope]"),
        (
            "[supervisor]\nexecutor = 'local'\nparalelism = 2\n",
            "privsep.toml:3: unknown key 'paralelism' in [supervisor] "
            "(did you mean 'parallelism'?)",
        ),
        (
            "[supervisor]\nparallelism = 'four'\n",
            "privsep.toml:2: key supervisor.parallelism: must be an integer, got str 'four'",
        ),
        (
            "[core]\nstrict_permissions = 1\n",
            "privsep.toml:2: key core.strict_permissions: must be true or false, got int 1",
        ),
        (
            "[supervisor]\nexecutor = 'celery'\n",
            "privsep.toml:2: key supervisor.executor: must be one of sequential, local",
        ),
        ("[sandbox]\nuid_first = 0\n", "privsep.toml:2: key sandbox.uid_first: must be at least 1"),
        (
            "[supervisor]\nbundle_version = 'literal:'\n",
            "privsep.toml:2: key supervisor.bundle_version: must be git, none or literal:TEXT",
        ),
        (
            "[supervisor]\nbundle_version = 'gti'\n",
            "privsep.toml:2: key supervisor.bundle_version: must be git, none or literal:TEXT",
        ),
        (
            "[supervisor]\nparallelism = 2\nparallelism = 3\n",
            "privsep.toml:3: key 'parallelism': invalid TOML: Cannot overwrite a value",
        ),
        ("[core]\n[core]\n", "privsep.toml:2: invalid TOML"),
        ("stray = 1\n", "privsep.toml:1: key 'stray': every key must sit in a section"),
        (
            "[database]\nurl_cmd = ''\n",
            "privsep.toml:2: key database.url_cmd: must be a non-empty string",
        ),
        ("[core\n", "privsep.toml:1: invalid TOML"),
    ],
)
def test_file_errors_name_file_line_and_key(home: Path, text: str, message: str) -> None:
    write(home / "privsep.toml", text)
    proc = runner("config", "list", env=clean_env(home))
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2


def test_non_utf8_file_is_an_error_with_its_line(home: Path) -> None:
    write(home / "privsep.toml", b"[core]\nstate_dir = 'ok'\nworkflows_dir = '\xff\xfe'\n")
    proc = runner("config", "list", env=clean_env(home))
    assert proc.returncode == 2
    assert "privsep.toml:3: not valid UTF-8 (byte 0xff)" in proc.stderr


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        (
            "PRIVSEP__SUPERVISOR__PARALELISM",
            "2",
            "environment variable PRIVSEP__SUPERVISOR__PARALELISM: names no known option "
            "(did you mean 'PRIVSEP__SUPERVISOR__PARALLELISM'?)",
        ),
        (
            "PRIVSEP__SUPERVISOR__PARALLELISM",
            "many",
            "environment variable PRIVSEP__SUPERVISOR__PARALLELISM (key supervisor.parallelism): "
            "must be an integer",
        ),
        ("PRIVSEP__CORE__STRICT_PERMISSIONS", "maybe", "must be true or false"),
        ("PRIVSEP__SERVER__BIND_CMD", "echo x", "names no known option"),
        ("PRIVSEP__SUPERVISOR", "x", "expected PRIVSEP__SECTION__KEY"),
    ],
)
def test_environment_errors_name_the_variable(
    home: Path, var: str, value: str, message: str
) -> None:
    proc = runner("config", "list", env=clean_env(home, **{var: value}))
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_repr_of_config_shows_no_secret(home: Path) -> None:
    cfg = load_config(environ=clean_env(home, PRIVSEP__DATABASE__URL="postgresql://u:pw@h/d"))
    assert "pw@" not in repr(cfg)
    assert cfg.settings["database.url"].display == "***"


def test_server_urls_as_an_array_or_a_comma_list_and_the_audience_default(home: Path) -> None:
    from privsep.runner.config.endpoints import endpoints

    plain = endpoints(load_config(environ=clean_env(home)))
    assert plain.urls == ("http://127.0.0.1:8780",)
    assert plain.audience == "http://127.0.0.1:8780"  # as before replicas: server.url
    write(
        home / "privsep.toml",
        '[server]\nurl = "http://lb:8780"\nurls = ["http://a:8780", " http://b:8780", ""]\n',
    )
    listed = endpoints(load_config(environ=clean_env(home)))
    assert listed.urls == ("http://a:8780", "http://b:8780")
    assert listed.audience == "http://lb:8780"
    env = clean_env(
        home,
        PRIVSEP__SERVER__URLS="http://c:1,http://c:1,http://d:2",
        PRIVSEP__SERVER__AUDIENCE="svc",
    )
    assert endpoints(load_config(environ=env)) == type(listed)(("http://c:1", "http://d:2"), "svc")
    write(home / "privsep.toml", "[server]\nurls = [1]\n")
    with pytest.raises(ConfigError, match="must be a string or an array of strings"):
        load_config(environ=clean_env(home))
