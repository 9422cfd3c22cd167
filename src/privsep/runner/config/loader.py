"""Load ``privsep.toml`` with environment overrides, ``_cmd`` and ``_file`` forms for secrets.

Precedence, highest first: ``PRIVSEP__SECTION__KEY``, ``PRIVSEP__SECTION__KEY_CMD``,
``PRIVSEP__SECTION__KEY_FILE``, the file's ``key``, ``key_cmd``, ``key_file``, the default.
A lower form is never evaluated when a higher one is set, so an unused ``_cmd`` never runs.

Anything the loader does not understand is an error that names the file, the line and the key:
a typo in a security setting must never be silently ignored.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shlex
import subprocess
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from privsep.runner.config.schema import BY_NAME, OPTIONS, SECTIONS, Option
from privsep.secrets.files import InsecureFileError, read_secret_file

ENV_PREFIX = "PRIVSEP__"
CONFIG_FILE_NAME = "privsep.toml"
MASK = "***"
# ``supervisor.credential = "systemd:supervisor.key"``: the file systemd's LoadCredential=
# delivered under $CREDENTIALS_DIRECTORY, so the key need not sit where the service reads it.
SYSTEMD_CREDENTIAL_PREFIX = "systemd:"
CREDENTIALS_DIRECTORY_ENV = "CREDENTIALS_DIRECTORY"
# systemd's own rule for credential names: a file name, nothing that climbs out of the directory.
_CREDENTIAL_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,255}")

Value = str | int | float | bool


class ConfigError(Exception):
    """The configuration is wrong. The message says where and what; the CLI exits 2."""


@dataclass(frozen=True)
class FileSecret:
    """A secret whose value lives in a permission-checked file; read only when it is needed."""

    path: str


@dataclass(frozen=True)
class Setting:
    """The effective value of one option and where it came from."""

    option: Option
    value: Value | FileSecret
    source: str
    origin: str = "default"  # env, env_cmd, env_file, file, file_cmd, file_file or default

    @property
    def display(self) -> str:
        """The value as it may be shown to a person: secrets are always ``***``."""
        if self.option.secret:
            return MASK
        value = self.value
        if isinstance(value, bool):
            return "true" if value else "false"
        return str(value)


@dataclass
class Config:
    """The effective configuration: one :class:`Setting` per option, plus where it was read."""

    home: Path
    path: Path
    file_exists: bool
    settings: dict[str, Setting] = field(default_factory=dict)
    secrets_in_file: list[str] = field(default_factory=list)
    secret_files: dict[str, str] = field(default_factory=dict)
    # Every ``_cmd`` the file or the environment names, run or not: ``{where: command}``.
    commands: dict[str, str] = field(default_factory=dict)
    # $CREDENTIALS_DIRECTORY as it was at load time ("" when unset): ``systemd:`` values
    # resolve against it, and only when they are used.
    credentials_directory: str = ""

    def get(self, name: str) -> Value:
        """The value of ``section.key``; a file-held secret is read (and checked) now."""
        setting = self.settings[name]
        if isinstance(setting.value, FileSecret):
            return read_secret_value(setting.value.path, setting.source)
        return setting.value

    def path_of(self, name: str) -> Path:
        """A path option, resolved against the home directory (``systemd:NAME``: against
        ``$CREDENTIALS_DIRECTORY``)."""
        value = str(self.get(name))
        if self.settings[name].option.secret_path and value.startswith(SYSTEMD_CREDENTIAL_PREFIX):
            return self._systemd_credential(name, value[len(SYSTEMD_CREDENTIAL_PREFIX) :])
        return self.home / value

    def systemd_credential(self, name: str) -> str | None:
        """The credential name when option ``name`` says ``systemd:NAME``, else ``None``."""
        setting = self.settings[name]
        value = setting.value
        if (
            setting.option.secret_path
            and isinstance(value, str)
            and value.startswith(SYSTEMD_CREDENTIAL_PREFIX)
        ):
            return value[len(SYSTEMD_CREDENTIAL_PREFIX) :]
        return None

    def _systemd_credential(self, name: str, credential: str) -> Path:
        """The file systemd delivered, or a one-line error that says which unit setting to fix.

        Checked when the value is used, not at load time: an operator's command on the same
        host loads this file too and has no business with the supervisor's credential.
        """
        directory = self.credentials_directory
        if not directory:
            raise ConfigError(
                f'{name} = "systemd:{credential}" but ${CREDENTIALS_DIRECTORY_ENV} is not '
                f"set: systemd sets it only inside a unit with "
                f"LoadCredential={credential}:PATH (run this there, or name the file itself)"
            )
        if not os.path.isabs(directory):
            raise ConfigError(
                f"{name}: ${CREDENTIALS_DIRECTORY_ENV} is {directory!r}, not an absolute path"
            )
        path = Path(directory) / credential
        if not os.path.lexists(path):
            raise ConfigError(
                f"{name}: systemd credential {credential!r} is not in {directory} "
                f"(add LoadCredential={credential}:PATH to the unit)"
            )
        return path

    def __repr__(self) -> str:  # never let a secret reach a log through repr()
        return f"Config(path={str(self.path)!r}, home={str(self.home)!r})"


def _expand_user(path: str, environ: Mapping[str, str]) -> Path:
    """``~`` expansion against the given environment, not necessarily ``os.environ``."""
    if path == "~" or path.startswith("~/"):
        user_home = environ.get("HOME") or os.path.expanduser("~")
        return Path(user_home + path[1:])
    return Path(path).expanduser()


def default_home(environ: Mapping[str, str]) -> Path:
    return _expand_user(environ.get("PRIVSEP_HOME") or "~/.privsep", environ)


def read_secret_value(path: str, where: str) -> str:
    """First line of a permission-checked secret file."""
    try:
        data = read_secret_file(path)
    except FileNotFoundError:
        raise ConfigError(f"{where}: secret file {path} does not exist") from None
    except InsecureFileError as exc:
        raise ConfigError(f"{where}: refusing secret file: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read secret file {path}: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: secret file {path} is not UTF-8 text") from None
    return text.splitlines()[0] if text else ""


def load_config(
    config_path: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration.

    ``config_path`` (the ``--config`` flag) wins over ``PRIVSEP_CONFIG``, which wins over
    ``$PRIVSEP_HOME/privsep.toml``. A file that was named explicitly must exist; the default
    one may be absent, and then only defaults and the environment apply.
    """
    env = dict(os.environ if environ is None else environ)
    home = default_home(env)
    explicit = config_path or env.get("PRIVSEP_CONFIG")
    path = _expand_user(str(explicit), env) if explicit else home / CONFIG_FILE_NAME
    cfg = Config(
        home=home,
        path=path,
        file_exists=False,
        credentials_directory=env.get(CREDENTIALS_DIRECTORY_ENV, ""),
    )

    file_values: dict[str, tuple[Value, int]] = {}
    if path.exists() or explicit:
        file_values = _read_file(path)
        cfg.file_exists = True
    env_values = _read_env(env)
    timeout = _early_timeout(file_values, env_values)
    for key, (command, line) in file_values.items():
        if key.endswith("_cmd"):
            cfg.commands[f"{path}:{line}: {key}"] = str(command)
    for key, raw in env_values.items():
        if key.endswith("_cmd"):
            cfg.commands[f"environment: {key}"] = raw

    for opt in OPTIONS:
        cfg.settings[opt.name] = _resolve(opt, file_values, env_values, path, timeout, env, home)
        # The file is checked whenever it holds a secret, even one the environment overrides:
        # the value is still sitting there for anyone who can read the file.
        if opt.secret and opt.name in file_values:
            cfg.secrets_in_file.append(opt.name)
        value = cfg.settings[opt.name].value
        if isinstance(value, FileSecret):
            cfg.secret_files[opt.name] = value.path
        if opt.secret_path and isinstance(value, str):
            _check_systemd_credential(opt, value, cfg.settings[opt.name].source)
    return cfg


def _check_systemd_credential(opt: Option, value: str, source: str) -> None:
    """A ``systemd:`` value names one credential file; say so now rather than at first use."""
    if not value.startswith(SYSTEMD_CREDENTIAL_PREFIX):
        return
    credential = value[len(SYSTEMD_CREDENTIAL_PREFIX) :]
    if opt.directory:
        raise ConfigError(
            f"{source}: key {opt.name}: names a directory; a systemd credential is one file"
        )
    if not _CREDENTIAL_NAME.fullmatch(credential) or credential in (".", ".."):
        raise ConfigError(
            f"{source}: key {opt.name}: {credential!r} is not a systemd credential name "
            "(letters, digits, '_', '.', '@' and '-', as in LoadCredential=NAME:PATH)"
        )


# --- the file -------------------------------------------------------------------------------

_HEADER = re.compile(r"^\s*\[\s*([A-Za-z0-9_\-]+)\s*\]\s*(#.*)?$")
_KEYLINE = re.compile(r"^\s*([A-Za-z0-9_\-.\"']+)\s*=")
_TOML_POS = re.compile(r"\(at line (\d+), column \d+\)")


def _locate_keys(text: str) -> dict[tuple[str, str], int]:
    """Line numbers of ``[section] key`` pairs.

    ``tomllib`` gives values but no positions; our file is flat (sections of scalars), so a
    line scan finds every key a person could have written.
    """
    where: dict[tuple[str, str], int] = {}
    section = ""
    for lineno, line in enumerate(text.splitlines(), start=1):
        if m := _HEADER.match(line):
            section = m.group(1)
            where.setdefault((section, ""), lineno)
        elif m := _KEYLINE.match(line):
            dotted = [p.strip("\"'") for p in m.group(1).split(".")]
            sec, key = (section, dotted[0]) if len(dotted) == 1 else (dotted[0], dotted[-1])
            where.setdefault((sec, key), lineno)
    return where


def _read_file(path: Path) -> dict[str, tuple[Value, int]]:
    """Parse and validate the TOML file into ``{"section.key[_cmd|_file]": (value, line)}``."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: configuration file does not exist (check --config or PRIVSEP_CONFIG)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read configuration file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"
        ) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_POS.search(str(exc))
        line = int(m.group(1)) if m else 0
        reason = _TOML_POS.sub("", str(exc)).strip()
        key = ""
        if m and (km := _KEYLINE.match(text.splitlines()[line - 1] if line else "")):
            key = f" key {km.group(1).strip()!r}:"
        if "overwrite" in reason:
            reason += " (the key or section is defined twice)"
        raise ConfigError(f"{path}:{line}:{key} invalid TOML: {reason}") from None

    where = _locate_keys(text)
    out: dict[str, tuple[Value, int]] = {}
    for section, table in data.items():
        sec_line = where.get(
            (section, ""),
            where.get((section, next(iter(table), "")), 0) if isinstance(table, dict) else 0,
        )
        if not isinstance(table, dict):
            raise ConfigError(
                f"{path}:{where.get(('', section), 0)}: key {section!r}: every key "
                f"must sit in a section; known sections: {', '.join(SECTIONS)}"
            )
        if section not in SECTIONS:
            raise ConfigError(
                f"{path}:{sec_line}: unknown section [{section}]"
                f"{_suggest(section, SECTIONS)}; known: {', '.join(SECTIONS)}"
            )
        for key, value in table.items():
            line = where.get((section, key), sec_line)
            name, form = _split_form(section, key)
            opt = _accepting(name, form)
            if opt is None:
                known = [o.key for o in OPTIONS if o.section == section]
                raise ConfigError(
                    f"{path}:{line}: unknown key {key!r} in [{section}]{_suggest(key, known)}"
                )
            where_text = f"{path}:{line}: key {section}.{key}"
            if form:
                if not isinstance(value, str) or not value.strip():
                    raise ConfigError(f"{where_text}: must be a non-empty string")
                out[name + form] = (value, line)
            else:
                out[name] = (_check_type(opt, value, where_text), line)
    return out


def _split_form(section: str, key: str) -> tuple[str, str]:
    for form in ("_cmd", "_file"):
        if key.endswith(form) and f"{section}.{key[: -len(form)]}" in BY_NAME:
            return f"{section}.{key[: -len(form)]}", form
    return f"{section}.{key}", ""


def _accepting(name: str, form: str) -> Option | None:
    """The option ``name``, if it takes values in ``form`` (``""``, ``"_cmd"``, ``"_file"``);
    the file and the environment refuse the same keys."""
    opt = BY_NAME.get(name)
    if (
        opt is None
        or (form == "_cmd" and not opt.accepts_cmd)
        or (form == "_file" and not opt.accepts_file)
    ):
        return None
    return opt


def _suggest(word: str, candidates: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


_TYPE_WORDS = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _check_type(opt: Option, value: object, where: str) -> Value:
    checked: Value
    if opt.kind == "bool" and isinstance(value, bool):
        checked = value
    elif opt.kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        checked = value
    elif opt.kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        checked = float(value)
    elif opt.kind == "str" and isinstance(value, str):
        checked = value
    elif opt.many and isinstance(value, list) and all(isinstance(v, str) for v in value):
        # One representation whatever the source: the environment can only give a string.
        checked = ",".join(v.strip() for v in value)
    else:
        raise ConfigError(
            f"{where}: must be {_TYPE_WORDS[opt.kind]}"
            f"{' or an array of strings' if opt.many else ''}, got {type(value).__name__} {value!r}"
        )
    if opt.choices and checked not in opt.choices:
        raise ConfigError(f"{where}: must be one of {', '.join(opt.choices)}, got {checked!r}")
    if opt.pattern and isinstance(checked, str) and not re.fullmatch(opt.pattern, checked):
        shown = checked if len(checked) <= 60 else checked[:57] + "..."
        raise ConfigError(f"{where}: must be {opt.pattern_words}, got {shown!r}")
    if opt.minimum is not None and not isinstance(checked, str) and checked < opt.minimum:
        raise ConfigError(f"{where}: must be at least {opt.minimum}, got {checked!r}")
    return checked


# --- the environment ------------------------------------------------------------------------


def _read_env(env: Mapping[str, str]) -> dict[str, str]:
    """``{"section.key[_cmd|_file]": raw string}`` from ``PRIVSEP__SECTION__KEY`` variables."""
    out: dict[str, str] = {}
    for var, raw in env.items():
        if not var.startswith(ENV_PREFIX):
            continue
        parts = var[len(ENV_PREFIX) :].lower().split("__")
        if len(parts) != 2:
            raise ConfigError(f"environment variable {var}: expected PRIVSEP__SECTION__KEY")
        section, key = parts
        name, form = _split_form(section, key)
        opt = _accepting(name, form)
        if opt is None:
            candidates = [f"PRIVSEP__{o.section.upper()}__{o.key.upper()}" for o in OPTIONS]
            raise ConfigError(
                f"environment variable {var}: names no known option"
                f"{_suggest(var, candidates)}; unset it or fix the name"
            )
        out[name + form] = raw
    return out


def _from_text(opt: Option, raw: str, where: str) -> Value:
    """Type a value that arrived as text (an environment variable or a command's output)."""
    value: object = raw
    if opt.kind == "bool":
        value = _BOOL_WORDS.get(raw.strip().lower(), raw)
    elif opt.kind in ("int", "float"):
        with contextlib.suppress(ValueError):
            value = int(raw) if opt.kind == "int" else float(raw)
    return _check_type(opt, value, where)


_BOOL_WORDS = {
    "1": True,
    "true": True,
    "yes": True,
    "on": True,
    "0": False,
    "false": False,
    "no": False,
    "off": False,
}


def _env_name(opt: Option, form: str = "") -> str:
    return f"{ENV_PREFIX}{opt.section.upper()}__{opt.key.upper()}{form.upper()}"


def _env_where(opt: Option, form: str = "") -> str:
    return f"environment variable {_env_name(opt, form)} (key {opt.name})"


# --- resolution -----------------------------------------------------------------------------


def _early_timeout(file_values: dict[str, tuple[Value, int]], env_values: dict[str, str]) -> float:
    """``core.command_timeout`` is needed before any ``_cmd`` runs, so it is resolved first."""
    opt = BY_NAME["core.command_timeout"]
    if "core.command_timeout" in env_values:
        return float(_from_text(opt, env_values[opt.name], _env_where(opt)))
    if opt.name in file_values:
        return float(file_values[opt.name][0])
    return float(opt.default)


def _resolve(
    opt: Option,
    file_values: dict[str, tuple[Value, int]],
    env_values: dict[str, str],
    path: Path,
    timeout: float,
    env: Mapping[str, str],
    home: Path,
) -> Setting:
    name = opt.name
    if name in env_values:
        var = _env_name(opt)
        return Setting(opt, _from_text(opt, env_values[name], _env_where(opt)), f"env {var}", "env")
    if name + "_cmd" in env_values:
        var = _env_name(opt, "_cmd")
        out = run_value_command(
            env_values[name + "_cmd"], f"environment variable {var}", timeout, env
        )
        return Setting(opt, _from_text(opt, out, _env_where(opt, "_cmd")), f"env {var}", "env_cmd")
    if name + "_file" in env_values:
        var = _env_name(opt, "_file")
        secret_file = str(home / env_values[name + "_file"])  # relative: under the home
        return Setting(opt, FileSecret(secret_file), f"env {var}", "env_file")
    if name in file_values:
        value, line = file_values[name]
        return Setting(opt, value, f"{path}:{line}", "file")
    if name + "_cmd" in file_values:
        cmd, line = file_values[name + "_cmd"]
        where = f"{path}:{line}: key {name}_cmd"
        out = run_value_command(str(cmd), where, timeout, env)
        return Setting(opt, _from_text(opt, out, where), f"{path}:{line} (_cmd)", "file_cmd")
    if name + "_file" in file_values:
        secret_path, line = file_values[name + "_file"]
        secret_file = str(home / str(secret_path))  # relative: under the home
        return Setting(opt, FileSecret(secret_file), f"{path}:{line} (_file)", "file_file")
    return Setting(opt, opt.default, "default")


def run_value_command(command: str, where: str, timeout: float, env: Mapping[str, str]) -> str:
    """First line of a command's standard output. No shell; the output is never shown.

    A command that fails, times out or prints nothing is an error: silently using an empty
    database URL or key would be worse than refusing to start.
    """
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise ConfigError(f"{where}: cannot split the command line: {exc}") from None
    if not argv:
        raise ConfigError(f"{where}: the command is empty")
    child_env = {k: v for k, v in env.items() if not k.startswith(ENV_PREFIX)}
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            timeout=timeout,
            env=child_env,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        raise ConfigError(f"{where}: command not found: {argv[0]}") from None
    except PermissionError:
        raise ConfigError(f"{where}: command is not executable: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(
            f"{where}: command {argv[0]} did not finish within {timeout:g} s "
            "(raise core.command_timeout or fix the command)"
        ) from None
    if done.returncode != 0:
        raise ConfigError(
            f"{where}: command {argv[0]} failed with exit status "
            f"{done.returncode}; run it by hand to see why"
        )
    try:
        text = done.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: command {argv[0]} printed non-UTF-8 output") from None
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise ConfigError(f"{where}: command {argv[0]} printed nothing on its first line")
    return lines[0].strip()
