#!/usr/bin/env python3
"""piku.py: the smallest PaaS you can trust, in one file.

Copy this file onto a Linux host, run `piku.py setup`, start the uWSGI emperor it
configures, add your SSH key with `piku.py setup:ssh KEYFILE`, and `git push
piku@host:APP main` deploys APP. The deploy runs in git's pre-receive hook: a deploy
that fails rejects the push, and the branch on the server stays at the release that is
live.

Python: 3.10 or newer. Dependencies: click and python-dotenv; psutil for `ps`. The
versions Debian 12 packages (click 8.1, python-dotenv 0.21, psutil 5.9) are enough.

Compatibility with upstream piku (github.com/piku/piku): the ~/.piku layout (apps/
repos/ envs/ data/ logs/ uwsgi/ uwsgi-available/ uwsgi-enabled/ nginx/ cache/), the
PIKU_ROOT override, the command names and arguments, the Procfile kinds and the ENV
keys keep working. Differences are deliberate and documented in docs/: failed deploys
reject the push, app names are refused rather than rewritten, PORT is stable across
deploys, and settings can never inject lines into generated configs.
"""

import sys

if sys.version_info < (3, 10):
    sys.stderr.write(" !     piku.py needs Python 3.10 or newer; this is Python %s.\n"
                     " !     Run it with a newer python3 (Debian 12 and Ubuntu 22.04 ship one).\n"
                     % sys.version.split()[0])
    sys.exit(1)

import fcntl
import glob
import io
import os
import pwd
import re
import shlex
import shutil
import signal
import socket
import string
import subprocess
import tempfile
import time
from dataclasses import dataclass, field

import click

PIKU_VERSION = "0.1.0"


##############################################################################
# Paths
##############################################################################

PIKU_SCRIPT = os.path.realpath(__file__)
PIKU_ROOT = os.path.abspath(os.environ.get("PIKU_ROOT") or os.path.join(os.path.expanduser("~"), ".piku"))
APP_ROOT = os.path.join(PIKU_ROOT, "apps")
CACHE_ROOT = os.path.join(PIKU_ROOT, "cache")
DATA_ROOT = os.path.join(PIKU_ROOT, "data")
ENV_ROOT = os.path.join(PIKU_ROOT, "envs")
GIT_ROOT = os.path.join(PIKU_ROOT, "repos")
LOG_ROOT = os.path.join(PIKU_ROOT, "logs")
NGINX_ROOT = os.path.join(PIKU_ROOT, "nginx")
RELEASE_ROOT = os.path.join(PIKU_ROOT, "releases")
LOCK_ROOT = os.path.join(PIKU_ROOT, "locks")
UWSGI_ROOT = os.path.join(PIKU_ROOT, "uwsgi")
UWSGI_AVAILABLE = os.path.join(PIKU_ROOT, "uwsgi-available")
UWSGI_ENABLED = os.path.join(PIKU_ROOT, "uwsgi-enabled")
PIKU_DIRS = (APP_ROOT, CACHE_ROOT, DATA_ROOT, ENV_ROOT, GIT_ROOT, LOG_ROOT, NGINX_ROOT,
             RELEASE_ROOT, LOCK_ROOT, UWSGI_ROOT, UWSGI_AVAILABLE, UWSGI_ENABLED)

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
UWSGI_LOG_MAXSIZE = "1048576"
RELEASES_KEPT = 2          # the live release and the one before it
ZERO_REV = "0" * 40


def app_path(app):
    return os.path.join(APP_ROOT, app)


def repo_path(app):
    return os.path.join(GIT_ROOT, app)


def env_dir(app):
    return os.path.join(ENV_ROOT, app)


def config_file(app):
    return os.path.join(ENV_ROOT, app, "ENV")


def live_env_file(app):
    return os.path.join(ENV_ROOT, app, "LIVE_ENV")


def scaling_file(app):
    return os.path.join(ENV_ROOT, app, "SCALING")


def vassal_name(app, kind, index):
    return f"{app}_{kind}.{index}.ini"


##############################################################################
# Errors and output
##############################################################################

class PikuError(Exception):
    """A problem the user can act on: what happened, and how to fix it."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def step(message):
    click.echo(f"-----> {message}")


def notice(message):
    click.echo(f"       {message}")


def problem(message):
    for line in str(message).splitlines() or [""]:
        click.echo(f" !     {line}", err=True)


def warning(message):
    problem(f"warning: {message}")


def run_command(args, *, cwd=None, env=None, capture=False, what=None):
    """Run args (a list, never a shell string); raise PikuError when it fails."""
    try:
        result = subprocess.run(args, cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE if capture else None,
                                stderr=subprocess.PIPE if capture else None)
    except FileNotFoundError:
        raise PikuError(f"'{args[0]}' is not installed or not on PATH",
                        f"Install it on the server (for example: apt-get install {os.path.basename(args[0])}).")
    if result.returncode != 0:
        detail = (result.stderr or "").strip() if capture else ""
        raise PikuError(f"{what or ' '.join(args[:2])} failed (exit code {result.returncode})"
                        + (f":\n{detail}" if detail else ""))
    return result


def git(*args, capture=True, env=None):
    verb = next((arg for arg in args if not arg.startswith("-") and "/" not in arg), "")
    return run_command(["git", *args], capture=capture, env=env, what=f"git {verb}")


##############################################################################
# Parsers
##############################################################################

APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SETTING_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
PROCFILE_LINE = re.compile(r"([A-Za-z0-9][A-Za-z0-9_-]*)\s*:\s*(.*)")
CRON_FIELD = re.compile(r"\*|\*/[0-9]+|[0-9]+")
CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
CRON_NAMES = ("minute", "hour", "day of month", "month", "day of week")

WEB_KINDS = frozenset({"wsgi", "web", "static"})        # they answer HTTP on PORT
PHASE_KINDS = frozenset({"preflight", "release"})       # run during a deploy, not workers
SINGLETON_KINDS = frozenset({"static"})                 # one instance at most


def validate_app_name(name):
    """Return name if it is a valid app name; refuse it otherwise (never rewrite it)."""
    if not isinstance(name, str) or not APP_NAME.fullmatch(name) or ".." in name:
        raise PikuError(f"invalid app name {name!r}",
                        "App names start with a letter or digit and use only letters, digits, "
                        "'.', '_' and '-' (at most 64 characters).")
    return name


def validate_setting(key, value, where="setting"):
    if not SETTING_KEY.fullmatch(key):
        raise PikuError(f"invalid {where} name {key!r}",
                        "Setting names are letters, digits and '_' and do not start with a digit.")
    if any(c in value for c in "\r\n\0"):
        raise PikuError(f"the value of {key} contains a line break or NUL character",
                        "Values must fit on one line; encode multi-line values (for example base64).")


def parse_setting_arg(text):
    """KEY=VALUE from the command line -> (key, value)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise PikuError(f"malformed setting {text!r}", "Use KEY=VALUE, for example: config:set APP DEBUG=1")
    validate_setting(key, value)
    return key, value


@dataclass
class Process:
    kind: str
    command: str
    line: int


def worker_class(kind):
    """Which kind of worker a Procfile name is: wsgi, web, static, cron or worker."""
    if kind in WEB_KINDS or kind in PHASE_KINDS:
        return kind
    if kind.startswith("cron"):
        return "cron"
    return "worker"


def parse_cron(spec, lineno):
    """'M H D Mo W command' -> (uWSGI cron fields, command)."""
    parts = spec.split(None, 5)
    if len(parts) < 6:
        raise PikuError(f"Procfile line {lineno}: a cron entry needs 5 schedule fields and a command",
                        "Write it like: cron-nightly: 0 3 * * * python nightly.py")
    fields = []
    for value, name, (low, high) in zip(parts[:5], CRON_NAMES, CRON_RANGES):
        if not CRON_FIELD.fullmatch(value):
            raise PikuError(f"Procfile line {lineno}: cron {name} field {value!r} is not supported",
                            "Each field is '*', '*/N' or a number (uWSGI's cron has no ranges or lists).")
        if value == "*":
            fields.append("-1")
        elif value.startswith("*/"):
            fields.append("-" + value[2:])
        elif not low <= int(value) <= high:
            raise PikuError(f"Procfile line {lineno}: cron {name} {value} is out of range {low}-{high}")
        else:
            fields.append(value)
    return " ".join(fields), parts[5]


def parse_procfile(text):
    """Procfile text -> {kind: Process}. Malformed lines are errors naming the line."""
    processes = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = PROCFILE_LINE.fullmatch(line)
        if not match:
            raise PikuError(f"Procfile line {lineno} is malformed: {raw!r}",
                            "Each line is 'kind: command', for example: web: python app.py")
        kind, command = match.group(1), match.group(2).strip()
        if not command:
            raise PikuError(f"Procfile line {lineno}: '{kind}' has no command")
        if "\0" in command:
            raise PikuError(f"Procfile line {lineno}: the command contains a NUL character")
        if kind in processes:
            raise PikuError(f"Procfile line {lineno}: '{kind}' is defined twice "
                            f"(first on line {processes[kind].line})",
                            "Give each process a unique name, for example worker1 and worker2.")
        if worker_class(kind) == "cron":
            parse_cron(command, lineno)
        processes[kind] = Process(kind, command, lineno)
    _check_process_mix(processes)
    return processes


def _check_process_mix(processes):
    if not processes:
        raise PikuError("the Procfile defines no processes",
                        "Add at least one line such as 'web: python app.py'.")
    if "web" in processes and "wsgi" in processes:
        raise PikuError(f"Procfile lines {processes['wsgi'].line} and {processes['web'].line}: "
                        "'wsgi' and 'web' cannot both be used; they would share one PORT",
                        "Keep one of them.")
    if "static" in processes and "web" in processes:
        raise PikuError(f"Procfile line {processes['static'].line}: 'static' next to 'web' is not supported",
                        "Serve the files from the web process, or use 'wsgi', which serves them alongside.")


def static_relative(command):
    """The folder a 'static:' line names, relative to the app."""
    return command.strip().strip("/") or "."


def static_folder(command, lineno, root):
    """The folder a 'static:' line serves, checked to be inside the app."""
    relative = static_relative(command)
    folder = os.path.normpath(os.path.join(root, relative))
    real_root = os.path.realpath(root)
    if not os.path.realpath(folder).startswith(real_root + os.sep) and os.path.realpath(folder) != real_root:
        raise PikuError(f"Procfile line {lineno}: static folder {command!r} is outside the app")
    if not os.path.isdir(folder):
        raise PikuError(f"Procfile line {lineno}: static folder {command!r} does not exist in the pushed code",
                        "Commit the folder, or fix the path in the Procfile.")
    return relative


def parse_env_text(text, source):
    """dotenv text -> list of (key, value). Errors name the file and the line."""
    from dotenv.parser import parse_stream
    pairs = []
    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        if binding.error:
            raise PikuError(f"{source} line {line} cannot be parsed: {binding.original.string.strip()!r}",
                            "Use KEY=value lines; quote values with spaces or '#'.")
        if binding.key is None or binding.value is None:
            continue
        try:
            validate_setting(binding.key, binding.value, where=f"{source} line {line}: setting")
        except PikuError as error:
            raise PikuError(f"{source} line {line}: {error.message}", error.hint)
        pairs.append((binding.key, binding.value))
    return pairs


def expand_settings(pairs, env):
    """Layer (key, value) pairs onto env, expanding $VAR and ${VAR} from what came before."""
    result = dict(env)
    for key, value in pairs:
        result[key] = string.Template(value).safe_substitute(result)
    return result


def format_env(settings):
    """A dict -> dotenv text that parse_env_text reads back exactly."""
    lines = []
    for key in sorted(settings):
        value = settings[key].replace("\\", "\\\\").replace("'", "\\'")
        lines.append(f"{key}='{value}'")
    return "".join(line + "\n" for line in lines)


def parse_scaling(text):
    """SCALING text ('kind:count' or 'kind=count' lines) -> {kind: count}."""
    counts = {}
    for line in text.splitlines():
        match = re.fullmatch(r"\s*([A-Za-z0-9_-]+)\s*[:=]\s*([0-9]+)\s*", line)
        if match:
            counts[match.group(1)] = int(match.group(2))
    return counts


def format_scaling(counts):
    return "".join(f"{kind}:{count}\n" for kind, count in sorted(counts.items()))


def scaling_for_kinds(processes):
    """The Procfile kinds that run as workers (static is served by wsgi when both exist)."""
    return [kind for kind in processes if worker_class(kind) not in PHASE_KINDS
            and not (kind == "static" and "wsgi" in processes)]


def parse_scale_args(args, processes):
    """['web=2', ...] -> {kind: count}, checked against the Procfile."""
    counts = {}
    for arg in args:
        kind, sep, count = arg.partition("=")
        if not sep or not count.isdigit():
            raise PikuError(f"malformed scaling {arg!r}", "Use KIND=COUNT, for example: ps:scale APP web=2")
        if kind not in scaling_for_kinds(processes):
            raise PikuError(f"the app has no '{kind}' worker",
                            "Workers: " + (", ".join(sorted(scaling_for_kinds(processes))) or "none"))
        if int(count) > 1 and (kind in SINGLETON_KINDS or worker_class(kind) == "cron"):
            raise PikuError(f"'{kind}' runs at most one instance")
        counts[kind] = int(count)
    return counts


##############################################################################
# The app
##############################################################################

def require_app(app):
    """Validate the name and check the app exists."""
    validate_app_name(app)
    if not os.path.isdir(repo_path(app)) and not os.path.exists(app_path(app)):
        raise PikuError(f"app '{app}' not found",
                        "List apps with 'apps'; push with 'git push piku main' to create one.")
    return app


def read_text(path, default=""):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return default


def write_atomic(path, text, mode=0o644, mtime=None):
    """Write text to path through a temporary file and a rename (with mtime, if given)."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(temp, mode)
        if mtime is not None:
            os.utime(temp, (mtime, mtime))
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise


def load_config(app):
    """The settings made with config:set, as a dict (no expansion)."""
    return dict(parse_env_text(read_text(config_file(app)), "settings (config:set)"))


def load_live_env(app):
    return dict(parse_env_text(read_text(live_env_file(app)), "LIVE_ENV"))


def load_scaling(app):
    return parse_scaling(read_text(scaling_file(app)))


def base_env(app):
    """What every process of the app sees before the ENV layers."""
    home = os.path.expanduser("~")
    return {
        "APP": app,
        "HOME": home,
        "USER": pwd.getpwuid(os.getuid()).pw_name,
        "PATH": clean_path(os.environ.get("PATH") or DEFAULT_PATH),
        "LOG_ROOT": LOG_ROOT,
        "DATA_ROOT": os.path.join(DATA_ROOT, app),
        "BIND_ADDRESS": "127.0.0.1",
        "PIKU_ROOT": PIKU_ROOT,
    }


def clean_path(path):
    """PATH without duplicates and without the git-core folder git adds for its hooks."""
    entries = []
    for entry in path.split(":"):
        if entry and entry not in entries and not entry.rstrip("/").endswith("/git-core"):
            entries.append(entry)
    return ":".join(entries)


class AppLock:
    """One deploy (or config change) per app at a time."""

    def __init__(self, app):
        self.path = os.path.join(LOCK_ROOT, app + ".lock")
        self.handle = None

    def __enter__(self):
        os.makedirs(LOCK_ROOT, exist_ok=True)
        self.handle = open(self.path, "a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            step("Waiting for another deploy of this app to finish")
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


##############################################################################
# Buildpacks
##############################################################################

BUILDPACKS = []


def buildpack(cls):
    """Register a buildpack; the registry is kept sorted by priority (lowest first)."""
    BUILDPACKS.append(cls())
    BUILDPACKS.sort(key=lambda pack: pack.priority)
    return cls


@dataclass
class BuildContext:
    app: str
    root: str               # the checked-out release
    processes: dict
    env: dict               # the app's settings, layered
    config: dict            # only the config:set layer (to say which layer asked for what)
    repo_env: dict          # only the repo's ENV layer


@dataclass
class BuildResult:
    env: dict = field(default_factory=dict)      # additions for every process of the app


class StaticBuildpack:
    """A site that is only files: a Procfile with 'static' and no other worker."""
    name = "static"
    priority = 90

    def detect(self, root, processes):
        workers = {kind for kind in processes if worker_class(kind) not in PHASE_KINDS}
        return workers == {"static"}

    def build(self, context):
        process = context.processes["static"]
        folder = static_folder(process.command, process.line, context.root)
        notice(f"serving the folder '{folder}' as it is")
        return BuildResult()


class GenericBuildpack:
    """Anything else: the Procfile's commands run as they are."""
    name = "generic"
    priority = 100

    def detect(self, root, processes):
        return True

    def build(self, context):
        notice("no language detected; the Procfile's commands run as they are")
        return BuildResult()


@dataclass
class Interpreter:
    path: str
    version: str            # full, e.g. 3.12.1


class PythonBuildpack:
    """What the Python buildpacks share: choose the interpreter and the WSGI server,
    fingerprint the inputs, and reuse the environment or build a new one beside it."""
    name = "python"
    needs_uv = True
    inputs = ()             # files of the app whose content decides the environment

    def build(self, context):
        started = time.monotonic()
        tool_env = build_tool_env(context.env)
        uv = find_uv(tool_env, required=self.needs_uv)
        request = resolve_python_request(context)
        step(f"Python {request.value} (from {request.source})" if request.value
             else "Python: no version requested, using uv's default")
        interpreter = find_interpreter(uv, request.value, tool_env, context)
        server = self.wsgi_server(context, interpreter)
        fingerprint = self.fingerprint(context, uv, interpreter, tool_env, server == "gunicorn")
        venv = os.path.join(env_dir(context.app), "python-" + fingerprint_digest(fingerprint)[:16])
        if environment_intact(venv, fingerprint):
            step(f"Dependencies unchanged: reusing {venv} (Python {interpreter.version}); uv sync skipped")
        else:
            self.create(context, uv, interpreter, venv, tool_env, server == "gunicorn", fingerprint)
        notice(f"Python environment ready in {time.monotonic() - started:.2f} s")
        additions = {"VIRTUAL_ENV": venv, "PATH": f"{venv}/bin:{context.env['PATH']}",
                     "PYTHONUNBUFFERED": context.env.get("PYTHONUNBUFFERED", "1")}
        if server:
            additions["WSGI_SERVER"] = server
        return BuildResult(additions)

    def wsgi_server(self, context, interpreter):
        if "wsgi" not in context.processes:
            return None
        server, reason = choose_wsgi_server(context.env.get("WSGI_SERVER"), interpreter.version,
                                            uwsgi_python_version(), context.app)
        step(f"Serving wsgi with {server}: {reason}")
        if server == "gunicorn" and "static" in context.processes:
            warning("gunicorn does not serve the 'static:' folder; serve it from the app until nginx does")
        return server

    def fingerprint(self, context, uv, interpreter, tool_env, with_gunicorn):
        """Everything that decides what the environment contains."""
        files = {}
        for name in self.inputs:
            path = os.path.join(context.root, name)
            files[name] = file_digest(path) if os.path.exists(path) else None
        settings = {key: value for key, value in sorted(tool_env.items())
                    if key.startswith("UV_") and key not in UV_UNRELATED_SETTINGS}
        return {"layout": 1, "buildpack": self.name, "files": files,
                "python": [interpreter.path, interpreter.version],
                "tool": tool_version(uv) if uv else "pip", "settings": settings, "gunicorn": with_gunicorn}

    def create(self, context, uv, interpreter, venv, tool_env, with_gunicorn, fingerprint):
        """Build a new environment at venv; the marker written last makes it usable."""
        if os.path.lexists(venv):
            shutil.rmtree(venv)         # a half-built one from a failed deploy
        started = time.monotonic()
        self.install(context, uv, interpreter, venv, tool_env)
        if with_gunicorn and not os.path.exists(os.path.join(venv, "bin", "gunicorn")):
            step("Adding gunicorn to the environment (the app does not depend on it)")
            install_packages(uv, venv, ["gunicorn"], tool_env, context.root)
        write_atomic(os.path.join(venv, ENV_MARKER), fingerprint_text(fingerprint))
        notice(f"environment built in {time.monotonic() - started:.1f} s: {venv}")


class UvBuildpack(PythonBuildpack):
    """pyproject.toml (no requirements.txt): uv sync, honouring a committed uv.lock."""
    name = "python-uv"
    priority = 10
    inputs = ("pyproject.toml", "uv.lock")

    def detect(self, root, processes):
        return (os.path.isfile(os.path.join(root, "pyproject.toml"))
                and not os.path.isfile(os.path.join(root, "requirements.txt")))

    def install(self, context, uv, interpreter, venv, tool_env):
        locked = os.path.isfile(os.path.join(context.root, "uv.lock"))
        if not locked:
            warning("no uv.lock: dependencies are resolved afresh, so this deploy is not reproducible")
            warning("run 'uv lock', commit uv.lock, and push again")
        args = [uv, "sync", "--no-default-groups", "--no-install-project", "--python", interpreter.path]
        args += ["--locked"] if locked else []
        for setting, flag in (("UV_SYNC_EXTRAS", "--extra"), ("UV_SYNC_GROUPS", "--group")):
            for name in filter(None, (part.strip() for part in context.env.get(setting, "").split(","))):
                args += [flag, name]
        step("Running " + " ".join(["uv", *args[1:]]))
        run_build_tool(args, context.root, dict(tool_env, UV_PROJECT_ENVIRONMENT=venv))


class RequirementsBuildpack(PythonBuildpack):
    """requirements.txt: uv venv + uv pip install when uv is there, else venv + pip."""
    name = "python-requirements"
    priority = 20
    needs_uv = False
    inputs = ("requirements.txt",)

    def detect(self, root, processes):
        return os.path.isfile(os.path.join(root, "requirements.txt"))

    def install(self, context, uv, interpreter, venv, tool_env):
        if uv:
            run_build_tool([uv, "venv", "--quiet", "--python", interpreter.path, venv], context.root, tool_env)
        else:
            notice("uv not found: using venv and pip")
            run_build_tool([interpreter.path, "-m", "venv", venv], context.root, tool_env)
        step("Installing requirements.txt")
        install_packages(uv, venv, ["-r", "requirements.txt"], tool_env, context.root)


buildpack(UvBuildpack)
buildpack(RequirementsBuildpack)
buildpack(StaticBuildpack)
buildpack(GenericBuildpack)


def select_buildpack(root, processes):
    for pack in BUILDPACKS:
        if pack.detect(root, processes):
            return pack
    raise PikuError("no buildpack matches this app")


ENV_MARKER = ".piku-fingerprint"
UV_UNRELATED_SETTINGS = frozenset({"UV_CACHE_DIR", "UV_PROJECT_ENVIRONMENT", "UV_NO_PROGRESS"})
TOOL_ENV_PASSTHROUGH = ("HOME", "USER", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR",
                        "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")


def build_tool_env(app_env):
    """The environment uv and pip run in: the host's UV_* and proxy settings, then the app's."""
    env = {key: value for key, value in os.environ.items()
           if key in TOOL_ENV_PASSTHROUGH or key.startswith("UV_")}
    env.update(app_env)
    env.setdefault("UV_PYTHON_PREFERENCE", "managed")
    env["UV_NO_PROGRESS"] = "1"
    env.pop("VIRTUAL_ENV", None)
    return env


def file_digest(path):
    import hashlib
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def fingerprint_text(fingerprint):
    import json
    return json.dumps(fingerprint, sort_keys=True, indent=1) + "\n"


def fingerprint_digest(fingerprint):
    import hashlib
    return hashlib.sha256(fingerprint_text(fingerprint).encode()).hexdigest()


def environment_intact(venv, fingerprint):
    """A finished environment (marker matches) whose interpreter still exists."""
    return (read_text(os.path.join(venv, ENV_MARKER)) == fingerprint_text(fingerprint)
            and os.path.exists(os.path.join(venv, "bin", "python")))


def install_packages(uv, venv, args, tool_env, cwd):
    python = os.path.join(venv, "bin", "python")
    if uv:
        run_build_tool([uv, "pip", "install", "--python", python, *args], cwd, tool_env)
    else:
        run_build_tool([python, "-m", "pip", "install", "--disable-pip-version-check", *args], cwd, tool_env)


UV_FAILURES = (
    ("needs to be updated, but `--locked`", "uv.lock is out of date with pyproject.toml",
     "Run 'uv lock', commit uv.lock, and push again."),
    ("incompatible with the project's Python requirement", "the Python version conflicts with requires-python",
     "Pick a version requires-python allows (config:set APP PYTHON_VERSION=X.Y) or change requires-python."),
    ("No solution found", "the dependencies cannot be resolved",
     "Check the package names and versions in pyproject.toml, run 'uv lock' locally, commit, and push again."),
    ("not found in the package registry", "a package was not found in the package index",
     "Check the package names in pyproject.toml / requirements.txt."),
)


def run_build_tool(args, cwd, env):
    """Run uv or pip, show its output indented, and turn a failure into an actionable error."""
    result = subprocess.run(args, cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in result.stdout.splitlines():
        notice(line)
    if result.returncode != 0:
        for needle, message, hint in UV_FAILURES:
            if needle in result.stdout:
                raise PikuError(f"{message}; nothing was changed", hint)
        raise PikuError(f"{os.path.basename(args[0])} {args[1]} failed (exit code {result.returncode}); "
                        "nothing was changed", "See its output above.")


##############################################################################
# Interpreters
##############################################################################

PYTHON_REQUEST = re.compile(r"(?:(?:cpython|pypy|graalpy)[@-]?)?[0-9]+(?:\.[0-9]+){0,2}t?"
                            r"|(?:(?:==|!=|<=|>=|~=|<|>)\s*[0-9]+(?:\.[0-9]+){0,2}(?:\.\*)?\s*,?\s*)+")
WSGI_SERVERS = ("auto", "uwsgi", "gunicorn")
_PROBES = {}


@dataclass
class PythonRequest:
    value: str
    source: str


def validate_python_request(value, source):
    value = value.strip()
    if not PYTHON_REQUEST.fullmatch(value):
        raise PikuError(f"PYTHON_VERSION {value!r} (from {source}) is not a Python version uv understands",
                        "Use a version such as 3.12, 3.12.4 or '>=3.11,<3.13'.")
    return value


def read_python_version_file(root):
    for line in read_text(os.path.join(root, ".python-version")).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return None


def requires_python(root):
    """The project's requires-python specifier, or None."""
    text = read_text(os.path.join(root, "pyproject.toml"))
    try:
        import tomllib
    except ImportError:         # Python 3.10: a line match is enough for this one key
        match = re.search(r"""^\s*requires-python\s*=\s*["']([^"']*)["']""", text, re.M)
        return match.group(1) if match else None
    try:
        return tomllib.loads(text).get("project", {}).get("requires-python")
    except tomllib.TOMLDecodeError as error:
        raise PikuError(f"pyproject.toml cannot be parsed: {error}", "Fix the file, commit, and push again.")


def _release(version):
    return tuple(int(part) for part in re.findall(r"[0-9]+", version)[:3])


def version_allowed(version, specifiers):
    """Does a full version like 3.11.2 satisfy a PEP 440 specifier set like '>=3.10,<4'?"""
    if not specifiers:
        return True
    have = _release(version)
    for spec in filter(None, (part.strip() for part in specifiers.split(","))):
        match = re.fullmatch(r"(==|!=|<=|>=|~=|<|>|===)\s*([0-9][0-9.]*)(\.\*)?", spec)
        if not match:
            return False
        op, wanted, wildcard = match.group(1), _release(match.group(2)), match.group(3)
        padded = have + (0,) * (len(wanted) - len(have))
        if wildcard or op == "~=":
            prefix = wanted if wildcard else wanted[:-1]
            same = padded[:len(prefix)] == prefix
            ok = (same if op == "==" else not same) if wildcard else (same and padded >= wanted)
        else:
            target = wanted + (0,) * (len(have) - len(wanted))
            ok = {"==": have == target, "===": have == target, "!=": have != target, "<=": have <= target,
                  ">=": have >= target, "<": have < target, ">": have > target}[op]
        if not ok:
            return False
    return True


def minor(version):
    return ".".join(str(part) for part in _release(version)[:2])


def resolve_python_request(context):
    """The Python the app asks for, first match wins; says where the answer came from."""
    env = context.env
    if "PYTHON_VERSION" in context.config:
        return PythonRequest(validate_python_request(env["PYTHON_VERSION"], "config:set"), "config:set PYTHON_VERSION")
    if "PYTHON_VERSION" in context.repo_env:
        return PythonRequest(validate_python_request(env["PYTHON_VERSION"], "ENV"), "PYTHON_VERSION in the app's ENV")
    pinned = read_python_version_file(context.root)
    if pinned:
        return PythonRequest(validate_python_request(pinned, ".python-version"), ".python-version")
    if "wsgi" in context.processes and (env.get("WSGI_SERVER") or "auto").lower() != "gunicorn":
        embedded = uwsgi_python_version()
        if embedded and version_allowed(embedded, requires_python(context.root)):
            return PythonRequest(minor(embedded), f"uWSGI, which embeds Python {embedded}")
    return PythonRequest(None, "uv's default")


def find_uv(env, required=True):
    """uv on the app's PATH, or where its installers put it."""
    home = os.path.expanduser("~")
    found = shutil.which("uv", path=env.get("PATH")) or next(
        (path for path in (os.path.join(home, ".local", "bin", "uv"), os.path.join(home, ".cargo", "bin", "uv"))
         if os.access(path, os.X_OK)), None)
    if not found and required:
        raise PikuError("uv is not installed for the piku user; it builds apps with a pyproject.toml",
                        "Install it as that user: 'curl -LsSf https://astral.sh/uv/install.sh | sh' "
                        "or 'pipx install uv' (apt-get install pipx), then push again.")
    return found


def tool_version(tool):
    if tool not in _PROBES:
        _PROBES[tool] = run_command([tool, "--version"], capture=True).stdout.strip()
    return _PROBES[tool]


def interpreter_version(path):
    code = "import sys; print('%d.%d.%d' % sys.version_info[:3])"
    return run_command([path, "-I", "-S", "-c", code], capture=True, what=f"{path}").stdout.strip()


def find_interpreter(uv, request, env, context):
    """The interpreter for the request: uv python find (installing it when uv may download)."""
    if not uv:
        name = f"python{request}" if request and re.fullmatch(r"[0-9]+(\.[0-9]+)?", request) else "python3"
        path = shutil.which(name, path=env.get("PATH"))
        if not path:
            raise PikuError(f"{name} is not installed on this server", "Install it, or install uv.")
        return Interpreter(path, interpreter_version(path))
    # uv python find looks at every Python on PATH and in its own folder (~0.2 s); the answer
    # only changes when one of those folders, the request or uv's settings change.
    folders = [*env.get("PATH", "").split(":"), uv_managed_pythons(env)]
    key = ["uv python find", tool_version(uv), request, None if request else requires_python(context.root),
           {name: value for name, value in sorted(env.items()) if name.startswith("UV_")},
           [stat_key(folder) for folder in folders]]
    path = cached_probe(key, lambda: uv_python_find(uv, request, env, context.root))
    if path is None:
        raise PikuError(f"Python {request or '(uv default)'} is not available on this server; "
                        f"uv can find: {', '.join(available_pythons(uv, env)) or 'none'}",
                        f"Install it as the piku user ('uv python install {request or '3.12'}') or pick one "
                        f"of those: config:set {context.app} PYTHON_VERSION=X.Y")
    return Interpreter(path, interpreter_version(path))


def uv_python_find(uv, request, env, root):
    args = [uv, "python", "find", *([request] if request else [])]
    result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    downloads = env.get("UV_PYTHON_DOWNLOADS", "automatic").lower()
    if result.returncode != 0 and request and downloads not in ("never", "manual", "false", "0"):
        step(f"Installing Python {request} with uv")
        subprocess.run([uv, "python", "install", request], cwd=root, env=env, capture_output=True)
        result = subprocess.run(args, cwd=root, env=env, capture_output=True, text=True)
    return result.stdout.strip().splitlines()[-1] if result.returncode == 0 and result.stdout.strip() else None


def uv_managed_pythons(env):
    """Where uv keeps the Pythons it installs."""
    data = env.get("XDG_DATA_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".local", "share")
    return env.get("UV_PYTHON_INSTALL_DIR") or os.path.join(data, "uv", "python")


def stat_key(path):
    try:
        stat = os.stat(path)
    except OSError:
        return [path, None]
    return [path, stat.st_mtime_ns, stat.st_size]


def cached_probe(key, compute, keep=64):
    """compute(), remembered in cache/probes.json while key -- what the answer depends on --
    stays the same. Answers naming a file are dropped once that file is gone."""
    import json
    path = os.path.join(CACHE_ROOT, "probes.json")
    try:
        table = json.loads(read_text(path) or "{}")
    except ValueError:
        table = {}
    name = fingerprint_digest(key)
    value = table.get(name)
    if value is not None and not (isinstance(value, str) and value.startswith("/") and not os.path.exists(value)):
        return value
    value = compute()
    if value is not None:
        table.pop(name, None)
        table[name] = value
        try:
            write_atomic(path, json.dumps(dict(list(table.items())[-keep:])))
        except OSError:
            pass
    return value


def available_pythons(uv, env):
    import json
    result = subprocess.run([uv, "python", "list", "--only-installed", "--output-format", "json"],
                            env=env, capture_output=True, text=True)
    try:
        versions = {entry["version"] for entry in json.loads(result.stdout)}
    except (ValueError, KeyError, TypeError):
        return []
    return sorted(versions, key=_release)


UWSGI_PLUGINS = "/usr/lib/uwsgi/plugins"


def uwsgi_python_version():
    """The full version of the Python the installed uWSGI embeds (plugin or built in), or None."""
    if "uwsgi" not in _PROBES:
        binary = shutil.which("uwsgi")
        key = ["uwsgi python", stat_key(os.path.realpath(binary)) if binary else None, stat_key(UWSGI_PLUGINS)]
        _PROBES["uwsgi"] = cached_probe(key, probe_uwsgi_python) if binary else None
    return _PROBES["uwsgi"]


def probe_uwsgi_python():
    for args in (["uwsgi", "--plugin", "python3", "--python-version"], ["uwsgi", "--python-version"]):
        try:
            result = subprocess.run(args, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        match = re.match(r"([0-9]+\.[0-9]+\.[0-9]+)", result.stdout.strip())
        if result.returncode == 0 and match:
            return match.group(1)
    return None


def choose_wsgi_server(setting, python_version, uwsgi_version, app="APP"):
    """-> (server, reason) for a wsgi worker whose environment runs python_version."""
    setting = (setting or "auto").strip().lower()
    if setting not in WSGI_SERVERS:
        raise PikuError(f"WSGI_SERVER={setting!r} is not one of {', '.join(WSGI_SERVERS)}",
                        f"Fix it with: config:set {app} WSGI_SERVER=auto")
    if setting == "gunicorn":
        return "gunicorn", "WSGI_SERVER=gunicorn"
    if uwsgi_version and minor(uwsgi_version) == minor(python_version):
        return "uwsgi", f"it embeds Python {uwsgi_version}, the same as the app's {python_version}"
    why = (f"the app runs on Python {python_version} but uWSGI embeds Python {uwsgi_version}" if uwsgi_version
           else "uWSGI cannot load Python here (is uwsgi-plugin-python3 installed?)")
    if setting == "uwsgi":
        fix = f"config:set {app} PYTHON_VERSION={minor(uwsgi_version)}" if uwsgi_version else \
            "apt-get install uwsgi-plugin-python3"
        raise PikuError(f"WSGI_SERVER=uwsgi, but {why}: uWSGI could not import the app's packages",
                        f"Either run on uWSGI's Python ({fix}) or let gunicorn serve it "
                        f"(config:set {app} WSGI_SERVER=gunicorn).")
    return "gunicorn", why


##############################################################################
# Config writers
##############################################################################

def uwsgi_escape(value):
    """Make value reach uWSGI literally: uWSGI expands %x, $(VAR) and @(file) in ini values."""
    if any(c in value for c in "\r\n\0"):
        raise PikuError(f"value {value[:40]!r} contains a line break or NUL character")
    return value.replace("%", "%%").replace("$(", "%(piku_dollar)(").replace("@(", "%(piku_at)(")


VASSAL_HEADER = string.Template("""\
[uwsgi]
; written by piku for $app ($kind.$index); piku rewrites this file on every deploy
set-placeholder = piku_dollar=$$
set-placeholder = piku_at=@
chdir = $chdir
master = true
project = $app
procname-prefix = $app:$kind.$index:
pidfile = $pidfile
master-fifo = $fifo
logto = $log
log-backupname = $log.old
log-maxsize = $log_maxsize
die-on-term = true
""")

VASSAL_KINDS = {
    "web": string.Template("attach-daemon = $command\n"),
    "worker": string.Template("attach-daemon = $command\n"),
    "cron": string.Template("cron = $cron\n"),
    "wsgi": string.Template("""\
plugin = python3
module = $command
pythonpath = $chdir
${virtualenv}http-socket = $bind
reuse-port = true
processes = $processes
threads = $threads
enable-threads = true
max-requests = $max_requests
listen = $listen
"""),
    "gunicorn": string.Template("attach-daemon = $gunicorn\n"),
    "static": string.Template("""\
plugin = notfound
http-socket = $bind
reuse-port = true
static-map = /=$folder
static-index = index.html
"""),
}


def vassal_template(kind, env):
    """Which template renders a worker: its class, except wsgi workers gunicorn serves."""
    kind_class = worker_class(kind)
    if kind_class == "wsgi" and env.get("WSGI_SERVER", "").lower() == "gunicorn":
        return "gunicorn"
    return kind_class


def bind_address(env):
    address = env["BIND_ADDRESS"]
    return f"[{address}]:{env['PORT']}" if ":" in address else f"{address}:{env['PORT']}"


UWSGI_NUMBERS = {"UWSGI_PROCESSES": "1", "UWSGI_THREADS": "4", "UWSGI_MAX_REQUESTS": "1024",
                 "UWSGI_LISTEN": "16", "UWSGI_LOG_MAXSIZE": UWSGI_LOG_MAXSIZE}


def setting_number(env, keys, default):
    """The first of keys that is set, as a whole number above 0 (refused otherwise), or default."""
    for key in keys:
        value = env.get(key, "").strip()
        if value:
            if not value.isdigit() or int(value) < 1:
                raise PikuError(f"{key} must be a whole number above 0, not {value!r}",
                                f"Fix it with: config:set {env.get('APP', 'APP')} {key}={default}")
            return int(value)
    return default


def uwsgi_number(env, key):
    return setting_number(env, (key,), UWSGI_NUMBERS[key])


def vassal_values(app, kind, index, command, env):
    """The plain dict a vassal template is filled from (everything escaped)."""
    log = os.path.join(LOG_ROOT, app, f"{kind}.{index}.log")
    values = {
        "app": app, "kind": kind, "index": index,
        "chdir": app_path(app),
        "pidfile": os.path.join(UWSGI_ROOT, f"{app}_{kind}.{index}.pid"),
        "fifo": os.path.join(UWSGI_ROOT, f"{app}_{kind}.{index}.fifo"),
        "log": log,
        "log_maxsize": uwsgi_number(env, "UWSGI_LOG_MAXSIZE"),
        "command": command,
        "processes": uwsgi_number(env, "UWSGI_PROCESSES"),
        "threads": uwsgi_number(env, "UWSGI_THREADS"),
        "max_requests": uwsgi_number(env, "UWSGI_MAX_REQUESTS"),
        "listen": uwsgi_number(env, "UWSGI_LISTEN"),
    }
    if worker_class(kind) in WEB_KINDS:
        values["bind"] = bind_address(env)
    if worker_class(kind) == "static":
        values["folder"] = os.path.join(app_path(app), static_relative(command))
    if worker_class(kind) == "wsgi":
        venv_bin = os.path.join(env["VIRTUAL_ENV"], "bin", "gunicorn") if env.get("VIRTUAL_ENV") else "gunicorn"
        values["gunicorn"] = "exec " + " ".join(shlex.quote(part) for part in (
            venv_bin, "--config", gunicorn_config_path(app, kind, index), command.strip()))
    if worker_class(kind) == "cron":
        schedule, cron_command = parse_cron(command, 0)
        values["cron"] = f"{schedule} {cron_command}"
    escaped = {key: uwsgi_escape(str(value)) for key, value in values.items()}
    escaped["virtualenv"] = f"virtualenv = {uwsgi_escape(env['VIRTUAL_ENV'])}\n" if env.get("VIRTUAL_ENV") else ""
    return escaped


def render_vassal(app, kind, index, command, env, extra=()):
    """The uWSGI vassal .ini for one worker instance, as text."""
    values = vassal_values(app, kind, index, command, env)
    text = VASSAL_HEADER.substitute(values) + VASSAL_KINDS[vassal_template(kind, env)].substitute(values)
    for key, value in extra:
        text += f"{key} = {uwsgi_escape(value)}\n"
    for key in sorted(env):
        text += f"env = {key}={uwsgi_escape(env[key])}\n"
    return text


GUNICORN_TEMPLATE = string.Template("""\
# written by piku for $app ($kind.$index); piku rewrites this file on every deploy
bind = [$bind]
reuse_port = True
workers = $workers
timeout = $timeout
graceful_timeout = $graceful_timeout
chdir = $chdir
accesslog = $accesslog
errorlog = $errorlog
proc_name = $proc_name
control_socket_disable = True   # gunicorn >= 24 would share one socket in $$HOME between apps
""")


def gunicorn_config_path(app, kind, index):
    return os.path.join(ENV_ROOT, app, "gunicorn", f"{kind}.{index}.conf.py")


def default_gunicorn_workers():
    """2 x cores + 1, but no more than one per 256 MiB of memory, and 2 to 8."""
    cores = os.cpu_count() or 1
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError):
        memory_mb = 1024
    return max(2, min(2 * cores + 1, memory_mb // 256, 8))


def render_gunicorn_config(app, kind, index, env):
    """gunicorn's config for one wsgi worker, as Python source (every value a repr)."""
    log = os.path.join(LOG_ROOT, app, f"{kind}.{index}")
    values = {
        "bind": repr(bind_address(env)),
        "workers": setting_number(env, ("GUNICORN_WORKERS", "WEB_CONCURRENCY"), default_gunicorn_workers()),
        "timeout": setting_number(env, ("GUNICORN_TIMEOUT",), 30),
        "graceful_timeout": setting_number(env, ("GUNICORN_GRACEFUL_TIMEOUT",), 20),
        "chdir": repr(app_path(app)),
        "accesslog": repr(log + ".access.log"),
        "errorlog": repr(log + ".error.log"),
        "proc_name": repr(f"{app}:{kind}.{index}"),
    }
    return GUNICORN_TEMPLATE.substitute(values, app=app, kind=kind, index=index)


EMPEROR_TEMPLATE = string.Template("""\
[uwsgi]
; the uWSGI emperor for piku: run it with  uwsgi --ini $config
chdir = $root
emperor = $enabled
emperor-freq = 1
logto = $root/uwsgi.log
log-backupname = $root/uwsgi.old.log
log-maxsize = $log_maxsize
die-on-term = true
""")


def render_emperor():
    return EMPEROR_TEMPLATE.substitute(config=os.path.join(UWSGI_ROOT, "uwsgi.ini"), root=UWSGI_ROOT,
                                       enabled=UWSGI_ENABLED, log_maxsize=UWSGI_LOG_MAXSIZE)


def install_vassal(name, text, restart=True):
    """Write a vassal to uwsgi-available and enable it.

    A running vassal is reloaded at once through its master FIFO (it rereads its file);
    the file keeps its old mtime so the emperor, which polls once a second, does not reload
    it a second time. A new or dead vassal gets a newer mtime and the emperor starts it.
    """
    write_atomic(os.path.join(UWSGI_AVAILABLE, name), text, mode=0o600)
    enabled = os.path.join(UWSGI_ENABLED, name)
    if os.path.exists(enabled) and not restart:
        return
    master = vassal_master_pid(name)
    if master and os.path.exists(enabled):
        write_atomic(enabled, text, mode=0o600, mtime=os.stat(enabled).st_mtime)
        if reload_vassal(name, master):
            return
    else:
        write_atomic(enabled, text, mode=0o600)
    bump_mtime(enabled)


def vassal_master_pid(name):
    """The live uWSGI master of a vassal file name, from its pidfile, or None."""
    try:
        pid = int(read_text(os.path.join(UWSGI_ROOT, name[:-4] + ".pid")).strip() or 0)
    except ValueError:
        return None
    return pid if pid > 0 and pid_alive(pid) else None


def bump_mtime(path):
    """Give path an mtime the emperor sees as new (it compares whole seconds)."""
    stat = os.stat(path)
    newest = max(time.time(), stat.st_mtime + 1)
    os.utime(path, (newest, newest))


##############################################################################
# Deploy pipeline
##############################################################################

@dataclass
class Release:
    app: str
    rev: str
    root: str
    processes: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    scaling: dict = field(default_factory=dict)
    repo_env: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)


def new_release_dir(app, rev):
    parent = os.path.join(RELEASE_ROOT, app)
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(dir=parent, prefix=time.strftime("%Y%m%d%H%M%S-") + rev[:12] + "-")


def checkout_revision(app, rev, dest):
    """Write the tree of rev into dest without touching the bare repo's HEAD or index."""
    with tempfile.TemporaryDirectory(prefix="piku-index-") as temp:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(temp, "index"))
        git("--git-dir", repo_path(app), "read-tree", rev, env=env)
        git("--git-dir", repo_path(app), "--work-tree", dest, "checkout-index", "--all", "--force", env=env)


def settings_layers(app, root):
    """(the repo's ENV pairs, the config:set pairs) -- the layers above piku's base."""
    return (parse_env_text(read_text(os.path.join(root, "ENV")), "ENV"),
            parse_env_text(read_text(config_file(app)), "settings (config:set)"))


def assign_port(app, env, processes):
    """Give web kinds a PORT: the one set, else the one from the last deploy, else a free one."""
    if not any(worker_class(kind) in WEB_KINDS for kind in processes):
        return env
    try:
        socket.getaddrinfo(env["BIND_ADDRESS"], None, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        raise PikuError(f"BIND_ADDRESS {env['BIND_ADDRESS']!r} is not an IP address",
                        f"Set one with: config:set {app} BIND_ADDRESS=127.0.0.1")
    port = env.get("PORT") or load_live_env(app).get("PORT") or str(free_port(env["BIND_ADDRESS"], app))
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise PikuError(f"PORT {port!r} is not a port number", f"Fix it with: config:set {app} PORT=8000")
    return dict(env, PORT=port)


def ports_in_use_by_other_apps(app):
    ports = set()
    for other in list_apps():
        if other != app:
            try:
                ports.add(load_live_env(other).get("PORT"))
            except PikuError:
                continue
    return ports


def free_port(address, app):
    taken = ports_in_use_by_other_apps(app)
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
            port = probe.getsockname()[1]
        if str(port) not in taken:
            return port
    raise PikuError("could not find a free port")


def plan_release(app, rev, root):
    """Read and validate everything the pushed code asks for, before anything runs."""
    procfile = os.path.join(root, "Procfile")
    if not os.path.isfile(procfile):
        raise PikuError("no Procfile in the pushed code",
                        "Add a Procfile with lines like 'web: python app.py', commit, and push again.")
    processes = parse_procfile(read_text(procfile))
    if "static" in processes:
        static_folder(processes["static"].command, processes["static"].line, root)
    repo_env, config = settings_layers(app, root)
    env = assign_port(app, expand_settings(config, expand_settings(repo_env, base_env(app))), processes)
    return Release(app, rev, root, processes, env, scaling_for(app, processes), dict(repo_env), dict(config))


def scaling_for(app, processes, changes=None):
    """Worker counts: the saved ones for kinds still in the Procfile, 1 for new kinds."""
    saved = load_scaling(app)
    counts = {kind: saved.get(kind, 1) for kind in scaling_for_kinds(processes)}
    counts.update(changes or {})
    return counts


def run_phase(release, kind):
    """Run the Procfile's preflight or release command; a failure stops the deploy."""
    process = release.processes.get(kind)
    if not process:
        return
    step(f"Running {kind}: {process.command}")
    env = dict(release.env, PWD=release.root)
    result = subprocess.run(["/bin/sh", "-c", process.command], cwd=release.root, env=env)
    if result.returncode != 0:
        raise PikuError(f"the {kind} command failed (exit code {result.returncode}); nothing was changed",
                        f"Fix Procfile line {process.line} or the code it runs, commit, and push again.")


def build_release(release):
    pack = select_buildpack(release.root, release.processes)
    step(f"Building with the {pack.name} buildpack")
    result = pack.build(BuildContext(release.app, release.root, release.processes, dict(release.env),
                                     release.config, release.repo_env))
    release.env.update(result.env)


def activate_release(release):
    """Point the app at the new release and (re)start its workers."""
    app = release.app
    write_atomic(live_env_file(app), format_env(release.env), mode=0o600)
    write_atomic(scaling_file(app), format_scaling(release.scaling))
    switch_symlink(app_path(app), release.root)
    restart = release.env.get("PIKU_AUTO_RESTART", "true").lower() not in ("0", "false", "no", "off")
    spawn_workers(app, release.processes, release.env, release.scaling, restart)


def switch_symlink(link, target):
    """Atomically make link point at target (an upstream host has a real folder there)."""
    if os.path.isdir(link) and not os.path.islink(link):
        shutil.rmtree(link)
    temp = f"{link}.piku-new"
    if os.path.lexists(temp):
        os.unlink(temp)
    os.symlink(target, temp)
    os.replace(temp, link)


def prune_releases(app):
    """Keep the live release and the one before it."""
    live = os.path.realpath(app_path(app))
    parent = os.path.join(RELEASE_ROOT, app)
    releases = sorted((os.path.join(parent, name) for name in os.listdir(parent)), key=os.path.getmtime)
    stale = [path for path in releases if path != live][: max(0, len(releases) - RELEASES_KEPT)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)


def live_virtualenv(app):
    try:
        return load_live_env(app).get("VIRTUAL_ENV")
    except PikuError:
        return None


def prune_environments(app, keep):
    """Remove Python environments neither the live release nor the one before it uses."""
    for path in glob.glob(os.path.join(env_dir(app), "python-*")):
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def deploy_app(app, rev):
    """Build rev of app and make it live. The caller holds the app's lock."""
    started = time.monotonic()
    step(f"Deploying {app} at {rev[:12]}")
    for folder in (DATA_ROOT, LOG_ROOT):
        os.makedirs(os.path.join(folder, app), exist_ok=True)
    root = new_release_dir(app, rev)
    try:
        checkout_revision(app, rev, root)
        release = plan_release(app, rev, root)
        run_phase(release, "preflight")
        build_release(release)
        run_phase(release, "release")
        previous = live_virtualenv(app)
        activate_release(release)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    prune_releases(app)
    prune_environments(app, {release.env.get("VIRTUAL_ENV"), previous})
    announce(release, time.monotonic() - started)


def announce(release, seconds):
    env = release.env
    workers = ", ".join(f"{kind}={count}" for kind, count in sorted(release.scaling.items())) or "none"
    step(f"Workers: {workers}")
    if any(worker_class(kind) in WEB_KINDS for kind in release.processes):
        host = f"[{env['BIND_ADDRESS']}]" if ":" in env["BIND_ADDRESS"] else env["BIND_ADDRESS"]
        step(f"{release.app} is live at http://{host}:{env['PORT']}/ (deployed in {seconds:.1f} s)")
    else:
        step(f"{release.app} is live (deployed in {seconds:.1f} s)")


def deployed_revision(app):
    """The commit the server's branch points at, or None before the first successful push."""
    try:
        return git("--git-dir", repo_path(app), "rev-parse", "--verify", "--quiet", "HEAD^{commit}").stdout.strip()
    except PikuError:
        return None


##############################################################################
# Process control
##############################################################################

def app_vassals(app, folder=UWSGI_ENABLED):
    """{(kind, index): path} of the app's vassal files in folder."""
    vassals = {}
    for path in glob.glob(os.path.join(folder, f"{app}_*.ini")):
        kind, _, index = os.path.basename(path)[len(app) + 1:-4].rpartition(".")
        if index.isdigit():
            vassals[(kind, int(index))] = path
    return vassals


def spawn_workers(app, processes, env, scaling, restart=True):
    """Make the app's vassals match scaling: write the wanted ones, remove the rest."""
    wanted = set()
    wsgi_extra = []
    if "static" in processes:       # the wsgi worker serves the folder's files itself
        folder = os.path.join(app_path(app), static_relative(processes["static"].command))
        wsgi_extra.append(("static-map", "/=" + folder))
    for kind, count in sorted(scaling.items()):
        for index in range(1, count + 1):
            if vassal_template(kind, env) == "gunicorn":
                write_atomic(gunicorn_config_path(app, kind, index), render_gunicorn_config(app, kind, index, env))
            text = render_vassal(app, kind, index, processes[kind].command, env,
                                 wsgi_extra if vassal_template(kind, env) == "wsgi" else ())
            install_vassal(vassal_name(app, kind, index), text, restart)
            wanted.add((kind, index))
    for folder in (UWSGI_ENABLED, UWSGI_AVAILABLE):
        for key, path in app_vassals(app, folder).items():
            if key not in wanted:
                os.unlink(path)


RELOAD_POKE_SECONDS = 2.0


def child_pids(pid):
    """The direct children of pid (None when /proc cannot tell)."""
    try:
        return [int(child) for child in read_text(f"/proc/{pid}/task/{pid}/children").split()]
    except (OSError, ValueError):
        return None


def reload_vassal(name, master):
    """Gracefully reload a running vassal now. False when it cannot be asked (the emperor will).

    uWSGI's master notices that an old worker has exited only on its one-second tick
    (unbit/uwsgi#2271); any byte written to its master FIFO wakes it sooner, so after the
    reload command piku writes newlines until the old processes are gone.
    """
    old = child_pids(master)
    try:
        fifo = os.open(os.path.join(UWSGI_ROOT, name[:-4] + ".fifo"), os.O_WRONLY | os.O_NONBLOCK)
    except OSError:
        try:
            os.kill(master, signal.SIGHUP)
        except ProcessLookupError:
            return False
        return True
    previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        os.write(fifo, b"r")
        deadline = time.monotonic() + RELOAD_POKE_SECONDS
        while time.monotonic() < deadline and (old is None or any(pid_alive(pid) for pid in old)):
            time.sleep(0.02)
            os.write(fifo, b"\n")
    except OSError:
        pass            # the master is re-executing itself: past the wait
    finally:
        os.close(fifo)
        signal.signal(signal.SIGPIPE, previous)
    return True


def vassal_pid(app, kind, index):
    return vassal_master_pid(vassal_name(app, kind, index))


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_workers(app, wait=15.0):
    """Disable every vassal of the app and wait for the emperor to stop them."""
    pids = [vassal_pid(app, kind, index) for kind, index in app_vassals(app)]
    for path in app_vassals(app).values():
        os.unlink(path)
    deadline = time.monotonic() + wait
    while any(pid and pid_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in pids if pid and pid_alive(pid)]
    if left:
        warning(f"processes still running after {wait:.0f} s: {', '.join(map(str, left))}")


def list_apps():
    names = set()
    for folder in (GIT_ROOT, APP_ROOT):
        if os.path.isdir(folder):
            names.update(name for name in os.listdir(folder) if APP_NAME.fullmatch(name))
    return sorted(names)


##############################################################################
# Git plumbing
##############################################################################

HOOK_TEMPLATE = string.Template("""\
#!/bin/sh
# installed by piku: $purpose
exec env PIKU_ROOT=$root $python $script git-hook $stage $app
""")


def install_hooks(app):
    """(Re)write the repo's hooks so they call this piku.py."""
    values = {"root": shlex.quote(PIKU_ROOT), "python": shlex.quote(sys.executable),
              "script": shlex.quote(PIKU_SCRIPT), "app": shlex.quote(app)}
    hooks = {"pre-receive": ("deploys each push before git accepts it", "--stage=pre"),
             "post-receive": ("points HEAD at the branch that was deployed", "--stage=post")}
    for hook, (purpose, stage) in hooks.items():
        text = HOOK_TEMPLATE.substitute(values, purpose=purpose, stage=stage)
        write_atomic(os.path.join(repo_path(app), "hooks", hook), text, mode=0o755)


def ensure_repo(app):
    path = repo_path(app)
    if not os.path.isdir(path):
        os.makedirs(GIT_ROOT, exist_ok=True)
        git("init", "--quiet", "--bare", path)
    install_hooks(app)
    return path


def git_path_to_app(path):
    """The path git sends ('app', '/app' from ssh:// URLs) -> a validated app name."""
    name = path[1:] if path.startswith("/") else path
    return validate_app_name(name)


def read_ref_updates(stream):
    """pre/post-receive stdin -> [(old, new, ref)]."""
    updates = []
    for line in stream:
        parts = line.split()
        if len(parts) == 3:
            updates.append(tuple(parts))
    return updates


def branch_to_deploy(updates):
    """The last branch the push creates or moves, and the ones it leaves undeployed."""
    branches = [(new, ref) for old, new, ref in updates if ref.startswith("refs/heads/") and new != ZERO_REV]
    if not branches:
        return None, []
    return branches[-1], [ref for _, ref in branches[:-1]]


##############################################################################
# CLI
##############################################################################

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(PIKU_VERSION, prog_name="piku")
def cli():
    """piku: git push deploys for one Linux host.

    Deploy with `git push piku main`; manage apps with the commands below
    (over SSH: ssh piku@host COMMAND ...).
    """


@cli.command("apps")
def cmd_apps():
    """List apps (* marks the running ones)."""
    for app in list_apps():
        click.echo(("* " if app_vassals(app) else "  ") + app)


@cli.command("config")
@click.argument("app")
def cmd_config(app):
    """Show the settings made with config:set."""
    require_app(app)
    click.echo(format_env(load_config(app)), nl=False)


@cli.command("config:get")
@click.argument("app")
@click.argument("setting")
def cmd_config_get(app, setting):
    """Print one setting made with config:set."""
    require_app(app)
    settings = load_config(app)
    if setting not in settings:
        raise PikuError(f"'{setting}' is not set for {app}", f"See all settings with: config {app}")
    click.echo(settings[setting])


@cli.command("config:live")
@click.argument("app")
def cmd_config_live(app):
    """Show the environment the running app sees."""
    require_app(app)
    if not os.path.exists(live_env_file(app)):
        raise PikuError(f"{app} has not been deployed yet", "Push to deploy it.")
    click.echo(format_env(load_live_env(app)), nl=False)


def change_config(app, update):
    """Apply update to the app's settings and redeploy; put them back if the deploy fails."""
    with AppLock(app):
        before = read_text(config_file(app), None)
        settings = load_config(app)
        update(settings)
        write_atomic(config_file(app), format_env(settings), mode=0o600)
        rev = deployed_revision(app)
        if not rev:
            step(f"Saved; {app} has not been deployed yet, the settings apply on the first push")
            return
        try:
            deploy_app(app, rev)
        except BaseException:
            if before is None:
                os.unlink(config_file(app))
            else:
                write_atomic(config_file(app), before, mode=0o600)
            problem("the settings were not changed; the running app was left as it was")
            raise


@cli.command("config:set")
@click.argument("app")
@click.argument("settings", nargs=-1, required=True)
def cmd_config_set(app, settings):
    """Set KEY=VALUE settings and redeploy."""
    require_app(app)
    pairs = [parse_setting_arg(arg) for arg in settings]

    def update(current):
        for key, value in pairs:
            step(f"Setting {key} for {app}")
            current[key] = value
    change_config(app, update)


@cli.command("config:unset")
@click.argument("app")
@click.argument("settings", nargs=-1, required=True)
def cmd_config_unset(app, settings):
    """Remove settings and redeploy."""
    require_app(app)
    for key in settings:
        validate_setting(key, "")

    def update(current):
        for key in settings:
            if current.pop(key, None) is None:
                warning(f"{key} was not set")
            else:
                step(f"Unsetting {key} for {app}")
    change_config(app, update)


@cli.command("deploy")
@click.argument("app")
def cmd_deploy(app):
    """Deploy the app again from its last pushed commit."""
    require_app(app)
    with AppLock(app):
        rev = deployed_revision(app)
        if not rev:
            raise PikuError(f"nothing has been pushed to {app} yet", "Push first: git push piku main")
        deploy_app(app, rev)


@cli.command("destroy")
@click.argument("app")
def cmd_destroy(app):
    """Remove the app (its data/APP folder is kept)."""
    require_app(app)
    with AppLock(app):
        stop_workers(app)
        for path in (app_path(app), repo_path(app), env_dir(app), os.path.join(LOG_ROOT, app),
                     os.path.join(RELEASE_ROOT, app), os.path.join(CACHE_ROOT, app)):
            if os.path.islink(path):
                os.unlink(path)
            elif os.path.exists(path):
                step(f"Removing {path}")
                shutil.rmtree(path)
        for path in app_vassals(app, UWSGI_AVAILABLE).values():
            os.unlink(path)
    data = os.path.join(DATA_ROOT, app)
    if os.path.isdir(data):
        notice(f"kept {data}; remove it yourself if you no longer need it")
    step(f"{app} destroyed")


def follow_logs(paths, lines, follow):
    """Print the last lines of each log, prefixed with its worker, then follow them."""
    width = max(len(os.path.basename(path)[:-4]) for path in paths)
    handles = {}
    for path in paths:
        prefix = os.path.basename(path)[:-4].ljust(width)
        with open(path, errors="replace") as handle:
            for line in handle.readlines()[-lines:] if lines else []:
                click.echo(f"{prefix} | {line.rstrip()}")
            handles[path] = (prefix, handle.tell(), os.stat(path).st_ino)
    while follow:
        time.sleep(0.5)
        for path, (prefix, offset, inode) in list(handles.items()):
            if not os.path.exists(path):
                continue
            stat = os.stat(path)
            if stat.st_ino != inode or stat.st_size < offset:
                offset, inode = 0, stat.st_ino
            with open(path, errors="replace") as handle:
                handle.seek(offset)
                for line in handle:
                    click.echo(f"{prefix} | {line.rstrip()}")
                handles[path] = (prefix, handle.tell(), inode)


@cli.command("logs")
@click.argument("app")
@click.argument("process", default="*")
@click.option("-n", "--lines", default=20, show_default=True, help="Lines of history to show per log.")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Keep printing new lines.")
def cmd_logs(app, process, lines, follow):
    """Show and follow the app's logs (all workers, or one kind)."""
    require_app(app)
    if process != "*" and not re.fullmatch(r"[A-Za-z0-9_-]+", process):
        raise PikuError(f"invalid process name {process!r}")
    paths = sorted(glob.glob(os.path.join(LOG_ROOT, app, f"{process}.*.log")))
    if not paths:
        raise PikuError(f"no logs for {app}" + ("" if process == "*" else f" process '{process}'"))
    try:
        follow_logs(paths, lines, follow)
    except KeyboardInterrupt:
        pass


@cli.command("ps")
@click.argument("app")
def cmd_ps(app):
    """Show the app's workers and their processes."""
    require_app(app)
    scaling = load_scaling(app)
    if not scaling:
        raise PikuError(f"{app} has no workers", "Push to deploy it.")
    try:
        import psutil
    except ImportError:
        psutil = None
    for kind, count in sorted(scaling.items()):
        click.echo(f"{kind}:{count}")
        for index in range(1, count + 1):
            pid = vassal_pid(app, kind, index)
            if not pid:
                click.echo(f"  {kind}.{index}  stopped")
                continue
            children = []
            if psutil:
                try:
                    children = [child.pid for child in psutil.Process(pid).children(recursive=True)]
                except psutil.Error:
                    pass
            extra = f" (processes {', '.join(map(str, children))})" if children else ""
            click.echo(f"  {kind}.{index}  running, uWSGI pid {pid}{extra}")


@cli.command("ps:scale")
@click.argument("app")
@click.argument("settings", nargs=-1, required=True)
def cmd_ps_scale(app, settings):
    """Set worker counts: ps:scale APP web=2 worker=0."""
    require_app(app)
    with AppLock(app):
        if not os.path.exists(live_env_file(app)):
            raise PikuError(f"{app} has not been deployed yet", "Push to deploy it.")
        processes = parse_procfile(read_text(os.path.join(app_path(app), "Procfile")))
        changes = parse_scale_args(settings, processes)
        scaling = scaling_for(app, processes, changes)
        write_atomic(scaling_file(app), format_scaling(scaling))
        spawn_workers(app, processes, load_live_env(app), scaling, restart=False)
        step("Workers: " + ", ".join(f"{kind}={count}" for kind, count in sorted(scaling.items())))


@cli.command("run", short_help="Run a command with the app's live settings.", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("app")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def cmd_run(app, command):
    """Run a command in the app's folder with its live settings.

    Example: run APP -- ls -la
    """
    require_app(app)
    if not os.path.exists(live_env_file(app)):
        raise PikuError(f"{app} has not been deployed yet", "Push to deploy it.")
    env = dict(load_live_env(app), PWD=app_path(app))
    command = command[1:] if command[0] == "--" else command
    if not command:
        raise PikuError("no command given", "Example: run APP -- ls -la")
    try:
        result = subprocess.run(list(command), cwd=app_path(app), env=env)
    except FileNotFoundError:
        raise PikuError(f"command not found: {command[0]}", "Use 'run APP -- sh -c \"...\"' for shell syntax.")
    except OSError as error:
        raise PikuError(f"cannot run {command[0]}: {error.strerror}")
    sys.exit(result.returncode)


@cli.command("restart")
@click.argument("app")
def cmd_restart(app):
    """Restart the app's workers (or start stopped ones)."""
    require_app(app)
    available = app_vassals(app, UWSGI_AVAILABLE)
    if not available:
        raise PikuError(f"{app} has no workers to restart", "Push to deploy it.")
    for path in sorted(available.values()):
        install_vassal(os.path.basename(path), read_text(path))
    step(f"Restarting {app}")


@cli.command("stop")
@click.argument("app")
def cmd_stop(app):
    """Stop the app's workers (restart starts them again)."""
    require_app(app)
    if not app_vassals(app):
        raise PikuError(f"{app} is not running")
    stop_workers(app)
    step(f"Stopped {app}")


@cli.command("setup")
def cmd_setup():
    """Create the ~/.piku folders and the uWSGI emperor config."""
    step(f"Running in Python {sys.version.split()[0]}, PIKU_ROOT={PIKU_ROOT}")
    for path in PIKU_DIRS:
        os.makedirs(path, exist_ok=True)
    config = os.path.join(UWSGI_ROOT, "uwsgi.ini")
    write_atomic(config, render_emperor())
    step(f"Wrote {config}")
    for tool in ("git", "uwsgi"):
        if not shutil.which(tool):
            warning(f"'{tool}' is not installed; deploys need it (apt-get install {tool})")
    notice(f"start the emperor with: uwsgi --ini {config}")


AUTHORIZED_KEY = re.compile(r"((?:sk-)?(?:ssh|ecdsa)-[A-Za-z0-9@.-]+) ([A-Za-z0-9+/]+={0,3})(?: ([^\r\n]*))?")


def authorized_keys_line(key_text, fingerprint):
    """The forced-command authorized_keys entry for one public key."""
    match = AUTHORIZED_KEY.fullmatch(key_text.strip())
    if not match:
        raise PikuError("that is not an SSH public key",
                        "Pass the .pub file, for example: setup:ssh ~/.ssh/id_ed25519.pub")
    command = ["env", f"FINGERPRINT={fingerprint}", "NAME=default"]
    if os.environ.get("PIKU_ROOT"):
        command.append(f"PIKU_ROOT={PIKU_ROOT}")
    command += [sys.executable, PIKU_SCRIPT, "ssh-command"]
    forced = " ".join(shlex.quote(part) for part in command).replace("\\", "\\\\").replace('"', '\\"')
    options = "no-agent-forwarding,no-user-rc,no-X11-forwarding,no-port-forwarding"
    return f'command="{forced}",{options} {match.group(1)} {match.group(2)}'


@cli.command("setup:ssh")
@click.argument("public_key_file")
def cmd_setup_ssh(public_key_file):
    """Allow an SSH public key (- reads it from stdin)."""
    text = sys.stdin.read() if public_key_file == "-" else read_text(public_key_file, None)
    if text is None:
        raise PikuError(f"public key file '{public_key_file}' not found")
    key = next((line.strip() for line in text.splitlines() if line.strip()), "")
    with tempfile.NamedTemporaryFile("w", suffix=".pub") as temp:
        temp.write(key + "\n")
        temp.flush()
        try:
            fingerprint = run_command(["ssh-keygen", "-lf", temp.name], capture=True,
                                      what="ssh-keygen").stdout.split()[1]
        except PikuError:
            raise PikuError("that is not a valid SSH public key",
                            "Pass the .pub file, for example: setup:ssh ~/.ssh/id_ed25519.pub")
    line = authorized_keys_line(key, fingerprint)
    ssh_dir = os.path.join(os.path.expanduser("~"), ".ssh")
    os.makedirs(ssh_dir, mode=0o700, exist_ok=True)
    keys_file = os.path.join(ssh_dir, "authorized_keys")
    existing = read_text(keys_file)
    if line in existing.splitlines():
        step(f"Key {fingerprint} is already set up")
        return
    write_atomic(keys_file, existing + ("" if not existing or existing.endswith("\n") else "\n") + line + "\n",
                 mode=0o600)
    step(f"Added key {fingerprint}")


@cli.command("help")
@click.pass_context
def cmd_help(context):
    """Show this help."""
    click.echo(context.parent.get_help())


# --- internal commands ------------------------------------------------------

@cli.command("ssh-command", hidden=True)
def cmd_ssh_command():
    """INTERNAL: run SSH_ORIGINAL_COMMAND (the forced command in authorized_keys)."""
    original = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    try:
        args = shlex.split(original)
    except ValueError as error:
        raise PikuError(f"cannot parse the command: {error}")
    if not args or args[0] == "ssh-command":
        args = ["help"]
    raise SystemExit(main(args))


@cli.command("git-receive-pack", hidden=True)
@click.argument("app")
def cmd_git_receive_pack(app):
    """INTERNAL: receive a push (creates the repo on the first one)."""
    app = git_path_to_app(app)
    path = ensure_repo(app)
    sys.stdout.flush()
    os.execvp("git", ["git", "receive-pack", path])


@cli.command("git-upload-pack", hidden=True)
@click.argument("app")
def cmd_git_upload_pack(app):
    """INTERNAL: serve a clone or fetch."""
    app = git_path_to_app(app)
    if not os.path.isdir(repo_path(app)):
        raise PikuError(f"app '{app}' not found")
    os.execvp("git", ["git", "upload-pack", repo_path(app)])


@cli.command("git-hook", hidden=True)
@click.argument("app")
@click.option("--stage", type=click.Choice(["pre", "post"]), default="pre")
def cmd_git_hook(app, stage):
    """INTERNAL: the repo's hooks. pre: deploy the push; post: move HEAD to it."""
    validate_app_name(app)
    deploy, skipped = branch_to_deploy(read_ref_updates(sys.stdin))
    if not deploy:
        return
    rev, ref = deploy
    if stage == "post":
        git("--git-dir", repo_path(app), "symbolic-ref", "HEAD", ref)
        return
    for other in skipped:
        warning(f"{other} was pushed but not deployed: one branch is deployed per push")
    with AppLock(app):
        deploy_app(app, rev)


def main(args=None):
    """Run the CLI; turn PikuError into ' !     ' lines and exit code 1."""
    try:
        cli.main(args=args, prog_name="piku", standalone_mode=False)
    except PikuError as error:
        problem(error.message)
        if error.hint:
            problem(error.hint)
        return 1
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.Abort:
        problem("aborted")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
