#!/usr/bin/env python3
"""piku.py: the smallest PaaS you can trust, in one file.

Copy this file onto a Debian or Ubuntu host and run `python3 piku.py install --key KEY.pub`
as root (or by hand: `piku.py setup`, start the uWSGI emperor it configures, `piku.py
setup:ssh KEYFILE`), and `git push piku@host:APP main` deploys APP. The deploy runs in git's pre-receive hook: a deploy
that fails rejects the push, and the branch on the server stays at the release that is
live.

Python: 3.10 or newer. Dependencies: click and python-dotenv; psutil for `ps`. The
versions Debian 12 packages (click 8.1, python-dotenv 0.21, psutil 5.9) are enough.

Compatibility with upstream piku (github.com/piku/piku): the ~/.piku layout (apps/
repos/ envs/ data/ logs/ uwsgi/ uwsgi-available/ uwsgi-enabled/ nginx/ cache/), the
PIKU_ROOT override, the command names and arguments, the Procfile kinds and the ENV
keys keep working. Differences are deliberate and documented in docs/: failed deploys
reject the push, app names are refused rather than rewritten, PORT is stable across
deploys, settings can never inject lines into generated configs, and a new release gets
traffic only after a health check.

Code map -- one push, and the section that holds each step:
  git push -> sshd -> `ssh-command` (CLI: the command line is parsed once, exactly as it will
     run; a key limited to some apps is checked on that parse: ssh_invocation),
     `git-receive-pack` (Git plumbing)
  -> pre-receive hook `git-hook` (CLI): watch the client (ClientWatch: Errors and output), lock
     the app and finish what an interrupted command left (AppLock: The app; reconcile)
  -> deploy_app (Deploy pipeline, inside a DeployRecord of what it prints): checkout -> plan_release
     (Parsers; PORT and server names checked against the other apps) -> preflight
     -> build_release (Buildpacks, Interpreters: the first manifest in PYTHON_MANIFESTS picks
        uv, Poetry, Pipenv or requirements, a package.json alone the Node buildpack; dependencies
        go into a shared environment keyed by its fingerprint, the app's own packages into
        RELEASE.site) -> release
  -> activate: checked_vhost (render_nginx from NGINX_FILES, check_nginx_files, nginx -t) and
     plan_generation (Config writers render every file) -> start_beside (start_generation beside
     the live workers, check_generation, start_front) -> under the names lock: check_shared_names,
     record_release, write_vhost (guard_nginx_files first) -> switch_traffic (point_slots for the
     front and nginx alike, serve_vhost; drain_old: Process control, except for a push) ->
     obtain_certificate (ACME, when none is held for the names)
  -> keep_lock_until_branch_moves: the push returns; a process holds the lock until git has moved
     the branch, then drains the old workers (reconcile) and adds both to the deploy's record.
Entry points run this file through PIKU_LAUNCHER (cached bytecode; setup writes it).
`config:set`, `ps:scale`, `restart` and `rollback` take the same path from plan or activate on.

Sections, in order (search for the banner):
  Paths            every path derived from PIKU_ROOT; piku's own files (HOST_FILES); folder modes
  Errors and output  PikuError, step/notice/problem, DeployRecord, ClientWatch (a client that left)
  Parsers          Procfile, ENV, SCALING, names and settings: pure functions
  The app          an app's files and lock; what app code may write (APP_WRITES), opened without
                   links; the sandbox
  Buildpacks       uv, Poetry, Pipenv, requirements, Node (npm, pnpm, Yarn; assets of Python
                   apps), static, generic
  Interpreters     which Python an app gets, which one uWSGI embeds
  Config writers   uWSGI vassals, gunicorn, the front, the emperor, nginx vhosts (NginxReader), what
                   nginx's root master opens (NGINX_FILES), ACME
  Deploy pipeline  plan, build, release, start beside, check, switch; shared names; releases, rollback
  Process control  the emperor's vassals: start, stop, scale
  Git plumbing     hooks, receive-pack, the keeper of the lock
  Export           a kept release as an OCI image: one reproducible tar writer, layers on a base
  Doctor           host and app checks
  Install and update  `install` as root, `update` with a self-check
  CLI              click commands: thin
"""

import sys

if sys.version_info < (3, 10):
    sys.stderr.write(" !     piku.py needs Python 3.10 or newer; this is Python %s.\n"
                     " !     Run it with a newer python3 (Debian 12 and Ubuntu 22.04 ship one).\n"
                     % sys.version.split()[0])
    sys.exit(1)

import gc
_COLLECTING = gc.isenabled()
gc.disable()        # while the module loads (click, ~1,000 definitions): no collection finds garbage there (~1 ms)
import collections
import contextlib
import errno
import fcntl
import fnmatch
import functools
import glob
import grp
import inspect                 # (click imports it: free)
import io
import itertools
import os
import pwd
import re
import select
import shlex
import signal
import string
import struct
import time
import stat


class LazyModule:
    """A module imported when a command first uses it; its name is then bound to the module
    itself. Every piku process pays at start-up for what it imports, and most commands need
    none of these (issue 20: `--version` and `apps` in a few tens of milliseconds)."""

    def __init__(self, name):
        self.name = name

    def __getattr__(self, attribute):
        module = __import__(self.name)
        globals()[self.name] = module
        return getattr(module, attribute)


class LazyPattern:
    """A regular expression compiled when first used (compiling all of them cost every start-up 4 ms)."""

    def __init__(self, text, flags=0):
        self.text, self.flags = text, flags

    @functools.cached_property
    def compiled(self):
        return re.compile(self.text, self.flags)

    def __getattr__(self, attribute):
        return getattr(self.compiled, attribute)


class Factory:
    """A record field's default made anew for each instance: field(default_factory=dict)."""

    def __init__(self, make):
        self.make = make


def field(default_factory):
    return Factory(default_factory)


def record(cls=None, *, frozen=False):
    """A class of named fields -- what dataclasses.dataclass makes, without compiling three
    functions per class at import (5 ms of every piku start-up): __init__ takes the annotated
    fields in order, positionally or by name (a default after the name; a field() default made
    per instance), then runs __post_init__ if the class has one; __eq__ and __repr__ compare and
    show the fields; frozen=True refuses assignment and hashes by the fields (else unhashable)."""
    def make(cls):
        names = tuple(inspect.get_annotations(cls))
        defaults = {name: cls.__dict__[name] for name in names if name in cls.__dict__}
        for name, default in defaults.items():
            if isinstance(default, Factory):
                delattr(cls, name)
        cls.FIELDS = names

        def __init__(self, *args, **given):
            if len(args) > len(names) or set(given) & set(names[:len(args)]) or set(given) - set(names):
                raise TypeError(f"{cls.__name__}() takes the fields {', '.join(names)}, each once")
            given.update(zip(names, args))
            for name in names:
                if name not in given and name not in defaults:
                    raise TypeError(f"{cls.__name__}() needs {name}")
                value = given[name] if name in given else defaults[name]
                object.__setattr__(self, name, value.make() if isinstance(value, Factory) else value)
            if hasattr(self, "__post_init__"):
                self.__post_init__()

        def __setattr__(self, name, value):
            raise AttributeError(f"a {cls.__name__} cannot be changed (cannot assign to {name})")

        cls.__init__ = __init__
        cls.__eq__ = lambda self, other: (fields_of(self) == fields_of(other) if other.__class__ is self.__class__
                                          else NotImplemented)
        cls.__repr__ = lambda self: f"{cls.__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"
        cls.__hash__ = (lambda self: hash(fields_of(self))) if frozen else None
        if frozen:
            cls.__setattr__ = cls.__delattr__ = __setattr__
        return cls
    return make if cls is None else make(cls)


def fields_of(instance):
    return tuple(getattr(instance, name) for name in instance.FIELDS)


def replace_fields(instance, **changes):
    """A copy of a record with some fields changed (dataclasses.replace)."""
    return type(instance)(**{**dict(zip(instance.FIELDS, fields_of(instance))), **changes})


difflib = LazyModule("difflib")
hashlib = LazyModule("hashlib")
json = LazyModule("json")
shutil = LazyModule("shutil")
socket = LazyModule("socket")
subprocess = LazyModule("subprocess")
tempfile = LazyModule("tempfile")

try:
    import click
except ImportError:
    # A fresh host: `piku.py install` (as root) installs click with the rest; nothing else runs without it.
    if sys.argv[1:2] != ["install"] or os.geteuid() != 0:
        sys.stderr.write(" !     piku.py needs click (Debian's python3-click).\n"
                         " !     As root, run: python3 piku.py install  (or: apt-get install python3-click "
                         "python3-dotenv python3-psutil python3-watchdog)\n")
        sys.exit(1)
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "python3-click"],
                   env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"), check=False)
    try:
        import click
    except ImportError:
        sys.stderr.write(f" !     click is not importable by {sys.executable}.\n"
                         " !     Run the installer with Debian's Python: /usr/bin/python3 piku.py install\n")
        sys.exit(1)

PIKU_VERSION = "0.1.0"


##############################################################################
# Paths
##############################################################################

PIKU_SCRIPT = os.path.realpath(__file__)
# How piku's entry points (the forced command, the git hook, the daily job) run this file: they
# import it, so Python loads the bytecode setup cached beside it (__pycache__, checked against the
# source's hash: a piku.py copied over by hand is never run stale), where `python3 piku.py`
# compiles all of it on every call (55 ms). -I: no PYTHON* variable, user site or caller's folder
# decides what Python imports; piku's folder is not put on sys.path either.
# The file runs as __main__, as `python3 piku.py` runs it: any piku.py -- an earlier one that
# `update --revert` brings back too -- runs through it.
PIKU_LAUNCHER = ("import sys, importlib.util as u; name, path = sys.argv[1:3]; del sys.argv[1:3]; "
                 "spec = u.spec_from_file_location(name, path); main = u.module_from_spec(spec); "
                 "sys.modules[name] = main; spec.loader.exec_module(main)")


def piku_entry(*args):
    """The argv of an entry point of piku's that runs this piku.py with args."""
    return [sys.executable or SYSTEM_PYTHON, "-I", "-c", PIKU_LAUNCHER, "__main__", PIKU_SCRIPT, *args]


def cache_bytecode():
    """Compile this piku.py into the __pycache__ beside it, where the entry points' Python (-I:
    no PYTHONPYCACHEPREFIX) looks -> None, or why it could not."""
    import py_compile
    name = os.path.splitext(os.path.basename(PIKU_SCRIPT))[0]
    target = os.path.join(os.path.dirname(PIKU_SCRIPT), "__pycache__", f"{name}.{sys.implementation.cache_tag}.pyc")
    try:
        py_compile.compile(PIKU_SCRIPT, cfile=target, doraise=True, optimize=0,
                           invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    except (OSError, py_compile.PyCompileError) as error:
        return str(error)
    return None
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
ACME_WWW = os.path.join(PIKU_ROOT, "acme")        # http-01 answers: ACME_WWW/.well-known/acme-challenge/
UWSGI_ROOT = os.path.join(PIKU_ROOT, "uwsgi")
UWSGI_AVAILABLE = os.path.join(PIKU_ROOT, "uwsgi-available")
UWSGI_ENABLED = os.path.join(PIKU_ROOT, "uwsgi-enabled")
SANDBOX_ROOT = os.path.join(PIKU_ROOT, "sandbox")  # piku's records of app processes: no sandbox shows it
TMP_ROOT = os.path.join(PIKU_ROOT, "tmp")          # tmp/APP: the app's /tmp and /var/tmp in its sandbox
UV_CACHE_ROOT = os.path.join(PIKU_ROOT, "uv")      # uv/APP: the app's own uv cache (and npm's) and tool folder
TOOL_ROOT = os.path.join(PIKU_ROOT, "tools")       # tools/NAME-VERSION: Nodes, pnpm and Yarn piku installed
PIKU_DIRS = (APP_ROOT, CACHE_ROOT, DATA_ROOT, ENV_ROOT, GIT_ROOT, LOG_ROOT, NGINX_ROOT, RELEASE_ROOT,
             LOCK_ROOT, UWSGI_ROOT, UWSGI_AVAILABLE, UWSGI_ENABLED, ACME_WWW, SANDBOX_ROOT, TMP_ROOT, UV_CACHE_ROOT,
             TOOL_ROOT)

# Who may enter piku's folders. nginx (www-data, in the piku user's group) walks through the
# group's folders to what it serves -- the apps' sockets, release files, ACME answers -- and
# writes its cache; its root master opens vhosts, certificates and logs itself. Nothing else
# is the group's (settings, repos, data, records), and nothing is anyone else's. A folder
# below one of these gets its mode; GROUP_WRITES lists the exceptions nginx writes into.
FOLDER_MODES = {PIKU_ROOT: 0o750, RELEASE_ROOT: 0o750, UWSGI_ROOT: 0o750, ACME_WWW: 0o750, CACHE_ROOT: 0o750,
                APP_ROOT: 0o700, DATA_ROOT: 0o700, ENV_ROOT: 0o700, GIT_ROOT: 0o700, LOG_ROOT: 0o700,
                NGINX_ROOT: 0o700, LOCK_ROOT: 0o700, UWSGI_AVAILABLE: 0o700, UWSGI_ENABLED: 0o700,
                SANDBOX_ROOT: 0o700, TMP_ROOT: 0o700, UV_CACHE_ROOT: 0o700, TOOL_ROOT: 0o700}
GROUP_WRITES = (CACHE_ROOT,)        # cache/APP: nginx's proxy and uwsgi caches
UMASK = 0o027                       # files piku (and what it runs) creates: the group reads, others nothing

# piku's own files in folders that also hold an entry per app. Each is registered here, and no
# app may be named so that one of its entries would be one of these (reserved_app_names).
HOST_FILES = {}
# How each shared folder names an app's entry: '' the app's name itself, '.conf' APP.conf, ...
APP_ENTRIES = {APP_ROOT: ("",), CACHE_ROOT: ("",), DATA_ROOT: ("",), ENV_ROOT: ("",), GIT_ROOT: ("",),
               LOG_ROOT: ("",), RELEASE_ROOT: ("",), UWSGI_ROOT: ("",), LOCK_ROOT: (".lock", ".destroyed"),
               NGINX_ROOT: (".conf", ".crt", ".key", ".acme"), UWSGI_ENABLED: ("@",), SANDBOX_ROOT: ("@",),
               TMP_ROOT: ("",), UV_CACHE_ROOT: ("",)}


def host_file(folder, name):
    """The path of one of piku's own files in folder, registered so no app can be named like it."""
    HOST_FILES.setdefault(folder, set()).add(name)
    return os.path.join(folder, name)


EMPEROR_CONFIG = host_file(UWSGI_ROOT, "uwsgi.ini")
EMPEROR_PID = host_file(UWSGI_ROOT, "emperor.pid")
EMPEROR_LOG = host_file(UWSGI_ROOT, "uwsgi.log")
EMPEROR_OLD_LOG = host_file(UWSGI_ROOT, "uwsgi.old.log")
DAILY_VASSAL = host_file(UWSGI_ENABLED, "acme-renew.ini")
DAILY_LOG = host_file(LOG_ROOT, "acme-renew.log")
DAILY_OLD_LOG = host_file(LOG_ROOT, "acme-renew.log.old")
PROBES_CACHE = host_file(CACHE_ROOT, ".probes.json")
CLOUDFLARE_CACHE = host_file(CACHE_ROOT, ".cloudflare-ips.json")
NAMES_LOCK = host_file(LOCK_ROOT, ".names.lock")
NGINX_PATHS_CACHE = host_file(CACHE_ROOT, ".nginx-paths.json")    # what each vhost text names (a cache)
SANDBOX_WRAPPER = host_file(SANDBOX_ROOT, "vassal-wrapper")     # the emperor starts every vassal with it
WORKER_SECCOMP = host_file(SANDBOX_ROOT, "worker.seccomp")      # what no worker may do (seccomp_program)
TERMINAL_SECCOMP = host_file(SANDBOX_ROOT, "terminal.seccomp")  # ... nor `run` with a terminal
PROCESS_GUARD = host_file(SANDBOX_ROOT, "process-guard")        # outside a sandbox, ties a command to its master
NGINX_RELOAD_TRIGGER = host_file(NGINX_ROOT, ".reload")     # not *.conf: nginx never reads it
HOST_ENV = os.path.join(PIKU_ROOT, "piku.env")
SYSTEMD_FOLDER = os.path.join(PIKU_ROOT, "systemd")
NGINX_LOGS = host_file(NGINX_ROOT, "logs")      # nginx's logs of the apps: its root master opens them, so
APP_ENTRIES[NGINX_LOGS] = (".access.log", ".error.log")     # they live where no app process writes


@functools.lru_cache(maxsize=None)
def reserved_app_names():
    """The names an app may not have: one of its entries would be one of piku's own files.
    (Derived from HOST_FILES once, on first use: every host_file() is registered at import.)"""
    reserved = set()
    for folder, names in HOST_FILES.items():
        for name in names:
            for suffix in APP_ENTRIES.get(folder, ()):
                if suffix == "@":
                    reserved.update([name.split("@", 1)[0]] if "@" in name else [])
                elif name.endswith(suffix) and len(name) > len(suffix):
                    reserved.add(name[:len(name) - len(suffix)])
    return reserved


DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
UWSGI_LOG_MAXSIZE = "1048576"
KEEP_RELEASES = "5"       # PIKU_KEEP_RELEASES: releases kept with their code and environment
KEEP_DEPLOYS = "20"       # deploy records (output, steps, outcome) kept per app
ZERO_REV = "0" * 40


def current_user():
    """The name of the user piku runs as (the piku user, or root for `install`)."""
    return pwd.getpwuid(os.getuid()).pw_name


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


def runtime_dir(app):
    """The app's sockets, pidfiles and FIFOs: uwsgi/APP/ (one folder per generation of workers)."""
    return os.path.join(UWSGI_ROOT, app)


def generation_dir(app, gen):
    return os.path.join(UWSGI_ROOT, app, f"g{gen}")


def slot_path(app, slot, prefix="slot"):
    """A slot: a symlink to a live worker's socket (slot: HTTP, uslot: uwsgi protocol)."""
    return os.path.join(UWSGI_ROOT, app, f"{prefix}.{slot}.sock")


def vassal_file(app, unit, folder=UWSGI_ENABLED):
    """uwsgi-enabled/APP@UNIT.ini: '@' is in no app name, so one app's glob never matches another's."""
    return os.path.join(folder, f"{app}@{unit}.ini")


def nginx_log(app, kind):
    """nginx's access or error log of the app, in piku's own nginx/logs/ (never an app's folder)."""
    return os.path.join(NGINX_LOGS, f"{app}.{kind}.log")


def releases_file(app):
    return os.path.join(ENV_ROOT, app, "releases.json")


def deploys_dir(app):
    return os.path.join(ENV_ROOT, app, "deploys")


##############################################################################
# Errors and output
##############################################################################

class PikuError(Exception):
    """A problem the user can act on: what happened, and how to fix it."""

    def __init__(self, message, hint=None):
        super().__init__(message)
        self.message = message
        self.hint = hint


def step(message, timed=True):
    """A `-----> ` line. In a deploy, a timed step's line stays open until the step ends and
    then gets its duration: `-----> Starting wsgi.1 (0.4 s)`; when output came in between,
    the duration follows that output (`       done in 2.1 s`, from 0.1 s on)."""
    end_step()
    for record in DeployRecord.active:
        record.step(message)
    if timed and DeployRecord.active:
        shared = output_shared()
        click.echo(f"-----> {message}", nl=not shared)
        OpenStep.current = OpenStep(time.monotonic(), line_open=shared)
    else:
        click.echo(f"-----> {message}")


def output_shared():
    """Do stdout and stderr go to one place (git's side-band, a terminal)? Only then may a step's
    line stay open for its duration: on two pipes (ssh without a terminal) a warning written to
    stderr could reach the screen before the line's end and land on the same line."""
    try:
        out, err = os.fstat(sys.stdout.fileno()), os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (out.st_dev, out.st_ino) == (err.st_dev, err.st_ino)


@record
class OpenStep:
    """The step a deploy is in: when it began, and whether its line is still open."""
    started: float
    line_open: bool = True
    current = None      # the one OpenStep being shown (a class attribute, like DeployRecord.active)


def end_step():
    """Close the step being shown with its duration."""
    current, OpenStep.current = OpenStep.current, None
    if current is None:
        return
    seconds = time.monotonic() - current.started
    if current.line_open:
        click.echo(f" ({seconds:.1f} s)")
    elif seconds >= 0.1:
        click.echo(f"       done in {seconds:.1f} s")


def _break_step_line():
    """End the open step line before other output appears under it."""
    if OpenStep.current is not None and OpenStep.current.line_open:
        OpenStep.current.line_open = False
        click.echo("")


def notice(message):
    _break_step_line()
    click.echo(f"       {message}")


def problem(message):
    _break_step_line()
    for line in str(message).splitlines() or [""]:
        click.echo(f" !     {line}", err=True)


def warning(message):
    problem(f"warning: {message}")


class Output(io.TextIOBase):
    """stdout or stderr as piku writes to them: through to the real stream, keeping a copy when
    asked (what a deploy showed), and a reader that has gone (EPIPE) ends the command the way
    a hang-up does (ClientWatch) instead of failing a write half-way through a switch."""

    def __init__(self, stream, copy=None):
        self.stream, self.copy = stream, copy

    @property
    def encoding(self):         # what click checks before it writes to a stream as it is
        return self.stream.encoding

    @property
    def errors(self):
        return self.stream.errors

    def write(self, text):
        if isinstance(text, (bytes, bytearray)):       # click writes bytes to a stream's buffer
            if self.copy is not None:
                self.copy.append(bytes(text).decode(errors="replace"))
            return self._guarded(lambda: self.stream.buffer.write(text), len(text))
        if self.copy is not None:
            self.copy.append(text)
        return self._guarded(lambda: self.stream.write(text), len(text))

    def _guarded(self, action, size):
        try:
            return action()
        except BrokenPipeError:
            ClientWatch.left()
            return size

    @property
    def buffer(self):
        return self

    def flush(self):
        self._guarded(self.stream.flush, 0)

    def isatty(self):
        return self.stream.isatty()

    def fileno(self):
        return self.stream.fileno()


class ClientGone(BaseException):
    """The client that asked for this command went away (ssh hung up, git's channel closed)."""


class ClientWatch:
    """Ends a command whose client has gone: a thread notices that the reader of our output
    closed its end (git's side-band and sshd close it when the client disconnects; git sends a
    keepalive every few seconds, so a silent hook notices too), and SIGHUP means the same. The
    main thread then gets ClientGone, which unwinds the command (new workers stopped, its
    release: command killed, the lock released) -- except inside shielded(): a release that
    is already committed finishes its switch, with its output going nowhere."""
    shields = 0             # > 0: a hang-up does not end the command (shielded, hold)
    gone = False            # the client has gone, and ClientGone was raised
    thread = None           # the watching thread, and the Event that stops it
    stopping = None
    channel = None          # in git's hook: an fd on the pipe git writes to its client

    @classmethod
    def start(cls):
        signal.signal(signal.SIGHUP, cls._hung_up)
        try:
            kind = os.fstat(sys.stdout.fileno()).st_mode
        except (OSError, ValueError):
            return
        if stat.S_ISFIFO(kind) or stat.S_ISSOCK(kind):
            cls._start_thread()

    @classmethod
    def watch_client_of(cls, pid):
        """In git's pre-receive hook, our output goes to git, which keeps its end open even after
        its client has gone (its side-band thread dies on EPIPE; the pipe stays). The client is at
        the other end of git's own stdout: watch that (a pipe of sshd's or of `git push`'s)."""
        path = f"/proc/{pid}/fd/1"
        try:
            if not stat.S_ISFIFO(os.stat(path).st_mode):
                return          # a socket (some sshd builds): our own output is all there is to watch
            cls.channel = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            if error.errno == errno.ENXIO:      # nobody reads it: the client has gone already
                cls.left()
            return
        cls._start_thread()

    @classmethod
    def _start_thread(cls):
        if cls.thread is None:
            import threading
            cls.stopping = threading.Event()
            cls.thread = threading.Thread(target=cls._watch, name="client-watch", daemon=True)
            cls.thread.start()

    @classmethod
    def stop(cls):
        """No more watching (before a fork: the child must not start with a second thread)."""
        if cls.thread is not None:
            cls.stopping.set()
            cls.thread.join()
            cls.thread = None

    @classmethod
    def _watch(cls):
        while not output_gone() and not (cls.channel is not None and fd_gone(cls.channel)):
            if cls.stopping.wait(0.5):
                return
        silence_output()
        os.kill(os.getpid(), signal.SIGHUP)         # handled in the main thread, between two steps

    @classmethod
    def _hung_up(cls, signum, frame):
        cls.left()

    @classmethod
    def left(cls):
        """The client went: say nothing more, and end the command once (a second hang-up must
        not interrupt the cleanup the first one started)."""
        silence_output()
        if not cls.shields and not cls.gone:
            cls.gone = True
            raise ClientGone()

    @classmethod
    def hold(cls):
        """From here on the command finishes whatever happens to its client (its release has
        committed): a shield that is never lowered."""
        cls.shields += 1

    @classmethod
    @contextlib.contextmanager
    def shielded(cls):
        cls.shields += 1
        try:
            yield
        finally:
            cls.shields -= 1


def output_gone():
    """Has the reader of our output gone (an ssh client that disconnected)?"""
    try:
        return fd_gone(sys.stdout.fileno())
    except (OSError, ValueError):
        return False


def fd_gone(fd):
    """Has the other end of the pipe or socket fd been closed?"""
    poller = select.poll()
    poller.register(fd, 0)          # error events are always reported
    return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))


def silence_output():
    """The reader of our output has gone: write nothing more, not even at exit."""
    null = os.open(os.devnull, os.O_WRONLY)
    for fd in (1, 2):
        with contextlib.suppress(OSError):
            os.dup2(null, fd)
    os.close(null)


class DeployRecord:
    """What one deploy attempt showed the user, its steps' durations, its outcome and who
    started it, kept in envs/APP/deploys/ID.json (the last PIKU_KEEP_DEPLOYS, default 20).
    Everything a deploy prints goes through step/notice/problem, so a copy of sys.stdout and
    sys.stderr is what the user saw."""
    active = []

    def __init__(self, app, cause, before=()):
        self.app, self.cause, self.output, self.steps = app, cause, [], []
        self.before = before        # [what, when (monotonic)]: the processes that led to it (push_processes)

    def step(self, message):
        self.steps.append([message, time.monotonic()])

    def __enter__(self):
        self.started, self.when, self.epoch = time.monotonic(), time.strftime("%Y-%m-%d %H:%M:%S"), time.time()
        self.id = self.allocate()
        self.streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = Output(sys.stdout, self.output), Output(sys.stderr, self.output)
        DeployRecord.active.append(self)
        with contextlib.suppress(OSError):      # a full disk: the deploy itself matters more
            self.save("running")                # what a deploy killed with SIGKILL leaves
        return self

    def __exit__(self, kind, error, trace):
        end_step()
        DeployRecord.active.remove(self)
        sys.stdout, sys.stderr = self.streams
        if isinstance(error, PikuError):     # the lines main() is about to print
            self.output += [f" !     {line}\n" for line in (error.message, error.hint) if line]
        elif isinstance(error, ClientGone):
            self.output.append(" !     the client disconnected: the deploy was stopped, nothing live changed\n")
        elif error is not None:
            self.output.append(f" !     {'interrupted' if isinstance(error, KeyboardInterrupt) else repr(error)}\n")
        outcome = "ok" if error is None else "interrupted" if isinstance(error, (KeyboardInterrupt, ClientGone)) \
            else "failed"
        try:
            self.save(outcome)
        except OSError as problem_writing:      # a full disk: the deploy's own outcome matters more
            warning(f"the record of this deploy could not be written ({problem_writing.strerror}): "
                    f"'deploys {self.app}' will not show it")
        return False

    def allocate(self):
        """The next record's id; the oldest records beyond PIKU_KEEP_DEPLOYS go."""
        folder = make_folder(deploys_dir(self.app))
        ids = sorted(int(name[:-5]) for name in os.listdir(folder) if re.fullmatch(r"[0-9]+\.json", name))
        for old in ids[:max(0, len(ids) + 1 - int(KEEP_DEPLOYS))]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, f"{old}.json"))
        return (ids[-1] + 1) if ids else 1

    def add_after(self, message, started, ended):
        """A step that ran after the deploy returned (the old workers' drain, after a push; ended
        None: a moment). The record may be gone or unwritable: the step is then not shown."""
        path = os.path.join(deploys_dir(self.app), f"{self.id}.json")
        try:
            record = json.loads(read_text(path))
            record.setdefault("after", []).append([message, None if ended is None else round(ended - started, 3),
                                                   round(started - self.started, 3)])
            write_atomic(path, json.dumps(record, indent=1) + "\n", mode=0o600)
        except (OSError, ValueError, AttributeError):
            pass        # (a full disk, a record its save could not write: the deploy matters more)

    def save(self, outcome):
        """The record; its waterfall is every step with its start (seconds from this record's
        start: the processes before it, at negative offsets, and what the push left to finish
        after it returned: add_after) and its duration."""
        ended = time.monotonic()
        times = [start for _, start in self.steps] + [ended]
        record = {"id": self.id, "app": self.app, "when": self.when, "started": round(self.epoch, 3),
                  "cause": self.cause, "by": who_deploys(),
                  "outcome": outcome, "seconds": round(ended - self.started, 2), "output": "".join(self.output),
                  "steps": [[message, round(times[i + 1] - start, 3), round(start - self.started, 3)]
                            for i, (message, start) in enumerate(self.steps)],
                  "before": [[what, round(when - self.started, 3)] for what, when in self.before],
                  "process": process_identity(os.getpid())}
        write_atomic(os.path.join(deploys_dir(self.app), f"{self.id}.json"), json.dumps(record, indent=1) + "\n",
                     mode=0o600)


def push_processes(pid):
    """The processes that led to a deploy, oldest first, as [what, when (monotonic)]: the ssh
    connection (sshd's processes), piku's forced command and git-receive-pack, the hook -- so a
    record's waterfall starts where the push reached the host. To 10 ms: the kernel keeps a
    process's start in clock ticks."""
    chain, tick, previous = [], os.sysconf("SC_CLK_TCK"), None
    since_boot, now = time.clock_gettime(time.CLOCK_BOOTTIME), time.monotonic()
    while pid > 1 and len(chain) < 12:
        try:
            started, words = process_started(pid), (read_bytes(f"/proc/{pid}/cmdline") or b"").split(b"\0")
        except OSError:         # (a process of another user's, with /proc mounted hidepid)
            break
        # sshd's listener, or a connection shared since long before (ControlMaster): not this push's
        if started is None or b"[listener]" in b" ".join(words) or previous is not None and previous - started > 10 * tick:
            break
        what = process_role(words)
        if what:
            chain.append([what, now - (since_boot - started / tick)])
        pid, previous = parent_pid(pid), started
    return chain[::-1]


def process_role(words):
    """What a process of a push is, by its command line ('' for a shell or env between them)."""
    script = os.fsencode(PIKU_SCRIPT)
    if script in words:
        rest = words[words.index(script) + 1:]
        return "piku " + (rest[0].decode(errors="replace") if rest else "")
    name = os.path.basename(words[0]).decode(errors="replace") if words and words[0] else ""
    if name.startswith("sshd"):
        shown = re.sub(r"^sshd(-session)?: ", "", b" ".join(words).decode(errors="replace")).split()
        return "sshd " + (shown[0] if shown else "?")
    return "git-receive-pack" if name == "git-receive-pack" or name == "git" and b"receive-pack" in words else ""


def process_identity(pid):
    """[pid, its start time]: names one process, even after the PID is used again."""
    return [pid, process_started(pid)]


def process_started(pid):
    """When process pid started, in clock ticks since boot (/proc/PID/stat), or None when it is gone."""
    try:
        return int(read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def deploy_outcome(record):
    """A record's outcome; one still 'running' whose process is gone was interrupted (SIGKILL,
    a reboot)."""
    process = record.get("process")
    if record.get("outcome") == "running" and (not process or process_identity(process[0]) != process):
        return "interrupted"
    return record.get("outcome", "?")


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

APP_NAME = LazyPattern(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SETTING_KEY = LazyPattern(r"[A-Za-z_][A-Za-z0-9_]*")
PROCFILE_LINE = LazyPattern(r"([A-Za-z0-9][A-Za-z0-9_-]{0,63})\s*:\s*(.*)")    # kinds: at most 64 characters
CRON_FIELD = LazyPattern(r"\*|\*/[0-9]+|[0-9]+")
PROCFILE_LINE_MAX = 32768
CRON_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
CRON_NAMES = ("minute", "hour", "day of month", "month", "day of week")

WHOLE_NUMBER = LazyPattern(r"[0-9]+")                     # ASCII only: str.isdigit() accepts '²'
FRONT_SLOTS = 16        # the front spreads connections over this many socket slots (see Process control)
HTTP_APP_KINDS = ("wsgi", "asgi", "web")     # the app's own HTTP server: one of these at most


@record(frozen=True)
class WorkerKind:
    """What a kind of Procfile entry is, and how piku runs and checks it."""
    name: str
    template: str = ""          # the vassal template that runs it ("" for deploy phases)
    http: bool = False          # answers HTTP behind the app's front, on a socket of its own
    most: int = 0               # instances at most (0: no limit)
    daemon: bool = False        # its command runs as a uWSGI attach-daemon: if it exits, the check fails
    settle: bool = False        # no HTTP to ask: it passes by staying up through the settle time
    phase: bool = False         # runs once during a deploy (preflight, release), not as a worker


WORKER_KINDS = {kind.name: kind for kind in (
    WorkerKind("wsgi", "wsgi", http=True, most=FRONT_SLOTS),
    WorkerKind("wsgi-gunicorn", "gunicorn", http=True, most=FRONT_SLOTS, daemon=True),
    WorkerKind("asgi", "gunicorn", http=True, most=FRONT_SLOTS, daemon=True),
    WorkerKind("web", "web", http=True, most=FRONT_SLOTS, daemon=True),
    WorkerKind("static", "static", http=True, most=1),
    WorkerKind("cron", "cron", most=1),
    WorkerKind("worker", "worker", most=64, daemon=True, settle=True),
    WorkerKind("preflight", phase=True),
    WorkerKind("release", phase=True),
)}


def validate_app_name(name):
    """Return name if it is a valid app name; refuse it otherwise (never rewrite it)."""
    if not isinstance(name, str) or not APP_NAME.fullmatch(name) or ".." in name:
        raise PikuError(f"invalid app name {name!r}",
                        "App names start with a letter or digit and use only letters, digits, "
                        "'.', '_' and '-' (at most 64 characters).")
    if name in reserved_app_names():
        taken = sorted(reserved for reserved in reserved_app_names() if APP_NAME.fullmatch(reserved))
        raise PikuError(f"the app name {name!r} is taken by one of piku's own files",
                        f"Pick another name: {', '.join(taken)} are piku's.")
    return name


def is_app_name(name):
    try:
        return bool(validate_app_name(name))
    except PikuError:
        return False


def validate_setting(key, value, where="setting"):
    if not SETTING_KEY.fullmatch(key):
        raise PikuError(f"invalid {where} name {key!r}",
                        "Setting names are letters, digits and '_' and do not start with a digit.")
    if any(c in value for c in "\r\n\0"):
        raise PikuError(f"the value of {key} contains a line break or NUL character",
                        "Values must fit on one line; encode multi-line values (for example base64).")
    if value != value.rstrip(" \t\v\f"):
        raise PikuError(f"the value of {key} ends with a space or tab, which uWSGI's config format drops",
                        "Remove it, or end the value with another character.")
    if value.endswith("\\") and env_file_value(value).startswith("'"):
        raise PikuError(f"the value of {key} starts with a quote or a space, or holds ' #', and ends with a "
                        "backslash: a settings file cannot hold that (its reader ends no quoted value after a "
                        "backslash)", "End the value with another character, or drop what makes it need quotes.")


def parse_setting_arg(text):
    """KEY=VALUE from the command line -> (key, value)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise PikuError(f"malformed setting {text!r}", "Use KEY=VALUE, for example: config:set APP DEBUG=1")
    validate_setting(key, value)
    return key, value


@record
class Process:
    kind: str
    command: str
    line: int


def worker_class(kind):
    """Which row of WORKER_KINDS a Procfile name is (cron* is cron, unknown names are workers)."""
    if kind in WORKER_KINDS and kind != "wsgi-gunicorn":
        return kind
    if kind.startswith("cron"):
        return "cron"
    return "worker"


def worker_kind(kind, env=None):
    """The WorkerKind that runs Procfile entry `kind`; gunicorn serves wsgi when the build chose it."""
    name = worker_class(kind)
    if name == "wsgi" and (env or {}).get("WSGI_SERVER", "").lower() == "gunicorn":
        name = "wsgi-gunicorn"
    return WORKER_KINDS[name]


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
            if len(value) > 4 or not 1 <= int(value[2:]) <= high:
                raise PikuError(f"Procfile line {lineno}: cron {name} step {value!r} is out of range */1-*/{high}")
            fields.append(f"-{int(value[2:])}")
        elif len(value) > 2 or not low <= int(value) <= high:
            raise PikuError(f"Procfile line {lineno}: cron {name} {value} is out of range {low}-{high}")
        else:
            fields.append(value)
    return " ".join(fields), parts[5]


def parse_procfile(text):
    """Procfile text -> {kind: Process}. Malformed lines are errors naming the line."""
    processes = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        if len(raw) > PROCFILE_LINE_MAX:
            raise PikuError(f"Procfile line {lineno} is longer than {PROCFILE_LINE_MAX} characters",
                            "Put a long command in a script, commit it, and run that.")
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
    served = [kind for kind in HTTP_APP_KINDS if kind in processes]
    if len(served) > 1:
        lines = " and ".join(str(processes[kind].line) for kind in served)
        raise PikuError(f"Procfile lines {lines}: {' and '.join(repr(kind) for kind in served)} cannot both be "
                        "used; they would share one PORT", "Keep one of them.")
    if "static" in processes and served and served[0] != "wsgi":
        raise PikuError(f"Procfile line {processes['static'].line}: 'static' next to '{served[0]}' is not supported",
                        f"Serve the files from the {served[0]} process, or use 'wsgi', which serves them alongside.")


def static_relative(command):
    """The folder a 'static:' line names, relative to the app."""
    return command.strip().strip("/") or "."


def static_path(command, root):
    """The folder a 'static:' line names, with every symlink resolved."""
    return os.path.realpath(os.path.join(root, static_relative(command)))


def static_folder(command, lineno, root, built=True):
    """The folder a 'static:' line serves, with every symlink resolved, checked to be inside
    the app. Workers are given this resolved path, so what is checked is what is served. Before
    the build (built False) it need not exist yet: a build script may make it (`static: dist`)."""
    folder = static_path(command, root)
    if not inside(folder, root):
        raise PikuError(f"Procfile line {lineno}: static folder {command!r} is outside the app",
                        "Serve a folder of the app (symlinks that lead out of it are refused).")
    if built and not os.path.isdir(folder):
        raise PikuError(f"Procfile line {lineno}: static folder {command!r} does not exist in the pushed code, "
                        "nor did the build make it", "Commit the folder (or have the build script write it), "
                        "or fix the path in the Procfile.")
    return folder


STATIC_PREFIX = LazyPattern(r"/[A-Za-z0-9._~/-]*")


def static_paths(env, root):
    """NGINX_STATIC_PATHS ('/static/:staticfiles,/media/:media') -> [(URL prefix, folder)]: each
    folder resolved and kept inside the release. uWSGI serves them beside a wsgi app."""
    paths = []
    for entry in comma_list(env.get("NGINX_STATIC_PATHS")):
        prefix, sep, folder = entry.partition(":")
        if not sep or not STATIC_PREFIX.fullmatch(prefix) or ".." in prefix.split("/") or not folder.strip():
            raise PikuError(f"NGINX_STATIC_PATHS entry {entry!r} is not '/url/prefix/:folder'",
                            "Write it like: NGINX_STATIC_PATHS=/static/:staticfiles,/media/:media")
        if folder.strip().startswith("/"):
            raise PikuError(f"NGINX_STATIC_PATHS folder {folder.strip()!r} is an absolute path",
                            "Name a folder of the app, relative to its root: /static/:staticfiles")
        resolved = os.path.realpath(os.path.join(root, folder.strip()))
        if not NGINX_SAFE_PATH.fullmatch(resolved):
            raise PikuError(f"NGINX_STATIC_PATHS folder {folder!r} has characters piku does not write into "
                            "a web server's config", "Use letters, digits and . _ - / in folder names.")
        if not inside(resolved, root):
            raise PikuError(f"NGINX_STATIC_PATHS folder {folder!r} is outside the app",
                            "Serve a folder of the app (symlinks that lead out of it are refused).")
        paths.append((prefix.rstrip("/") + "/", resolved + "/"))
    return paths


def parse_env_text(text, source, skip_bad=False):
    """dotenv text -> list of (key, value). Errors name the file and the line (skip_bad: each
    is a warning, and the line is left out -- to repair a damaged settings file)."""
    from dotenv.parser import parse_stream
    pairs = []
    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line
        try:
            if binding.error:
                raise PikuError(f"{source} line {line} cannot be parsed: {binding.original.string.strip()[:80]!r}",
                                "Use KEY=value lines; quote values with spaces or '#'.")
            if binding.key is None or binding.value is None:
                continue
            try:
                validate_setting(binding.key, binding.value, where=f"{source} line {line}: setting")
            except PikuError as error:
                raise PikuError(f"{source} line {line}: {error.message}", error.hint)
        except PikuError as error:
            if not skip_bad:
                raise
            warning(f"{error.message}: it is left out (set the setting again with config:set)")
            continue
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
    return "".join(f"{key}={env_file_value(settings[key])}\n" for key in sorted(settings))


def env_file_value(value):
    """A value as a dotenv line carries it: as it is where the reader keeps it so (it strips
    spaces around it and a ' #' comment, and reads a leading quote as quoting), else in single
    quotes with \\ and \' -- which the reader cannot end after a backslash (validate_setting
    refuses such a value)."""
    if value == value.strip() and not value.startswith(("'", '"')) and not re.search(r"\s#", value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


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
    return [kind for kind in processes if not worker_kind(kind).phase
            and not (kind == "static" and "wsgi" in processes)]


def parse_scale_args(args, processes):
    """['web=2', ...] -> {kind: count}, checked against the Procfile."""
    counts = {}
    for arg in args:
        kind, sep, count = arg.partition("=")
        if not sep or not WHOLE_NUMBER.fullmatch(count) or len(count) > 9:
            raise PikuError(f"malformed scaling {arg!r}", "Use KIND=COUNT, for example: ps:scale APP web=2")
        if kind not in scaling_for_kinds(processes):
            raise PikuError(f"the app has no '{kind}' worker",
                            "Workers: " + (", ".join(sorted(scaling_for_kinds(processes))) or "none"))
        most = worker_kind(kind).most
        if most and int(count) > most:
            raise PikuError(f"'{kind}' runs at most {'one instance' if most == 1 else f'{most} instances'}",
                            "Give each instance more processes instead (UWSGI_PROCESSES, GUNICORN_WORKERS)."
                            if most > 1 else None)
        counts[kind] = int(count)
    return counts


##############################################################################
# The app
##############################################################################

def require_app(app):
    """Validate the name and check the app exists (a destroy it committed to is finished first)."""
    validate_app_name(app)
    finish_destroy_left(app)
    if not app_exists(app):
        raise PikuError(f"app '{app}' not found",
                        "List apps with 'apps'; push with 'git push piku main' to create one.")
    return app


def app_exists(app):
    """Does the app exist: its repo or its apps/APP link, and no destroy committed to?"""
    return not is_destroyed(app) and (os.path.isdir(repo_path(app)) or os.path.lexists(app_path(app)))


def read_text(path, default=""):
    try:
        with open(path, encoding="utf-8") as handle:
            return handle.read()
    except FileNotFoundError:
        return default


PUSHED_TEXT_MAX = 256 * 1024        # Procfile, ENV, .python-version, pyproject.toml
PUSHED_LOCK_MAX = 64 * 1024 * 1024  # lock files piku only fingerprints


def inside(path, root):
    """Is path, with every symlink followed, root or something inside it? (A path no file can
    have -- a NUL, text that is not UTF-8 -- is inside nothing.)"""
    try:
        real_root = os.path.realpath(root)
        return os.path.commonpath([os.path.realpath(path), real_root]) == real_root
    except (ValueError, UnicodeError):
        return False


def read_pushed_bytes(root, name, limit, head=False):
    """A file of the pushed tree, or None when there is none. It must stay inside the release
    once symlinks are followed and be a regular file of at most limit bytes (head: its first limit
    bytes, whatever its size); it is opened without blocking, so a link to a FIFO or a device is
    refused instead of hanging or filling memory."""
    path = os.path.join(root, name)
    if not os.path.lexists(path):
        return None
    if not inside(path, root):
        raise PikuError(f"{name} in the pushed code is a link to a file outside the app",
                        f"Commit {name} itself, not a symlink to it.")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as error:
        raise PikuError(f"{name} in the pushed code cannot be read: {error.strerror}")
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):      # (before fdopen, which refuses a folder with a traceback)
        os.close(fd)
        raise PikuError(f"{name} in the pushed code is not a regular file", f"Commit {name} as a plain file.")
    with os.fdopen(fd, "rb") as handle:
        if info.st_size > limit and not head:
            raise PikuError(f"{name} in the pushed code is {info.st_size} bytes; piku reads at most {limit}")
        return handle.read(limit + 1)[:limit]


# --- files in folders app code can write --------------------------------------------
# An app's processes write into logs/APP/, uwsgi/APP/ (sockets, pidfiles, FIFOs) and data/APP/,
# so they can put a symlink (or a FIFO, a socket) where piku expects its own file. Everything
# piku opens, reads, signals or connects to there goes through open_app_file or
# app_socket_path: no component below piku's own folder is followed if it is a link, and
# the file must be of the kind piku expects.

APP_WRITABLE = (LOG_ROOT, UWSGI_ROOT, DATA_ROOT, TMP_ROOT, UV_CACHE_ROOT)
# The one list of what app code may write: (piku's folder, the components below it, the first
# being the app), for every folder a sandbox view may show read-write. View refuses any other,
# and nothing nginx's root master opens may lie in one (check_nginx_files).
APP_WRITES = ((UWSGI_ROOT, ("g*",)), (LOG_ROOT, ("g*",)), (DATA_ROOT, ()), (TMP_ROOT, ()), (UV_CACHE_ROOT, ()),
              (RELEASE_ROOT, ("*",)), (ENV_ROOT, ("python-*",)), (ENV_ROOT, ("node-*",)))


@functools.lru_cache(maxsize=None)
def path_forms(folder):
    """A folder of piku's as written and with its links resolved (a sysadmin may have linked
    ~/.piku, or a folder above it, to another disk)."""
    return tuple(dict.fromkeys((folder, os.path.realpath(folder))))


def app_may_write(path, app=None):
    """Is path (as written: links are not followed) a folder the code of app (None: of any app)
    may write, or below one?"""
    path = os.path.normpath(path)
    for root, below in ((form, below) for folder, below in APP_WRITES for form in path_forms(folder)):
        if not path.startswith(root + os.sep):
            continue
        parts = path[len(root) + 1:].split(os.sep)
        if len(parts) > len(below) and (app is None or parts[0] == app) \
                and all(fnmatch.fnmatchcase(part, pattern) for part, pattern in zip(parts[1:], below)):
            return True
    return False


def inside_app_folder(path):
    """Is path below an app's own folder in a folder app code writes (not that folder itself)?"""
    try:
        return len(split_app_path(path)[1]) >= 2
    except ValueError:
        return False


def split_app_path(path):
    """(piku's own folder, the components below it) of a path in a folder app code writes (or
    nginx's logs, which piku reads the same careful way)."""
    for root in (*APP_WRITABLE, NGINX_LOGS):
        if path.startswith(root + os.sep):
            return root, [part for part in path[len(root) + 1:].split(os.sep) if part]
    raise ValueError(f"{path} is not in a folder app code writes")


def _open_parent_nofollow(path):
    """An fd of path's folder, reached without following a link below piku's own folder."""
    root, parts = split_app_path(path)
    folder = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for depth, part in enumerate(parts[:-1]):
            # the app's own folder may be a sysadmin's link (data/APP on another disk); below it, none
            nofollow = os.O_NOFOLLOW if depth else 0
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | nofollow | os.O_CLOEXEC, dir_fd=folder)
            os.close(folder)
            folder = inner
    except BaseException:
        os.close(folder)
        raise
    return folder, parts[-1]


def open_app_file(path, flags=os.O_RDONLY, kind=stat.S_ISREG):
    """Open path, in a folder app code writes, without following any link on the way and
    only if it is of kind (a regular file, a FIFO) and has no other name (a hard link to a file
    elsewhere is a link too). -> fd. OSError otherwise (ELOOP for a link, EINVAL for another
    kind of file or a second name)."""
    folder, name = _open_parent_nofollow(path)
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    finally:
        os.close(folder)
    info = os.fstat(fd)
    if not kind(info.st_mode) or (stat.S_ISREG(info.st_mode) and info.st_nlink != 1):
        os.close(fd)
        raise OSError(errno.EINVAL, "not the kind of file piku expects there", path)
    return fd


def read_app_file(path, limit=1024 * 1024):
    """The text of a small file in a folder app code writes ('' when it cannot be read so)."""
    try:
        fd = open_app_file(path)
    except OSError:
        return ""       # missing (not written yet, or gone) or not ours to read: callers take '' as nothing
    with os.fdopen(fd, "rb") as handle:
        return handle.read(limit).decode(errors="replace")


@contextlib.contextmanager
def app_socket_path(path):
    """A path to connect to the unix socket at path (in a folder app code writes) that leads
    through piku's own folders only: /proc/self/fd/N/NAME, N being that folder reached without
    following links, NAME checked to be a socket. OSError when it is not one."""
    folder, name = _open_parent_nofollow(path)
    try:
        if not stat.S_ISSOCK(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
            raise OSError(errno.ENOTSOCK, "not a socket", path)
        yield f"/proc/self/fd/{folder}/{name}"
    finally:
        os.close(folder)


def log_tail(path, count):
    """The last count lines of a log in a folder app code writes ([] when it cannot be read so)."""
    try:
        fd = open_app_file(path)
    except OSError:
        return []       # as read_app_file: no log to show is shown as none
    try:
        return tail_lines(fd, count)[0]
    finally:
        os.close(fd)


def tail_lines(fd, count, most=8 * 1024 * 1024):
    """The last count lines of the file open at fd, read from its end: a 1 GiB log costs the
    lines asked for, not the file (at most `most` bytes are read). -> (lines, the end offset)"""
    end = os.lseek(fd, 0, os.SEEK_END)
    data, position = b"", end
    while position > 0 and data.count(b"\n") <= count and end - position < most:
        size = min(65536, position)
        position -= size
        data = os.pread(fd, size, position) + data
    lines = data.decode(errors="replace").splitlines()
    if position > 0 and lines:
        lines = lines[1:]       # the first one is cut
    return (lines[-count:] if count else []), end


def read_pushed_text(root, name, limit=PUSHED_TEXT_MAX):
    """read_pushed_bytes, as UTF-8 text ('' when there is no such file)."""
    data = read_pushed_bytes(root, name, limit)
    if data is None:
        return ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise PikuError(f"{name} line {line} is not UTF-8 text (byte 0x{data[error.start]:02x})",
                        f"Save {name} as UTF-8, commit, and push again.")


def pushed_folder_files(root, folder):
    """The files below a folder of the pushed tree (paths relative to root, sorted): that folder,
    each folder on the way to it and every folder below it must be a real folder -- a link to a
    folder is refused, so nothing outside the release is ever listed or read."""
    parts = folder.split("/")
    for count in range(1, len(parts) + 1):
        if os.path.islink(os.path.join(root, *parts[:count])):
            link = "/".join(parts[:count])
            raise PikuError(f"{link} in the pushed code is a link", f"Commit {link} itself, and push again.")
    if not os.path.isdir(os.path.join(root, folder)):
        return []
    found = []
    for parent, folders, names in os.walk(os.path.join(root, folder)):
        linked = [name for name in folders if os.path.islink(os.path.join(parent, name))]
        if linked:
            relative = os.path.relpath(os.path.join(parent, linked[0]), root)
            raise PikuError(f"{relative} in the pushed code is a link to a folder",
                            f"Commit what is in {relative} itself, and push again.")
        found += [os.path.relpath(os.path.join(parent, name), root) for name in names]
    return sorted(found)


def folder_mode(path):
    """The mode of a folder of piku's: that of the registered folder it is (or lies below)."""
    for root in sorted(FOLDER_MODES, key=len, reverse=True):
        if path == root or path.startswith(root + os.sep):
            if path != root and root in GROUP_WRITES:
                return 0o770
            return FOLDER_MODES[root]
    return None


def make_folder(path):
    """Create path and its missing parents. Below PIKU_ROOT each gets the mode its place gives it
    (FOLDER_MODES, whatever the umask), and a link found where one of piku's folders goes inside
    an app's folder that its code writes (logs/APP/..., uwsgi/APP/..., data/APP/...) is removed,
    never followed -- for every component, not only the last. (logs/APP or data/APP themselves
    may be a sysadmin's link to another disk: app code cannot write their parent.) Outside
    PIKU_ROOT, as os.makedirs."""
    path = os.path.abspath(path)
    if folder_mode(path) is None:
        os.makedirs(path, exist_ok=True)
        return path
    parent = os.path.dirname(path)
    if folder_mode(parent) is not None:
        make_folder(parent)
    if os.path.islink(path) and inside_app_folder(path):
        os.unlink(path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        if not os.path.isdir(path):
            raise
        return path
    os.chmod(path, folder_mode(path))
    return path


WRITES = itertools.count(1)        # piku's writes in this process, for PIKU_TEST_WRITE_FAILS's #N


def test_write_fault(path):
    """The tests' full disk (PIKU_TEST_WRITE_FAILS, tests only): the writes it names -- by the
    file's name, or '#N', the Nth write of this process -- fail with ENOSPC; PIKU_TEST_WRITE_LOG
    lists every write, so a test can fail each in turn."""
    number = next(WRITES)
    log = os.environ.get("PIKU_TEST_WRITE_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as out:
            out.write(f"{number} {path}\n")
    if {os.path.basename(path), f"#{number}"} & set(os.environ.get("PIKU_TEST_WRITE_FAILS", "").split(",")):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def fsync_folder(folder):
    """A new name in folder (a rename, a link) survives a crash once this returns."""
    handle = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def write_atomic(path, text, mode=0o644, mtime=None):
    """Write text (or bytes) to path durably: a temporary file, fsynced, renamed over path, and
    its folder fsynced -- after a crash path holds the old text or the new one, never less."""
    if not isinstance(text, bytes):
        text = text.encode("utf-8")
    test_write_fault(path)
    directory = os.path.dirname(path)
    make_folder(directory)
    handle, temp = tempfile.mkstemp(dir=directory, prefix=".tmp-")     # a new file (O_EXCL): no link followed
    try:
        os.fchmod(handle, mode)
        with os.fdopen(handle, "wb") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        if mtime is not None:
            os.utime(temp, (mtime, mtime))
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.unlink(temp)
        raise
    fsync_folder(directory)


def write_link(path, target, durable=True):
    """Make path a symbolic link to target in one step (a temporary link renamed over it), and
    durably unless it is runtime state that is rebuilt after a restart anyway."""
    test_write_fault(path)
    temp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.piku-new")
    if os.path.lexists(temp):
        os.unlink(temp)
    os.symlink(target, temp)
    os.replace(temp, path)
    if durable:
        fsync_folder(os.path.dirname(path))


def load_config(app, repair=False):
    """The settings made with config:set, as a dict (no expansion; repair: lines that cannot be
    read are left out, with a warning, so config:set and config:unset can mend the file)."""
    return dict(parse_env_text(read_text(config_file(app)), "settings (config:set)", skip_bad=repair))


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
        "USER": current_user(),
        "PATH": clean_path(os.environ.get("PATH") or DEFAULT_PATH),
        "LOG_ROOT": LOG_ROOT,
        "DATA_ROOT": os.path.join(DATA_ROOT, app),
        "BIND_ADDRESS": "127.0.0.1",
        "PIKU_ROOT": PIKU_ROOT,
        "LANG": "C.UTF-8",      # settings are UTF-8: Python under uWSGI reads os.environ as the locale says
    }


def clean_path(path):
    """PATH without duplicates and without the git-core folder git adds for its hooks."""
    entries = []
    for entry in path.split(":"):
        if entry and entry not in entries and not entry.rstrip("/").endswith("/git-core"):
            entries.append(entry)
    return ":".join(entries)


@contextlib.contextmanager
def flocked(path):
    """An flock on one of piku's lock files, for something all apps share (PORT and server
    names, authorized_keys); held for a moment, dropped by the kernel if the holder dies."""
    make_folder(os.path.dirname(path))
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


class AppLock:
    """One change per app at a time (push, config, scale, restart, rollback, destroy).

    The lock is an flock on locks/APP.lock; the kernel drops it when the holder dies, so a
    killed deploy never leaves the app locked. A push hands it to a keeper process that holds
    it until git has moved the branch (see keep_lock_until_branch_moves)."""

    def __init__(self, app):
        self.path = os.path.join(LOCK_ROOT, app + ".lock")
        self.handle = None
        self.handed_over = False

    def __enter__(self):
        make_folder(LOCK_ROOT)
        self.handle = open(self.path, "a")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            step("Waiting for another change of this app to finish")
            fcntl.flock(self.handle, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if not self.handed_over:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
        self.handle.close()


# --- the sandbox ------------------------------------------------------------------
# Every process of an app's code -- its build, preflight: and release:, workers of every kind,
# cron and `run` -- runs in the app's own view of the host, made by bubblewrap without root: new
# user, PID, IPC, UTS and mount namespaces, the system read-only, a cleared environment plus the
# app's own, and of ~/.piku only the app's own folders. sandbox_command() is the one place a
# view becomes a command; piku's own processes (the hook, the front, doctor) stay outside.
#   worker   the release, its site folder and environment read-only; its generation's runtime
#            folder (sockets, pidfile, FIFO) and logs, and the app's data, read-write
#   build    the release, the new environment and site folder, and the app's uv cache read-write
#   release  (preflight: and release:) the release and the data read-write
#   run      the data read-write
# piku's records of what it starts live in SANDBOX_ROOT, which no view shows: a vassal's view
# (APP@UNIT.view: bwrap's arguments; APP@UNIT.host: one of piku's own, run as it is), bwrap's
# report of its real PID (APP@UNIT.info), gunicorn configs, generation records. The emperor
# starts every vassal through SANDBOX_WRAPPER, which starts none that piku did not describe.

SANDBOX_MODES = ("required", "auto", "off")     # PIKU_SANDBOX, a host setting (piku.env)
SANDBOX_MARK = "/run/piku-sandbox"              # exists only inside a sandbox: a vassal checks it
BWRAP_COPY = "/usr/local/lib/piku/bwrap"        # install's copy where AppArmor restricts user namespaces
SYSTEM_FOLDERS = ("/usr", "/etc", "/opt", "/sys")
MERGED_USR = ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
HOME_TOOLS = (".local/bin", ".local/share/uv", ".local/share/pipx", ".local/pipx", ".config/uv", ".config/pip",
              ".config/pypoetry")


@record(frozen=True)
class View:
    """What one process of an app sees besides the system: paths bound at their own place."""
    app: str
    write: tuple = ()       # read-write
    read: tuple = ()        # read-only
    links: tuple = ()       # (target, path): symlinks made at path
    cwd: str = ""           # where it starts (bwrap sets PWD to it); else where its caller is
    terminal: bool = False  # keeps the caller's terminal session (run with a terminal: ^C reaches it)
    binds: tuple = ()       # (source, path): a folder it writes, also shown read-write at path (an
                            # empty folder in one it writes): a build's node_modules inside its release

    def __post_init__(self):
        stray = [path for path in (*self.write, *(source for source, _ in self.binds))
                 if not app_may_write(path, self.app)]
        stray += [path for _, path in self.binds if not any(path.startswith(folder + os.sep) for folder in self.write)]
        if stray:       # a bug of piku's: every writable folder is one of APP_WRITES
            raise ValueError(f"a view of {self.app} would write {stray}, which APP_WRITES does not list")


def sandbox_mode():
    mode = host_setting("PIKU_SANDBOX", "auto").strip().lower() or "auto"
    if mode not in SANDBOX_MODES:
        raise PikuError(f"the host setting PIKU_SANDBOX={mode!r} is not one of {', '.join(SANDBOX_MODES)}",
                        f"Fix it in {HOST_ENV}: PIKU_SANDBOX=auto")
    return mode


def bwrap_binary():
    """The host's PIKU_BWRAP, else piku's own copy (an AppArmor profile lets only it make user
    namespaces), else bubblewrap's -- None when there is none."""
    configured = host_setting("PIKU_BWRAP").strip()
    if configured:
        return configured if os.path.isabs(configured) and os.access(configured, os.X_OK) else None
    return BWRAP_COPY if os.access(BWRAP_COPY, os.X_OK) else shutil.which("bwrap", path=DEFAULT_PATH)


@functools.lru_cache(maxsize=None)
def bwrap_options():
    """The options this bubblewrap knows (Ubuntu 22.04's 0.6 has no --disable-userns), asked once
    per bwrap binary (cached_probe)."""
    bwrap = bwrap_binary()
    if not bwrap:
        return frozenset()
    def ask():
        result = subprocess.run([bwrap, "--help"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
        return sorted(set(re.findall(r"^\s+(--[a-z-]+)", result.stdout + result.stderr, re.M))) or None
    return frozenset(cached_probe(["bwrap options", bwrap, stat_key(bwrap)], ask) or ())


@functools.lru_cache(maxsize=None)
def sandbox_problem(fresh=False):
    """Why no sandbox starts here as this user -> (why, fix), or None when one does (fresh: try
    it now, as doctor does, whatever was remembered)."""
    bwrap = bwrap_binary()
    if not bwrap and host_setting("PIKU_BWRAP").strip():
        return (f"PIKU_BWRAP={host_setting('PIKU_BWRAP').strip()} is no program piku can run",
                f"Fix PIKU_BWRAP in {HOST_ENV} (an absolute path), or remove it to use bubblewrap's")
    if not bwrap:
        return "bubblewrap is not installed", "As root: apt-get install bubblewrap (piku.py install does it)"
    # a sandbox that started is remembered while nothing it depends on changed (this boot, the
    # binary, the user, the kernel's settings for user namespaces): a push saves the ~6 ms
    key = ["sandbox starts", bwrap, stat_key(bwrap), os.geteuid(), read_text("/proc/sys/kernel/random/boot_id"),
           *(read_text(f"/proc/sys/{name}") for name in USERNS_SYSCTLS)]
    problems = []
    def probe():
        problems.append(probe_sandbox(bwrap))
        return None if problems[-1] else True
    if fresh:
        key.append(time.time())
    return None if cached_probe(key, probe) else problems[-1]


USERNS_SYSCTLS = ("user/max_user_namespaces", "kernel/unprivileged_userns_clone",
                  "kernel/apparmor_restrict_unprivileged_userns")


def probe_sandbox(bwrap):
    """Start the smallest sandbox as this user -> (why, fix) when it does not start, else None."""
    try:
        result = subprocess.run([bwrap, *view_args(View("")), "--", "/bin/true"], capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, env={"PATH": DEFAULT_PATH}, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bubblewrap did not run: {error}", "Check the bubblewrap package: apt-get install --reinstall bubblewrap"
    if result.returncode == 0:
        return None
    said = f"bwrap says: {last_line(result.stderr)}"
    if read_text("/proc/sys/user/max_user_namespaces").strip() == "0":
        return (f"user namespaces are turned off (user.max_user_namespaces=0); {said}",
                "As root: echo user.max_user_namespaces=15000 > /etc/sysctl.d/90-piku.conf && sysctl --system")
    if read_text("/proc/sys/kernel/unprivileged_userns_clone").strip() == "0":
        return (f"unprivileged user namespaces are turned off (kernel.unprivileged_userns_clone=0); {said}",
                "As root: echo kernel.unprivileged_userns_clone=1 > /etc/sysctl.d/90-piku.conf && sysctl --system")
    if read_text("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").strip() == "1" and bwrap != BWRAP_COPY:
        return (f"AppArmor restricts user namespaces on this host (Ubuntu 24.04 and later); {said}",
                f"As root: python3 {PIKU_SCRIPT} install --user {current_user()}  (it installs {BWRAP_COPY} "
                "and an AppArmor profile for it)")
    return said, "Run doctor as the piku user; docs/SECURITY.md lists what the sandbox needs"


def app_sandboxed(app, workers=False):
    """Will the app's code (its workers, with workers) run in its sandbox? Refuses (PikuError)
    where it must and cannot: PIKU_SANDBOX=required, or a key limited to some apps; says so
    loudly where it may not."""
    mode, problem = sandbox_mode(), None
    if mode != "off":
        problem = sandbox_problem() or (emperor_problem() if workers else None)
        if not problem:
            return True
    why, fix = problem or ("PIKU_SANDBOX=off on this host", f"Remove PIKU_SANDBOX=off from {HOST_ENV}")
    if mode == "required" or key_apps() is not None:
        demand = "PIKU_SANDBOX=required" if mode == "required" else "a key limited to some apps"
        raise PikuError(f"{app}'s code must run in its sandbox ({demand}), and it cannot: {why}. Nothing was changed",
                        fix)
    warn_unsandboxed(app, why, fix)
    return False


@functools.lru_cache(maxsize=None)
def warn_unsandboxed(app, why, fix):
    warning(f"NO SANDBOX: {app}'s code runs as the piku user and can read and change every app's files, and "
            f"the files nginx's root master opens: {why}")
    warning(fix)


def running_emperor():
    """The PID of this PIKU_ROOT's emperor: its pidfile, or -- set up by a piku.py that wrote none
    -- the process of this user running `uwsgi --ini` with its config (0: none)."""
    pid = pidfile_pid(EMPEROR_PID)
    if pid and pid_alive(pid):
        return pid
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                words = handle.read().split(b"\0")
        except OSError:
            continue        # gone meanwhile
        if os.fsencode(EMPEROR_CONFIG) in words and b"--ini" in words and b"uwsgi" in os.path.basename(words[0]):
            return int(entry)
    return 0


def emperor_problem():
    """Why the running emperor would start vassals outside piku's wrapper -> (why, fix), or None.
    (An emperor that is not running is the health check's to report.)"""
    pid = running_emperor()
    if not pid or emperor_runs_wrapper(pid):
        return None
    fix, as_root = restart_emperor_fix()
    setup = "" if f"emperor-wrapper = {SANDBOX_WRAPPER}" in read_text(EMPEROR_CONFIG) else \
        f"as the piku user, {piku_command('setup')}; then "
    return ("the uWSGI emperor runs without piku's vassal wrapper (it started before this piku.py set it up)",
            f"Restart the emperor: {setup}{'as root, ' if as_root else ''}{fix}")


def sandbox_command(view, args, seccomp=None, settings=None):
    """args as they run in the app's view: bubblewrap, the view, then args. seccomp: the fd of a
    program for bwrap --seccomp; settings: the fd bwrap reads the environment from (launch)."""
    make_folder(os.path.join(TMP_ROOT, view.app))
    return [bwrap_binary(), *(["--args", str(settings)] if settings is not None else []),
            *(["--seccomp", str(seccomp)] if seccomp is not None else []), *view_args(view), "--", *args]


@contextlib.contextmanager
def launch(view, args, env, seccomp=None):
    """How to start args with env -> (argv, env, pass_fds): as they are without a view; in the
    view with one. bubblewrap itself then runs with piku's PATH alone -- an app's LD_PRELOAD
    must not reach a program that runs outside the sandbox -- and the app's environment reaches
    the sandbox through a memfd bwrap reads (--args): no setting shows on a command line."""
    if view is None:
        yield list(args), env, ()
        return
    settings = os.memfd_create("piku-settings")
    try:
        pairs = [item for key, value in sorted(env.items()) for item in ("--setenv", key, value)]
        os.write(settings, b"".join(os.fsencode(arg) + b"\0" for arg in ["--clearenv", *pairs]))
        os.lseek(settings, 0, os.SEEK_SET)
        yield (sandbox_command(view, args, seccomp, settings), {"PATH": DEFAULT_PATH},
               (settings, *([seccomp] if seccomp is not None else [])))
    finally:
        os.close(settings)


def view_args(view):
    """bubblewrap's arguments for a view. Order matters: a later mount covers an earlier one."""
    home = os.path.expanduser("~")
    args = ["--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--die-with-parent"]
    args += ["--disable-userns"] if "--disable-userns" in bwrap_options() else []
    args += [] if view.terminal else ["--new-session"]
    for folder in SYSTEM_FOLDERS:
        args += ["--ro-bind-try", folder, folder]
    for link in MERGED_USR:
        if os.path.islink(link):
            args += ["--symlink", os.readlink(link), link]
        elif os.path.isdir(link):
            args += ["--ro-bind", link, link]
    args += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/run", "--dir", SANDBOX_MARK]
    resolv = os.path.realpath("/etc/resolv.conf")
    if resolv.startswith("/run/") and os.path.isfile(resolv):      # systemd-resolved's stub
        args += ["--ro-bind", resolv, resolv]
    args += ["--tmpfs", home]
    if view.app:
        tmp = os.path.join(TMP_ROOT, view.app)
        args += ["--bind", tmp, "/tmp", "--bind", tmp, "/var/tmp"]
    args += ["--tmpfs", PIKU_ROOT]         # empty: below it only what follows, on a read-only skeleton
    for path in host_tools(home):
        args += ["--ro-bind-try", path, path]
    for path in view.read:
        args += ["--ro-bind", path, path]
    for path in view.write:
        args += ["--bind", path, path]
    for source, path in view.binds:
        args += ["--bind", source, path]
    for target, path in view.links:
        args += ["--symlink", target, path]
    args += ["--chdir", view.cwd] if view.cwd else []
    return [*args, "--remount-ro", PIKU_ROOT]


def host_tools(home):
    """Where the tools an app's processes run live, when not in the system's folders: the piku
    user's installed tools and configs, uv, the Pythons uv manages and the test's toolchain."""
    found = [os.path.join(home, folder) for folder in HOME_TOOLS]
    uv = find_uv(dict(os.environ, PATH=os.environ.get("PATH") or DEFAULT_PATH), required=False)
    found += tool_folders(uv) if uv else []
    found.append(uv_managed_pythons(os.environ))
    return [path for path in dict.fromkeys(found) if may_show(path)]


def python_home(venv, depth=0):
    """The installation a tool's venv (one of the host's, not an app's) runs its Python from."""
    for line in read_nofollow(os.path.join(venv, "pyvenv.cfg"), 65536).splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "home" and value.strip() and depth < 3:
            return tool_folders(os.path.join(value.strip(), "python3"), depth + 1)
    return []


def link_chain(path, most=16):
    """path and every link it leads through, as written (each one's folder must be shown too)."""
    chain = [path]
    while os.path.islink(chain[-1]) and len(chain) < most:
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), os.readlink(chain[-1]))))
    return chain


def tool_folders(path, depth=0):
    """The folders a tool runs from, to be shown read-only: where it is found and where it really
    is, and when that is a Python installation or a venv's bin/, the installation (and the venv's
    Python) too."""
    found = []
    home_local = os.path.join(os.path.expanduser("~"), ".local")
    for place in dict.fromkeys([*link_chain(path), os.path.realpath(path)]):
        folder = os.path.dirname(place)
        found.append(folder)
        prefix = os.path.dirname(folder)
        if os.path.basename(folder) != "bin" or prefix == home_local:
            continue
        if os.path.isfile(os.path.join(prefix, "pyvenv.cfg")):
            found += [prefix, *python_home(prefix, depth)]
        elif glob.glob(os.path.join(glob.escape(prefix), "lib", "python3*")):
            found.append(prefix)
    return [folder for folder in dict.fromkeys(found) if may_show(folder)]


def read_nofollow(path, limit):
    """The text of a small regular file, not reached through a link at its last component ('' when
    it cannot be read so)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return ""       # missing or a link: nothing to show
    if not stat.S_ISREG(os.fstat(fd).st_mode):     # (before fdopen, which refuses a folder)
        os.close(fd)
        return ""
    with os.fdopen(fd, "rb") as handle:
        return handle.read(limit).decode(errors="replace")


def may_show(path):
    """May a tool's folder be shown to apps? Never piku's folders, the keys, the home itself or
    anything holding them; the system's folders are shown anyway."""
    path = os.path.realpath(path)
    if not os.path.isabs(path) or any(inside(path, folder) for folder in SYSTEM_FOLDERS):
        return False
    home = os.path.realpath(os.path.expanduser("~"))
    for private in (PIKU_ROOT, os.path.join(home, ".ssh")):
        if inside(path, private) or inside(private, path):
            return False
    return path != home and os.path.exists(path)


def app_uv_folder(app):
    """uv/APP: the app's own uv cache (cache/) and the folder `uv tool run` works in (tools/)."""
    folder = os.path.join(UV_CACHE_ROOT, app)
    for name in ("cache", "tools"):
        make_folder(os.path.join(folder, name))
    return folder


def sandbox_file(app, unit, suffix):
    """piku's record of one vassal in SANDBOX_ROOT: APP@UNIT.SUFFIX."""
    return os.path.join(SANDBOX_ROOT, f"{app}@{unit}.{suffix}")


def vassal_description(app, unit, view):
    """{path: text} of a vassal's description: its view's arguments for the wrapper (NUL-separated,
    bwrap --args), or that it is one of piku's own (view None) and runs as it is."""
    if view is None:
        return {sandbox_file(app, unit, "host"): "piku's own: no app code\n"}
    make_folder(os.path.join(TMP_ROOT, app))
    # the uWSGI master is the sandbox's PID 1: when it dies, however, the kernel ends every
    # process it started (attach-daemons, cron jobs, their children), so the emperor's new copy
    # never runs beside an old one. (bwrap's own init would keep the namespace, and them, alive.)
    args = ["--clearenv", "--as-pid-1", *view_args(view)]
    return {sandbox_file(app, unit, "view"): "".join(arg + "\0" for arg in args)}


WRAPPER_TEMPLATE = string.Template("""\
#!/bin/sh
# written by piku: the uWSGI emperor starts every vassal through this (emperor-wrapper).
# A vassal runs as piku described it in $folder: in its app's sandbox (NAME.view,
# bubblewrap's arguments), or as it is when it is one of piku's own (NAME.host). Any other is not started.
[ "$$#" = 2 ] && [ "$$1" = --ini ] || { echo "piku: unexpected vassal arguments: $$*" >&2; exit 1; }
name=$${2##*/}
name=$${name%.ini}
case "$$name" in *[!A-Za-z0-9@._-]*|.*) echo "piku: refused the vassal name $$name" >&2; exit 1;; esac
description=$folder/$$name
if [ -f "$$description.view" ]; then
    exec $bwrap --args 3 --setenv UWSGI_EMPEROR_FD "$$UWSGI_EMPEROR_FD" --info-fd 4 --seccomp 5 \\
        -- $uwsgi "$$@" 3<"$$description.view" 4>"$$description.info" 5<$seccomp
elif [ -f "$$description.host" ]; then
    exec $uwsgi "$$@"
fi
echo "piku: $$name has no description in $folder: not started" >&2
exit 1
""")


# seccomp programs (classic BPF, for bwrap --seccomp) on the architectures piku runs on.
# Workers make no symbolic link: the sockets the front and nginx connect to lie in a folder
# workers write, and a link planted there would send those connections to another app's socket
# (their build and release: may make links; nothing connects through those folders). Nor can
# they get one another way: io_uring could make one past seccomp (IORING_OP_SYMLINKAT), so
# workers get none (programs fall back to plain calls, as in Docker's default profile), and a
# mount (an overlay in a user namespace of their own, where bwrap cannot forbid those) could
# copy one up. And no process pushes input into a terminal (TIOCSTI, TIOCLINUX): `run` shares
# the caller's.
NEW_MOUNT_CALLS = (425, 428, 429, 430, 431, 432, 433, 442)   # io_uring_setup, open_tree ... mount_setattr
SECCOMP_ARCHES = (      # (audit arch, ioctl, the calls workers may not make, x32 calls exist)
    (0xC000003E, 16, (88, 266, 165, *NEW_MOUNT_CALLS), True),     # x86_64: symlink, symlinkat, mount
    (0x40000003, 54, (83, 304, 21, *NEW_MOUNT_CALLS), False),     # i386 (a 32-bit program on x86_64)
    (0xC00000B7, 29, (36, 40, *NEW_MOUNT_CALLS), False),          # aarch64: symlinkat, mount
)
TERMINAL_INJECTION = (0x5412, 0x541C)       # TIOCSTI, TIOCLINUX


def seccomp_program(worker):
    """The filter as bytes: EPERM for those calls, everything else allowed."""
    load, jump_equal, jump_set, ret = 0x20, 0x15, 0x45, 0x06
    code = [(load, 4, None, None)]                          # seccomp_data.arch
    code += [(jump_equal, arch, f"arch{index}", None) for index, (arch, *_) in enumerate(SECCOMP_ARCHES)]
    code.append((ret, 0x7FFF0000, None, None))              # another architecture: no filter
    for index, (arch, ioctl, denied, x32) in enumerate(SECCOMP_ARCHES):
        code.append(("label", f"arch{index}", None, None))
        code.append((load, 0, None, None))                  # seccomp_data.nr
        code += [(jump_set, 0x40000000, "deny", None)] if x32 else []
        code += [(jump_equal, number, "deny", None) for number in (denied if worker else ())]
        code.append((jump_equal, ioctl, "ioctl", "allow"))
    code += [("label", "ioctl", None, None), (load, 24, None, None)]    # the request: args[1], low half
    code += [(jump_equal, request, "deny", None) for request in TERMINAL_INJECTION]
    code += [("label", "allow", None, None), (ret, 0x7FFF0000, None, None),
             ("label", "deny", None, None), (ret, 0x00050000 | errno.EPERM, None, None)]
    labels, position = {}, 0
    for op, k, _, _ in code:
        if op == "label":
            labels[k] = position
        else:
            position += 1
    program, position = b"", 0
    for op, k, true, false in code:
        if op == "label":
            continue
        offset = {None: 0, **{name: at - position - 1 for name, at in labels.items()}}
        program += struct.pack("=HBBI", op, offset[true], offset[false], k)
        position += 1
    return program


# Outside a sandbox nothing ends what a worker's command started when its uWSGI master dies
# (uWSGI kills only the shell it started), so the emperor's next copy would run beside it. There,
# every command a vassal runs (attach-daemon, cron) runs under this guard, in the process group
# uWSGI made for it: when the master dies (PR_SET_PDEATHSIG) or stops it, and when the command's
# first process exits, the guard ends the whole group. In a sandbox the master is the sandbox's
# PID 1, and the kernel does this.
PROCESS_GUARD_TEXT = """\
# written by piku: runs one command of a vassal outside a sandbox (python3 -I -S process-guard GRACE COMMAND)
import ctypes, os, signal, sys
grace, command = float(sys.argv[1]), sys.argv[2]
stops = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)
master = os.getppid()
ctypes.CDLL(None).prctl(1, signal.SIGTERM)              # PR_SET_PDEATHSIG: told when the master dies
if os.getppid() != master:
    sys.exit(1)                                         # it died before it could tell
if os.getpgrp() != os.getpid():
    os.setpgid(0, 0)                                    # a group of its own (uWSGI's cron jobs have none)
group = os.getpgrp()
def end(number):
    handler = signal.signal(number, signal.SIG_IGN)     # the guard stays to see its command out
    try:
        os.killpg(group, number)
    finally:
        signal.signal(number, handler)
def forward(number, frame):
    end(number)
    if not signal.getitimer(signal.ITIMER_REAL)[0]:
        signal.setitimer(signal.ITIMER_REAL, grace)     # then SIGKILL, as uWSGI's mercy would
signal.signal(signal.SIGALRM, lambda number, frame: os.killpg(group, signal.SIGKILL))
for number in stops:
    signal.signal(number, forward)
child = os.fork()
if child == 0:
    for number in stops:
        signal.signal(number, signal.SIG_DFL)
    os.execv("/bin/sh", ["/bin/sh", "-c", command])
status = os.waitpid(child, 0)[1]
def left():
    for name in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{name}/stat") as stat:
                if int(stat.read().rsplit(")", 1)[1].split()[2]) == group and int(name) != os.getpid():
                    yield int(name)
        except (OSError, IndexError, ValueError):
            continue                                    # gone while we looked
for attempt in range(10):                               # what the command left behind goes with it
    pids = list(left())
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if not pids:
        break
sys.exit(os.waitstatus_to_exitcode(status))
"""


DAEMON_GRACE = 10       # seconds a command has to stop after its guard passed the signal on


def guarded(command, grace=DAEMON_GRACE):
    """command as a vassal runs it outside a sandbox: under PROCESS_GUARD."""
    return "exec " + shlex.join([SYSTEM_PYTHON, "-I", "-S", PROCESS_GUARD, f"{grace:g}", command])


def render_wrapper():
    return WRAPPER_TEMPLATE.substitute(folder=shlex.quote(SANDBOX_ROOT), bwrap=shlex.quote(bwrap_binary() or "bwrap"),
                                       seccomp=shlex.quote(WORKER_SECCOMP),
                                       uwsgi=shlex.quote(shutil.which("uwsgi", path=DEFAULT_PATH) or "uwsgi"))


def write_wrapper():
    """The vassal wrapper and the seccomp programs, rewritten when they changed (bubblewrap or
    uWSGI moved: install's copy of bwrap)."""
    for path, text in ((SANDBOX_WRAPPER, render_wrapper()), (PROCESS_GUARD, PROCESS_GUARD_TEXT)):
        if read_text(path, None) != text:
            make_folder(SANDBOX_ROOT)
            write_atomic(path, text, mode=0o700)
    for path, program in ((WORKER_SECCOMP, seccomp_program(worker=True)),
                          (TERMINAL_SECCOMP, seccomp_program(worker=False))):
        if read_bytes(path) != program:
            write_atomic(path, program)


def describe_earlier_vassals():
    """Vassals an earlier piku.py wrote have no description: they keep running as they did (not in
    a sandbox; `restart APP` moves an app's workers into one), and piku's own go on as its own."""
    described = []
    for name in sorted(os.listdir(UWSGI_ENABLED)) if os.path.isdir(UWSGI_ENABLED) else []:
        base = os.path.join(SANDBOX_ROOT, name[:-len(".ini")])
        if name.endswith(".ini") and not any(os.path.exists(f"{base}.{kind}") for kind in ("view", "host")):
            write_atomic(f"{base}.host", "written before the sandbox: runs as it is\n", mode=0o600)
            described.append(name)
    return described


def enable_vassal(app, unit, text, view=None):
    """Describe the vassal, then write it (the emperor may start it at once)."""
    write_wrapper()
    for path, description in vassal_description(app, unit, view).items():
        write_atomic(path, description, mode=0o600)
    write_atomic(vassal_file(app, unit), text, mode=0o600)


def master_pid(app, unit):
    """The real PID of a vassal's uWSGI master (0: none). In a sandbox its pidfile says 1, and
    the app could write anything there: bwrap's report in SANDBOX_ROOT names the master (its
    sandbox's PID 1), or for a vassal an earlier piku.py started, bwrap's init, whose one child
    is the master. piku's own vassals write their pidfile where no app process writes."""
    if os.path.exists(sandbox_file(app, unit, "info")):     # written by the wrapper's bwrap only
        try:
            init = int(json.loads(read_text(sandbox_file(app, unit, "info")) or "{}").get("child-pid", 0))
        except (ValueError, TypeError, AttributeError):
            return 0
        if init and not pid_alive(init) or is_uwsgi(init):
            return init         # the master itself (--as-pid-1), or gone: callers see a master that is gone
        children = child_pids(init) if init else None       # bwrap's init, before --as-pid-1
        return children[0] if children and is_uwsgi(children[0]) else 0
    if os.path.exists(sandbox_file(app, unit, "view")):
        return 0            # in its sandbox, not started yet: its pidfile is the app's to write
    pid = pidfile_pid(unit_runtime(app, unit, "pid"))
    if os.path.exists(sandbox_file(app, unit, "host")):
        return pid
    return pid if pid and is_uwsgi(pid) else 0   # no record (an earlier piku.py's, or stopped)


def is_uwsgi(pid):
    try:
        return "uwsgi" in os.path.basename(os.readlink(f"/proc/{pid}/exe"))
    except OSError:
        return False        # gone, or not this user's to look at


def forget_vassal(app, unit):
    """A stopped vassal is not started again, even by an emperor that still had it. (bwrap's
    report stays until its generation is pruned: its master may still be finishing requests.)"""
    for suffix in ("view", "host"):
        with contextlib.suppress(FileNotFoundError):    # never written (PIKU_SANDBOX=off) or gone
            os.unlink(sandbox_file(app, unit, suffix))


##############################################################################
# Buildpacks
##############################################################################

BUILDPACKS = []


def buildpack(cls):
    """Register a buildpack; the registry is kept sorted by priority (lowest first)."""
    BUILDPACKS.append(cls())
    BUILDPACKS.sort(key=lambda pack: pack.priority)
    return cls


@record
class BuildContext:
    app: str
    root: str               # the checked-out release
    processes: dict
    env: dict               # the app's settings, layered
    config: dict            # only the config:set layer (to say which layer asked for what)
    repo_env: dict          # only the repo's ENV layer
    sandboxed: bool = False
    tools: tuple = ()       # folders of the build's Python and tools, shown read-only
    host_env: dict = field(default_factory=dict)    # where piku finds uv, Pythons, tools (discovery_env)

    def view(self, *made, read=(), release=True, binds=()):
        """The view a build step runs in: the release (unless release is False), what the step
        makes (created here) and the app's uv cache read-write; None without a sandbox."""
        if not self.sandboxed:
            return None
        for path in made:
            os.makedirs(path, exist_ok=True)
        own = (self.root,) if release else ()
        return View(self.app, write=(*own, app_uv_folder(self.app), *made), read=(*self.tools, *read), binds=binds)


@record
class BuildResult:
    env: dict = field(default_factory=dict)      # additions for every process of the app
    environments: list = field(default_factory=list)    # the folders in envs/APP/ the release runs with


class StaticBuildpack:
    """A site that is only files: a Procfile with 'static' and no other worker."""
    name = "static"
    priority = 90

    def detect(self, root, processes):
        workers = {kind for kind in processes if not worker_kind(kind).phase}
        return workers == {"static"} and not python_manifests(root)

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


@record
class Interpreter:
    path: str
    version: str            # full, e.g. 3.12.1


# --- which Python buildpack ------------------------------------------------------
# The files that describe a Python app's dependencies, most exact first. The first one
# present decides (a lock before the list it may have been exported to); the push names
# the files it ignored. pyproject.toml alone is a uv project, or a Poetry one when only
# [tool.poetry] names the dependencies.
PYTHON_MANIFESTS = ("uv.lock", "poetry.lock", "Pipfile.lock", "requirements.txt", "pyproject.toml", "Pipfile")


def python_manifests(root):
    return [name for name in PYTHON_MANIFESTS if os.path.isfile(os.path.join(root, name))]


# --- Node: package.json, its package manager and its lock ---------------------------------------
# A package.json with no Python manifest beside it is a Node app; beside one, the Python app's
# assets are built with Node first. Which manager installs it: package.json's packageManager,
# else upstream piku's NODE_PACKAGE_MANAGER setting (its first word), else the lockfile.

NODE_LOCKFILES = {"npm-shrinkwrap.json": "npm", "package-lock.json": "npm", "pnpm-lock.yaml": "pnpm",
                  "yarn.lock": "yarn"}      # (npm installs from its shrinkwrap when both are there)
NODE_MANAGERS = ("npm", "pnpm", "yarn")
PACKAGE_MANAGER_FIELD = LazyPattern(r"(npm|pnpm|yarn)@([0-9]{1,9})\.[0-9]{1,9}\.[0-9]{1,9}(-[0-9A-Za-z.-]+)?"
                                   r"(\+[A-Za-z0-9]+\.[0-9a-fA-F]+)?")
PACKAGE_JSON_MAX = 1024 * 1024
PACKAGE_JSON_DEPTH = 64


@record(frozen=True)
class NodeManager:
    """The package manager that installs a Node app, and why it was chosen."""
    name: str               # npm, pnpm or yarn
    version: str            # what packageManager pins ('' when nothing does)
    lockfile: str           # the lock it installs from ('' when there is none)
    source: str             # what chose it, as the push says
    berry: bool = False     # Yarn 2 or later (Berry), not Yarn 1
    ignored: str = ""       # words of NODE_PACKAGE_MANAGER after the manager's name


def read_package_json(root):
    """package.json of the pushed tree as a dict ({} when there is none)."""
    text = read_pushed_text(root, "package.json", PACKAGE_JSON_MAX)
    if not text:
        return {}
    try:
        package = json.loads(text)
    except RecursionError:
        raise PikuError("package.json nests too deeply to read", "Fix it, commit, and push again.") from None
    except ValueError as error:
        raise PikuError(f"package.json is not valid JSON: {error}",
                        "Fix it (npm pkg fix, or a JSON linter), commit, and push again.") from None
    if not isinstance(package, dict):
        raise PikuError("package.json is not a JSON object", "Fix it, commit, and push again.")
    if json_depth(package) > PACKAGE_JSON_DEPTH:
        raise PikuError(f"package.json nests more than {PACKAGE_JSON_DEPTH} levels deep", "Fix it, commit, and push again.")
    try:
        json.dumps(package, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise PikuError("package.json has a string that is no Unicode text (a lone \\ud800-style escape)",
                        "Fix it, commit, and push again.") from None
    return package


def json_depth(value):
    """How deeply a parsed JSON value nests (without recursion: it may nest thousands deep)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        pending.extend((child, depth + 1) for child in children)
    return deepest


def node_package_manager(root, env, package):
    """-> NodeManager for the pushed tree at root with settings env and package.json package."""
    locks = [name for name in NODE_LOCKFILES if os.path.lexists(os.path.join(root, name))]
    field, setting, ignored = package.get("packageManager"), env.get("NODE_PACKAGE_MANAGER", "").split(), ""
    version = ""
    if field is not None:
        match = PACKAGE_MANAGER_FIELD.fullmatch(field) if isinstance(field, str) else None
        if not match:
            raise PikuError(f"package.json's packageManager {json.dumps(field)} names no version of npm, pnpm "
                            "or Yarn that piku installs (it reads NAME@X.Y.Z)",
                            'Write it as, for example, "packageManager": "pnpm@9.15.0" (or remove it to choose '
                            "by the lockfile), commit, and push again.")
        name, version, source = match.group(1), field.split("@", 1)[1].split("+")[0], f"packageManager {field}"
    elif setting:
        if setting[0] not in NODE_MANAGERS:
            raise PikuError(f"NODE_PACKAGE_MANAGER={shlex.quote(' '.join(setting))} names no package manager "
                            "piku knows", "Set npm, pnpm or yarn: config:set APP NODE_PACKAGE_MANAGER=npm")
        name, source, ignored = setting[0], "NODE_PACKAGE_MANAGER", " ".join(setting[1:])
    elif len({NODE_LOCKFILES[lock] for lock in locks}) > 1:
        raise PikuError(f"the app has the lockfiles of two package managers: {' and '.join(locks)}",
                        "Keep the one of the manager you use (git rm the other), or name it in package.json "
                        '("packageManager": "npm@10.9.2"); commit, and push again.')
    else:
        name = NODE_LOCKFILES[locks[0]] if locks else "npm"
        source = locks[0] if locks else "no lockfile"
    own = [lock for lock in locks if NODE_LOCKFILES[lock] == name]
    if locks and not own:
        raise PikuError(f"{source} chooses {name}, but the app's lockfile is {locks[0]} "
                        f"({NODE_LOCKFILES[locks[0]]}'s)", f"Lock it with {name} and commit that lockfile (and "
                        f"git rm {locks[0]}), or choose {NODE_LOCKFILES[locks[0]]}; push again.")
    berry = name == "yarn" and (int(version.split(".")[0]) >= 2 if version else
                                os.path.lexists(os.path.join(root, ".yarnrc.yml")) or
                                b"__metadata:" in (read_pushed_bytes(root, "yarn.lock", 4096, head=True) or b""))
    return NodeManager(name, version, own[0] if own else "", source, berry, ignored)


# Which Node: NODE_VERSION (config:set, then ENV), .node-version or .nvmrc, package.json's
# engines.node; each is a version or an npm range, matched against the Nodes there are.
NODE_CODENAMES = {"argon": 4, "boron": 6, "carbon": 8, "dubnium": 10, "erbium": 12, "fermium": 14,
                  "gallium": 16, "hydrogen": 18, "iron": 20, "jod": 22, "krypton": 24}
NODE_RANGE_PART = r"(0|[1-9][0-9]{0,8}|[xX*])"
NODE_RANGE_WORD = LazyPattern(rf"(<=|>=|<|>|=|~>|~|\^)?\s*v?{NODE_RANGE_PART}(?:\.{NODE_RANGE_PART})?"
                             rf"(?:\.{NODE_RANGE_PART})?(?:\+[0-9A-Za-z.-]+)?")     # (released Nodes only)


def node_range(text):
    """An npm version range (`^20.11`, `>=18 <21`, `18 || 20.x`, `18.0 - 20`, `lts/iron`, `v20.11.0`)
    -> a test of (major, minor, patch); PikuError when it is not one."""
    text = text.strip().lower()
    if text in ("node", "latest", "current", "lts/*", "lts"):
        text = "*"
    elif text.startswith("lts/"):
        if text[4:] not in NODE_CODENAMES:
            raise PikuError(f"'{text}' names no Node LTS line piku knows",
                            f"Use a version number, or one of: lts/{', lts/'.join(NODE_CODENAMES)}")
        text = str(NODE_CODENAMES[text[4:]])
    alternatives = [_node_comparators(part) for part in text.split("||")]
    return lambda version: any(all(test(version) for test in tests) for tests in alternatives)


def _node_comparators(text):
    hyphen = re.fullmatch(r"\s*(\S+)\s+-\s+(\S+)\s*", text)
    if hyphen:
        return _node_comparators(f">={hyphen.group(1)}") + _node_comparators(f"<={hyphen.group(2)}")
    tests = []
    for word in re.findall(r"(?:<=|>=|<|>|=|~>|~|\^)?\s*[^\s<>=~^]+|\S+", text.strip()) or ["*"]:
        match = NODE_RANGE_WORD.fullmatch(word.strip())
        if not match:
            raise PikuError(f"'{text.strip()}' is not a Node version or npm version range",
                            "Write one like 20, 20.11.1, ^20.11, >=18 <21 or 18 || 20.")
        operator = match.group(1) or "="
        parts = [None if part is None or part in "xX*" else int(part) for part in match.groups()[1:]]
        known = len(list(itertools.takewhile(lambda part: part is not None, parts)))
        if any(part is not None for part in parts[known:]):
            raise PikuError(f"'{word.strip()}' has a number after a wildcard", "Write it like 20.x or 20.11.x.")
        low = tuple(part or 0 for part in parts[:known]) + (0,) * (3 - known)
        if known == 0:
            tests.append(lambda version, operator=operator: operator not in ("<", ">"))
            continue
        # the first version past this partial one (1.2 -> 1.3.0; 1.2.3 -> 1.2.4)
        past = tuple(low[:known - 1]) + (low[known - 1] + 1,) + (0,) * (3 - known)
        if operator == "^":
            first = next((index for index, part in enumerate(low[:known]) if part), known - 1)
            past = low[:first] + (low[first] + 1,) + (0,) * (2 - first)
        elif operator in ("~", "~>"):
            past = (low[0] + 1, 0, 0) if known == 1 else (low[0], low[1] + 1, 0)
        bounds = {"=": (low, past), "^": (low, past), "~": (low, past), "~>": (low, past), ">=": (low, None),
                  ">": (past, None), "<": (None, low), "<=": (None, past)}[operator]
        tests.append(lambda version, bounds=bounds: (bounds[0] is None or version >= bounds[0])
                     and (bounds[1] is None or version < bounds[1]))
    return tests


NodeRequest = collections.namedtuple("NodeRequest", "text source")     # text None: any (the host's node)


def resolve_node_request(root, config, repo_env, package):
    """The Node the app asks for, first match wins: config:set NODE_VERSION, then its ENV's,
    .node-version, .nvmrc, package.json's engines.node. A request that is no version or range
    is refused, naming where it came from."""
    engines = package.get("engines") if isinstance(package.get("engines"), dict) else {}
    for text, source in ((config.get("NODE_VERSION"), "config:set NODE_VERSION"),
                         (repo_env.get("NODE_VERSION"), "NODE_VERSION in the app's ENV"),
                         (read_pushed_text(root, ".node-version").strip().split("\n")[0], ".node-version"),
                         (read_pushed_text(root, ".nvmrc").strip().split("\n")[0], ".nvmrc"),
                         (engines.get("node"), "engines.node in package.json")):
        if text is None or text == "":
            continue
        if not isinstance(text, str) or len(text) > 200:
            raise PikuError(f"{source} is not a Node version or npm version range",
                            "Write one like 20, 20.11.1, ^20.11 or >=18 <21.")
        try:
            node_range(text)
        except PikuError as error:
            raise PikuError(f"{source}: {error.message}", error.hint) from None
        return NodeRequest(text.strip(), source)
    return NodeRequest(None, "no version asked for: the host's node")


def choose_node(request, available, host=None):
    """The Node for request among available ({version string: node binary}; host: the version
    of the host's own) -> (version, binary): with no request, the host's; else the host's when
    it is allowed, or the newest allowed (one piku installed for this app or another). A Node
    another app asked for is never chosen for an app that asks for none, or that the host's
    satisfies. PikuError naming what there is when none is allowed."""
    if request.text is None and host in available:
        return host, available[host]
    test = node_range(request.text or "*")
    allowed = [version for version in available if test(tuple(map(int, version.split("."))))]
    if host in allowed:
        return host, available[host]
    if not allowed:
        found = ", ".join(sorted(available, key=lambda version: tuple(map(int, version.split("."))))) or "none"
        raise PikuError(f"no Node on this host is {request.text} ({request.source}); found: {found}",
                        "Ask for one of those, and push again.")
    newest = max(allowed, key=lambda version: tuple(map(int, version.split("."))))
    return newest, available[newest]


# What decides a Node environment's contents: the fingerprint its folder is named by. Not the
# app's name or version in package.json, nor scripts other than the ones an install runs.
NODE_CONFIG_FILES = (".npmrc", ".yarnrc", ".yarnrc.yml", "pnpm-workspace.yaml")
NODE_INPUT_FOLDERS = ("patches", ".yarn/patches", ".yarn/plugins")   # patch-package's, Yarn's and pnpm's
                                                                     # patches; Yarn's plugins
NODE_INSTALL_SCRIPTS = ("preinstall", "install", "postinstall", "prepare", "dependencies")
NODE_SETTINGS = ("NPM_CONFIG_", "YARN_", "PNPM_")


def node_fingerprint(root, manager, node_version, production, env):
    """Everything that decides what a Node environment contains (secrets left out)."""
    package = read_package_json(root)
    manifest = {key: value for key, value in package.items() if key not in ("name", "version", "scripts")}
    scripts = package.get("scripts") if isinstance(package.get("scripts"), dict) else {}
    manifest["scripts"] = {key: scripts[key] for key in NODE_INSTALL_SCRIPTS if key in scripts}
    files = {}
    for name in (manager.lockfile, *NODE_CONFIG_FILES):
        data = read_pushed_bytes(root, name, PUSHED_LOCK_MAX) if name else None
        files[name] = hashlib.sha256(data).hexdigest() if data is not None else None
    for name in node_tarballs(package):
        data = read_pushed_bytes(root, name, PUSHED_LOCK_MAX)
        if data is None:
            raise PikuError(f"package.json depends on file:{name}, which is not in the pushed code",
                            f"Commit {name} (npm pack writes it), and push again.")
        files[name] = hashlib.sha256(data).hexdigest()
    for folder in NODE_INPUT_FOLDERS:
        for relative in pushed_folder_files(root, folder):
            files[relative] = hashlib.sha256(read_pushed_bytes(root, relative, PUSHED_LOCK_MAX) or b"").hexdigest()
    settings = {key: strip_url_credentials(value) for key, value in sorted(env.items())
                if key.upper().startswith(NODE_SETTINGS) and not is_secret(key.upper())
                and not any(word in key.upper() for word in ("AUTH", "KEY", "CERT", "OTP"))}
    return {"layout": 1, "buildpack": "node", "manifest": manifest, "files": files, "node": node_version,
            "manager": [manager.name, manager.version, manager.berry], "production": production,
            "settings": settings}


# --- Node: the buildpack ----------------------------------------------------------------------
# The dependencies go into envs/APP/node-FINGERPRINT, installed from a copy of the files that
# decide them (package.json, the lock, the managers' settings, patch folders) -- that folder
# holds none of the app's code, so every release with the same fingerprint shares it and a
# code-only push runs no package manager. Each release links node_modules to it. A build
# script runs in the release with node-FINGERPRINT-build, which has the dev dependencies too.

NODE_VERSION_TEXT = LazyPattern(r"v?([0-9]{1,9})\.([0-9]{1,9})\.([0-9]{1,9})")
NODE_BUILD_SCRIPTS = ("heroku-postbuild", "build")     # the first one present runs (Heroku's rule)
NODE_LOCAL_SPECS = ("file:", "link:", "portal:", "./", "../", "/", "~/")
NODE_TARBALLS = (".tgz", ".tar.gz", ".tar")
NODE_DEPENDENCY_FIELDS = ("dependencies", "devDependencies", "optionalDependencies")
NODE_ROOT_HOOKS = ("preinstall", "install", "postinstall", "prepare")
NODE_FAILURES = (
    ("can only install packages when your package.json and package-lock.json",
     "package-lock.json is out of date with package.json", "Run 'npm install', commit package-lock.json, and push again."),
    ("Missing: ", "package-lock.json is out of date with package.json",
     "Run 'npm install', commit package-lock.json, and push again."),
    ("ERR_PNPM_OUTDATED_LOCKFILE", "pnpm-lock.yaml is out of date with package.json",
     "Run 'pnpm install', commit pnpm-lock.yaml, and push again."),
    ("Your lockfile needs to be updated", "yarn.lock is out of date with package.json",
     "Run 'yarn install', commit yarn.lock, and push again."),
    ("The lockfile would have been modified", "yarn.lock is out of date with package.json",
     "Run 'yarn install', commit yarn.lock, and push again."),
    ("ETARGET", "a version package.json asks for is not in the npm registry",
     "Check the versions in package.json, lock again, commit, and push again."),
    ("E404", "a package was not found in the npm registry", "Check the package names in package.json."),
    ("E401", "the npm registry refused the credentials (HTTP 401)",
     "Commit an .npmrc with the line //HOST/:_authToken=${NPM_TOKEN} and set the token with "
     "config:set APP NPM_TOKEN=... (docs/NODE.md)."),
)


@record
class NodeSetup:
    """What a Node build runs with, decided before anything is installed."""
    package: dict
    manager: NodeManager
    version: str            # the Node's full version
    node: str               # its binary
    command: list           # how the manager is run: [node, its script]
    env: dict               # the environment the manager and build scripts run in


@buildpack
class NodeBuildpack:
    """package.json and no Python manifest: the locked dependencies in a shared environment, the
    build script in the release, and the Procfile (or package.json's start script) served."""
    name = "node"
    priority = 20

    def detect(self, root, processes):
        return os.path.isfile(os.path.join(root, "package.json")) and not python_manifests(root)

    def build(self, context):
        started = time.monotonic()
        drop_pushed_node_modules(context.root)
        setup = prepare_node(context)
        production = node_environment(context, setup, production=True)
        environments = [production]
        script = node_build_script(setup.package)
        if script:
            environments.append(run_node_build(context, setup, script))
            check_dev_only_commands(context, production, environments[-1])
        link_node_modules(context.root, production)
        additions = {"PATH": f"{production}/node_modules/.bin:{os.path.dirname(setup.node)}:{context.env['PATH']}",
                     "NODE_ENV": context.env.get("NODE_ENV") or "production"}
        notice(f"Node environment ready in {time.monotonic() - started:.2f} s")
        return BuildResult(additions, environments)


def check_dev_only_commands(context, production, build):
    """A command of the app whose program only a dev dependency provides would fail when it
    starts (the workers run without them, as `nest start` does): refused now, with the fix."""
    for kind, process in sorted(context.processes.items()):
        try:
            words = shlex.split(process.command)
        except ValueError:
            continue            # (the shell says what is wrong with it)
        program = next((word for word in words if not re.match(r"[A-Za-z_][A-Za-z0-9_]*=", word)), "")
        if not program or "/" in program or os.path.exists(os.path.join(production, "node_modules", ".bin", program)) \
                or shutil.which(program, path=context.host_env.get("PATH")):
            continue
        if os.path.exists(os.path.join(build, "node_modules", ".bin", program)):
            raise PikuError(f"'{kind}: {process.command}' runs {program}, which only a dev dependency provides; "
                            "the app's processes run without the dev dependencies",
                            "Move the package that provides it to 'dependencies', or run what the build made "
                            "(for NestJS: 'web: node dist/main' in a Procfile); commit, and push again.")


def build_node_assets(context):
    """A Python app's package.json: its build script runs first, with the dev dependencies, so
    that the Python build (Django's collectstatic) finds what it made. -> the environments used."""
    package = read_package_json(context.root)
    script = node_build_script(package)
    if not script:
        notice("package.json has no build script: Node is not run for this Python app")
        return []
    if context.env.get("DISABLE_NODE_BUILD", "").strip() in ("1", "true", "yes"):
        notice(f"DISABLE_NODE_BUILD is set: package.json's {script} script is not run")
        return []
    step(f"Assets: package.json has a {script} script; it runs before the Python build")
    drop_pushed_node_modules(context.root)
    setup = prepare_node(context)
    build = run_node_build(context, setup, script)
    context.tools = (*context.tools, build)      # collectstatic may collect from node_modules
    return [build]


def prepare_node(context):
    """Read package.json and choose the manager and the Node, saying which and why."""
    package = read_package_json(context.root)
    check_node_package(package, context.root)
    manager = node_package_manager(context.root, context.env, package)
    context.host_env = discovery_env(context.env)
    request = resolve_node_request(context.root, context.config, context.repo_env, package)
    available, host = node_versions(context.host_env)
    if host is None:
        raise PikuError("Node.js is not installed on this server, and this app has a package.json",
                        "Install it for the piku user (apt-get install nodejs npm), then push again. (A Python app "
                        f"can skip its package.json build: config:set {context.app} DISABLE_NODE_BUILD=1)")
    try:       # the host's, or the one the app's live release runs on: never one only another app uses
        version, node = choose_node(request, {host: available[host], **live_node(context.app, available)}, host)
        how = ""
    except PikuError as missing:
        version, node, how = install_node(request, available, context.host_env, missing)
    step(f"Node {version} ({request.text} from {request.source}{how})" if request.text else
         f"Node {version} ({request.source})")
    check_yarn_berry(context.root, manager)
    lock = read_pushed_bytes(context.root, manager.lockfile, 4096, head=True) if manager.lockfile else b""
    command, folders = node_manager_command(manager, node, context.host_env, (lock or b"").decode(errors="replace"))
    used = node_tool_version(node, command[-1])
    step(f"Installing with {manager.name} {used} (from {manager.source})")
    manager = NodeManager(manager.name, used, manager.lockfile, manager.source, manager.berry, manager.ignored)
    if manager.ignored:
        warning(f"NODE_PACKAGE_MANAGER's '{manager.ignored}' is not used: piku runs {manager.name} with the "
                "lock honoured (docs/NODE.md)")
    context.tools = (*context.tools, *runtime_folders(node), *folders)
    return NodeSetup(package, manager, version, node, command, node_tool_env(context, node, manager.berry))


def check_yarn_berry(root, manager):
    """Yarn 2+: version 4 or later (its production install, `yarn workspaces focus`, is built in
    from 4 on), and not Plug'n'Play (no node_modules), which it installs unless .yarnrc.yml says
    otherwise."""
    if not manager.berry:
        return
    if manager.version and int(manager.version.split(".")[0]) < 4:
        raise PikuError(f"this app uses Yarn {manager.version}; piku deploys Yarn 1 and Yarn 4 or later (it "
                        "installs the production dependencies with 'yarn workspaces focus', built into Yarn 4)",
                        "Run 'yarn set version 4' and 'yarn install', commit, and push again.")
    text = read_pushed_text(root, ".yarnrc.yml")
    if not re.search(r"^nodeLinker:\s*['\"]?(node-modules|pnpm)['\"]?\s*(#.*)?$", text, re.M):
        raise PikuError("this Yarn app installs with Plug'n'Play, which piku does not deploy: the release runs "
                        "from a node_modules folder shared by releases",
                        "Add 'nodeLinker: node-modules' to .yarnrc.yml, run 'yarn install', commit, and push again.")


def check_node_package(package, root):
    """Refuse the shapes piku cannot install apart from the app's code, saying why."""
    pnpm = re.search(r"^packages\s*:", read_pushed_text(root, "pnpm-workspace.yaml"), re.M)
    if "workspaces" in package or pnpm:
        where = "pnpm-workspace.yaml declares workspace packages" if pnpm else "package.json declares workspaces"
        raise PikuError(f"{where}, which piku does not install: their packages are "
                        "the app's own code, and piku installs the dependencies apart from the code",
                        "Deploy one package: give it its own package.json and lock at the top of a repository "
                        "(or remove 'workspaces' from package.json, 'packages' from pnpm-workspace.yaml), commit, "
                        "and push again.")
    node_tarballs(package)


def node_tarballs(package):
    """The packed packages (file:PATH.tgz in the repository) package.json depends on: files an
    install reads, copied with package.json. Any other path (a folder, link:, portal:) is the
    app's own code, which piku installs nothing from: refused."""
    found = []
    for kind in NODE_DEPENDENCY_FIELDS:
        wanted = package.get(kind)
        for name, spec in (wanted.items() if isinstance(wanted, dict) else ()):
            spec = spec.strip() if isinstance(spec, str) else ""
            path = os.path.normpath(spec[len("file:"):]) if spec.startswith("file:") else ""
            if path.endswith(NODE_TARBALLS) and not path.startswith(("/", "..")):
                found.append(path)
            elif spec.startswith(NODE_LOCAL_SPECS):
                raise PikuError(f"package.json's {kind} name {name} at {spec!r}, a path in the repository; piku "
                                "installs the dependencies apart from the code, where that path is not",
                                "Pack it ('npm pack', commit the .tgz and depend on file:PATH.tgz), publish it, or "
                                "keep its code in the app and import it by path; commit, and push again.")
    return sorted(set(found))


def node_versions(env):
    """-> ({full version: binary} of the Nodes there are: the host's node on PATH and those piku
    installed in TOOL_ROOT, each finished: its marker written last; the host's version or None)."""
    found = {}
    host = shutil.which("node", path=env.get("PATH"))
    candidates = [host] if host else []
    for marker in sorted(glob.glob(os.path.join(glob.escape(TOOL_ROOT), "node-*", ENV_MARKER))):
        candidates.append(os.path.join(os.path.dirname(marker), *TOOL_PACKAGES["node"]))
    for binary in candidates:
        version = node_version_of(binary)
        if version and version not in found:
            found[version] = binary
    return found, (next(iter(found)) if host and found and found[next(iter(found))] == host else None)


def live_node(app, available):
    """{version: binary} of the Node the app's live release runs on, when it is one of available."""
    try:
        record = live_release(app)
    except PikuError:
        return {}           # (doctor reports a damaged record)
    for binary in filter(None, (node_of(app, path) for path in record_environments(app, record or {}))):
        version = node_version_of(binary) if os.path.isabs(binary) and os.path.exists(binary) else None
        if version and available.get(version) == binary:
            return {version: binary}
    return {}


def install_node(request, available, env, missing):
    """The newest Node the request allows that the npm registry has (the official binaries,
    repackaged as node-linux-ARCH), installed into TOOL_ROOT/node-VERSION unless it is there
    -> (version, binary, how it was found). The registry is reached as npm reaches it, with the
    host's settings. None allowed: missing, with what the registry has too; no answer: the
    newest allowed Node piku installed earlier, with a warning, else missing."""
    host = next(iter(available.values()))       # (the host's: it comes first)
    npm = host_npm(host, env)
    package = TOOL_REGISTRY_NAMES["node"]
    test = node_range(request.text)
    try:
        result = subprocess.run([*npm, "view", package, "versions", "--json"], capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, cwd=PIKU_ROOT, env=tool_install_env(host, env), timeout=120)
        offered = [text for text in json.loads(result.stdout) if NODE_VERSION_TEXT.fullmatch(text)]
    except (OSError, subprocess.TimeoutExpired, ValueError, TypeError) as error:
        why = (result.stderr.strip().splitlines() or ["no answer"])[-1] if isinstance(error, (ValueError, TypeError)) \
            else "it did not answer within 120 s" if isinstance(error, subprocess.TimeoutExpired) else error.strerror
        earlier = [text for text in available if test(tuple(map(int, text.split("."))))]
        if not earlier:
            raise PikuError(f"{missing.message}; and the npm registry could not be asked for others "
                            f"(npm view {package}: {why})", missing.hint) from None
        warning(f"the npm registry could not be asked for Node versions ({why}): using the newest one piku "
                "installed earlier")
        version = max(earlier, key=lambda text: tuple(map(int, text.split("."))))
        return version, available[version], "; installed by piku earlier (the npm registry did not answer)"
    allowed = [text for text in offered if test(tuple(map(int, text.split("."))))]
    if not allowed:
        majors = sorted({int(text.split(".")[0]) for text in offered})
        raise PikuError(f"{missing.message}; nor does the npm registry have one ({package} has Node "
                        f"{majors[0]} to {majors[-1]})" if majors else missing.message, missing.hint)
    version = max(allowed, key=lambda text: tuple(map(int, text.split("."))))
    how = "; the newest the npm registry has" + (", installed by piku earlier" if version in available else "")
    folder = installed_tool("node", version, host, npm, env)
    return version, os.path.join(folder, *TOOL_PACKAGES["node"]), how


def node_version_of(binary):
    """The full version of a Node binary, asked once while the file stays the same (None: no Node)."""
    return cached_probe(["node --version", stat_key(os.path.realpath(binary))], lambda: node_binary_version(binary))


def node_binary_version(binary):
    try:
        result = subprocess.run([binary, "--version"], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = NODE_VERSION_TEXT.fullmatch(result.stdout.strip())
    return ".".join(match.groups()) if result.returncode == 0 and match else None


def node_manager_command(manager, node, env, lockfile_text=""):
    """-> (how the manager is run, the folders it runs from). npm is the host's, unless
    packageManager pins another version; pnpm and Yarn are installed by piku (installed_tool)
    at the pinned version or the default for the lock. Each runs under the chosen Node."""
    npm = host_npm(node, env)
    if manager.name == "npm" and (not manager.version or manager.version == node_tool_version(node, npm[-1])):
        package = os.path.dirname(os.path.dirname(npm[-1]))
        return npm, [package] if may_show(package) else []
    name = "berry" if manager.berry else manager.name
    version = manager.version or default_tool_version(manager, lockfile_text)
    folder = installed_tool(name, version, node, npm, env)
    return [node, os.path.join(folder, *TOOL_PACKAGES[name])], [folder]


def host_npm(node, env):
    """[node, npm-cli.js] of the host's npm (npm itself when it is not a script)."""
    found = shutil.which("npm", path=env.get("PATH"))
    if not found:
        raise PikuError("npm is not installed for the piku user; it installs the dependencies of Node apps",
                        "Install it (apt-get install npm, or NodeSource's nodejs), then push again.")
    script = os.path.realpath(found)
    return [node, script] if script.endswith(".js") else [script]


# What piku installs from the npm registry into TOOL_ROOT/NAME-VERSION, and the file it runs there.
NODE_ARCH = {"x86_64": "x64", "aarch64": "arm64", "armv7l": "armv7l", "ppc64le": "ppc64le", "s390x": "s390x"}
TOOL_PACKAGES = {"npm": ("node_modules", "npm", "bin", "npm-cli.js"), "pnpm": ("node_modules", "pnpm", "bin", "pnpm.cjs"),
                 "yarn": ("node_modules", "yarn", "bin", "yarn.js"),
                 "berry": ("node_modules", "@yarnpkg", "cli-dist", "bin", "yarn.js"),
                 "node": ("node_modules", f"node-linux-{NODE_ARCH.get(os.uname().machine, 'x64')}", "bin", "node")}
TOOL_REGISTRY_NAMES = {"npm": "npm", "pnpm": "pnpm", "yarn": "yarn", "berry": "@yarnpkg/cli-dist",
                       "node": TOOL_PACKAGES["node"][1]}
PNPM_DEFAULTS = {"9": "10.34.9", "6": "8.15.9", "5": "7.33.7"}     # by pnpm-lock.yaml's lockfileVersion
YARN_DEFAULT = "1.22.22"
TOOL_VERSION = LazyPattern(r"[0-9]{1,9}\.[0-9]{1,9}\.[0-9]{1,9}(-[0-9A-Za-z.-]{1,40})?")


def default_tool_version(manager, lockfile_text):
    """The version of pnpm or Yarn 1 piku installs when packageManager pins none (docs/NODE.md)."""
    if manager.name == "yarn" and not manager.berry:
        return YARN_DEFAULT
    if manager.name == "pnpm":
        match = re.search(r"^lockfileVersion:\s*['\"]?([0-9]+)", lockfile_text, re.M)
        if match is None or match.group(1) in PNPM_DEFAULTS:
            return PNPM_DEFAULTS[match.group(1) if match else "9"]
        raise PikuError(f"pnpm-lock.yaml has lockfileVersion {match.group(1)}, which no pnpm piku installs by "
                        "default reads", 'Name the pnpm that wrote it in package.json ("packageManager": '
                        '"pnpm@X.Y.Z"), commit, and push again.')
    raise PikuError(f"this app uses Yarn {'2 or later (Berry)' if manager.berry else ''}, and package.json's "
                    "packageManager names no version of it", 'Name it in package.json ("packageManager": '
                    '"yarn@4.5.3", as `yarn set version` writes it), commit, and push again.')


def installed_tool(name, version, node, npm, env):
    """TOOL_ROOT/NAME-VERSION: the npm package of that tool at that version, installed once with
    the host's npm and the host's settings only (never an app's registry or .npmrc: every app
    shares it), in a folder of its own renamed into place with its marker -- never replaced."""
    if not TOOL_VERSION.fullmatch(version):
        raise PikuError(f"'{version}' is not a version of {name} piku installs", "Name one like 10.34.9.")
    folder = os.path.join(TOOL_ROOT, f"{name}-{version}")
    if os.path.isfile(os.path.join(folder, ENV_MARKER)):
        return folder
    package = f"{TOOL_REGISTRY_NAMES[name]}@{version}"
    step(f"Installing {package} from the npm registry into {folder}")
    make_folder(TOOL_ROOT)
    temp = tempfile.mkdtemp(dir=TOOL_ROOT, prefix=f".{name}-{version}-")
    try:
        run_build_tool([*npm, "install", "--prefix", temp, "--no-save", "--no-package-lock", "--no-audit",
                        "--no-fund", "--ignore-scripts", package], temp, tool_install_env(node, env),
                       failures=NODE_FAILURES, name=f"npm install {package}")
        if not os.path.exists(os.path.join(temp, *TOOL_PACKAGES[name])):
            raise PikuError(f"{package} from the npm registry has no {'/'.join(TOOL_PACKAGES[name][2:])}")
        write_atomic(os.path.join(temp, ENV_MARKER), json.dumps({"package": package}) + "\n")
        os.chmod(temp, 0o700)
        try:
            os.rename(temp, folder)
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not os.path.isfile(os.path.join(folder, ENV_MARKER)):
                raise       # (else another push installed it meanwhile: that one stays)
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    return folder


def tool_install_env(node, env):
    """The host's environment, with npm's cache in TOOL_ROOT: nothing of any app's."""
    return dict(build_tool_env({}), PATH=f"{os.path.dirname(node)}:{env['PATH']}",
                npm_config_cache=os.path.join(TOOL_ROOT, ".npm-cache"), npm_config_update_notifier="false",
                npm_config_fund="false", npm_config_audit="false", npm_config_progress="false")


def node_tool_version(node, script):
    return cached_probe(["node tool --version", stat_key(os.path.realpath(node)), stat_key(script)],
                        lambda: subprocess.run([node, script, "--version"], capture_output=True, text=True,
                                               stdin=subprocess.DEVNULL).stdout.strip() or None) or "unknown"


def node_tool_env(context, node, berry=False):
    """The environment a package manager and the build script run in: the app's settings, the
    chosen Node first on PATH, the cache in the app's own folder, node-gyp's headers."""
    env = build_tool_env(context.env)
    env["PATH"] = f"{os.path.dirname(node)}:{context.host_env['PATH']}"
    env["NODE_ENV"] = context.env.get("NODE_ENV") or "production"
    cache = app_uv_folder(context.app)
    env.update(npm_config_cache=os.path.join(cache, "npm"), npm_config_update_notifier="false",
               npm_config_fund="false", npm_config_audit="false", npm_config_progress="false",
               # pnpm's store and Yarn's cache are the app's, and files are copied out of them (never
               # hard-linked: a later build that could write the store must not change an environment)
               npm_config_store_dir=os.path.join(cache, "pnpm-store"), npm_config_package_import_method="copy",
               YARN_CACHE_FOLDER=os.path.join(cache, "yarn"), COREPACK_ENABLE_STRICT="0")
    # (Yarn 2+ refuses settings it does not know, Yarn 1's among them)
    env.update(dict(YARN_ENABLE_GLOBAL_CACHE="false", YARN_ENABLE_TELEMETRY="0", YARN_IGNORE_PATH="1") if berry
               else dict(YARN_DISABLE_SELF_UPDATE_CHECK="true"))
    prefix = os.path.dirname(os.path.dirname(os.path.realpath(node)))
    if os.path.isfile(os.path.join(prefix, "include", "node", "node.h")):
        env["npm_config_nodedir"] = prefix      # native addons build against this Node's headers, no download
    return env


def node_build_script(package):
    scripts = package.get("scripts") if isinstance(package.get("scripts"), dict) else {}
    return next((name for name in NODE_BUILD_SCRIPTS if isinstance(scripts.get(name), str)
                 and scripts[name].strip()), None)


def node_environment(context, setup, production):
    """The production environment (or, production False, the build's, with dev dependencies)
    for the pushed package.json and lock: reused when its marker matches, else built. Both are
    named by the production fingerprint (the build's with -build), so they are kept together."""
    fingerprint = node_fingerprint(context.root, setup.manager, setup.version, True, context.env)
    path = os.path.join(env_dir(context.app), "node-" + fingerprint_digest(fingerprint)[:16])
    if not production:
        fingerprint, path = dict(fingerprint, production=False), path + "-build"
    what = "Dependencies" if production else "Build dependencies (with the dev dependencies)"
    if environment_intact(path, fingerprint, "node_modules"):
        step(f"{what} unchanged: reusing {path} (Node {setup.version}); {setup.manager.name} skipped")
    else:
        install_node_environment(context, setup, path, fingerprint, production)
    record_environment(context.app, path, setup.node)
    return path


def install_node_environment(context, setup, path, fingerprint, production):
    """Install into path from a copy of the files that decide it; the marker written last."""
    if os.path.lexists(path):
        shutil.rmtree(path)         # a half-built one from a failed deploy
    started = time.monotonic()
    make_folder(path)
    copy_node_inputs(context.root, path, setup.manager)
    commands = node_install_args(setup.manager, production)
    if not setup.manager.lockfile:
        warning(f"no lockfile: {setup.manager.name} resolves the dependencies afresh, so this deploy is not "
                "reproducible and a new release of any of them can break it")
        warning(f"run '{setup.manager.name} install', commit its lockfile, and push again")
    env = dict(setup.env, **({"YARN_ENABLE_IMMUTABLE_INSTALLS": str(bool(setup.manager.lockfile)).lower()}
                             if setup.manager.berry else {}))
    try:
        for args in commands:
            step(f"Running {setup.manager.name} {' '.join(args)}")
            run_build_tool([*setup.command, *args], path, env, failures=NODE_FAILURES,
                           name=f"{setup.manager.name} {args[0]}", view=context.view(path, release=False))
    except PikuError as error:
        scripts = setup.package.get("scripts") if isinstance(setup.package.get("scripts"), dict) else {}
        hooks = [name for name in NODE_ROOT_HOOKS if name in scripts]
        if not hooks or error.hint != "See its output above.":
            raise
        raise PikuError(error.message, f"package.json's {', '.join(hooks)} ran where the dependencies are "
                        "installed, which holds package.json, the lock and the patch folders but not the app's "
                        "code: move what needs the code into a build script (docs/NODE.md).") from None
    make_folder(os.path.join(path, "node_modules"))     # (no dependencies: an empty one to link to)
    marker = os.path.join(path, ENV_MARKER)
    if os.path.isdir(marker) and not os.path.islink(marker):
        shutil.rmtree(marker)       # an install script's, not piku's: piku's marker is written only here
    write_atomic(marker, fingerprint_text(fingerprint))
    notice(f"environment built in {time.monotonic() - started:.1f} s: {path}")


def copy_node_inputs(root, path, manager):
    """The pushed files an install reads, copied (never linked) into the environment folder."""
    names = ["package.json", *([manager.lockfile] if manager.lockfile else []), *NODE_CONFIG_FILES,
             *node_tarballs(read_package_json(root))]
    for folder in NODE_INPUT_FOLDERS:
        names += pushed_folder_files(root, folder)
    for name in dict.fromkeys(names):
        data = read_pushed_bytes(root, name, PUSHED_LOCK_MAX)
        if data is not None:
            target = os.path.join(path, name)
            make_folder(os.path.dirname(target))
            with open(target, "xb") as handle:
                handle.write(data)


def node_install_args(manager, production):
    """The manager's commands (argument lists) that install exactly the lock (or, with no lock,
    resolve afresh)."""
    locked = bool(manager.lockfile)
    if manager.name == "npm":
        return [["ci" if locked else "install", "--omit=dev" if production else "--include=dev",
                 "--no-audit", "--no-fund"]]
    if manager.name == "pnpm":
        return [["install", "--frozen-lockfile" if locked else "--no-frozen-lockfile",
                 "--prod" if production else "--production=false"]]
    if not manager.berry:
        return [["install", *(["--frozen-lockfile"] if locked else []), f"--production={str(production).lower()}",
                 "--non-interactive", "--no-progress"]]
    if not production:
        return [["install"]]
    # `workspaces focus` resolves what the lock lacks, immutable or not: an immutable install checks
    # the lock first (building nothing; focus then leaves only the production dependencies)
    return [*([["install", "--immutable", "--mode=skip-build"]] if locked else []),
            ["workspaces", "focus", "--all", "--production"]]


def run_node_build(context, setup, script):
    """Run package.json's build script in the release, with the build environment linked as its
    node_modules. -> that environment"""
    build = node_environment(context, setup, production=False)
    modules, binds = os.path.join(context.root, "node_modules"), ()
    remove_node_modules(context.root)
    if context.sandboxed:       # a real folder there, not a link out of the project (Turbopack refuses one)
        os.mkdir(modules)
        binds = ((os.path.join(build, "node_modules"), modules),)
    else:
        link_node_modules(context.root, build)
    step(f"Running {setup.manager.name} run {script} (package.json's {script} script)")
    env = dict(setup.env, PATH=f"{build}/node_modules/.bin:{setup.env['PATH']}")
    run_build_tool([*setup.command, "run", script], context.root, env, name=f"the {script} script",
                   view=context.view(build, binds=binds))
    link_node_modules(context.root, build)      # (what follows -- collectstatic -- sees it as a link)
    return build


def link_node_modules(root, environment):
    """The release's node_modules: a link to the environment's (a pushed folder is replaced)."""
    remove_node_modules(root)
    os.symlink(os.path.join(environment, "node_modules"), os.path.join(root, "node_modules"))


def drop_pushed_node_modules(root):
    if remove_node_modules(root) == "folder":
        notice("node_modules is in the pushed code: piku replaces it with the installed dependencies "
               "(add it to .gitignore)")


def remove_node_modules(root):
    """Remove the release's node_modules, whatever a push or a build left there (never following
    a link) -> what it was: 'folder', 'file' or None."""
    path = os.path.join(root, "node_modules")
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
        return "folder"
    if os.path.lexists(path):
        os.unlink(path)
        return "file"
    return None


def node_start_command(root):
    """What `npm start` runs for a Node app's pushed tree -> (command, why): package.json's start
    script, else `node server.js` when there is a server.js (npm's own default); None otherwise."""
    if not os.path.isfile(os.path.join(root, "package.json")) or python_manifests(root):
        return None
    scripts = read_package_json(root).get("scripts")
    start = scripts.get("start") if isinstance(scripts, dict) else None
    if isinstance(start, str) and start.strip() and not any(char in start for char in "\r\n\0"):
        return start.strip(), "package.json's start script"
    return ("node server.js", "npm start's default for a server.js") \
        if os.path.isfile(os.path.join(root, "server.js")) else None


def load_toml(text, name):
    try:
        import tomllib
    except ImportError:             # Python 3.10: Debian/Ubuntu's python3-tomli has the same API
        try:
            import tomli as tomllib
        except ImportError:
            raise PikuError(f"reading {name} needs Python 3.11 or the tomli module",
                            "Install it on the server: apt-get install python3-tomli")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PikuError(f"{name} cannot be parsed: {error}", "Fix the file, commit, and push again.")
    except RecursionError:
        raise PikuError(f"{name} is nested too deeply to be read", "Fix the file, commit, and push again.")


# Valid TOML or JSON can still hold a number where piku reads a table. Each such file piku
# parses has one shape here -- the keys piku reads, and what each must be ([X]: a list of X) --
# and read_shaped() is the one reader: a file of another shape is refused with the key named.
FILE_SHAPES = {
    "pyproject.toml": {"project": {"name": str, "requires-python": str, "dependencies": [str], "dynamic": [str]},
                       "build-system": dict,
                       "tool": {"uv": {"package": bool, "required-version": str, "workspace": {"members": [str]},
                                       "sources": dict},
                                "poetry": {"dependencies": dict, "package-mode": bool}}},
    "uv.lock": {"version": int, "manifest": {"members": [str]}, "package": [dict]},
    "uv.toml": {"required-version": str},
    "poetry.lock": {"package": [{"name": str, "version": str}], "metadata": dict},
    "Pipfile.lock": {"_meta": {"requires": {"python_version": str, "python_full_version": str}}, "default": dict},
}
SHAPE_WORDS = {dict: "a table", list: "a list", str: "text", int: "a whole number", bool: "true or false",
               float: "a number", type(None): "null"}


def read_shaped(root, name):
    """A file of the release, parsed ({} when there is none) and checked against its shape."""
    if name.endswith(".json") or name == "Pipfile.lock":
        text = read_pushed_text(root, name, PUSHED_LOCK_MAX)
        try:
            data = json.loads(text) if text.strip() else {}
        except ValueError as error:
            raise PikuError(f"{name} is not valid JSON ({error})", "Fix the file, commit, and push again.")
        except RecursionError:
            raise PikuError(f"{name} is nested too deeply to be read", "Fix the file, commit, and push again.")
    else:
        data = load_toml(read_pushed_text(root, name, PUSHED_LOCK_MAX if name.endswith(".lock") else PUSHED_TEXT_MAX),
                         name)
    check_shape(data, FILE_SHAPES[name], name, "")
    return data


def check_shape(value, shape, name, where):
    if isinstance(shape, dict):
        wanted = dict
    elif isinstance(shape, list):
        wanted = list
    else:
        wanted = shape
    if not isinstance(value, wanted) or (wanted is int and isinstance(value, bool)):
        place = f"'{where}'" if where else "the file"
        raise PikuError(f"{name}: {place} is {SHAPE_WORDS.get(type(value), type(value).__name__)}, where piku "
                        f"reads {SHAPE_WORDS[wanted]}", f"Fix {name}, commit, and push again.")
    if isinstance(shape, dict):
        for key, inner in shape.items():
            if key in value:
                check_shape(value[key], inner, name, f"{where}.{key}" if where else key)
    elif isinstance(shape, list):
        for index, item in enumerate(value):
            check_shape(item, shape[0], name, f"{where}[{index}]")


def read_pyproject(root):
    """pyproject.toml as a dict ({} when there is none)."""
    return read_shaped(root, "pyproject.toml")


def is_poetry_project(pyproject):
    """Poetry 1.x: the dependencies are in [tool.poetry], and there is no [project] table."""
    poetry = pyproject.get("tool", {}).get("poetry", {})
    return "project" not in pyproject and isinstance(poetry, dict) and "dependencies" in poetry


def is_packaged(pyproject):
    """Does the project install itself (uv's and Poetry's rules: a build system, unless turned off)?"""
    tool = pyproject.get("tool", {})
    uv_package = tool.get("uv", {}).get("package")
    if uv_package is not None:
        return bool(uv_package)
    if tool.get("poetry", {}).get("package-mode") is False:
        return False
    return "build-system" in pyproject


class PythonBuildpack:
    """What the Python buildpacks share: choose the interpreter and the WSGI server,
    fingerprint the inputs, and reuse the environment or build a new one beside it.

    An environment holds the dependencies only, so releases share it while its fingerprint
    stays the same. A project that installs itself (a build system, a uv workspace member, a
    path dependency) is installed per release, without dependencies, into a folder beside the
    release's code (RELEASE.site, on PYTHONPATH and PATH): each release -- and each rollback --
    runs its own code, and a code-only push still skips the dependencies."""
    name = "python"
    priority = 10
    needs_uv = True
    files = ()              # the manifests this buildpack reads: the first one present picks it
    inputs = ()             # files of the app whose content decides the environment
    skipped = "uv sync skipped"     # what a reused environment saves, as the push says it

    def detect(self, root, processes):
        found = python_manifests(root)
        return bool(found) and found[0] in self.files

    def build(self, context):
        started = time.monotonic()
        # the app's own cache; files copied out of it, not linked: a later build that could write
        # the cache must not change an environment a release runs (nor can a link cross the
        # sandbox's mounts)
        uv_folder = app_uv_folder(context.app)
        tool_env = dict(build_tool_env(context.env), UV_CACHE_DIR=os.path.join(uv_folder, "cache"),
                        UV_TOOL_DIR=os.path.join(uv_folder, "tools"), UV_LINK_MODE="copy")
        context.host_env = discovery_env(context.env)
        uv = find_uv(context.host_env, required=self.needs_uv)
        self.check(context, uv, tool_env)
        request = resolve_python_request(context)
        step(f"Python {request.value} (from {request.source})" if request.value
             else "Python: no version requested, using uv's default")
        interpreter = find_interpreter(uv, request.value, context.host_env, context)
        context.tools = (*context.tools, *tool_folders(interpreter.path), *(tool_folders(uv) if uv else ()))
        server = self.wsgi_server(context, interpreter)
        servers = server_packages(context.processes, server)
        fingerprint = self.fingerprint(context, uv, interpreter, tool_env, servers)
        venv = os.path.join(env_dir(context.app), "python-" + fingerprint_digest(fingerprint)[:16])
        if environment_intact(venv, fingerprint):
            step(f"Dependencies unchanged: reusing {venv} (Python {interpreter.version}); {self.skipped}")
        else:
            self.create(context, uv, interpreter, venv, tool_env, servers, fingerprint)
        record_environment(context.app, venv, interpreter.path)
        path = context.env["PATH"]
        if uv and os.path.dirname(uv) not in path.split(":"):
            path = f"{path}:{os.path.dirname(uv)}"      # `uv run` in a Procfile finds the uv that built it
        additions = {"VIRTUAL_ENV": venv, "PATH": f"{venv}/bin:{path}",
                     "PYTHONUNBUFFERED": context.env.get("PYTHONUNBUFFERED", "1"), **uv_run_settings(venv)}
        packages = self.local_packages(context, uv, tool_env)
        if packages:
            site = install_local_packages(context, uv, venv, tool_env, packages)
            pythonpath = context.env.get("PYTHONPATH")
            additions.update(PYTHONPATH=f"{site}:{pythonpath}" if pythonpath else site,
                             PATH=f"{site}/bin:{additions['PATH']}")
        if server:
            additions["WSGI_SERVER"] = server
        notice(f"Python environment ready in {time.monotonic() - started:.2f} s")
        collect_static(context, dict(context.env, **additions), [venv])
        return BuildResult(additions, [venv])

    def check(self, context, uv, tool_env):
        """Refuse what cannot build, before any work (tools, project shape)."""

    def local_packages(self, context, uv, tool_env):
        """Paths (relative to the release) of the packages installed per release."""
        return []

    def wsgi_server(self, context, interpreter):
        if "wsgi" not in context.processes:
            return None
        server, reason = choose_wsgi_server(context.env.get("WSGI_SERVER"), interpreter.version,
                                            uwsgi_python_version(), context.app)
        step(f"Serving wsgi with {server}: {reason}")
        if server == "gunicorn" and "static" in context.processes:
            warning("gunicorn does not serve the 'static:' folder; serve it from the app until nginx does")
        return server

    def fingerprint(self, context, uv, interpreter, tool_env, servers):
        """Everything that decides what the environment contains (secrets left out)."""
        files = {}
        for name in self.inputs:
            data = read_pushed_bytes(context.root, name, PUSHED_LOCK_MAX)
            files[name] = hashlib.sha256(data).hexdigest() if data is not None else None
        settings = {key: strip_url_credentials(value) for key, value in sorted(tool_env.items())
                    if key.startswith("UV_") and key not in UV_UNRELATED_SETTINGS and not is_secret(key)}
        fingerprint = {"layout": 1, "buildpack": self.name, "files": files,
                       "python": [interpreter.path, interpreter.version],
                       "tool": tool_version(uv) if uv else "pip", "settings": settings,
                       "gunicorn": "gunicorn" in servers}
        if "uvicorn-worker" in servers:
            fingerprint["asgi"] = True
        return fingerprint

    def create(self, context, uv, interpreter, venv, tool_env, servers, fingerprint):
        """Build a new environment at venv; the marker written last makes it usable."""
        if os.path.lexists(venv):
            shutil.rmtree(venv)         # a half-built one from a failed deploy
        started = time.monotonic()
        self.install(context, uv, interpreter, venv, tool_env)
        missing = [package for package in servers if not has_module(venv, SERVER_MODULES[package])]
        if missing:
            step(f"Adding {' and '.join(missing)} to the environment (the app does not depend on "
                 f"{'them' if len(missing) > 1 else 'it'})")
            install_packages(uv, venv, missing, tool_env, context.root, context.view(venv))
        marker = os.path.join(venv, ENV_MARKER)
        if os.path.isdir(marker) and not os.path.islink(marker):
            shutil.rmtree(marker)       # the build's, not piku's: piku's marker is written only here
        write_atomic(marker, fingerprint_text(fingerprint))
        notice(f"environment built in {time.monotonic() - started:.1f} s: {venv}")

    def new_venv(self, context, uv, interpreter, venv, tool_env):
        if uv:
            run_build_tool([uv, "venv", "--quiet", "--python", interpreter.path, venv], context.root, tool_env,
                           view=context.view(venv))
        else:
            notice("uv not found: using venv and pip")
            run_build_tool([interpreter.path, "-m", "venv", venv], context.root, tool_env, view=context.view(venv))


def uv_run_settings(venv):
    """What makes `uv run` in a Procfile, `run`, cron or `release:` use the release's environment
    as it is: no .venv in the release, no sync (which would add the dev group to an environment
    other releases share, and could need the network at a worker's start)."""
    return {"UV_PROJECT_ENVIRONMENT": venv, "UV_NO_SYNC": "1"}


SERVER_MODULES = {"gunicorn": "gunicorn", "uvicorn-worker": "uvicorn_worker"}


def server_packages(processes, wsgi_server):
    """The servers piku runs the app's HTTP kinds with, which its environment must hold."""
    if "asgi" in processes:
        return ["gunicorn", "uvicorn-worker"]
    return ["gunicorn"] if wsgi_server == "gunicorn" else []


def has_module(venv, module):
    return bool(glob.glob(os.path.join(venv, "lib", "python*", "site-packages", module)))


def project_site(root):
    """Where a release's own packages are installed: beside its code, removed with it."""
    return root.rstrip("/") + ".site"


def install_local_packages(context, uv, venv, tool_env, packages):
    site = project_site(context.root)
    if os.path.lexists(site):
        shutil.rmtree(site)
    step(f"Installing {', '.join(packages)} into this release (no dependencies: they are in the environment)")
    run_build_tool([uv, "pip", "install", "--quiet", "--no-deps", "--compile-bytecode", "--python",
                    os.path.join(venv, "bin", "python"), "--target", site, *packages], context.root, tool_env,
                   view=context.view(site, read=[venv]))
    return site


def local_requirement(line, root):
    """The path of a requirement line that names a folder of the release, or None."""
    requirement = line.split(";", 1)[0].split(" --hash", 1)[0].strip()
    if " @ file://" in requirement:
        requirement = requirement.split(" @ file://", 1)[1]
    elif not requirement.startswith((".", "/", "file://")):
        return None
    path = requirement.removeprefix("file://")
    resolved = os.path.realpath(os.path.join(root, path))
    if not inside(resolved, root):
        raise PikuError(f"the local package {path!r} is outside the pushed code",
                        "Keep path dependencies inside the repository (a uv workspace member, say).")
    return os.path.relpath(resolved, root) if resolved != root else "."


def comma_list(value):
    return [part.strip() for part in (value or "").split(",") if part.strip()]


class UvBuildpack(PythonBuildpack):
    """pyproject.toml: uv sync, honouring a committed uv.lock."""
    name = "python-uv"
    files = ("uv.lock", "pyproject.toml")
    inputs = ("pyproject.toml", "uv.lock")

    def detect(self, root, processes):
        found = python_manifests(root)
        return bool(found) and (found[0] == "uv.lock" or found[0] == "pyproject.toml"
                                and not is_poetry_project(safe_pyproject(root)))

    def check(self, context, uv, tool_env):
        if not os.path.isfile(os.path.join(context.root, "pyproject.toml")):
            raise PikuError("uv.lock is pushed without its pyproject.toml",
                            "Commit pyproject.toml (uv.lock is made from it), and push again.")
        pyproject = read_pyproject(context.root)
        check_uv_version(uv, pyproject, context.root)
        project = pyproject.get("project")
        workspace = pyproject.get("tool", {}).get("uv", {}).get("workspace")
        if not isinstance(project, dict) and not isinstance(workspace, dict):
            raise PikuError("pyproject.toml names no dependencies in any form piku knows",
                            "Expected a [project] table with 'dependencies = [...]' (uv, pip, Poetry 2), "
                            "[tool.poetry.dependencies] with a poetry.lock (Poetry 1.x), or a uv workspace "
                            "([tool.uv.workspace]); or push a requirements.txt instead.")
        if isinstance(project, dict) and "dependencies" not in project and \
                "dependencies" not in project.get("dynamic", []):
            raise PikuError("pyproject.toml's [project] table has no 'dependencies' list",
                            "Add one, even empty ('dependencies = []' when the app needs nothing), "
                            "run 'uv lock', commit, and push again.")
        package = context.env.get("UV_PACKAGE", "").strip()
        members = workspace_members(context.root)
        if package and package not in members:
            raise PikuError(f"UV_PACKAGE={package!r} is not a member of this uv workspace"
                            + (f" (members: {', '.join(members)})" if members else " (there is no uv.lock naming them)"),
                            f"Name one with: config:set {context.app} UV_PACKAGE=NAME")
        if not package and not isinstance(project, dict):
            raise PikuError("this repository is a uv workspace without a root project; piku deploys one member",
                            f"Name it with: config:set {context.app} UV_PACKAGE=NAME"
                            + (f" (members: {', '.join(members)})" if members else ""))

    def selection(self, context):
        """uv's flags that pick what is installed: the member, extras and groups."""
        args = ["--no-default-groups"]
        package = context.env.get("UV_PACKAGE", "").strip()
        args += ["--package", package] if package else []
        for setting, flag in (("UV_SYNC_EXTRAS", "--extra"), ("UV_SYNC_GROUPS", "--group")):
            for name in comma_list(context.env.get(setting)):
                args += [flag, name]
        return args

    def install(self, context, uv, interpreter, venv, tool_env):
        locked = os.path.isfile(os.path.join(context.root, "uv.lock"))
        if not locked:
            warning("no uv.lock: dependencies are resolved afresh, so this deploy is not reproducible")
            warning("run 'uv lock', commit uv.lock, and push again")
        args = [uv, "sync", "--no-install-local", "--python", interpreter.path]
        args += ["--locked"] if locked else []
        args += ["--compile-bytecode"]      # once per environment, so each new worker starts faster
        args += self.selection(context)
        step("Running " + " ".join(["uv", *args[1:]]))
        run_build_tool(args, context.root, dict(tool_env, UV_PROJECT_ENVIRONMENT=venv), view=context.view(venv))

    def local_packages(self, context, uv, tool_env):
        """The project, workspace members and path dependencies the app uses, from uv.lock (which
        this also checks against every pyproject.toml, also when the environment is reused)."""
        pyproject = read_pyproject(context.root)
        if not os.path.isfile(os.path.join(context.root, "uv.lock")):
            return ["."] if is_packaged(pyproject) else []
        tool = pyproject.get("tool", {}).get("uv", {})
        if not is_packaged(pyproject) and "workspace" not in tool and "sources" not in tool:
            return []           # a flat project: nothing of its own to install
        args = [uv, "export", "--locked", "--quiet", "--no-hashes", "--no-header", "--no-annotate",
                "--no-editable", "--format", "requirements.txt", *self.selection(context)]
        output = run_build_tool(args, context.root, tool_env, show=False, view=context.view())
        return [path for path in (local_requirement(line, context.root) for line in output.splitlines()
                                  if line.strip() and not line.startswith(("#", "-"))) if path]


def safe_pyproject(root):
    """pyproject.toml for detection, which must not fail: {} when it cannot be read."""
    try:
        return read_pyproject(root)
    except PikuError:
        return {}


def workspace_members(root):
    """The members uv.lock names for a workspace ([] for a single project)."""
    if not os.path.isfile(os.path.join(root, "uv.lock")):
        return []
    manifest = read_shaped(root, "uv.lock").get("manifest", {})
    return sorted(manifest.get("members", []))


UV_VERSION = LazyPattern(r"uv ([0-9]+(?:\.[0-9]+)*)")


def check_uv_version(uv, pyproject, root):
    """[tool.uv] required-version (or uv.toml's), checked against this host's uv."""
    required = pyproject.get("tool", {}).get("uv", {}).get("required-version")
    if required is None and os.path.isfile(os.path.join(root, "uv.toml")):
        required = read_shaped(root, "uv.toml").get("required-version")
    if not isinstance(required, str) or not required.strip():
        return
    match = UV_VERSION.match(tool_version(uv))
    have = match.group(1) if match else "unknown"
    wanted = required.strip() if required.strip()[0] in "<>=!~" else "==" + required.strip()
    if match and version_allowed(have, wanted):
        return
    raise PikuError(f"this project requires uv {required.strip()} ([tool.uv] required-version), "
                    f"but the server has uv {have}",
                    "Upgrade uv as the piku user: 'uv self update' (installed with uv's installer) or "
                    "'pipx upgrade uv', then push again.")


class ExportedLockBuildpack(PythonBuildpack):
    """A lock file another tool owns (Poetry, Pipenv): the tool checks it against its manifest
    and exports the main dependencies, exactly as locked, with hashes; uv installs that list
    into a new environment. The tool runs only when the environment is built."""
    tool = ""
    lock = ""
    manifest = ""
    install_hint = ""
    uv_tool = ()            # the pinned tool (and plugins) `uv tool run` runs when none is installed
    stale_needles = ()

    @property
    def skipped(self):
        return f"{self.tool} and uv skipped"

    def check(self, context, uv, tool_env):
        if not os.path.isfile(os.path.join(context.root, self.lock)):
            raise PikuError(f"{self.manifest} is pushed without {self.lock}; piku installs exactly what the lock says",
                            f"Run '{self.tool} lock', commit {self.lock}, and push again.")
        if not os.path.isfile(os.path.join(context.root, self.manifest)):
            raise PikuError(f"{self.lock} is pushed without {self.manifest}",
                            f"Commit {self.manifest} too, and push again.")
        read_shaped(context.root, self.lock)

    def install(self, context, uv, interpreter, venv, tool_env):
        tool, which = self.tool_command(context, uv, tool_env)
        env = dict(tool_env, **self.tool_settings)
        self.verify(context, tool, env)
        step(f"Exporting the main dependencies of {self.lock} with {which}")
        exported = run_build_tool([*tool, *self.export_args], context.root, env, show=False,
                                  failures=self.failures(), name=f"{self.tool} {self.export_args[0]}",
                                  view=context.view())
        if not exported.strip():
            raise PikuError(f"{self.tool} exported no dependencies from {self.lock}",
                            f"Check that {self.manifest} lists the app's dependencies in its main group.")
        self.new_venv(context, uv, interpreter, venv, tool_env)
        requirements = os.path.join(venv, ".piku-requirements.txt")     # where the build may read it
        write_atomic(requirements, exported, mode=0o600)
        step("Installing the locked versions with uv pip sync")
        run_build_tool([uv, "pip", "sync", "--compile-bytecode", "--python",
                        os.path.join(venv, "bin", "python"), requirements], context.root, tool_env,
                       view=context.view(venv))

    def tool_command(self, context, uv, tool_env):
        """The tool as the piku user installed it, else the version pinned in uv_tool, run with
        `uv tool run` (fetched once into uv's cache) -> (command, what the push calls it)."""
        found = locate_tool(self.tool, context.host_env)
        if found:
            context.tools = (*context.tools, *tool_folders(found))
            return [found], f"{self.tool} at {found}"
        requirement, *plugins = self.uv_tool
        pinned = " and ".join(self.uv_tool)
        environment = [uv, "tool", "run", "--offline", "--from", requirement, *(f"--with={plugin}" for plugin in plugins)]
        home, check = os.path.expanduser("~"), ["python", "-I", "-c", "pass"]    # starts the tool's Python only
        # from uv's cache, with no request to the index (the version is pinned): a 0.05 s check
        view = context.view()
        with launch(view, [*environment, *check], tool_env) as (argv, env, fds):
            probe = subprocess.run(argv, cwd=home, env=env, pass_fds=fds, text=True, stdin=subprocess.DEVNULL,
                                   capture_output=True)
        if probe.returncode != 0 and not any(needle in probe.stderr for needle in UV_CACHE_MISSES):
            for line in probe.stderr.strip().splitlines()[-10:]:
                notice(mask_secrets(line, secret_values(tool_env)))
            raise PikuError(f"uv could not run {pinned}, which this app's lock file needs (uv's words are above)",
                            f"Check the app's UV_* settings (config APP) and the host's uv.toml, or install "
                            f"{self.tool} for the piku user: '{self.install_hint}'; then push again.")
        if probe.returncode != 0:
            environment.remove("--offline")     # fetched now; without a cache (UV_NO_CACHE) every time
            step(f"Fetching {pinned} into uv's cache (no {self.tool} is installed for the piku user)")
            try:
                run_build_tool([*environment, *check], home, tool_env, show=False, view=view)
            except PikuError:
                raise PikuError(f"{self.tool} is not installed for the piku user, and uv could not fetch {requirement} "
                                "(uv's output is above)", "Let the piku user reach the package index, or install "
                                f"{self.tool} as that user: '{self.install_hint}'; then push again.") from None
        return [*environment, self.tool], f"{pinned} (uv tool run: no {self.tool} is installed for the piku user)"

    def verify(self, context, tool, env):
        """Check the lock against its manifest, when exporting does not."""

    def failures(self):
        return tuple((needle, f"{self.lock} is out of date with {self.manifest}",
                      f"Run '{self.tool} lock', commit {self.lock}, and push again.")
                     for needle in self.stale_needles)


# What uv says when --offline finds a package missing from its cache (it must fetch it first).
UV_CACHE_MISSES = ("not found in the cache", "network was disabled", "network connectivity is disabled")


class PoetryBuildpack(ExportedLockBuildpack):
    """poetry.lock (Poetry 1.x [tool.poetry] or Poetry 2 [project] projects)."""
    name = "python-poetry"
    files = ("poetry.lock", "pyproject.toml")   # its own detect() decides which pyproject.toml is Poetry's
    inputs = ("pyproject.toml", "poetry.lock")
    tool, lock, manifest = "poetry", "poetry.lock", "pyproject.toml"
    install_hint = "uv tool install poetry --with poetry-plugin-export"
    uv_tool = ("poetry==2.5.1", "poetry-plugin-export==1.10.1")     # docs/PYTHON.md names them
    export_args = ("export", "--only", "main", "--format", "requirements.txt", "--no-interaction", "--no-ansi")
    tool_settings = {"POETRY_VIRTUALENVS_CREATE": "false", "POETRY_NO_INTERACTION": "1"}
    stale_needles = ("changed significantly since poetry.lock was last generated",
                     "poetry.lock is not consistent with pyproject.toml")

    def detect(self, root, processes):
        found = python_manifests(root)
        return bool(found) and (found[0] == "poetry.lock" or found[0] == "pyproject.toml"
                                and is_poetry_project(safe_pyproject(root)))

    def check(self, context, uv, tool_env):
        super().check(context, uv, tool_env)
        read_pyproject(context.root)

    def local_packages(self, context, uv, tool_env):
        return ["."] if is_packaged(read_pyproject(context.root)) else []


class PipenvBuildpack(ExportedLockBuildpack):
    """Pipfile.lock: its default section, as locked."""
    name = "python-pipenv"
    files = ("Pipfile.lock", "Pipfile")
    inputs = ("Pipfile", "Pipfile.lock")
    tool, lock, manifest = "pipenv", "Pipfile.lock", "Pipfile"
    install_hint = "uv tool install pipenv"
    uv_tool = ("pipenv==2026.10.3",)
    export_args = ("requirements", "--hash")
    tool_settings = {"PIPENV_IGNORE_VIRTUALENVS": "1", "PIPENV_NOSPIN": "1", "PIPENV_YES": "1",
                     "PIPENV_VERBOSITY": "-1"}
    stale_needles = ("Pipfile.lock is out-of-date",)

    def verify(self, context, tool, env):
        run_build_tool([*tool, "verify"], context.root, env, show=False, failures=self.failures(),
                       name=f"{self.tool} verify", view=context.view())


class RequirementsBuildpack(PythonBuildpack):
    """requirements.txt: uv venv + uv pip install when uv is there, else venv + pip."""
    name = "python-requirements"
    needs_uv = False
    files = ("requirements.txt",)
    inputs = ("requirements.txt",)
    skipped = "uv pip install skipped"

    def install(self, context, uv, interpreter, venv, tool_env):
        self.new_venv(context, uv, interpreter, venv, tool_env)
        step("Installing requirements.txt")
        install_packages(uv, venv, ["-r", "requirements.txt"], tool_env, context.root, context.view(venv))


buildpack(UvBuildpack)
buildpack(PoetryBuildpack)
buildpack(PipenvBuildpack)
buildpack(RequirementsBuildpack)
buildpack(StaticBuildpack)
buildpack(GenericBuildpack)


def select_buildpack(root, processes):
    for pack in BUILDPACKS:
        if pack.detect(root, processes):
            return pack
    raise PikuError("no buildpack matches this app")


def describe_detection(pack, root):
    """What the push says about the files it chose by, and those it ignored."""
    found = python_manifests(root)
    own = [name for name in found if name in getattr(pack, "files", ())]
    ignored = [name for name in found if name not in own]
    step(f"Found {', '.join(own)}: building with the {pack.name} buildpack" if own
         else f"Building with the {pack.name} buildpack")
    if ignored:
        notice(f"ignored: {', '.join(ignored)} ({found[0]} comes first; the order is in docs/PYTHON.md)")


def locate_tool(name, env, folders=(".local/bin",)):
    """A tool on the app's PATH, else in the piku user's folders its installers use, or None."""
    home = os.path.expanduser("~")
    return shutil.which(name, path=env.get("PATH")) or next(
        (path for path in (os.path.join(home, folder, name) for folder in folders) if os.access(path, os.X_OK)), None)


# --- Django -----------------------------------------------------------------------

def collect_static(context, env, environments):
    """A Django project's static files, collected into the release at build time."""
    if not os.path.isfile(os.path.join(context.root, "manage.py")) or not has_module(env["VIRTUAL_ENV"], "django"):
        return
    if env.get("DISABLE_COLLECTSTATIC", "").strip() in ("1", "true", "yes"):
        notice("DISABLE_COLLECTSTATIC is set: manage.py collectstatic skipped")
        return
    step("Django: running manage.py collectstatic --noinput")
    args = [os.path.join(env["VIRTUAL_ENV"], "bin", "python"), "manage.py", "collectstatic", "--noinput"]
    view = context.view(read=release_environment(context.app, context.root, environments))
    with launch(view, args, dict(env, PWD=context.root)) as (argv, run_env, fds):
        result = subprocess.run(argv, cwd=context.root, env=run_env, pass_fds=fds, text=True,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in result.stdout.splitlines()[-20:]:
        notice(line)
    if result.returncode != 0:
        raise PikuError("manage.py collectstatic failed; nothing was changed",
                        "Set STATIC_ROOT in the Django settings (see docs/PYTHON.md), or skip it with "
                        f"config:set {context.app} DISABLE_COLLECTSTATIC=1.")


# --- build tools ------------------------------------------------------------------

ENV_MARKER = ".piku-fingerprint"
UV_UNRELATED_SETTINGS = frozenset({"UV_CACHE_DIR", "UV_PROJECT_ENVIRONMENT", "UV_NO_PROGRESS", "UV_NO_SYNC",
                                   "UV_LINK_MODE", "UV_TOOL_DIR"})
TOOL_ENV_PASSTHROUGH = ("HOME", "USER", "LANG", "LC_ALL", "TZ", "SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS",
                        "http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY")
UV_CONFIG_FILES = ("~/.config/uv/uv.toml", "/etc/uv/uv.toml")


DISCOVERY_SETTINGS = ("UV_PYTHON_DOWNLOADS", "UV_PYTHON_PREFERENCE")


def discovery_env(app_env):
    """The environment piku finds uv, the Pythons and the build tools in, and runs them outside
    any sandbox to ask their version: the host's own (piku's PATH, uv's settings, the home) and,
    of the app's settings, only those that choose among the host's Pythons -- never a PATH, a
    folder or a cache an app could point at programs of its own."""
    env = build_tool_env({key: app_env[key] for key in DISCOVERY_SETTINGS if key in app_env})
    env["PATH"] = clean_path(os.environ.get("PATH") or DEFAULT_PATH)
    return env


def build_tool_env(app_env):
    """The environment uv and pip run in: the host's UV_* and proxy settings, then the app's.
    uv downloads no Python unless the host (its environment or uv.toml) or the app's settings
    allow it."""
    env = {key: value for key, value in os.environ.items()
           if key in TOOL_ENV_PASSTHROUGH or key.startswith("UV_")}
    env.update(app_env)
    env.setdefault("UV_PYTHON_PREFERENCE", "managed")
    if "UV_PYTHON_DOWNLOADS" not in env and not host_sets_python_downloads():
        env["UV_PYTHON_DOWNLOADS"] = "never"
    env["UV_NO_PROGRESS"] = "1"
    env.pop("VIRTUAL_ENV", None)
    return env


def host_sets_python_downloads(value=""):
    """Does the host's uv.toml set python-downloads (to value, when given)?"""
    pattern = r"^\s*python-downloads\s*=\s*" + (f"[\"']{value}[\"']" if value else "")
    for path in UV_CONFIG_FILES:
        try:
            if re.search(pattern, read_text(os.path.expanduser(path)), re.M):
                return True
        except (PikuError, OSError):
            continue
    return False


def python_downloads_allowed(env):
    setting = env.get("UV_PYTHON_DOWNLOADS")
    return setting == "automatic" if setting is not None else host_sets_python_downloads("automatic")


def environment_python(venv):
    """The Python version a finished environment was built with, from piku's marker (None: none)."""
    try:
        python = json.loads(read_nofollow(os.path.join(venv, ENV_MARKER), 1024 * 1024) or "{}").get("python")
    except (ValueError, AttributeError):
        return None
    return python[1] if isinstance(python, list) and len(python) == 2 and isinstance(python[1], str) else None


def fingerprint_text(fingerprint):
    return json.dumps(fingerprint, sort_keys=True, indent=1) + "\n"


def fingerprint_digest(fingerprint):
    return hashlib.sha256(fingerprint_text(fingerprint).encode()).hexdigest()


def environment_intact(path, fingerprint, needed="bin/python"):
    """A finished environment (marker matches) whose interpreter (or node_modules) still exists."""
    # (read without following a link or blocking: a build script may write its -build environment)
    return (read_nofollow(os.path.join(path, ENV_MARKER), 1024 * 1024) == fingerprint_text(fingerprint)
            and os.path.exists(os.path.join(path, needed)))


def install_packages(uv, venv, args, tool_env, cwd, view):
    python = os.path.join(venv, "bin", "python")
    if uv:
        run_build_tool([uv, "pip", "install", "--compile-bytecode", "--python", python, *args], cwd, tool_env, view=view)
    else:
        run_build_tool([python, "-m", "pip", "install", "--disable-pip-version-check", *args], cwd, tool_env, view=view)


UV_FAILURES = (
    ("needs to be updated, but `--locked`", "uv.lock is out of date with pyproject.toml",
     "Run 'uv lock', commit uv.lock, and push again."),
    ("incompatible with the project's Python requirement", "the Python version conflicts with requires-python",
     "Pick a version requires-python allows (config:set APP PYTHON_VERSION=X.Y) or change requires-python."),
    ("No solution found", "the dependencies cannot be resolved",
     "Check the package names and versions in pyproject.toml, run 'uv lock' locally, commit, and push again."),
    ("not found in the package registry", "a package was not found in the package index",
     "Check the package names in pyproject.toml / requirements.txt."),
    ("401 Unauthorized", "the package index refused the credentials (HTTP 401)",
     "Set them with: config:set APP UV_INDEX_<NAME>_USERNAME=... UV_INDEX_<NAME>_PASSWORD=... "
     "(NAME is the index's name in [[tool.uv.index]], upper-case, '-' as '_')."),
    ("403 Forbidden", "the package index refused access (HTTP 403)",
     "Check the index's credentials (config:set APP UV_INDEX_<NAME>_PASSWORD=...) and permissions."),
    ("Required uv version", "the project requires another version of uv",
     "Upgrade uv as the piku user ('uv self update' or 'pipx upgrade uv'), then push again."),
)


class CommandTimeout(Exception):
    """A command piku streamed ran past its time and was stopped."""


def stream_command(args, cwd, env, secrets=(), timeout=None, view=None):
    """Run args in a session of its own, showing each line of its output (stdout and stderr)
    indented as it comes, secrets masked. -> (exit code, the output). Past timeout seconds, or
    when anything stops piku meanwhile (the client went, ^C), the command and everything it
    started are killed: nothing it runs outlives the deploy that ran it. CommandTimeout then.
    With a view, the command runs in the app's sandbox."""
    with launch(view, args, env) as (argv, run_env, fds):
        process = subprocess.Popen(argv, cwd=cwd, env=run_env, pass_fds=fds, stdin=subprocess.DEVNULL,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    lines, pending = [], b""
    def show(raw):
        line = raw.decode(errors="replace")
        lines.append(line + "\n")
        notice(mask_secrets(line, secrets))
    try:
        while True:
            if deadline is not None:
                wait = deadline - time.monotonic()
                if wait <= 0 or not select.select([process.stdout], [], [], wait)[0]:
                    raise CommandTimeout(f"{args[0]} ran for more than {timeout:g} s")
            chunk = os.read(process.stdout.fileno(), 65536)
            if not chunk:
                break
            *complete, pending = (pending + chunk).split(b"\n")
            for raw in complete:
                show(raw)
        if pending:
            show(pending)
        # its output closed; the command itself may go on (`exec >/dev/null; sleep ...`)
        process.wait(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(ProcessLookupError, PermissionError):   # none left: nothing to do
            os.killpg(process.pid, signal.SIGKILL)     # what it left running in the background
    except subprocess.TimeoutExpired:
        kill_session(process)
        raise CommandTimeout(f"{args[0]} ran for more than {timeout:g} s")
    except BaseException:
        kill_session(process)
        raise
    finally:
        process.stdout.close()
    return process.returncode, "".join(lines)


def kill_session(process):
    """Kill a command -- and, when it was started in a session of its own, everything in it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):    # gone already; wait() reaps it
        if os.getpgid(process.pid) == process.pid:
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    process.wait()


def run_build_tool(args, cwd, env, show=True, failures=(), name=None, view=None):
    """Run a build tool (uv, pip, poetry, pipenv) with no terminal to ask on; stream its output
    indented as it comes, with secrets masked (or keep its stdout, when show is False), and turn
    a failure into an actionable error. -> its stdout"""
    secrets = secret_values(env)
    if show:
        returncode, output = stream_command(args, cwd, env, secrets, view=view)
        result = subprocess.CompletedProcess(args, returncode, "", "")
    else:
        with launch(view, args, env) as (argv, run_env, fds):
            result = subprocess.run(argv, cwd=cwd, env=run_env, pass_fds=fds, text=True,
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        output = result.stderr
        if result.returncode != 0:
            for line in (output or "").splitlines():
                notice(mask_secrets(line, secrets))
    if result.returncode != 0:
        for needle, message, hint in (*failures, *UV_FAILURES):
            if needle in (output or "") or needle in result.stdout:
                raise PikuError(f"{message}; nothing was changed", hint)
        raise PikuError(f"{name or os.path.basename(args[0]) + ' ' + args[1]} failed (exit code {result.returncode}); "
                        "nothing was changed", "See its output above.")
    return result.stdout


# --- secrets ----------------------------------------------------------------------
# Credentials for private package indexes (uv's UV_INDEX_<NAME>_USERNAME/_PASSWORD) and
# settings named like secrets are shown masked in `config`, `config:live` and build output;
# they are left out of environment fingerprints, so changing only a password rebuilds nothing.

SECRET_KEY = LazyPattern(r"UV_INDEX_[A-Z0-9_]+_(USERNAME|PASSWORD)|(.*_)?(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY)(_.*)?")
URL_CREDENTIALS = LazyPattern(r"(?<=://)[^/@\s:]+(:[^/@\s]*)?@")
MASK = "****"


def is_secret(key):
    return bool(SECRET_KEY.fullmatch(key))


def strip_url_credentials(value):
    return URL_CREDENTIALS.sub("", value)


def secret_values(env):
    """The values to mask in output: secret settings, and credentials written into URLs."""
    values = {value for key, value in env.items() if is_secret(key) and len(value) >= 3}
    for value in env.values():
        for match in URL_CREDENTIALS.finditer(value):
            values.add(match.group(0)[:-1])
    return sorted(values, key=len, reverse=True)


def mask_secrets(text, secrets):
    for value in secrets:
        text = text.replace(value, MASK)
    return text


def masked_settings(settings):
    return {key: MASK if is_secret(key) and value else URL_CREDENTIALS.sub(MASK + "@", value)
            for key, value in settings.items()}


##############################################################################
# Interpreters
##############################################################################

PYTHON_REQUEST = LazyPattern(r"(?:(?:cpython|pypy|graalpy)[@-]?)?[0-9]+(?:\.[0-9]+){0,2}t?"
                            r"|(?:(?:==|!=|<=|>=|~=|<|>)\s*[0-9]+(?:\.[0-9]+){0,2}(?:\.\*)?\s*,?\s*)+")
WSGI_SERVERS = ("auto", "uwsgi", "gunicorn")
_PROBES = {}


@record
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
    for line in read_pushed_text(root, ".python-version").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            return line
    return None


def requires_python(root):
    """The project's Python requirement as a PEP 440 specifier, or None: [project]
    requires-python, or the python constraint of a Poetry 1.x project."""
    if not os.path.isfile(os.path.join(root, "pyproject.toml")):
        return None
    pyproject = read_pyproject(root)
    specifier = pyproject.get("project", {}).get("requires-python")
    if specifier is None and is_poetry_project(pyproject):
        specifier = poetry_constraint(pyproject["tool"]["poetry"]["dependencies"].get("python"))
    return specifier if isinstance(specifier, str) else None


def poetry_constraint(constraint):
    """Poetry's '^3.10', '~3.10', '3.10.*' or '>=3.9,<3.13' as a PEP 440 specifier (None: any)."""
    if not isinstance(constraint, str):
        return None
    parts = []
    for part in re.split(r"\s*,\s*|\s+(?=[<>=!~^])", constraint.strip()):
        match = re.fullmatch(r"([\^~])([0-9]+)(?:\.([0-9]+))?(?:\.[0-9]+)?", part)
        if match:
            op, major, minor_part = match.group(1), int(match.group(2)), match.group(3)
            if op == "^" or minor_part is None:
                upper = f"{major + 1}" if major or op == "~" else f"0.{int(minor_part or 0) + 1}"
            else:
                upper = f"{major}.{int(minor_part) + 1}"
            parts += [f">={part[1:]}", f"<{upper}"]
        elif re.fullmatch(r"[0-9]+(\.[0-9]+)*\.\*", part):
            parts.append("==" + part)
        elif re.fullmatch(r"(==|!=|<=|>=|~=|<|>)\s*[0-9][0-9.]*(\.\*)?", part):
            parts.append(part.replace(" ", ""))
        else:
            return None         # '*', '||' alternatives: no constraint piku can check
    return ",".join(parts) or None


def pipfile_python(root):
    """The Python a Pipfile.lock was made for ([requires] python_full_version or python_version)."""
    if not os.path.isfile(os.path.join(root, "Pipfile.lock")):
        return None
    requires = read_shaped(root, "Pipfile.lock").get("_meta", {}).get("requires", {})
    return requires.get("python_full_version") or requires.get("python_version")


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
    pinned = pipfile_python(context.root)
    if pinned and python_manifests(context.root)[0] in PipenvBuildpack.files:
        return PythonRequest(validate_python_request(pinned, "Pipfile.lock"), "Pipfile.lock [requires]")
    if "wsgi" in context.processes and (env.get("WSGI_SERVER") or "auto").lower() != "gunicorn":
        embedded = uwsgi_python_version()
        if embedded and version_allowed(embedded, requires_python(context.root)):
            return PythonRequest(minor(embedded), f"uWSGI, which embeds Python {embedded}")
    return PythonRequest(None, "uv's default")


def find_uv(env, required=True):
    """uv on the app's PATH, or where its installers put it (None when not required)."""
    found = locate_tool("uv", env, (".local/bin", ".cargo/bin"))
    if not found and required:
        raise PikuError("uv is not installed for the piku user; it builds apps with a pyproject.toml",
                        "Install it as that user: 'curl -LsSf https://astral.sh/uv/install.sh | sh' "
                        "or 'pipx install uv' (apt-get install pipx), then push again.")
    return found


def tool_version(tool):
    """`tool --version`, asked again only when the program changed (a push asks each time); a
    version manager's shim (a script, or a link to a program of another name) is always asked."""
    if tool not in _PROBES:
        key = program_key(tool)
        ask = lambda: run_command([tool, "--version"], capture=True).stdout.strip()     # noqa: E731
        named = os.path.basename(os.path.realpath(tool)) == os.path.basename(tool)
        _PROBES[tool] = cached_probe(["version", key], ask) if key and named else ask()
    return _PROBES[tool]


def interpreter_version(path):
    """The Python's full version, asked again only when its program changed -- and always when
    path is a shim that picks a Python at run time (the Python it ran is not the file path names)."""
    code = "import sys; print('%d.%d.%d' % sys.version_info[:3], sys.executable)"

    def ask():
        version, _, executable = run_command([path, "-I", "-S", "-c", code], capture=True,
                                             what=f"{path}").stdout.strip().partition(" ")
        return [version, os.path.realpath(executable) == os.path.realpath(path)]
    key = program_key(path)
    answer = cached_probe(["python version", key], ask, lasting=lambda answer: answer[1]) if key else ask()
    return answer[0]


def program_key(path):
    """What a program's answers depend on: the path as given and the file it resolves to (its
    device, inode, change time and size: an installer may keep a file's mtime, never its ctime)
    -- None for a script, whose answers a version manager may change at any time."""
    real = os.path.realpath(path)
    try:
        with open(real, "rb") as handle:
            if handle.read(2) == b"#!":
                return None
            info = os.fstat(handle.fileno())
    except OSError:
        return None
    return [path, real, info.st_dev, info.st_ino, info.st_ctime_ns, info.st_mtime_ns, info.st_size]


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
    wanted = request or requires_python(context.root)     # uv looks at no project: it is told
    if wanted and not PYTHON_REQUEST.fullmatch(wanted.strip()):
        wanted = None       # a requires-python uv's request syntax does not take (nor a path uv would run)
    key = ["uv python find", tool_version(uv), wanted,
           {name: value for name, value in sorted(env.items()) if name.startswith("UV_")},
           [stat_key(folder) for folder in folders]]
    path = cached_probe(key, lambda: uv_python_find(uv, wanted, env))
    if path is None:
        raise PikuError(f"Python {request or '(uv default)'} is not available on this server; "
                        f"uv can find: {', '.join(available_pythons(uv, env)) or 'none'}",
                        f"Install it as the piku user ('uv python install {request or '3.12'}') or pick one "
                        f"of those: config:set {context.app} PYTHON_VERSION=X.Y")
    return Interpreter(path, interpreter_version(path))


def uv_python_find(uv, request, env):
    """uv's answer, outside any sandbox: so nothing of the release may steer it -- no project
    and no virtual environment is looked at (a pushed .venv/bin/python would be run), and it
    runs in piku's own folder."""
    args = [uv, "python", "find", "--system", "--no-project", "--", *([request.strip()] if request else [])]
    result = subprocess.run(args, cwd=PIKU_ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0 and request and python_downloads_allowed(env):
        step(f"Installing Python {request} with uv")
        subprocess.run([uv, "python", "install", "--", request.strip()], cwd=PIKU_ROOT, env=env, capture_output=True,
                       stdin=subprocess.DEVNULL)
        result = subprocess.run(args, cwd=PIKU_ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
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


def cached_probe(key, compute, keep=64, lasting=None):
    """compute(), remembered in cache/.probes.json while key -- what the answer depends on --
    stays the same (and lasting(answer) says it may be kept). Answers naming a file are
    dropped once that file is gone."""
    path = PROBES_CACHE
    try:
        table = json.loads(read_text(path) or "{}")
    except ValueError:
        table = {}
    if not isinstance(table, dict):
        table = {}          # (not piku's: written by hand)
    name = fingerprint_digest(key)
    value = table.get(name)
    if value is not None and not (isinstance(value, str) and value.startswith("/") and not os.path.exists(value)):
        return value
    value = compute()
    if value is not None and (lasting is None or lasting(value)):
        table.pop(name, None)
        table[name] = value
        try:
            write_atomic(path, json.dumps(dict(list(table.items())[-keep:])))
        except OSError:
            pass
    return value


def available_pythons(uv, env):
    result = subprocess.run([uv, "python", "list", "--only-installed", "--output-format", "json"],
                            cwd=PIKU_ROOT, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL)
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


UNIX_PATH_MAX = 107     # sun_path is 108 bytes with the final NUL


@record(frozen=True)
class Instance:
    """One running copy of a Procfile entry, in one generation of the app's workers.

    Every path an instance uses is built here, under the app's own folders, so no two
    apps and no two generations can share a file.
    """
    app: str
    gen: int
    kind: str
    index: int

    @property
    def name(self):
        return f"{self.kind}.{self.index}"

    @property
    def unit(self):
        return f"g{self.gen}.{self.name}"

    def runtime(self, suffix):
        return os.path.join(generation_dir(self.app, self.gen), f"{self.name}.{suffix}")

    @property
    def vassal(self):
        return vassal_file(self.app, self.unit)

    @property
    def socket(self):
        return self.runtime("sock")

    @property
    def uwsgi_socket(self):
        """The uwsgi-protocol socket of a wsgi worker on uWSGI, for nginx's uwsgi_pass (a short
        name: a unix socket path has at most 107 bytes)."""
        return self.runtime("uws")

    @property
    def log(self):
        return os.path.join(LOG_ROOT, self.app, f"g{self.gen}", f"{self.name}.log")

    @property
    def gunicorn_config(self):
        """piku's own file (the app's code reads it, and cannot change it)."""
        return sandbox_file(self.app, self.unit, "gunicorn.py")


VASSAL_HEADER = string.Template("""\
[uwsgi]
; written by piku for $app ($name, generation $gen)
set-placeholder = piku_dollar=$$
set-placeholder = piku_at=@
chdir = $chdir
master = true
project = $app
procname-prefix = $app:$name:
pidfile = $pidfile
master-fifo = $fifo
logto = $log
${rotation}die-on-term = true
chmod-socket = 660
""")

VASSAL_TEMPLATES = {
    "web": string.Template("""\
plugin = rawrouter
rawrouter = $socket
rawrouter-to = $private
rawrouter-timeout = $idle
attach-daemon = $daemon
"""),
    "worker": string.Template("attach-daemon = $daemon\n"),
    "cron": string.Template("cron = $cron\n"),
    "wsgi": string.Template("""\
plugin = python3
module = $command
${pythonpath}${virtualenv}http-socket = $socket
uwsgi-socket = $usocket
need-app = true
processes = $processes
threads = $threads
enable-threads = true
max-requests = $max_requests
; Debian 12's uWSGI (2.0.21) can deadlock a threaded worker that max-requests recycles while
; Python finalizes (unbit/uwsgi#2480, fixed upstream in 2024); skipping that teardown avoids it
skip-atexit-teardown = true
listen = $listen
"""),
    "gunicorn": string.Template("""\
reload-mercy = $mercy
attach-daemon = $gunicorn
"""),
    "static": string.Template("""\
plugin = notfound
http-socket = $socket
static-map = /=$folder
static-index = index.html
"""),
}


def bind_address(env):
    address = env["BIND_ADDRESS"]
    return f"[{address}]:{env['PORT']}" if ":" in address else f"{address}:{env['PORT']}"


UWSGI_NUMBERS = {"UWSGI_PROCESSES": "1", "UWSGI_THREADS": "4", "UWSGI_MAX_REQUESTS": "1024",
                 "UWSGI_LISTEN": "100", "UWSGI_LOG_MAXSIZE": UWSGI_LOG_MAXSIZE}


# The most a number setting may ask for: beyond these a host runs out of processes or memory
# long before the app benefits (listen: the kernel's somaxconn ceiling).
NGINX_PROXY_READ_TIMEOUT = 3600        # seconds a WebSocket or an event stream may stay quiet
RELEASE_TIMEOUT = 600                   # seconds preflight: and release: may run (PIKU_RELEASE_TIMEOUT)
NUMBER_LIMITS = {"UWSGI_PROCESSES": 1024, "UWSGI_THREADS": 1024, "GUNICORN_WORKERS": 1024,
                 "WEB_CONCURRENCY": 1024, "UWSGI_LISTEN": 65535, "NGINX_CACHE_SIZE": 1024,
                 "NGINX_PROXY_READ_TIMEOUT": 7 * 86400, "PIKU_RELEASE_TIMEOUT": 86400}


def setting_number(env, keys, default):
    """The first of keys that is set, as a whole number above 0 (refused otherwise), or default."""
    for key in keys:
        value = env.get(key, "").strip()
        if value:
            most = NUMBER_LIMITS.get(key, 999999999)
            if not WHOLE_NUMBER.fullmatch(value) or len(value) > 9 or not 1 <= int(value) <= most:
                raise PikuError(f"{key} must be a whole number from 1 to {most}, not {value!r}",
                                f"Fix it with: config:set {env.get('APP', 'APP')} {key}={default}")
            return int(value)
    return default


def uwsgi_number(env, key):
    return setting_number(env, (key,), UWSGI_NUMBERS[key])


def vassal_values(instance, command, env, root, sandboxed=False):
    """The plain dict a vassal template is filled from (everything escaped)."""
    kind = worker_kind(instance.kind, env)
    values = {
        "app": instance.app, "name": instance.name, "gen": instance.gen,
        "chdir": root,
        "pidfile": instance.runtime("pid"),
        "fifo": instance.runtime("fifo"),
        "log": instance.log,
        "log_maxsize": uwsgi_number(env, "UWSGI_LOG_MAXSIZE"),
        "command": command,
        "processes": uwsgi_number(env, "UWSGI_PROCESSES"),
        "threads": uwsgi_number(env, "UWSGI_THREADS"),
        "max_requests": uwsgi_number(env, "UWSGI_MAX_REQUESTS"),
        "listen": uwsgi_number(env, "UWSGI_LISTEN"),
        **vassal_commands(instance, kind, command, env, sandboxed),
    }
    if kind.http:
        values["socket"] = instance.socket
        values["usocket"] = instance.uwsgi_socket
    if kind.name == "web":
        values["private"] = f"127.0.0.1:{env['PORT']}"
        values["idle"] = idle_timeout(env)
    if kind.name == "static":
        values["folder"] = static_path(command, root)   # planning checked it stays inside the app
    escaped = {key: uwsgi_escape(str(value)) for key, value in values.items()}
    escaped["rotation"] = log_rotation(instance.log, instance.log + ".old", values["log_maxsize"])
    escaped["virtualenv"] = f"virtualenv = {uwsgi_escape(env['VIRTUAL_ENV'])}\n" if env.get("VIRTUAL_ENV") else ""
    escaped["pythonpath"] = "".join(f"pythonpath = {uwsgi_escape(path)}\n"
                                    for path in [root, *filter(None, env.get("PYTHONPATH", "").split(":"))])
    return escaped


SANDBOX_GUARD = f"""\
; started without piku's wrapper (an emperor started before the sandbox): stop at once
if-not-exists = {SANDBOX_MARK}
print = piku: this vassal runs only in its app's sandbox, and the uWSGI emperor started it without piku's \
wrapper: restart the emperor (doctor says how)
hook-asap = exit:1
endif =
"""


LOG_ROTATION_MARK = "piku-rotate-log"


def keep_room_for_rotation(log, old=None):
    """log.old (or old), made (empty) when its process starts: the rotation then copies into a
    file that exists and needs no free inode. Opened without following links or waiting on a
    FIFO (the folder may be one the app writes); what is already there is left as it is."""
    try:
        make_folder(os.path.dirname(log))
        os.close(os.open(old or log + ".old", os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         0o600))
    except OSError as error:        # a link or a FIFO the app put there: the rotation's copy fails, not the log
        warning(f"{old or log + '.old'} cannot be made ({error.strerror}); that log is emptied without a copy "
                "when it is full")


def log_rotation(log, old, maxsize):
    """uWSGI config lines that, once a minute, rotate log in place when it passed maxsize bytes:
    copied to old, then emptied (the process keeps appending to the same file). uWSGI's own
    log-maxsize renames the log and opens a new file -- and exits when it cannot, so a disk
    without free inodes would stop every worker in turn. The job's own lines are drained."""
    log, old = shlex.quote(log), shlex.quote(old)
    command = (f": {LOG_ROTATION_MARK}; if find {log} -size +{maxsize}c | grep -q .; then "
               f"[ -f {old} ] && [ ! -h {old} ] && timeout 10 cat {log} > {old}; : > {log}; fi")   # (emptied
    # even when the copy fails: a log that cannot be copied must not grow until the disk is full)
    return f"log-drain = {LOG_ROTATION_MARK}\ncron = -1 -1 -1 -1 -1 {uwsgi_escape(command)}\n"


def vassal_commands(instance, kind, command, env, sandboxed):
    """The commands a vassal runs (attach-daemon, gunicorn, cron); outside a sandbox each under
    PROCESS_GUARD."""
    guard = (lambda line, grace=DAEMON_GRACE: line) if sandboxed else guarded
    values = {"daemon": guard(command)}
    if kind.template == "gunicorn":
        venv_bin = os.path.join(env["VIRTUAL_ENV"], "bin", "gunicorn") if env.get("VIRTUAL_ENV") else "gunicorn"
        graceful = setting_number(env, ("GUNICORN_GRACEFUL_TIMEOUT",), 20)
        values["gunicorn"] = guard("exec " + " ".join(shlex.quote(part) for part in (
            venv_bin, "--config", instance.gunicorn_config, command.strip())), graceful)
        values["mercy"] = graceful + 1
    if kind.name == "cron":
        schedule, cron_command = parse_cron(command, 0)
        values["cron"] = f"{schedule} {guard(cron_command)}"
    return values


def render_vassal(instance, command, env, root, extra=(), sandboxed=False):
    """The uWSGI vassal .ini for one worker instance, as text. env is what its processes see."""
    values = vassal_values(instance, command, env, root, sandboxed)
    text = VASSAL_HEADER.substitute(values) + (SANDBOX_GUARD if sandboxed else "")
    text += VASSAL_TEMPLATES[worker_kind(instance.kind, env).template].substitute(values)
    for key, value in extra:
        text += f"{key} = {uwsgi_escape(value)}\n"
    check_option_references(text, {f"the {instance.kind} command": command,
                                   **{f"the value of {key}": value for key, value in env.items()}})
    for key in sorted(env):
        text += f"env = {key}={uwsgi_escape(env[key])}\n"
    return text


OPTION_NAME_MAX = 64        # uWSGI's option and placeholder names are short; longer is no name


def option_references(value):
    """The NAMEs of every '%(NAME)' in value, nested ones included ('%(%n%(env)' names 'env' as
    uWSGI reads it), in time linear in the value's length."""
    names, start = [], value.find("%(")
    while start != -1:
        end = value.find(")", start + 2, start + 3 + OPTION_NAME_MAX)
        if end != -1:
            names.append(value[start + 2:end])
        start = value.find("%(", start + 1)
    return names


def check_option_references(text, values):
    """uWSGI replaces %(NAME) with the value of the option NAME wherever the config sets one,
    and no escape stops it (uwsgi --get shows '%%(chdir)' read back as the folder). Refuse a
    value -- a setting, a Procfile command -- that names an option of its own vassal; anything
    else (%(asctime)s, say) reaches the app byte for byte. values: {what it is: its text}."""
    options = {line.split("=", 1)[0].strip() for line in text.splitlines() if "=" in line}
    options |= {"env", "piku_dollar", "piku_at"}
    options |= {name.replace("-", "_") for name in options} | {name.replace("_", "-") for name in options}
    for what, value in sorted(values.items()):
        for name in option_references(value):
            if name in options:
                raise PikuError(f"{what} contains '%({name})', which uWSGI would replace with "
                                f"its own {name!r} option", "Write it another way (for example '%%' + '(...)' "
                                "built by the app); piku cannot pass it through uWSGI unchanged.")

GUNICORN_TEMPLATE = string.Template("""\
# written by piku for $app ($name, generation $gen)
bind = [$bind]
workers = $workers
timeout = $timeout
graceful_timeout = $graceful_timeout
chdir = $chdir
accesslog = '-'
errorlog = '-'
proc_name = $proc_name
control_socket_disable = True   # gunicorn >= 24 would share one socket in $$HOME between apps
umask = 0o007                   # its socket: the piku user and its group (nginx), no one else
$worker_class""")

# asgi: gunicorn runs uvicorn's worker (from the uvicorn-worker package, or uvicorn's own)
ASGI_WORKER_CLASS = """\
try:                            # asgi: gunicorn runs uvicorn's worker class
    import uvicorn_worker
    worker_class = 'uvicorn_worker.UvicornWorker'
except ImportError:
    worker_class = 'uvicorn.workers.UvicornWorker'
"""


def default_gunicorn_workers():
    """2 x cores + 1, but no more than one per 256 MiB of memory, and 2 to 8."""
    cores = os.cpu_count() or 1
    try:
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    except (ValueError, OSError):
        memory_mb = 1024
    return max(2, min(2 * cores + 1, memory_mb // 256, 8))


def render_gunicorn_config(instance, env, root):
    """gunicorn's config for one wsgi instance, as Python source (every value a repr).

    gunicorn logs to its stderr, which the vassal writes to the instance's log (and rotates)."""
    values = {
        "bind": repr("unix:" + instance.socket),
        "workers": setting_number(env, ("GUNICORN_WORKERS", "WEB_CONCURRENCY"), default_gunicorn_workers()),
        "timeout": setting_number(env, ("GUNICORN_TIMEOUT",), 30),
        "graceful_timeout": setting_number(env, ("GUNICORN_GRACEFUL_TIMEOUT",), 20),
        "chdir": repr(root),
        "proc_name": repr(f"{instance.app}:{instance.name}"),
        "worker_class": ASGI_WORKER_CLASS if worker_class(instance.kind) == "asgi" else "",
    }
    return GUNICORN_TEMPLATE.substitute(values, app=instance.app, name=instance.name, gen=instance.gen)


FRONT_TEMPLATE = string.Template("""\
[uwsgi]
; written by piku: the front of $app on $bind. It forwards each connection to the socket a
; slot links to; piku moves traffic between releases by re-linking the slots.
master = true
plugin = rawrouter
procname-prefix = $app:front:
pidfile = $pidfile
logto = $log
${rotation}die-on-term = true
rawrouter = $bind
rawrouter-gracetime = 1
rawrouter-timeout = $idle
$slots""")


def front_unit(env):
    return f"front.{env['PORT']}"


def render_front(app, env):
    """The vassal of the app's front door: a TCP relay on BIND_ADDRESS:PORT to the slots."""
    unit = front_unit(env)
    log = os.path.join(LOG_ROOT, app, "front.log")
    slots = "".join(f"rawrouter-to = {uwsgi_escape(slot_path(app, slot))}\n" for slot in range(1, FRONT_SLOTS + 1))
    values = {"app": app, "bind": uwsgi_escape(bind_address(env)), "log": uwsgi_escape(log), "slots": slots,
              "pidfile": uwsgi_escape(os.path.join(runtime_dir(app), unit + ".pid")),
              "rotation": log_rotation(log, log + ".old", uwsgi_number(env, "UWSGI_LOG_MAXSIZE")),
              "idle": idle_timeout(env)}
    return FRONT_TEMPLATE.substitute(values)


def idle_timeout(env):
    """Seconds a connection may stay quiet -- a WebSocket, an event stream -- before nginx or the
    app's relays (the front, a web worker's) close it: NGINX_PROXY_READ_TIMEOUT. (uWSGI's relays
    close a connection after 60 quiet seconds unless told otherwise.)"""
    return setting_number(env, ("NGINX_PROXY_READ_TIMEOUT",), NGINX_PROXY_READ_TIMEOUT)


EMPEROR_MARK = "; the uWSGI emperor for piku"
EMPEROR_TEMPLATE = string.Template("""\
[uwsgi]
; the uWSGI emperor for piku: run it with  uwsgi --ini $config
chdir = $root
emperor = $enabled
; every vassal starts through piku's wrapper: in its app's sandbox, or not at all
emperor-wrapper = $wrapper
emperor-freq = 1
; start new vassals at once (uWSGI's default sleeps 1 s before each), stop them gracefully
emperor-throttle = 1
emperor-graceful-shutdown = true
; piku wakes the emperor with SIGWINCH when it adds or removes a vassal
emperor-pidfile = $pidfile
logto = $log
log-backupname = $old_log
log-maxsize = $log_maxsize
die-on-term = true
""")


def render_emperor():
    return EMPEROR_TEMPLATE.substitute(config=EMPEROR_CONFIG, root=UWSGI_ROOT, enabled=UWSGI_ENABLED, wrapper=SANDBOX_WRAPPER,
                                       pidfile=EMPEROR_PID, log=EMPEROR_LOG, old_log=EMPEROR_OLD_LOG,
                                       log_maxsize=UWSGI_LOG_MAXSIZE)


# --- nginx ------------------------------------------------------------------------
# With NGINX_SERVER_NAME set, piku writes ~/.piku/nginx/APP.conf, which the host's nginx
# includes in its http block. nginx reaches the app through the same 16 slots as the front
# (unix socket paths that piku re-links at each switch; nginx opens the path per connection),
# so a deploy moves nginx's traffic without reloading it. nginx is reloaded only when the
# vhost's text changes, after `nginx -t` passed on the candidate.

HOST_NAME = LazyPattern(r"(\*\.)?(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")
NGINX_SAFE_PATH = LazyPattern(r"/[A-Za-z0-9._~/@+,=-]*")
NGINX_MARKER_PATH = "/.piku-vhost"
TRUE_WORDS = ("1", "true", "yes", "on")


def setting_true(env, key):
    return env.get(key, "").strip().lower() in TRUE_WORDS


def host_setting(name, default=""):
    """A setting of the host, not of an app: piku's environment, else ~/.piku/piku.env (which
    the sysadmin writes; ssh sessions do not carry an environment of their own)."""
    if name in os.environ:
        return os.environ[name]
    return host_env_file().get(name, default)


_HOST_SETTINGS = {}


def host_env_file():
    """piku.env's settings, read once per command (the key None says it was read)."""
    if None not in _HOST_SETTINGS:
        _HOST_SETTINGS.update(parse_env_text(read_text(HOST_ENV), HOST_ENV))
        _HOST_SETTINGS[None] = HOST_ENV
    return _HOST_SETTINGS


def host_settings(prefix):
    """The host settings whose names start with prefix (piku's environment wins over piku.env)."""
    found = {key: value for key, value in host_env_file().items() if isinstance(key, str) and key.startswith(prefix)}
    found.update((key, value) for key, value in os.environ.items() if key.startswith(prefix))
    return found


def nginx_server_names(env):
    names = [name for name in re.split(r"[\s,]+", env.get("NGINX_SERVER_NAME", "").strip()) if name]
    for name in names:
        if not HOST_NAME.fullmatch(name) or len(name) > 253:
            raise PikuError(f"NGINX_SERVER_NAME {name!r} is not a host name",
                            "Use names like example.com or www.example.com, separated by commas.")
        if name.startswith("*.") and "." not in name[2:].rstrip("."):
            raise PikuError(f"NGINX_SERVER_NAME {name!r} would claim a whole top-level domain",
                            "A wildcard names a domain of yours: *.example.com")
    return names


def nginx_path(path, what):
    """A path written into nginx's config: absolute, and nothing nginx would read as syntax."""
    if not NGINX_SAFE_PATH.fullmatch(path):
        raise PikuError(f"{what} {path!r} has characters piku does not write into nginx's config",
                        "Use letters, digits and . _ - / in folder and file names.")
    return path


# --- what nginx's root master opens --------------------------------------------------
# nginx's master runs as root and opens, at every start and reload, each file a vhost names for
# it: logs and cache folders (which it creates and chowns), certificates. A link or a FIFO an app
# put at one of those paths would have root follow it. NGINX_FILES is the one table of every path
# a vhost may name: the directive, the folder and the names there that are the app's, who writes
# them and who opens them. nginx_file() writes each such directive from it, check_nginx_files()
# checks a vhost against it before nginx may read it (and guard_nginx_files() every vhost before
# each reload), and no path nginx's master opens lies where app code may write (APP_WRITES): only
# the release folders nginx's workers serve, where disable_symlinks keeps them to what is there.
# Without a sandbox no app is kept from any of it.

@record(frozen=True)
class NginxFile:
    directive: str
    folder: str
    names: tuple            # paths below folder an app's vhost may name ({app}; fnmatch: '*' spans '/')
    writer: str             # who writes there
    opener: str = "master"  # nginx's root master (every start and reload), or its workers (per request)
    kind: str = "file"      # what may be found there: file, folder, socket (piku's link to one), served
    reads_only: bool = False    # the master only reads it: a link there is doctor's to report


NGINX_FILES = (
    NginxFile("access_log", NGINX_LOGS, ("{app}.access.log",), "nginx's master creates it; piku reads and rotates it"),
    NginxFile("error_log", NGINX_LOGS, ("{app}.error.log",), "nginx's master creates it; piku reads and rotates it"),
    NginxFile("ssl_certificate", NGINX_ROOT, ("{app}.crt",), "piku: a new file, renamed into place", reads_only=True),
    NginxFile("ssl_certificate_key", NGINX_ROOT, ("{app}.key",), "piku: a new file, renamed into place",
              reads_only=True),
    NginxFile("include", NGINX_ROOT, (), "piku: the vhosts, which the host's nginx.conf includes (no vhost "
              "includes anything)"),
    NginxFile("proxy_cache_path", CACHE_ROOT, ("{app}", "{app}/*"), "nginx: its master makes the folder, its "
              "workers fill it", kind="folder"),
    NginxFile("uwsgi_cache_path", CACHE_ROOT, ("{app}", "{app}/*"), "nginx: its master makes the folder, its "
              "workers fill it", kind="folder"),
    NginxFile("server", UWSGI_ROOT, ("{app}/slot.*.sock", "{app}/uslot.*.sock"), "piku: a link per slot to a "
              "socket of the app's live workers", "workers", "socket"),
    NginxFile("root", ACME_WWW, ("",), "piku: the ACME client's http-01 answers", "workers", "served"),
    NginxFile("root", RELEASE_ROOT, ("{app}/*",), "the app's build and release: (links refused: disable_symlinks)",
              "workers", "served"),
    NginxFile("alias", RELEASE_ROOT, ("{app}/*",), "the app's build and release: (links refused: disable_symlinks)",
              "workers", "served"),
)
# Every directive of nginx that names a file, a folder or a unix socket (unix:PATH): a vhost that
# names one in a place NGINX_FILES does not give it is refused, whichever directive it is.
NGINX_PATH_DIRECTIVES = frozenset({
    "access_log", "error_log", "root", "alias", "include", "ssl_certificate", "ssl_certificate_key",
    "ssl_trusted_certificate", "ssl_client_certificate", "ssl_crl", "ssl_dhparam", "ssl_password_file",
    "ssl_session_ticket_key", "ssl_stapling_file", "proxy_cache_path", "uwsgi_cache_path", "fastcgi_cache_path",
    "scgi_cache_path", "client_body_temp_path", "proxy_temp_path", "uwsgi_temp_path", "fastcgi_temp_path",
    "scgi_temp_path", "proxy_store", "uwsgi_store", "fastcgi_store", "scgi_store", "auth_basic_user_file",
    "load_module", "pid", "lock_file", "working_directory", "geoip_country", "geoip_city", "geoip_org",
    "xslt_stylesheet", "perl_modules", "perl_require", "js_import", "js_path", "state",
    *(f"{proxy}_ssl_{what}" for proxy in ("proxy", "uwsgi", "grpc")
      for what in ("certificate", "certificate_key", "trusted_certificate", "crl", "password_file")),
    "server", "listen", "set_real_ip_from", "proxy_pass", "uwsgi_pass", "fastcgi_pass", "scgi_pass",
    "grpc_pass", "memcached_pass",
})
NGINX_SOCKET_DIRECTIVES = frozenset({"server", "listen", "set_real_ip_from", "proxy_pass", "uwsgi_pass",
                                     "fastcgi_pass", "scgi_pass", "grpc_pass", "memcached_pass"})
# ... of which these are opened by nginx's workers, per request, and not by its root master
NGINX_WORKER_DIRECTIVES = frozenset({"root", "alias", "server", "proxy_pass", "uwsgi_pass", "fastcgi_pass",
                                     "scgi_pass", "grpc_pass", "memcached_pass", "proxy_store", "uwsgi_store",
                                     "fastcgi_store", "scgi_store", "disable_symlinks"})
NginxProblem = collections.namedtuple("NginxProblem", "path text remove master")


def nginx_file(app, directive, path, *rest, scheme=""):
    """One directive naming path, as NGINX_FILES places it (a path it does not place is a bug)."""
    nginx_path(path, f"the {directive} path")      # a path of the user's choosing: refused with the reason
    if not nginx_file_place(app, directive, path):
        raise ValueError(f"NGINX_FILES places no {directive} of {app} at {path}")
    return " ".join([directive, scheme + path, *rest]) + ";"


def nginx_file_place(app, directive, path):
    """(the entry of NGINX_FILES, the form of its folder) that gives app's vhost this path, or None."""
    bare = path.rstrip("/")
    if not NGINX_SAFE_PATH.fullmatch(path) or os.path.normpath(path) != bare or "//" in path:
        return None
    for entry in NGINX_FILES:
        for base in path_forms(entry.folder) if entry.directive == directive else ():
            relative = "" if bare == base else bare[len(base) + 1:] if bare.startswith(base + os.sep) else None
            if relative is not None and any(fnmatch.fnmatchcase(relative, name.format(app=app))
                                            for name in entry.names):
                return entry, base
    return None


def nginx_no_links(folder):
    """nginx's workers serve what is below folder only if no part of its path below it is a link
    (the app writes the release: a link there could lead anywhere nginx's user may read)."""
    return f"disable_symlinks on from={nginx_path(folder.rstrip('/'), 'the served folder')};"


def served_folder(release, folder):
    """A folder of the release as nginx is given it: below the release's path as piku wrote it
    (folder has every link resolved; the release's own path may lie below a sysadmin's link)."""
    relative = os.path.relpath(folder, os.path.realpath(release.root))
    path = os.path.normpath(os.path.join(release.root, relative))
    return path + "/" if folder.endswith("/") else path


@functools.lru_cache(maxsize=256)       # a command checks each vhost text before and at each reload
def nginx_named_paths(text):
    """((directive, path, the disable_symlinks from= of its block or None, line), ...): every path
    the vhost text names (NGINX_PATH_DIRECTIVES), and every disable_symlinks that is not 'on' (as
    its directive, with its words as the path). NginxSyntaxError for what nginx would not read.
    Kept by the text's digest in NGINX_PATHS_CACHE: a reload reads each unchanged vhost once."""
    key = named_paths_key(text)
    known = _named_paths_cache()
    if not named_paths_shaped(known.get(key)):
        known[key] = parse_named_paths(text)
        known[None] = True          # to be written (keep_named_paths)
    return tuple(tuple(item) for item in known[key])


def named_paths_key(text):
    """The digest a vhost text's entry is kept by: of the text, and of what decides the reading."""
    return hashlib.sha256("\0".join([NAMED_PATHS_VERSION, *sorted(NGINX_PATH_DIRECTIVES), text]).encode()).hexdigest()


NAMED_PATHS_VERSION = "1"       # one more when parse_named_paths reads differently


def named_paths_shaped(entry):
    """Is a kept entry as parse_named_paths makes them (the cache is read again otherwise)?"""
    return isinstance(entry, list) and all(
        isinstance(item, list) and len(item) == 4 and isinstance(item[0], str) and isinstance(item[1], str)
        and (item[2] is None or isinstance(item[2], str)) and type(item[3]) is int for item in entry)


def _named_paths_cache():
    if not _NAMED_PATHS:
        try:
            kept = json.loads(read_text(NGINX_PATHS_CACHE) or "{}")
        except (ValueError, UnicodeDecodeError):
            kept = {}       # parsed again, and written anew
        _NAMED_PATHS.update(kept if isinstance(kept, dict) else {})
        _NAMED_PATHS[None] = False
    return _NAMED_PATHS


def keep_named_paths(texts):
    """Write NGINX_PATHS_CACHE with the entries of these vhost texts only (when it changed)."""
    known = _named_paths_cache()
    keys = {named_paths_key(text) for text in texts}
    if known.get(None) or set(known) - {None} - keys:       # new entries, or ones of vhosts gone
        kept = {key: value for key, value in known.items() if key in keys}
        with contextlib.suppress(OSError):      # a cache: without it, the next command parses again
            write_atomic(NGINX_PATHS_CACHE, json.dumps(kept) + "\n", mode=0o600)
        known[None] = False


_NAMED_PATHS = {}


def parse_named_paths(text):
    """nginx_named_paths, read from the text (NginxReader)."""
    found, stack = [], [{"paths": [], "from": None}]
    for words, end, line in nginx_statements(text):
        if end == "{":
            stack.append({"paths": [], "from": None})
        elif end == "}":
            if len(stack) == 1:
                raise NginxSyntaxError(f"'}}' on line {line} closes no block")
            frame = stack.pop()
            found += [(*named, frame["from"], at) for named, at in frame["paths"]]
        elif words[0] == "disable_symlinks":
            if words[1:2] != ["on"]:
                found.append(("disable_symlinks", " ".join(words[1:]), None, line))
            stack[-1]["from"] = next((word[5:] for word in words[2:] if word.startswith("from=")), "/")
        elif words[0] in NGINX_PATH_DIRECTIVES:
            path = nginx_named_path(words)
            if path is not None:
                stack[-1]["paths"].append(((words[0], path), line))
    if len(stack) != 1:
        raise NginxSyntaxError("a block is not closed")
    return [list(item) for item in found + [(*named, stack[0]["from"], at) for named, at in stack[0]["paths"]]]


def nginx_named_path(words):
    """The path a statement names: a unix: socket for the directives that connect or listen (nginx
    reads 'unix:' in any case), else its first argument (None when it names none)."""
    if words[0] in NGINX_SOCKET_DIRECTIVES:
        socket_word = next((word for word in words[1:] if "unix:" in word.lower()), None)
        return re.split("unix:", socket_word, 1, flags=re.I)[1].split(":", 1)[0] if socket_word else None
    argument = words[1] if len(words) > 1 else ""
    if words[0] in ("access_log", "error_log") and (argument in ("off", "stderr")
                                                    or argument.startswith(("syslog:", "memory:"))):
        return None
    return argument


def check_nginx_files(text, app, sockets=False):
    """What is wrong with the paths app's vhost text names, as [NginxProblem]: a path NGINX_FILES
    does not give the app, one app code may write, a link or a file of another kind where nginx's
    master opens one, a served folder without disable_symlinks from its release -- and, with
    sockets, a slot that leads elsewhere than to a socket of the app's own workers (doctor's: the
    workers connect there, not root, and the next switch points every slot anew). master: nginx's
    root master would open what the problem is about."""
    problems = []
    for directive, path, from_, line in nginx_named_paths(text):
        place = nginx_file_place(app, directive, path) if directive != "disable_symlinks" else None
        master = directive not in NGINX_WORKER_DIRECTIVES
        if not place:
            what = f"disable_symlinks {path}" if directive == "disable_symlinks" else f"{directive} {path}"
            problems.append(NginxProblem(path, f"line {line}: {what} is no place of piku's for {app}", None, master))
            continue
        entry, base = place
        if entry.kind == "served":
            release = base if entry.folder == ACME_WWW else os.path.join(base, app, path[len(base) + 1:].split("/")[1])
            if from_ is None or from_.rstrip("/") != release:
                problems.append(NginxProblem(path, f"line {line}: nginx's workers would follow links (no "
                                                   f"disable_symlinks from the release, or the ACME folder) in {path}",
                                             None, False))
        elif app_may_write(path):
            problems.append(NginxProblem(path, f"line {line}: {path} is in a folder app code writes", None, master))
        elif entry.kind != "socket" or sockets:
            problems += nginx_file_problems(entry, base, path)
    return problems


def nginx_file_problems(entry, base, path):
    """A link below the entry's folder, or a file of another kind (or with a second name) at path."""
    current = base
    for part in path[len(base) + 1:].rstrip("/").split(os.sep):
        current = os.path.join(current, part)
        try:
            info = os.lstat(current)
        except FileNotFoundError:
            return []
        except OSError as error:
            # below a folder nginx's workers own (a cache it made: mode 700), which no app writes
            return [NginxProblem(path, f"{current} cannot be checked ({error.strerror})", None, False)]
        if stat.S_ISLNK(info.st_mode) and not (entry.kind == "socket" and current == path):
            return [NginxProblem(path, f"{current} is a link: nginx's {entry.opener} would follow it",
                                 None if entry.reads_only else current, not entry.reads_only)]
    if entry.kind == "socket":
        target = os.path.join(os.path.dirname(path), os.readlink(path)) if os.path.islink(path) else path
        app = path[len(base) + 1:].split(os.sep)[0]
        return [] if app_may_write(os.path.dirname(target), app) and ".." not in target.split(os.sep) else \
            [NginxProblem(path, f"{path} leads to {target}, not to a socket of the app's workers", None, False)]
    wanted = stat.S_ISDIR if entry.kind == "folder" else stat.S_ISREG
    if not wanted(info.st_mode):
        return [NginxProblem(path, f"{path} is not a {'folder' if entry.kind == 'folder' else 'regular file'}: "
                                   f"nginx's {entry.opener} would open it", path, True)]
    if entry.kind == "file" and info.st_nlink != 1 and not entry.reads_only:
        return [NginxProblem(path, f"{path} has another name (a hard link): nginx's {entry.opener} would write "
                                   "to it", path, True)]
    return []


def clear_nginx_files(app, text, master_only=False):
    """Remove what is not piku's or nginx's where nginx's master opens the vhost's files (a link,
    a FIFO, a second name: only app code without a sandbox, or a hand, puts one there) -> the
    problems left (master_only: those about what nginx's root master opens)."""
    left = []
    for problem in check_nginx_files(text, app):
        if master_only and not problem.master:
            continue
        if problem.remove is None:
            left.append(problem)
            continue
        try:
            os.unlink(problem.remove)
        except OSError as error:
            left.append(problem._replace(text=f"{problem.text}, and it cannot be removed ({error.strerror})"))
            continue
        warning(f"removed {problem.remove}: {problem.text}" if visible_to_key(app) else
                "removed a file of another app that nginx's master would have followed")
    return left


def guard_nginx_files(replacing=None):
    """Before nginx reads the vhosts again: every vhost's files are checked (and cleared), and a
    vhost that would still have nginx's root master open what it must not -- one written by hand,
    or by a piku.py older than NGINX_FILES -- is set aside as APP.conf.refused (nginx includes
    *.conf), so that no reload opens it and no other app's change stops on it. replacing: the
    app whose vhost is about to be written anew (checked as its new text, before the change
    commits). What concerns nginx's workers only is doctor's to report; setup writes the vhosts
    of an earlier piku.py again."""
    texts = []
    for path in sorted(glob.glob(os.path.join(NGINX_ROOT, "*.conf"))):
        app = os.path.basename(path)[:-len(".conf")]
        if app == replacing:
            continue
        text = read_vhost(path)
        try:
            left = clear_nginx_files(app, text, master_only=True) if text is not None else \
                [NginxProblem(path, "not a regular UTF-8 file", None, True)]
        except NginxSyntaxError as error:
            left = [NginxProblem(path, str(error), None, True)]
        if left:
            set_vhost_aside(app, path, left[0].text)
        else:
            texts.append(text)
    keep_named_paths(texts)


def read_vhost(path):
    """A vhost's text, read without following a link or waiting on a FIFO (None: not a regular
    UTF-8 file)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return os.read(fd, PUSHED_TEXT_MAX).decode()
    except (OSError, UnicodeDecodeError):
        return None
    finally:
        os.close(fd)


def set_vhost_aside(app, path, why):
    try:
        os.replace(path, path + ".refused")
    except OSError as error:
        raise PikuError(f"nginx was not reloaded: a vhost nginx's master must not read could not be set aside "
                        f"({error.strerror})", "Remove it by hand (doctor names it).")
    warning(f"the vhost of {app} was set aside ({path}.refused), so nginx no longer serves it: {why}"
            if visible_to_key(app) else "another app's vhost was set aside: nginx's master must not read it")
    if visible_to_key(app):
        warning(f"a deploy writes it again from the app's settings: deploy {app}")


def nginx_address(env, key, default, family):
    value = env.get(key, default).strip()
    bare = value[1:-1] if family == socket.AF_INET6 and value.startswith("[") and value.endswith("]") else value
    try:
        socket.inet_pton(family, bare)
    except OSError:
        raise PikuError(f"{key} {value!r} is not an IPv{4 if family == socket.AF_INET else 6} address",
                        f"Fix it with: config:set {env.get('APP', 'APP')} {key}={default}")
    return f"[{bare}]" if family == socket.AF_INET6 else bare


def nginx_port(name, default):
    value = host_setting(name, default)
    if not WHOLE_NUMBER.fullmatch(value) or not 0 < int(value) < 65536:
        raise PikuError(f"{name}={value!r} (in piku's environment) is not a port number")
    return value


def nginx_listen(env, https=False):
    """The listen lines for the HTTP (or HTTPS) port: IPv4, and IPv6 unless DISABLE_IPV6."""
    port = nginx_port("PIKU_NGINX_HTTPS_PORT", "443") if https else nginx_port("PIKU_NGINX_HTTP_PORT", "80")
    suffix = " ssl" if https else ""
    lines = [f"listen {nginx_address(env, 'NGINX_IPV4_ADDRESS', '0.0.0.0', socket.AF_INET)}:{port}{suffix};"]
    if not setting_true(env, "DISABLE_IPV6"):
        lines.append(f"listen {nginx_address(env, 'NGINX_IPV6_ADDRESS', '[::]', socket.AF_INET6)}:{port}{suffix};")
    return lines


def nginx_upstream(app, uwsgi):
    prefix = "uslot" if uwsgi else "slot"
    servers = "".join(f"    {nginx_file(app, 'server', slot_path(app, slot, prefix), 'max_fails=0', scheme='unix:')}\n"
                      for slot in range(1, FRONT_SLOTS + 1))
    return f"upstream piku-{app}-{prefix} {{\n{servers}}}\n"


# What nginx's uwsgi_params file sets (written out: a host's copy may be elsewhere or edited)
UWSGI_PARAMS = (("QUERY_STRING", "$query_string"), ("REQUEST_METHOD", "$request_method"),
                ("CONTENT_TYPE", "$content_type"), ("CONTENT_LENGTH", "$content_length"),
                ("REQUEST_URI", "$request_uri"), ("PATH_INFO", "$document_uri"), ("DOCUMENT_ROOT", "$document_root"),
                ("SERVER_PROTOCOL", "$server_protocol"), ("REQUEST_SCHEME", "$scheme"), ("HTTPS", "$https if_not_empty"),
                ("REMOTE_ADDR", "$remote_addr"), ("REMOTE_PORT", "$remote_port"), ("SERVER_PORT", "$server_port"),
                ("SERVER_NAME", "$server_name"), ("HTTP_X_FORWARDED_PROTO", "$scheme"))


def nginx_connection_variable(app):
    """The variable of the app's Upgrade map: nginx's variables are one namespace for every
    vhost, so the name is the app's (and unique: a digest tells 'a.b' from 'a_b')."""
    digest = hashlib.sha256(app.encode()).hexdigest()[:8]
    return f"$piku_connection_{re.sub(r'[^A-Za-z0-9]', '_', app)}_{digest}"


def nginx_upgrade_map(app):
    """Connection: upgrade when the request asks for an upgrade (WebSockets), none otherwise."""
    return nginx_block(f"map $http_upgrade {nginx_connection_variable(app)}", ["default upgrade;", "'' '';"])


def nginx_pass(app, uwsgi, env, cached=False):
    """How nginx hands a request to the app: uwsgi_pass for uWSGI's wsgi, HTTP for the rest.
    Responses are passed on as they come (an event stream's first event arrives before the
    response ends) unless they are cached or NGINX_PROXY_BUFFERING is on (then an event stream
    needs the app's `X-Accel-Buffering: no`), WebSockets are upgraded, and a connection may stay
    quiet for NGINX_PROXY_READ_TIMEOUT seconds before nginx closes it."""
    timeout = idle_timeout(env)
    flow = "on" if cached or setting_true(env, "NGINX_PROXY_BUFFERING") else "off"
    if uwsgi:
        return [*(f"uwsgi_param {name} {value};" for name, value in UWSGI_PARAMS),
                f"uwsgi_read_timeout {timeout}s;", f"uwsgi_send_timeout {timeout}s;", f"uwsgi_buffering {flow};",
                f"uwsgi_pass piku-{app}-uslot;"]
    return ["proxy_http_version 1.1;", "proxy_set_header Host $host;", "proxy_set_header X-Real-IP $remote_addr;",
            "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;",
            "proxy_set_header X-Forwarded-Proto $scheme;", "proxy_set_header Upgrade $http_upgrade;",
            f"proxy_set_header Connection {nginx_connection_variable(app)};",
            f"proxy_read_timeout {timeout}s;", f"proxy_send_timeout {timeout}s;", f"proxy_buffering {flow};",
            f"proxy_pass http://piku-{app}-slot;"]


def nginx_block(header, lines):
    return [f"{header} {{", *(f"    {line}" for line in lines), "}"]


def render_nginx(release):
    """The app's nginx vhost as text, or None when the app sets no NGINX_SERVER_NAME.

    Every value is checked on the way in: a setting can add no directive and name no nginx
    $variable, and every path is one of the release's (or piku's own)."""
    env, app = release.env, release.app
    names = nginx_server_names(env)
    if not names:
        return None
    served = next((kind for kind in HTTP_APP_KINDS if kind in release.processes), None)
    uwsgi = served == "wsgi" and worker_kind("wsgi", env).name == "wsgi"
    nginx_catch_all(env)        # checked even where unused, so a bad value is never stored
    acme_directory(env), acme_email(env)
    crt, key = certificate_files(app)
    common = [f"server_name {' '.join(names)};",
              nginx_file(app, "access_log", nginx_log(app, "access")), nginx_file(app, "error_log", nginx_log(app, "error")),
              *nginx_block(f"location = {NGINX_MARKER_PATH}", [
                  "allow 127.0.0.1;", "allow ::1;", "deny all;", "default_type text/plain;",
                  'return 200 "$piku_vhost\\n";']),
              *nginx_block("location ^~ /.well-known/acme-challenge/", [
                  nginx_file(app, "root", ACME_WWW), nginx_no_links(ACME_WWW), "allow all;", "default_type text/plain;",
                  "try_files $uri =404;"])]
    tls = [*nginx_listen(env, https=True), nginx_file(app, "ssl_certificate", crt),
           nginx_file(app, "ssl_certificate_key", key)]
    zone, cached = nginx_cache(app, env, uwsgi) if served else ([], [])
    site = cached + nginx_site(release, served, uwsgi)
    text = f"# written by piku for {app}; nginx -t checked it before it replaced the previous one\n"
    text += nginx_upstream(app, uwsgi) if served else ""
    text += "".join(line + "\n" for line in nginx_upgrade_map(app)) if served and not uwsgi else ""
    text += "".join(line + "\n" for line in zone)
    if setting_true(env, "NGINX_HTTPS_ONLY"):
        redirect = nginx_block("location /", ["return 301 https://$host$request_uri;"])
        servers = [[*nginx_listen(env), *common, *redirect], [*tls, *common, *site]]
    else:
        servers = [[*nginx_listen(env), *tls, *common, *site]]
    return text + "".join("\n".join(nginx_block("server", server)) + "\n" for server in servers)


# Upstream's NGINX_CACHE_* keys: responses under NGINX_CACHE_PREFIXES are cached by nginx.
NGINX_CACHE_SECONDS = {"NGINX_CACHE_TIME": 3600, "NGINX_CACHE_REDIRECTS": 3600, "NGINX_CACHE_ANY": 3600,
                       "NGINX_CACHE_CONTROL": 3600, "NGINX_CACHE_EXPIRY": 86400}
CACHE_PREFIX = LazyPattern(r"/?[A-Za-z0-9._~/-]+")


def nginx_cache(app, env, uwsgi):
    """(the http-level cache zone, the location that caches) for NGINX_CACHE_PREFIXES, or ([], [])."""
    prefixes = comma_list(env.get("NGINX_CACHE_PREFIXES"))
    if not prefixes:
        return [], []
    for prefix in prefixes:
        if not CACHE_PREFIX.fullmatch(prefix):
            raise PikuError(f"NGINX_CACHE_PREFIXES entry {prefix!r} is not a URL path prefix",
                            "Write it like: NGINX_CACHE_PREFIXES=/api,/static")
    seconds = {key: setting_number(env, (key,), default) for key, default in NGINX_CACHE_SECONDS.items()}
    size = setting_number(env, ("NGINX_CACHE_SIZE",), 1)
    path = nginx_cache_folder(app, env)
    cache = "uwsgi_cache" if uwsgi else "proxy_cache"
    zone = [nginx_file(app, f"{cache}_path", path, "levels=1:2", f"keys_zone=piku-{app}:10m", f"max_size={size}g",
                       f"inactive={seconds['NGINX_CACHE_EXPIRY']}s", "use_temp_path=off")]
    pattern = "|".join(re.escape(prefix.strip("/")) for prefix in prefixes)
    location = nginx_block(f"location ~* ^/({pattern})", [
        *nginx_pass(app, uwsgi, env, cached=True), f"{cache} piku-{app};",
        f"{cache}_key $scheme$host$request_uri;",
        f"{cache}_valid 200 304 {seconds['NGINX_CACHE_TIME']}s;",
        f"{cache}_valid 301 302 307 308 {seconds['NGINX_CACHE_REDIRECTS']}s;",
        f"{cache}_valid any {seconds['NGINX_CACHE_ANY']}s;",
        f"{cache}_use_stale error timeout updating;",
        f"add_header Cache-Control \"public, max-age={seconds['NGINX_CACHE_CONTROL']}\";",
        "add_header X-Cache-Status $upstream_cache_status;"])
    return zone, location


def nginx_cache_folder(app, env):
    """cache/APP, or NGINX_CACHE_PATH: a folder below it, as written (nginx's root master makes
    and chowns it: no link is followed to decide where it is)."""
    own = os.path.join(CACHE_ROOT, app)
    path = env.get("NGINX_CACHE_PATH", "").strip() or own
    normal = os.path.normpath(path) if path.startswith("/") else ""
    if normal != path.rstrip("/") or not (normal == own or normal.startswith(own + os.sep)):
        raise PikuError(f"NGINX_CACHE_PATH {path!r} is not the app's cache folder",
                        f"Leave it unset ({own}) or use a folder below it.")
    return normal


CLOUDFLARE_IPS = "https://api.cloudflare.com/client/v4/ips"


def cloudflare_acl(env):
    """NGINX_CLOUDFLARE_ACL: only Cloudflare's addresses (and this host, and the deploying ssh
    client, as upstream) may connect; the app sees the visitor's address (CF-Connecting-IP)."""
    if not setting_true(env, "NGINX_CLOUDFLARE_ACL"):
        return []
    import ipaddress
    networks = cloudflare_networks()
    allowed = [*networks, "127.0.0.1", "::1"]
    client = os.environ.get("SSH_CLIENT", "").split()[:1]
    if client:
        try:
            allowed.append(str(ipaddress.ip_address(client[0])))
        except ValueError:
            pass
    return [*(f"allow {network};" for network in allowed), "deny all;",
            *(f"set_real_ip_from {network};" for network in networks), "real_ip_header CF-Connecting-IP;"]


def cloudflare_networks():
    """Cloudflare's published ranges, fetched (and kept in cache/ for when the API is away)."""
    import ipaddress
    import urllib.request
    cached = CLOUDFLARE_CACHE
    if os.path.exists(cached) and time.time() - os.stat(cached).st_mtime < 86400:
        try:
            return [str(ipaddress.ip_network(cidr)) for cidr in json.loads(read_text(cached))]
        except (ValueError, TypeError):
            pass        # fetch them again
    try:
        with urllib.request.urlopen(host_setting("PIKU_CLOUDFLARE_IPS_URL", CLOUDFLARE_IPS), timeout=5) as response:
            result = json.loads(response.read().decode())["result"]
        networks = [str(ipaddress.ip_network(cidr)) for cidr in result["ipv4_cidrs"] + result["ipv6_cidrs"]]
        write_atomic(cached, json.dumps(networks) + "\n")
        return networks
    except (OSError, ValueError, KeyError, TypeError) as error:
        try:
            networks = [str(ipaddress.ip_network(cidr)) for cidr in json.loads(read_text(cached) or "null")]
        except (ValueError, TypeError):
            networks = []
        if not networks:
            raise PikuError(f"NGINX_CLOUDFLARE_ACL is set, but Cloudflare's addresses could not be fetched ({error})",
                            "Try again when api.cloudflare.com can be reached, or unset NGINX_CLOUDFLARE_ACL.")
        warning(f"Cloudflare's addresses could not be fetched ({error}); using the ones fetched before")
        return networks


def nginx_site(release, served, uwsgi):
    """The locations that serve the app: static paths, the app or its folder, the include."""
    env, server = release.env, cloudflare_acl(release.env)
    if not setting_true(env, "NGINX_ALLOW_GIT_FOLDERS"):
        server.append("location ~ /\\.git { deny all; }")
    for prefix, folder in static_paths(env, release.root):
        server += nginx_block(f"location {prefix}", [nginx_file(release.app, "alias", served_folder(release, folder)),
                                                     nginx_no_links(release.root),
                                                     "add_header X-Served-By nginx-static;", "try_files $uri $uri/ =404;"])
    server += nginx_root_location(release, served, uwsgi)
    return server + nginx_include(release)


def nginx_root_location(release, served, uwsgi):
    env = release.env
    static = release.processes.get("static")
    if not static:
        return nginx_block("location /", nginx_pass(release.app, uwsgi, env)) if served else []
    folder = static_folder(static.command, static.line, release.root, release.built)
    root = [nginx_file(release.app, "root", served_folder(release, folder)),
            nginx_no_links(release.root)]
    if served:          # files first, then the app (as uWSGI's static-map does)
        return [*nginx_block("location /", [*root, "add_header X-Served-By nginx-static;",
                                            "try_files $uri $uri/index.html @app;"]),
                *nginx_block("location @app", nginx_pass(release.app, uwsgi, env))]
    return nginx_block("location /", [*root, "index index.html;", "add_header X-Served-By nginx-static;",
                                      f"try_files $uri $uri/ {nginx_catch_all(env)}=404;"])


def nginx_catch_all(env):
    """NGINX_CATCH_ALL: the file a static site answers unknown paths with (a single-page app)."""
    value = env.get("NGINX_CATCH_ALL", "").strip()
    if not value:
        return ""
    if not re.fullmatch(r"/[A-Za-z0-9._~/-]*", value) or ".." in value.split("/"):
        raise PikuError(f"NGINX_CATCH_ALL {value!r} is not a path in the site", "Use a path like /index.html")
    return value + " "


# Directives an NGINX_INCLUDE_FILE may use: they shape responses and requests, and none of them
# names a file, a socket or another server, so a pushed file cannot serve what is not its own.
NGINX_INCLUDE_DIRECTIVES = frozenset({
    "location", "add_header", "expires", "etag", "gzip", "gzip_types", "gzip_min_length", "gzip_vary",
    "gzip_comp_level", "gzip_proxied", "client_max_body_size", "client_body_timeout", "keepalive_timeout",
    "send_timeout", "proxy_read_timeout", "proxy_send_timeout", "proxy_connect_timeout",
    "proxy_buffering", "proxy_set_header", "proxy_hide_header", "uwsgi_read_timeout", "uwsgi_send_timeout",
    "uwsgi_buffering", "uwsgi_param", "return", "rewrite", "allow", "deny", "if", "set", "default_type",
    "charset", "limit_except", "autoindex", "internal", "error_page", "server_tokens", "if_modified_since",
    "add_trailer", "sub_filter", "sub_filter_once", "sub_filter_types",
})
NGINX_BLOCKS = frozenset({"location", "if", "limit_except"})     # the allowed directives that open a block
NGINX_SPACE = " \t\r\n"
NGINX_BARE_WORD = LazyPattern(r"[A-Za-z0-9_./:=,@+*^~!%?&|()<>\[\]$-]+")


class NginxSyntaxError(ValueError):
    """What nginx's config reader would refuse, in its words."""


class NginxReader:
    """nginx's config reader (ngx_conf_read_token in nginx 1.22), one character at a time:
    '#' starts a comment only where a word could start; a quote opens a string only there too
    (inside a word it is a letter), and after its closing quote comes a space, ';', '{' or a ')'
    that starts a new word; '\\' makes the next character a letter; '$' keeps a following '{' in
    the word. Words are unescaped as nginx does (nginx_unescape)."""

    def __init__(self, text):
        self.text, self.words, self.line = text, [], 1
        self.reset()

    def reset(self):
        self.start, self.need_space, self.last_space, self.comment = 0, False, True, False
        self.escaped, self.quote, self.variable = False, None, False

    def statements(self):
        """-> (words, end, line) for each statement as nginx reads it, end being ';', '{' or '}'
        (a '}' has no words); NginxSyntaxError where nginx stops, and for a text that ends
        inside a statement or a string (what follows it in the vhost is piku's own)."""
        for index, ch in enumerate(self.text, 1):       # index: just past ch
            if ch == "\n":
                self.line += 1
                self.comment = False
            if self.comment:
                continue
            if self.escaped:
                self.escaped = False
                continue
            if self.need_space:
                if ch in ";{":
                    yield self.finish(ch)
                    continue
                if not self.after_string(ch):
                    continue
            yield from (self.between_words(ch, index) if self.last_space else self.in_word(ch, index))
        if self.words or not self.last_space or self.escaped:
            raise NginxSyntaxError(f"the text ends inside a statement (line {self.line}): every directive ends "
                                   "with ';' and every string is closed")

    def after_string(self, ch):
        """Right after a closing quote, ch is a space (-> False) or a ')' that starts a new word
        (-> True); anything else is nginx's 'unexpected'."""
        if ch not in NGINX_SPACE and ch != ")":
            raise NginxSyntaxError(f'unexpected "{ch}" on line {self.line}')
        self.last_space, self.need_space = True, False
        return ch == ")"

    def between_words(self, ch, index):
        if ch in NGINX_SPACE:
            return
        self.start = index - 1
        if ch in ";{}":
            if (ch == "}") == bool(self.words):
                raise NginxSyntaxError(f'unexpected "{ch}" on line {self.line}')
            yield self.finish(ch)
        elif ch == "#":
            self.comment = True
        else:
            self.last_space, self.escaped, self.variable = False, ch == "\\", ch == "$"
            self.quote = ch if ch in "\"'" else None
            self.start += self.quote is not None

    def in_word(self, ch, index):
        if ch == "{" and self.variable:
            return
        self.variable = False
        if ch in "\\$":
            self.escaped, self.variable = ch == "\\", ch == "$"
            return
        if self.quote:
            if ch != self.quote:
                return
            self.quote, self.need_space = None, True
        elif ch in NGINX_SPACE or ch in ";{":
            self.last_space = True
        else:
            return
        self.words.append(nginx_unescape(self.text[self.start:index - 1]))
        if ch in ";{":
            yield self.finish(ch)

    def finish(self, end):
        statement = (self.words, end, self.line)
        self.words = []
        self.reset()
        return statement


def nginx_statements(text):
    """The statements of text as nginx reads them (NginxReader): [(words, end, line)]."""
    return list(NginxReader(text).statements())


def nginx_unescape(raw):
    """A word as nginx keeps it: \\" \\' \\\\ stand for the character, \\t \\r \\n for tab,
    CR and LF; any other backslash stays."""
    out, index = [], 0
    while index < len(raw):
        ch = raw[index]
        if ch == "\\" and index + 1 < len(raw):
            following = raw[index + 1]
            if following in "\"'\\":
                index += 1
                ch = following
            elif following in "trn":
                out.append({"t": "\t", "r": "\r", "n": "\n"}[following])
                index += 2
                continue
        out.append(ch)
        index += 1
    return "".join(out)


def nginx_word(word):
    """A word written so that nginx reads back exactly word."""
    if NGINX_BARE_WORD.fullmatch(word) and "${" not in word:
        return word
    escaped = word.replace("\\", "\\\\").replace("'", "\\'")
    return "'" + escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t") + "'"


def nginx_include(release):
    """NGINX_INCLUDE_FILE, a file of the release: read as nginx reads it, checked statement by
    statement against NGINX_INCLUDE_DIRECTIVES, and written into the server block from what was
    checked -- one statement a line, each word quoted so nginx reads it back as it was read here
    -- never from the file's own text."""
    name = release.env.get("NGINX_INCLUDE_FILE", "").strip()
    if not name:
        return []
    text = read_pushed_text(release.root, name)
    if not text and not os.path.isfile(os.path.join(release.root, name)):
        raise PikuError(f"NGINX_INCLUDE_FILE {name!r} is not in the pushed code", "Commit it, or unset the setting.")
    lines, depth = [f"# from {name}"], 0
    try:
        statements = nginx_statements(text)
    except NginxSyntaxError as error:
        raise PikuError(f"NGINX_INCLUDE_FILE {name}: nginx cannot read it: {error}",
                        "Fix the file, commit, and push again.")
    for words, end, line in statements:
        if end == "}":
            depth -= 1
            if depth < 0:
                raise PikuError(f"NGINX_INCLUDE_FILE {name} line {line}: '}}' closes a block the file did not open",
                                "Keep the file's blocks balanced: it is written inside piku's server block.")
            lines.append("    " * depth + "}")
            continue
        allowed = NGINX_BLOCKS if end == "{" else NGINX_INCLUDE_DIRECTIVES - NGINX_BLOCKS
        if words[0] not in allowed:
            raise PikuError(f"NGINX_INCLUDE_FILE {name} line {line}: the directive {words[0]!r} is not allowed there",
                            "It may use: " + ", ".join(sorted(NGINX_INCLUDE_DIRECTIVES)) +
                            ". Files, sockets and upstreams are piku's to set.")
        lines.append("    " * depth + " ".join(nginx_word(word) for word in words) + (" {" if end == "{" else ";"))
        depth += end == "{"
    if depth:
        raise PikuError(f"NGINX_INCLUDE_FILE {name}: a block is not closed", "Close every '{' with a '}'.")
    return lines


def nginx_vhost_hash(text):
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finish_vhost(text):
    """The vhost with the marker that tells a deploy this text is the one nginx serves."""
    return text.replace("$piku_vhost", nginx_vhost_hash(text)) if text else text


def nginx_vhost_file(app):
    return os.path.join(NGINX_ROOT, f"{app}.conf")


def certificate_files(app):
    """The app's certificate and key (upstream's names): issued over ACME, or self-signed."""
    return os.path.join(NGINX_ROOT, f"{app}.crt"), os.path.join(NGINX_ROOT, f"{app}.key")


NGINX_TEST_CONFIG = string.Template("""\
pid $temp/nginx.pid;
events { worker_connections 64; }
http {
    include /etc/nginx/mime.types;
    client_body_temp_path $temp/body;
    proxy_temp_path $temp/proxy;
    uwsgi_temp_path $temp/uwsgi;
    fastcgi_temp_path $temp/fastcgi;
    scgi_temp_path $temp/scgi;
    include $candidate;
}
""")


def nginx_binary():
    return host_setting("PIKU_NGINX") or shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)


def check_vhost(app, text):
    """nginx -t on the candidate, in a config of its own: nginx's own message on failure."""
    left = clear_nginx_files(app, text)
    if left:
        raise PikuError(f"the vhost would have nginx open what it must not: {left[0].text}; nothing was changed",
                        "Report this to piku's authors: a path of the vhost is in no place of NGINX_FILES.")
    nginx = nginx_binary()
    if not nginx:
        raise PikuError("NGINX_SERVER_NAME is set, but nginx is not installed",
                        f"Install it (apt-get install nginx) or unset it: config:unset {app} NGINX_SERVER_NAME")
    with tempfile.TemporaryDirectory(prefix="piku-nginx-") as temp:
        candidate = os.path.join(temp, f"{app}.conf")
        # the real logs may belong to nginx's root master, and the live certificate stays as it is
        # until the change commits: nginx -t gets logs and a certificate of its own
        self_signed(nginx_server_names_all(text) or ["localhost"], temp)
        checked = re.sub(r"^(\s*(?:access|error)_log) [^;]+;", rf"\1 {temp}/log;", text, flags=re.M)
        checked = re.sub(r"^(\s*ssl_certificate) [^;]+;", rf"\1 {temp}/crt;", checked, flags=re.M)
        checked = re.sub(r"^(\s*ssl_certificate_key) [^;]+;", rf"\1 {temp}/key;", checked, flags=re.M)
        write_atomic(candidate, checked)
        write_atomic(os.path.join(temp, "nginx.conf"), NGINX_TEST_CONFIG.substitute(temp=temp, candidate=candidate))
        result = subprocess.run([nginx, "-t", "-q", "-e", "stderr", "-p", temp, "-c", os.path.join(temp, "nginx.conf")],
                                capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if result.returncode != 0:
        for line in result.stderr.replace(candidate, f"nginx/{app}.conf").splitlines():
            if line.strip():
                notice(line)
        raise PikuError("nginx refused the new vhost (nginx -t above); nothing was changed",
                        "Fix the setting or NGINX_INCLUDE_FILE it names, and try again.")


def reload_nginx(app, text):
    """Make nginx load the vhost just written (PIKU_NGINX_RELOAD, or the host's path unit),
    and wait until it serves this text."""
    since = uptime()
    command = host_setting("PIKU_NGINX_RELOAD").strip()
    guard_nginx_files()
    if command:
        result = subprocess.run(shlex.split(command), capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            warning(f"reloading nginx failed ({command}): {result.stderr.strip()[:200]}")
    if text is None:
        return
    host = nginx_server_names_from(text)
    address = re.search(r"listen ([0-9.]+):([0-9]+);", text)
    if not address:
        return
    ip = "127.0.0.1" if address.group(1) == "0.0.0.0" else address.group(1)
    wanted = nginx_vhost_hash_in(text)
    deadline = time.monotonic() + NGINX_RELOAD_SECONDS
    while time.monotonic() < deadline:
        # the new workers answer first; nginx tells the old ones to stop accepting 100 ms later
        if nginx_marker(ip, int(address.group(2)), host) == wanted and not nginx_workers_older_than(since):
            return
        time.sleep(PROBE_INTERVAL)
    warning(f"nginx did not serve the new vhost of {app} within {NGINX_RELOAD_SECONDS:.0f} s; "
            "check that it includes ~/.piku/nginx/*.conf and is reloaded (docs/NGINX.md)")


NGINX_RELOAD_SECONDS = 10.0


def uptime():
    """Seconds since boot, the clock /proc/PID/stat start times count in."""
    try:
        return float(read_text("/proc/uptime").split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def nginx_workers_older_than(since):
    """nginx workers that started before since and still accept connections (an old
    configuration's). Workers that were told to stop are titled '... is shutting down'."""
    ticks = os.sysconf("SC_CLK_TCK")
    old = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if handle.read().rstrip(b"\0").replace(b"\0", b" ").strip() != b"nginx: worker process":
                    continue
        except OSError:
            continue        # gone meanwhile, or not ours to read
        started = process_started(pid)
        old += started is not None and started / ticks < since - 0.02
    return old


def nginx_server_names_all(text):
    match = re.search(r"server_name ([^;]+);", text)
    return match.group(1).split() if match else []


def nginx_server_names_from(text):
    return (nginx_server_names_all(text) or ["localhost"])[0]


def nginx_vhost_hash_in(text):
    match = re.search(r'return 200 "([0-9a-f]{16})\\n"', text)
    return match.group(1) if match else None


def nginx_marker(ip, port, host):
    import http.client
    connection = http.client.HTTPConnection(ip, port, timeout=2)
    try:
        connection.request("GET", NGINX_MARKER_PATH, headers={"Host": host})
        response = connection.getresponse()
        return response.read().decode(errors="replace").strip() if response.status == 200 else None
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()



# --- HTTPS: certificates over ACME --------------------------------------------------
# An app with NGINX_SERVER_NAME gets a certificate from an ACME CA (http-01: the CA fetches a
# token that nginx serves from ACME_WWW) with lego, Debian's ACME client, or with acme.sh where
# a host already has it (as upstream piku uses). Until one is issued -- or when issuing fails --
# a self-signed certificate lets nginx start, and the deploy says so.

ACME_CAS = {"letsencrypt.org": "https://acme-v02.api.letsencrypt.org/directory",
            "letsencrypt": "https://acme-v02.api.letsencrypt.org/directory",
            "letsencrypt_test": "https://acme-staging-v02.api.letsencrypt.org/directory",
            "zerossl": "https://acme.zerossl.com/v2/DV90", "zerossl.com": "https://acme.zerossl.com/v2/DV90"}
ACME_URL = LazyPattern(r"https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~/%-]*)?")
ACME_TIMEOUT = 180
EMAIL = LazyPattern(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")


def acme_directory(env):
    """ACME_ROOT_CA (upstream's key): a known CA's name or a directory URL."""
    value = env.get("ACME_ROOT_CA", "").strip() or "letsencrypt.org"
    url = ACME_CAS.get(value.lower(), value)
    if not ACME_URL.fullmatch(url):
        raise PikuError(f"ACME_ROOT_CA {value!r} is neither a known CA nor an https:// directory URL",
                        "Use letsencrypt.org, letsencrypt_test, zerossl or the CA's directory URL.")
    return url


def acme_email(env):
    value = env.get("ACME_EMAIL", "").strip()
    if value and not EMAIL.fullmatch(value):
        raise PikuError(f"ACME_EMAIL {value!r} is not an e-mail address", "Set one like ops@example.com")
    return value


def certificate_state(app):
    try:
        return json.loads(read_text(os.path.join(NGINX_ROOT, f"{app}.acme")) or "{}")
    except ValueError:
        return {}


def save_certificate_state(app, state):
    write_atomic(os.path.join(NGINX_ROOT, f"{app}.acme"), json.dumps(state, sort_keys=True) + "\n")


def ensure_certificate(app, names):
    """A certificate nginx can start with, once a vhost for names goes live: the one the app has
    -- an issued one is kept, also while a certificate for new names is asked for, as it still
    serves the names it covers -- else a new self-signed one. Called only when the change has
    committed: a refused or failed change never touches the live certificate."""
    crt, key = certificate_files(app)
    state = certificate_state(app)
    if os.path.exists(crt) and os.path.exists(key) and (state.get("issued") or same_names(state.get("names"), names)):
        return
    with tempfile.TemporaryDirectory(prefix="piku-tls-") as temp:
        self_signed(names, temp)
        install_certificate(app, os.path.join(temp, "crt"), os.path.join(temp, "key"))
    save_certificate_state(app, {"names": names, "issued": False})


def same_names(first, second):
    return sorted(map(server_name_key, first or [])) == sorted(map(server_name_key, second or []))


def self_signed(names, folder):
    """A self-signed certificate for names, as folder/crt and folder/key (90 days)."""
    run_command(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                 "-days", "90", "-subj", f"/CN={names[0]}",
                 "-addext", "subjectAltName=" + ",".join(f"DNS:{name}" for name in names),
                 "-keyout", os.path.join(folder, "key"), "-out", os.path.join(folder, "crt")],
                capture=True, what="openssl (a self-signed certificate)")


def install_certificate(app, crt_source, key_source):
    crt, key = certificate_files(app)
    guard_nginx_files()         # the path unit reloads nginx once they are written
    write_atomic(key, read_text(key_source), mode=0o600)
    write_atomic(crt, read_text(crt_source))


@record
class AcmeClient:
    kind: str               # lego or acme.sh
    command: list           # the command line that runs it (PIKU_LEGO may be 'env X=1 lego')
    env: dict               # its environment: piku's, with the host's LEGO_* settings from piku.env


def acme_client():
    """acme.sh where a host has it, else lego (PIKU_LEGO, split like a shell would but never run
    by one), else None."""
    acme_sh = os.path.join(os.environ.get("ACME_ROOT") or os.path.join(os.path.expanduser("~"), ".acme.sh"),
                           "acme.sh")
    if os.access(acme_sh, os.X_OK):
        return AcmeClient("acme.sh", [acme_sh], dict(os.environ))
    return lego_client()


def lego_client():
    """lego (PIKU_LEGO), with its environment: piku's own, and the LEGO_* settings of the host
    (piku.env), such as LEGO_CA_CERTIFICATES for a private or test CA -- the daily renewal runs
    from the emperor, which has no environment of the sysadmin's. None without lego."""
    try:
        command = shlex.split(host_setting("PIKU_LEGO")) or ["lego"]
    except ValueError as error:
        raise PikuError(f"PIKU_LEGO cannot be split into words: {error}", f"Fix it in {HOST_ENV}.")
    if not shutil.which(command[0]):
        return None
    return AcmeClient("lego", command, {**host_settings("LEGO_"), **os.environ})


def http_port_hint(names):
    port = nginx_port("PIKU_NGINX_HTTP_PORT", "80")
    where = "port 80 reaches nginx" if port == "80" else f"port 80 reaches nginx (which listens on {port} here)"
    return f"check that {names[0]} resolves to this host and that {where}"


def obtain_certificate(app, env, names):
    """After the vhost is live: an ACME certificate for names, unless one is held already."""
    state, ca = certificate_state(app), acme_directory(env)
    if state.get("issued") and same_names(state.get("names"), names) and state.get("ca") == ca:
        return
    if any(name.startswith("*.") for name in names):
        warning("a wildcard name needs a DNS-01 challenge, which piku does not do: nginx keeps a self-signed "
                "certificate; put your own in ~/.piku/nginx/APP.crt and .key")
        return
    client = acme_client()
    if not client:
        warning(f"no ACME client (apt-get install lego): {app} serves HTTPS with a self-signed certificate")
        return
    email = acme_email(env)
    if client.kind == "lego" and not email:
        save_certificate_state(app, dict(state, names=names, issued=False, error="ACME_EMAIL is not set"))
        warning("no certificate was requested: the CA's account needs a contact address and ACME_EMAIL is "
                "not set; nginx serves HTTPS with a self-signed certificate")
        warning(f"set it, and piku asks for one: config:set {app} ACME_EMAIL=you@example.com")
        return
    step(f"HTTPS: asking {ca} for a certificate for {', '.join(names)} ({client.kind})")
    started = time.monotonic()
    make_folder(ACME_WWW)
    try:
        issued = (acme_sh_issue if client.kind == "acme.sh" else lego_issue)(app, client, ca, email, names)
    except (OSError, subprocess.TimeoutExpired) as error:
        issued = str(error)
    if issued is not True:
        save_certificate_state(app, dict(state, names=names, issued=False, error=issued[-500:]))
        warning(f"no certificate was issued ({last_line(issued)}); nginx keeps serving HTTPS with a "
                "self-signed certificate")
        warning(f"{http_port_hint(names)}, then run: deploy {app}")
        return
    save_certificate_state(app, {"names": names, "issued": True, "ca": ca, "client": client.kind, "email": email,
                                 "when": time.strftime("%Y-%m-%d %H:%M:%S")})
    reload_nginx(app, read_text(nginx_vhost_file(app), None))
    step(f"HTTPS: certificate issued and installed in {time.monotonic() - started:.1f} s")


def last_line(text):
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no reason given"


def lego_path(app):
    """lego's account and certificates for one app: in its own settings folder, so no app's
    certificate or account can overwrite another's (and destroy takes them with it)."""
    return os.path.join(env_dir(app), "acme")


def lego_args(app, client, ca, email, names):
    return [*client.command, "--accept-tos", "--server", ca, "--path", lego_path(app), "--http",
            "--http.webroot", ACME_WWW, *(["--email", email] if email else []),
            *(word for name in names for word in ("--domains", name))]


def lego_certificate(app, names):
    return os.path.join(lego_path(app), "certificates", names[0].replace("*", "_"))


def lego_issue(app, client, ca, email, names):
    """True, or what went wrong."""
    make_folder(lego_path(app))
    result = subprocess.run([*lego_args(app, client, ca, email, names), "run"], capture_output=True, text=True,
                            stdin=subprocess.DEVNULL, timeout=ACME_TIMEOUT, env=client.env)
    if result.returncode != 0:
        return result.stderr or result.stdout
    return lego_install(app, names)


def lego_install(app, names):
    base = lego_certificate(app, names)
    if not os.path.exists(base + ".crt"):
        return f"lego wrote no certificate at {base}.crt"
    install_certificate(app, base + ".crt", base + ".key")
    return True


def acme_sh_issue(app, client, ca, email, names):
    domains = [word for name in names for word in ("-d", name)]
    crt, key = certificate_files(app)
    for args in ([*client.command, "--issue", *domains, "-w", ACME_WWW, "--server", ca,
                  *(["--accountemail", email] if email else [])],
                 [*client.command, "--install-cert", *domains, "--key-file", key, "--fullchain-file", crt]):
        result = subprocess.run(args, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=ACME_TIMEOUT,
                                env=client.env)
        if result.returncode not in (0, 2):     # 2: acme.sh skipped, the certificate is still fresh
            return result.stderr or result.stdout
    return True


RENEW_DAYS = 30


def renew_certificates(days=RENEW_DAYS, spread=False):
    """Renew the lego-issued certificates that expire within days, with the account, CA and
    settings they were issued with; install them and reload nginx. (acme.sh renews its own from
    its cron job.) -> the apps whose renewal failed. spread: let lego wait a random while first,
    as a daily job should, so the CA does not get every host's renewals at the same minute."""
    client = lego_client()         # what issued them, whatever else the host has since
    failed = []
    for app in visible_apps(None):
        state = certificate_state(app)
        if not state.get("issued") or state.get("client") != "lego":
            continue
        if client is None:
            failed.append(app)
            problem(f"{app}: its certificate was issued with lego, which is not installed (apt-get install lego)")
            continue
        try:
            error = renew_certificate(app, client, state, days, spread)
        except (PikuError, OSError) as trouble:     # one app's damage stops no other app's renewal
            error = getattr(trouble, "message", None) or str(trouble)
        save_certificate_state(app, dict(state, renewal={"when": time.strftime("%Y-%m-%d %H:%M:%S"),
                                                         "error": error[-500:] if error else ""}))
        if error:
            failed.append(app)
            problem(f"{app}: renewing its certificate failed: {last_line(error)}")
    return failed


def renew_certificate(app, client, state, days, spread):
    """'' when the certificate is fresh or was renewed, else what went wrong."""
    names, base = state["names"], lego_certificate(app, state["names"])
    before = read_text(base + ".crt")
    email = state.get("email") or acme_email((live_release(app) or {}).get("env", {}))
    if not email:
        return f"no contact address for its ACME account: config:set {app} ACME_EMAIL=you@example.com"
    # a certificate issued before lego's state was kept per app is not in lego_path: issue it anew
    action = ["renew", "--days", str(days), *([] if spread else ["--no-random-sleep"])] if before else ["run"]
    make_folder(lego_path(app))
    try:
        result = subprocess.run([*lego_args(app, client, state["ca"], email, names), *action], capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, timeout=ACME_TIMEOUT + (600 if spread else 0),
                                env=client.env)
    except (OSError, subprocess.TimeoutExpired) as error:
        return str(error)
    if result.returncode != 0:
        return result.stderr or result.stdout or f"lego exited {result.returncode}"
    if read_text(base + ".crt") != before:
        installed = lego_install(app, names)
        if installed is not True:
            return installed
        reload_nginx(app, read_text(nginx_vhost_file(app), None))
        step(f"{app}: certificate renewed")
    return ""


CERTIFICATE_WARN_DAYS = 21


def certificate_expiry(path):
    """When the certificate at path expires (seconds since the epoch), or None when openssl
    cannot read it (doctor reports that)."""
    import ssl
    try:
        output = run_command(["openssl", "x509", "-noout", "-enddate", "-in", path], capture=True,
                             what="openssl x509").stdout
        return ssl.cert_time_to_seconds(output.strip().split("=", 1)[1])
    except (PikuError, IndexError, ValueError):
        return None


DAILY_JOB = string.Template("""\
[uwsgi]
; written by piku: every day at $hour:$minute, renews ACME certificates and rotates the nginx logs
; of the apps (piku.py daily)
master = true
procname-prefix = piku:daily:
logto = $log
${rotation}cron = $minute $hour -1 -1 -1 $command
""")


def write_daily_job():
    """The daily job, as a uWSGI cron vassal (its name has no '@', so it is no app's)."""
    command = shlex.join(piku_entry("daily"))
    keep_room_for_rotation(DAILY_LOG, DAILY_OLD_LOG)
    text = DAILY_JOB.substitute(hour=3, minute=17, log=DAILY_LOG, rotation=log_rotation(DAILY_LOG, DAILY_OLD_LOG,
                                                                                        UWSGI_LOG_MAXSIZE),
                                command=uwsgi_escape(f"env PIKU_ROOT={shlex.quote(PIKU_ROOT)} {command}"))
    write_wrapper()
    description = os.path.join(SANDBOX_ROOT, os.path.basename(DAILY_VASSAL)[:-len(".ini")] + ".host")
    if not os.path.exists(description):
        write_atomic(description, "piku's own: no app code\n", mode=0o600)
    if read_text(DAILY_VASSAL, None) != text:
        write_atomic(DAILY_VASSAL, text)


NGINX_LOG_MAXSIZE = str(16 * 2**20)     # PIKU_NGINX_LOG_MAXSIZE: bytes before a log is rotated


def rotate_nginx_logs():
    """nginx writes each app's nginx/logs/APP.access.log and APP.error.log; piku keeps each below
    PIKU_NGINX_LOG_MAXSIZE: a bigger one becomes NAME.1 (the one before is dropped) and nginx,
    reloaded, reopens its logs. -> the apps whose logs were rotated"""
    value = host_setting("PIKU_NGINX_LOG_MAXSIZE", NGINX_LOG_MAXSIZE)
    if not WHOLE_NUMBER.fullmatch(value):
        raise PikuError(f"PIKU_NGINX_LOG_MAXSIZE={value!r} is not a number of bytes", f"Fix it in {HOST_ENV}.")
    rotated = []
    for app in visible_apps(None):
        moved = False
        for path in (nginx_log(app, "access"), nginx_log(app, "error")):
            try:
                info = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_size > int(value):
                os.replace(path, path + ".1")
                moved = True
        if moved:
            rotated.append(app)
    if rotated:                 # nginx reopens its logs when it reloads
        if host_setting("PIKU_NGINX_RELOAD").strip():
            reload_nginx(rotated[0], None)
        else:                   # the path unit reloads nginx when a file in nginx/ changes
            guard_nginx_files()
            write_atomic(NGINX_RELOAD_TRIGGER, time.strftime("%Y-%m-%d %H:%M:%S\n"))
    return rotated


##############################################################################
# Deploy pipeline
##############################################################################

@record
class Release:
    """Everything one release needs to run, decided before anything live changes."""
    app: str
    rev: str
    root: str
    processes: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    scaling: dict = field(default_factory=dict)
    repo_env: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    ref: str = "refs/heads/main"
    committed: bool = False
    sandboxed: bool = True          # its code runs in the app's sandbox (app_sandboxed)
    environments: list = field(default_factory=list)    # what its build made or reused in envs/APP/
    built: bool = True              # False while it is planned: what its build makes is not there yet
    drain_later: bool = False       # a push's: the old workers drain after it returned, under its lock


def new_release_dir(app, rev):
    parent = make_folder(os.path.join(RELEASE_ROOT, app))
    root = tempfile.mkdtemp(dir=parent, prefix=time.strftime("%Y%m%d%H%M%S-") + rev[:12] + "-")
    os.chmod(root, folder_mode(root))       # mkdtemp makes it 0700: nginx serves static files from it
    return root


def release_folder_readable(root):
    """Releases made by earlier versions are 0700: nginx could not serve their static files."""
    if root.startswith(RELEASE_ROOT + os.sep) and os.path.isdir(root):
        os.chmod(root, folder_mode(root))


def remove_release_dir(root):
    """A release that never went live: its code and the packages installed beside it."""
    for path in (root, project_site(root)):
        shutil.rmtree(path, ignore_errors=True)


def checkout_revision(app, rev, dest):
    """Write the tree of rev into dest without touching the bare repo's HEAD or index."""
    with tempfile.TemporaryDirectory(prefix="piku-index-") as temp:
        env = dict(os.environ, GIT_INDEX_FILE=os.path.join(temp, "index"))
        git("--git-dir", repo_path(app), "read-tree", rev, env=env)
        git("--git-dir", repo_path(app), "--work-tree", dest, "checkout-index", "--all", "--force", env=env)


def settings_layers(app, root, config=None):
    """(the repo's ENV pairs, the config:set pairs) -- the layers above piku's base."""
    if config is None:
        config = parse_env_text(read_text(config_file(app)), "settings (config:set)")
    else:
        config = list(config.items())
    return parse_env_text(read_pushed_text(root, "ENV"), "ENV"), config


def serves_http(processes):
    return any(worker_kind(kind).http for kind in processes)


def assign_port(app, env, processes, live_env):
    """Give web kinds a PORT (the one set, else the one live, else a free one) and check that
    the front can listen on it: a port that is taken, privileged or on an address this host
    does not have is refused here, before anything starts."""
    if not serves_http(processes):
        return env
    address = env["BIND_ADDRESS"]
    try:
        socket.getaddrinfo(address, None, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        raise PikuError(f"BIND_ADDRESS {address!r} is not an IP address",
                        f"Set one with: config:set {app} BIND_ADDRESS=127.0.0.1")
    port = env.get("PORT") or live_env.get("PORT") or str(free_port(address, app))
    if not WHOLE_NUMBER.fullmatch(port) or not 0 < int(port) < 65536:
        raise PikuError(f"PORT {port!r} is not a port number", f"Fix it with: config:set {app} PORT=8000")
    port = str(int(port))
    if int(port) < 1024:
        raise PikuError(f"PORT {port} is a privileged port; apps listen on ports above 1023",
                        f"Pick one with: config:set {app} PORT=8000 (nginx serves ports 80 and 443).")
    env = dict(env, PORT=port)
    check_shared_names(app, env, processes)         # another app's PORT: named as such, before the bind test
    if not front_current(app, env) and not legacy_vassals(app, processes):
        check_bindable(app, address, int(port))
    return env


def check_bindable(app, address, port):
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((address, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE and held_by_own_front(app, port):
                return          # the app's own front: start_front moves it
            if error.errno == errno.EADDRINUSE:
                raise PikuError(f"PORT {port} on {address} is in use by another program",
                                f"Pick another one (config:set {app} PORT=...) or unset PORT to get a free one.")
            if error.errno == errno.EADDRNOTAVAIL:
                raise PikuError(f"BIND_ADDRESS {address} is not an address of this host",
                                f"Use one it has (see 'ip addr'), e.g. config:set {app} BIND_ADDRESS=127.0.0.1")
            raise PikuError(f"cannot listen on {address}:{port}: {error.strerror}")


def held_by_own_front(app, port):
    """Is every socket listening on port held by the app's own front (its master, its workers)?"""
    inodes = listening_inodes(port)
    fronts = {pid for pid in (master_pid(app, unit) for unit in front_units(app)) if pid}
    if not inodes or not fronts:
        return False
    holders = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    holders.setdefault(link[8:-1], set()).add(int(pid))
        except OSError:
            continue        # gone meanwhile, or another user's: not the app's front
    return set(holders) == inodes and all(pid in fronts or parent_pid(pid) in fronts
                                          for pids in holders.values() for pid in pids)


def listening_inodes(port):
    """The inodes of the TCP sockets listening on port (any address, IPv4 and IPv6)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in read_text(table).splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def parent_pid(pid):
    try:
        return int(read_text(f"/proc/{pid}/stat").rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):      # gone meanwhile
        return 0


# --- names in shared namespaces ----------------------------------------------------
# A PORT and an nginx server name belong to one app on the host. Each change checks them
# against what the other apps hold -- their live releases and the vhosts nginx serves -- when
# it is planned (a refusal costs nothing), when its workers are about to start (a rollback or
# restart of an old release), and once more under one host-wide lock at the moment it commits,
# so two changes racing cannot both win. Names are compared the way their consumer compares
# them: server names without case or a final dot, a wildcard covering every name below it.

def app_name_key(app):
    """An app's name as its consumers compare it: nginx's upstream, zone and variable names made
    from it ignore case (so do some file systems); app names are unique in this form."""
    return app.lower()


def server_name_key(name):
    """A server name as nginx compares it: without case or a final dot."""
    return name.lower().rstrip(".")


def server_names_overlap(first, second):
    """Would nginx send a request for some host name to both? (*.example.com covers every name
    below example.com, other wildcards below it included; not example.com itself.)"""
    first, second = server_name_key(first), server_name_key(second)
    if first == second:
        return True
    return any(wild.startswith("*.") and other.endswith(wild[1:]) for wild, other in ((first, second), (second, first)))


Claim = collections.namedtuple("Claim", "port names listen")


def shared_claims(app):
    """{other app: Claim(its PORT or None, its server names, the addresses its vhost listens
    on)}: what its live release and its installed vhost hold (a change in flight holds both
    until it is done)."""
    claims = {}
    for other in list_apps():
        if other == app:
            continue
        try:
            record = live_release(other)
            env = record["env"] if record else load_live_env(other)
        except PikuError:       # a damaged releases.json: LIVE_ENV says what runs
            try:
                env = load_live_env(other)
            except PikuError:   # both damaged: the other app holds what its vhost says, and no PORT
                if visible_to_key(other):
                    warning(f"the settings of '{other}' cannot be read: its PORT is not checked (see: doctor)")
                env = {}
        vhost = read_text(nginx_vhost_file(other))
        names = set(nginx_server_names_all(vhost))
        with contextlib.suppress(PikuError):       # a name no longer valid is still the one it holds
            names.update(nginx_server_names(env))
        claims[other] = Claim(env.get("PORT"), names, listen_addresses(vhost))
    return claims


def listen_addresses(vhost):
    """The addresses a vhost's listen lines name (without ports)."""
    return {address for address in re.findall(r"^\s*listen (\S+):[0-9]+(?: ssl)?;", vhost or "", re.M)}


def visible_to_key(app):
    """May the key in use learn that app exists?"""
    allowed = key_apps()
    return allowed is None or app in allowed


def check_shared_names(app, env, processes):
    """Refuse a PORT or a server name another app holds; the owner is named only to a key that
    may see it."""
    claims = shared_claims(app)
    port = env.get("PORT") if serves_http(processes) else None
    wanted = nginx_server_names(env)
    listen = listen_addresses("\n".join(nginx_listen(env) + nginx_listen(env, https=True))) if wanted else set()
    for other, (used, names, their_listen) in sorted(claims.items()):
        who = f"the app '{other}'" if visible_to_key(other) else "another app"
        if port and used == port:
            raise PikuError(f"PORT {port} is already used by {who}",
                            f"Pick another one (config:set {app} PORT=...) or unset PORT to get a free one.")
        if listen and their_listen and listen != their_listen:
            # nginx picks a server by the address first: an app alone on 127.0.0.1:80 gets every
            # request for 127.0.0.1:80, the other apps' names included
            raise PikuError(f"nginx would listen on {', '.join(sorted(listen))} for {app} but on "
                            f"{', '.join(sorted(their_listen)) if visible_to_key(other) else 'other addresses'} "
                            f"for {who}: one address would then send every name to a single app",
                            "Every app on a host listens on the same addresses: set NGINX_IPV4_ADDRESS, "
                            "NGINX_IPV6_ADDRESS and DISABLE_IPV6 as the other apps do (or leave them unset).")
        for name in wanted:
            clash = next((held for held in sorted(names) if server_names_overlap(name, held)), None)
            if clash:
                shown = "" if clash == name or not visible_to_key(other) else f" (as {clash})"
                raise PikuError(f"NGINX_SERVER_NAME {name} is already served by {who}{shown}",
                                "Use another name" + (f", or remove it from {other}'s NGINX_SERVER_NAME first "
                                                      f"(config:set {other} NGINX_SERVER_NAME=...)"
                                                      if visible_to_key(other) else "."))


def free_port(address, app):
    taken = {claim.port for claim in shared_claims(app).values()}
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    for _ in range(50):
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((address, 0))
            port = probe.getsockname()[1]
        if str(port) not in taken:
            return port
    raise PikuError("could not find a free port")


ARG_STRING_MAX = 131072     # the kernel refuses to exec with a longer KEY=VALUE (MAX_ARG_STRLEN)


def check_environment_size(app, env):
    """Refuse settings no process could start with (execve fails with E2BIG)."""
    total = 0
    for key, value in env.items():
        size = len(key.encode()) + len(value.encode()) + 2
        if size > ARG_STRING_MAX:
            raise PikuError(f"the setting {key} is {size} bytes; no process can be started with a setting "
                            f"over {ARG_STRING_MAX} bytes",
                            "Keep large values in a file under DATA_ROOT and put its path in the setting.")
        total += size + 8
    limit = os.sysconf("SC_ARG_MAX") // 2
    if total > limit:
        raise PikuError(f"the settings of {app} add up to {total} bytes, more than a process environment "
                        f"holds here ({limit})", "Move large values into files under DATA_ROOT.")


def release_processes(root, say=False):
    """The Procfile's processes; for a Node app without one, package.json's start script as
    'web:' (what `npm start` runs, without npm between the worker and its signals)."""
    if os.path.lexists(os.path.join(root, "Procfile")):
        return parse_procfile(read_pushed_text(root, "Procfile"))
    start = node_start_command(root)
    if start is None:
        node = os.path.isfile(os.path.join(root, "package.json")) and not python_manifests(root)
        raise PikuError("no Procfile in the pushed code" + (", and package.json has no start script" if node else ""),
                        "Add a Procfile with a line like " + ("'web: node server.js' (or a start script in "
                                                              "package.json; for a site its build writes to "
                                                              "files: 'static: dist')" if node else "'web: python app.py'")
                        + ", commit, and push again.")
    if say:
        step(f"No Procfile: running 'web: {start[0]}' ({start[1]}; npm's prestart and poststart do not run)")
    return parse_procfile(f"web: {start[0]}\n")


def plan_release(app, rev, root, ref="refs/heads/main", config=None, say=True):
    """Read and validate everything the pushed code asks for, before anything runs."""
    processes = release_processes(root, say)
    if "static" in processes:
        static_folder(processes["static"].command, processes["static"].line, root, built=False)
    repo_env, config = settings_layers(app, root, config)
    live = live_release(app)
    env = expand_settings(config, expand_settings(repo_env, base_env(app)))
    env = assign_port(app, env, processes, live["env"] if live else load_live_env(app))
    if not serves_http(processes):                  # assign_port checked those of the others
        check_shared_names(app, env, processes)
    check_environment_size(app, env)
    check_health_settings(app, env)
    saved = live["scaling"] if live else load_scaling(app)
    release = Release(app, rev, root, processes, env, scaling_for(processes, saved), dict(repo_env), dict(config), ref,
                      sandboxed=app_sandboxed(app), built=False)
    plan_generation(release, 0, release.scaling)        # every worker config renders: refused now, not after a build
    render_nginx(release)                               # and the vhost (nginx -t runs before the switch)
    return release


def scaling_for(processes, saved, changes=None):
    """Worker counts: the saved ones for kinds still in the Procfile, 1 for new kinds."""
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
    timeout = setting_number(release.env, ("PIKU_RELEASE_TIMEOUT",), RELEASE_TIMEOUT)
    view = View(release.app, write=(release.root, app_data(release.app)),
                read=release_environment(release.app, release.root, release.environments)) if release.sandboxed else None
    try:
        returncode, _ = stream_command(["/bin/sh", "-c", process.command], release.root, env,
                                       secret_values(release.env), timeout, view)
    except OSError as error:
        raise PikuError(f"the {kind} command could not be started: {error.strerror}; nothing was changed")
    except CommandTimeout:
        raise PikuError(f"the {kind} command did not finish within {timeout} s (PIKU_RELEASE_TIMEOUT); it was "
                        "stopped and nothing was changed", f"Make it faster, or allow it longer: config:set "
                        f"{release.app} PIKU_RELEASE_TIMEOUT={min(timeout * 2, NUMBER_LIMITS['PIKU_RELEASE_TIMEOUT'])}")
    if returncode != 0:
        raise PikuError(f"the {kind} command failed (exit code {returncode}); nothing was changed",
                        f"Fix Procfile line {process.line} or the code it runs, commit, and push again.")


def build_release(release):
    pack = select_buildpack(release.root, release.processes)
    describe_detection(pack, release.root)
    context = BuildContext(release.app, release.root, release.processes, dict(release.env), release.config,
                           release.repo_env, release.sandboxed)
    assets = build_node_assets(context) if pack.name != "node" and os.path.isfile(
        os.path.join(release.root, "package.json")) else []
    result = pack.build(context)
    if assets:
        remove_node_modules(release.root)       # the Python app runs without it
    release.env.update(result.env)
    release.environments = [*result.environments, *assets]
    release.built = True
    check_environment_size(release.app, release.env)
    served = next((kind for kind in HTTP_APP_KINDS if kind in release.processes), None)
    if release.env.get("NGINX_STATIC_PATHS") and served and worker_kind(served, release.env).name != "wsgi" \
            and not nginx_server_names(release.env):
        warning(f"NGINX_STATIC_PATHS is served by nginx (with NGINX_SERVER_NAME) or by uWSGI beside a wsgi app; "
                f"here neither serves it: serve those files from the {served} worker (for Django: whitenoise)")


# --- health checks ------------------------------------------------------------

HEALTH_DEFAULTS = {"PIKU_HEALTHCHECK_PATH": "/", "PIKU_HEALTHCHECK_TIMEOUT": "30", "PIKU_HEALTHCHECK_SETTLE": "1"}
SECONDS = LazyPattern(r"[0-9]{1,5}(\.[0-9]{1,3})?")
HEALTH_PATH = LazyPattern(r"/[\x21-\x7e]*")
PROBE_INTERVAL = 0.02
HEALTH_MOST_SECONDS = 600   # a health check (or settle time) longer than this would outlast any push


def health_setting(env, key):
    return env.get(key, "").strip() or HEALTH_DEFAULTS[key]


def check_health_settings(app, env):
    path = health_setting(env, "PIKU_HEALTHCHECK_PATH")
    if not HEALTH_PATH.fullmatch(path):
        raise PikuError(f"PIKU_HEALTHCHECK_PATH {path!r} is not a URL path",
                        f"Use a path such as /health: config:set {app} PIKU_HEALTHCHECK_PATH=/health")
    for key in ("PIKU_HEALTHCHECK_TIMEOUT", "PIKU_HEALTHCHECK_SETTLE"):
        value = health_setting(env, key)
        if not SECONDS.fullmatch(value) or (key == "PIKU_HEALTHCHECK_TIMEOUT" and float(value) <= 0):
            raise PikuError(f"{key} must be a number of seconds, not {value!r}",
                            f"Fix it with: config:set {app} {key}={HEALTH_DEFAULTS[key]}")
        if float(value) > HEALTH_MOST_SECONDS:
            raise PikuError(f"{key}={value} is more than a push can wait ({HEALTH_MOST_SECONDS} s)",
                            f"Fix it with: config:set {app} {key}={HEALTH_DEFAULTS[key]}")
    setting_number(env, ("PIKU_RELEASE_TIMEOUT",), RELEASE_TIMEOUT)


def health_host(env):
    """The Host header of the health check: the app's first server name, else its address."""
    names = re.split(r"[\s,]+", env.get("NGINX_SERVER_NAME", "").strip())
    return names[0] if names and names[0] else bind_address(env)


def probe_http(socket_path, path, host, timeout):
    """GET path over a unix socket -> the status (int), or what went wrong (str)."""
    import http.client      # here, not at the top: with ssl it costs every CLI call ~60 ms
    connection = http.client.HTTPConnection("localhost", timeout=timeout)
    try:
        connection.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        connection.sock.settimeout(timeout)
        with app_socket_path(socket_path) as reachable:
            connection.sock.connect(reachable)
        connection.request("GET", path, headers={"Host": host, "User-Agent": "piku-healthcheck"})
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException) as error:
        # EPIPE or a reset: the worker went away while the probe talked to it; the next
        # round sees why (it exited) instead of piku being killed by SIGPIPE
        return str(error) or type(error).__name__
    finally:
        connection.close()


def port_open(port):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@record
class Watch:
    """What the check has seen of one starting instance."""
    master: int = 0
    daemons: frozenset = frozenset()
    since: float = 0.0          # when its daemons were first seen running
    passed: bool = False
    last: str = "not started yet"


def observe(instance, watch, kind):
    """Update watch from the instance's processes; return why it failed, if it did."""
    pid = master_pid(instance.app, instance.unit)
    if (pid and not pid_alive(pid)) or (watch.master and not pid_alive(watch.master)):
        return f"{instance.name} exited while starting"
    if not watch.master and pid:
        watch.master = pid
    if kind.daemon and daemon_exited(instance):
        return f"the command of {instance.name} exited while starting"
    if kind.daemon and watch.master and not watch.daemons:
        found = daemon_pids(watch.master)       # (an exit of the command is uWSGI's respawn, in its log: above)
        if found:
            watch.daemons, watch.since = frozenset(found), time.monotonic()
    return None


def daemon_exited(instance):
    """Did an attach-daemon of this (new) instance exit? uWSGI logs each respawn, and the
    instance's log is its own, so this sees commands that die between two looks at /proc."""
    return '[uwsgi-daemons] respawning "' in read_app_file(instance.log)


def check_instance(instance, watch, kind, generation, deadline):
    """One round of checks; sets watch.passed when the instance is ready."""
    if not watch.master or (kind.daemon and not watch.daemons):
        return
    env = generation.release.env
    if kind.http:
        private = generation.ports.get(instance)
        if private and not port_open(private):
            watch.last = f"nothing listens on its PORT ({private}) yet"
            return
        path = health_setting(env, "PIKU_HEALTHCHECK_PATH")
        status = probe_http(instance.socket, path, health_host(env), max(0.1, min(5.0, deadline - time.monotonic())))
        watch.last = f"GET {path} answered {status}" if isinstance(status, int) else f"GET {path}: {status}"
        watch.passed = isinstance(status, int) and status < 500
    elif kind.settle:
        settle = float(health_setting(env, "PIKU_HEALTHCHECK_SETTLE"))
        watch.passed = time.monotonic() - watch.since >= settle
        watch.last = f"running for {time.monotonic() - watch.since:.1f} s of the {settle:g} s settle time"
    else:
        watch.passed = True


def check_generation(generation):
    """Wait until every new instance is ready: HTTP kinds answer the health check below 500,
    background kinds stay up through the settle time. Fail at once when one exits."""
    env = generation.release.env
    started = time.monotonic()
    deadline = started + float(health_setting(env, "PIKU_HEALTHCHECK_TIMEOUT"))
    watches = {instance: Watch() for instance in generation.instances}
    while True:
        for instance, watch in watches.items():
            if watch.passed:
                continue
            kind = worker_kind(instance.kind, env)
            failure = observe(instance, watch, kind)
            if failure:
                fail_generation(generation, instance, failure)
            check_instance(instance, watch, kind, generation, deadline)
        if all(watch.passed for watch in watches.values()):
            break
        if time.monotonic() > deadline:
            instance, watch = next((i, w) for i, w in watches.items() if not w.passed)
            why = watch.last if watch.master else (
                "it never started -- is the uWSGI emperor running? "
                f"(uwsgi --ini {EMPEROR_CONFIG}, or the service in docs/INSTALL.md)")
            fail_generation(generation, instance, f"{instance.name} was not ready after "
                            f"{deadline - started:g} s (PIKU_HEALTHCHECK_TIMEOUT): {why}")
        time.sleep(PROBE_INTERVAL)
    if generation.instances:
        names = ", ".join(instance.name for instance in generation.instances)
        step(f"Health check passed ({names})", timed=False)      # the Starting step shows how long


LOG_TAIL_LINES = 20


def fail_generation(generation, instance, why):
    """Stop the new instances (nothing live changed) and explain, ending with the log tail."""
    stop_units(generation.release.app, [i.unit for i in generation.instances], graceful=False)
    tail = log_tail(instance.log, LOG_TAIL_LINES)
    raise PikuError(f"the new release did not start: {why}. Nothing live changed; the previous release "
                    f"keeps serving.\nThe last lines of {instance.name}'s log ({instance.log}):\n"
                    + "\n".join("  " + line for line in tail or ["(empty)"]))


# --- generations: one set of running workers ------------------------------------

@record
class Generation:
    release: Release
    gen: int
    scaling: dict
    instances: list = field(default_factory=list)
    files: dict = field(default_factory=dict)       # path -> text; written in this order
    ports: dict = field(default_factory=dict)       # web instance -> its private port
    sandboxed: bool = True


def generation_record(app, gen):
    """What a generation runs (its release and environment), for prune: piku's own record."""
    return os.path.join(SANDBOX_ROOT, f"{app}@g{gen}.json")


def next_generation(app):
    path = os.path.join(runtime_dir(app), "generation")
    try:
        gen = int(read_app_file(path, 64).strip() or 0) + 1
    except ValueError:
        gen = 1
    gen = max([gen, *(number + 1 for number in running_generations(app))])
    write_atomic(path, f"{gen}\n")
    return gen


def plan_generation(release, gen, scaling, only=None):
    """Render every file the workers of release need (nothing is written here)."""
    generation = Generation(release, gen, dict(scaling), sandboxed=app_sandboxed(release.app, workers=True))
    wsgi_extra = []
    if "static" in release.processes:       # the wsgi worker serves the folder's files itself
        static = release.processes["static"]
        wsgi_extra.append(("static-map", "/=" + static_folder(static.command, static.line, release.root, release.built)))
    for prefix, folder in static_paths(release.env, release.root):
        wsgi_extra.append(("static-map", f"{prefix}={folder}"))
    for kind, count in sorted(scaling.items()):
        for index in range(1, count + 1):
            if only is not None and (kind, index) not in only:
                continue
            instance = Instance(release.app, gen, kind, index)
            generation.instances.append(instance)
            render_instance(generation, instance, wsgi_extra)
    return generation


def render_instance(generation, instance, wsgi_extra):
    release = generation.release
    env, root = release.env, release.root
    kind = worker_kind(instance.kind, env)
    worker_env = env
    if kind.http and len(max(instance.socket, instance.uwsgi_socket, key=len)) > UNIX_PATH_MAX:
        raise PikuError(f"the socket path {instance.socket} is longer than Linux allows ({UNIX_PATH_MAX})",
                        "Use a shorter app name or a shorter PIKU_ROOT.")
    if kind.name == "web":
        port = free_port("127.0.0.1", release.app)
        generation.ports[instance] = port
        worker_env = dict(env, PORT=str(port), BIND_ADDRESS="127.0.0.1")
    if kind.template == "gunicorn":
        generation.files[instance.gunicorn_config] = render_gunicorn_config(instance, env, root)
    view = worker_view(release, instance, kind) if generation.sandboxed else None
    generation.files.update(vassal_description(release.app, instance.unit, view))
    command = release.processes[instance.kind].command
    generation.files[instance.vassal] = render_vassal(instance, command, worker_env, root,
                                                      wsgi_extra if kind.name == "wsgi" else (),
                                                      sandboxed=generation.sandboxed)


def worker_view(release, instance, kind):
    """A worker sees its release, site folder and environment read-only, and writes its own
    generation's sockets and logs and the app's data."""
    app = release.app
    read = [release.root, *release_environment(app, release.root, release.environments), instance.vassal]
    if kind.template == "gunicorn":
        read.append(instance.gunicorn_config)
    write = [generation_dir(app, instance.gen), os.path.dirname(instance.log), app_data(app)]
    return View(app, write=tuple(write), read=tuple(read))


def release_environment(app, root, environments):
    """What a release runs besides its code: its site folder, the environments piku built for it
    (never one the app's settings point elsewhere) and the runtime each was built with -- not the
    environments only its build used (NAME-build)."""
    site = project_site(root)
    found = [site] if os.path.isdir(site) else []
    for path in environments:
        record = environment_record(app, path)
        if record and not build_only(path) and os.path.isdir(path) and not os.path.islink(path):
            runtime = read_text(record).strip()
            found += [path, *(runtime_folders(runtime) if os.path.isabs(runtime) else [])]
    return list(dict.fromkeys(found))


def runtime_folders(binary):
    """The folders a runtime (a Python, a Node) is shown from: one piku installed is its whole
    folder in TOOL_ROOT (which no view shows otherwise); the host's are found as tools are."""
    if binary.startswith(TOOL_ROOT + os.sep):
        top = os.path.join(TOOL_ROOT, binary[len(TOOL_ROOT) + 1:].split(os.sep)[0])
        return [top] if os.path.isdir(top) and not os.path.islink(top) else []
    return tool_folders(binary)


ENVIRONMENT_NAME = LazyPattern(r"(python|node)-[0-9a-f]{16}(-build)?")    # envs/APP/KIND-FINGERPRINT


def build_only(path):
    """Is this an environment only a build uses (NAME-build), which no release runs with?"""
    return path.endswith("-build")


def node_of(app, path):
    """The Node binary a release environment of the app was built with (None: not a Node one,
    only a build's, or none recorded)."""
    record = environment_record(app, path)
    if not record or not record.endswith(".node") or build_only(path):
        return None
    return read_text(record).strip()


def runtime_record(app, path):
    """Where piku records the runtime an environment of the app was built with: SANDBOX_ROOT/
    APP@NAME.KIND (APP@python-DIGEST.python, APP@node-DIGEST.node)."""
    name = os.path.basename(path)
    return os.path.join(SANDBOX_ROOT, f"{app}@{name}.{name.split('-', 1)[0]}")


def environment_record(app, path):
    """piku's record of the runtime an environment of the app was built with (written by the
    build that made or reused it), or None for anything else a setting may name. Not the
    environment's own pyvenv.cfg or marker: the build writes the environment. An environment
    without a record is not shown to a sandbox."""
    if not piku_environment(app, path):
        return None
    record = runtime_record(app, path)
    return record if os.path.isfile(record) else None


def record_environment(app, path, runtime):
    record = runtime_record(app, path)
    if read_text(record, None) != runtime + "\n":
        make_folder(SANDBOX_ROOT)
        write_atomic(record, runtime + "\n", mode=0o600)


def record_earlier_environments():
    """Environments of releases piku recorded before the sandbox have no record of their Python:
    take it from their marker, which piku wrote after each of those builds had succeeded (a
    release is recorded only then). Environments no release names are left without one."""
    for app in list_apps():
        try:
            records = load_releases(app)
        except PikuError:
            continue        # doctor reports an unreadable releases.json
        for venv in {str(record["env"].get("VIRTUAL_ENV") or "") for record in records
                     if isinstance(record, dict) and isinstance(record.get("env"), dict)}:
            if not ENVIRONMENT_NAME.fullmatch(os.path.basename(venv)) or os.path.dirname(venv) != env_dir(app):
                continue
            if os.path.exists(runtime_record(app, venv)):
                continue
            try:
                python = json.loads(read_nofollow(os.path.join(venv, ENV_MARKER), 65536) or "{}")["python"][0]
            except (ValueError, KeyError, TypeError, IndexError):
                continue
            if isinstance(python, str) and os.path.isabs(python):
                record_environment(app, venv, python)


def app_data(app):
    return make_folder(os.path.join(DATA_ROOT, app))


def start_generation(generation):
    """Write the prepared files and let the emperor start the new instances beside the live ones."""
    release = generation.release
    make_folder(generation_dir(release.app, generation.gen))
    make_folder(os.path.join(LOG_ROOT, release.app, f"g{generation.gen}"))
    write_wrapper()
    meta = {"root": release.root, "virtualenv": release.env.get("VIRTUAL_ENV"), "rev": release.rev,
            "ref": release.ref, "env": release.env, "config": release.config, "scaling": generation.scaling,
            "environments": release.environments}
    write_atomic(generation_record(release.app, generation.gen), json.dumps(meta) + "\n", mode=0o600)
    for instance in generation.instances:       # bwrap's report of an earlier instance of that name (ps:scale)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sandbox_file(release.app, instance.unit, "info"))
        keep_room_for_rotation(instance.log)
    for path, text in generation.files.items():
        write_atomic(path, text, mode=0o600)
    if generation.instances:
        wake_emperor()


def uwsgi_sockets(app, gen, scaling, env):
    """The uwsgi-protocol sockets nginx's uwsgi_pass reaches (wsgi workers on uWSGI)."""
    return [Instance(app, gen, "wsgi", index).uwsgi_socket for index in range(1, scaling.get("wsgi", 0) + 1)
            if worker_kind("wsgi", env).name == "wsgi"]


def http_sockets(app, gen, scaling, env):
    """The sockets the front sends traffic to: the instances of the one HTTP kind."""
    return [Instance(app, gen, kind, index).socket for kind, count in sorted(scaling.items())
            if worker_kind(kind, env).http for index in range(1, count + 1)]


# --- the switch -------------------------------------------------------------------

DRAIN_SECONDS = 0.1     # lets connections the front made just before the switch be accepted
DRAIN_MAX_SECONDS = 5.0


def activate(release, commit):
    """Start release's workers beside the live ones, check them, switch traffic, drain the old.

    commit(gen) records the release; it runs after every check passed and before traffic
    moves, so a failure before it changes nothing live and a crash after it is finished by
    the next command (reconcile)."""
    app = release.app
    check_shared_names(app, release.env, release.processes)      # a rollback's PORT may be taken since
    release_folder_readable(release.root)
    vhost, vhost_changed = checked_vhost(release)
    started = []
    try:
        generation = plan_generation(release, next_generation(app), release.scaling)
        started = [instance.unit for instance in generation.instances]
        switch_to(release, generation, commit, vhost, vhost_changed)
    except BaseException as error:      # refused, failed, or the client went
        if release.committed and isinstance(error, OSError):    # the change stands: it says what is left to do
            live_but(app, f"v{live_release(app)['version']} is recorded as live", error, " (until then some "
                     "visitors may still reach the release before it)")
            return
        if release.committed:
            raise
        stop_units(app, started, graceful=False)        # nothing live changed
        restore_live_front(app)
        raise stopped_before_commit("the change", error) if isinstance(error, OSError) else error


def switch_to(release, generation, commit, vhost, vhost_changed):
    """activate's steps from the start of the new workers: the commit, the switch, the drain."""
    app = release.app
    first = not any(front_alive(app, None, unit) for unit in front_units(app))
    if generation.instances:
        step(f"Starting {', '.join(instance.name for instance in generation.instances)}"
             + ("" if first else " beside the live workers"))
    front = start_beside(release, generation, first)
    with ClientWatch.shielded(), flocked(NAMES_LOCK):     # from here on it goes live, client or not
        check_shared_names(app, release.env, release.processes)
        commit(generation.gen)
        release.committed = True
        ClientWatch.hold()          # committed: whatever happens to the client, the command finishes
        if vhost:
            ensure_certificate(app, nginx_server_names(release.env))
        if vhost_changed:
            write_vhost(app, vhost)
    with ClientWatch.shielded():
        switch_traffic(release, generation, front, first, vhost, vhost_changed)
        if vhost:
            obtain_certificate(app, release.env, nginx_server_names(release.env))
            write_daily_job()


def stopped_before_commit(what, error):
    """The refusal of a change that failed before its commit point: nothing live changed."""
    where = os.path.relpath(error.filename, PIKU_ROOT) if error.filename else "a file"
    return PikuError(f"{what} stopped: {error.strerror or error} ({where}); nothing live changed",
                     f"Free some disk space (df -h {PIKU_ROOT}) or fix the permissions, and try again.")


def live_but(app, what, error, meanwhile=""):
    """The warning of a change that failed after its commit point: it stands (a push moves the
    branch to it), and the next command (reconcile) finishes what this one could not."""
    where = os.path.relpath(error.filename, PIKU_ROOT) if error.filename else "a file"
    warning(f"{what}, but {where} could not be written ({error.strerror}); the next command for {app} finishes "
            f"the switch{meanwhile}: make room (df -h {PIKU_ROOT}), then run {piku_command('restart', app)}")


def checked_vhost(release):
    """-> (the release's vhost or None, whether it differs from the installed one), checked by
    nginx -t when it does, with a certificate nginx can start with."""
    vhost = finish_vhost(render_nginx(release))
    changed = vhost != read_text(nginx_vhost_file(release.app), None)
    if vhost and changed:
        check_vhost(release.app, vhost)
    return vhost, changed


def start_beside(release, generation, first):
    """The new workers start, pass their health check, and the app's front listens where the
    release says (a first deploy's slots point at them at once). -> the front's unit or None"""
    start_generation(generation)
    check_generation(generation)
    sockets = http_sockets(release.app, generation.gen, release.scaling, release.env)
    if first:
        point_slots(release.app, sockets)
    return start_front(release, generation) if sockets else None


def switch_traffic(release, generation, front, first, vhost, vhost_changed):
    """The committed release gets the traffic: slots, logs, the vhost nginx serves (written at
    the commit); then the old workers drain."""
    app = release.app
    point_slots(app, http_sockets(app, generation.gen, release.scaling, release.env))
    usockets = uwsgi_sockets(app, generation.gen, release.scaling, release.env)
    if usockets:                # left as they are otherwise: nginx uses them until it reloads
        point_slots(app, usockets, "uslot")
    link_logs(app, generation.instances)
    if vhost_changed:
        serve_vhost(app, vhost)
    if release.drain_later:         # keep_lock_until_branch_moves drains them, the app's lock still held
        if not first:
            step("Traffic moved to the new workers; the old ones stop once their queues are empty, after "
                 "the push returns")
        return
    if not first:
        step("Traffic moved to the new workers; stopping the old ones once their queues are empty")
    drain_old(app, generation.gen, front)


def restore_vhost(app, record):
    """After an interrupted command: the live release's vhost, if another one is in place."""
    if not record["env"].get("NGINX_SERVER_NAME") and not os.path.exists(nginx_vhost_file(app)):
        return
    try:
        vhost = finish_vhost(render_nginx(release_from_record(app, record)))
        if vhost != read_text(nginx_vhost_file(app), None):
            if vhost:
                check_vhost(app, vhost)
                ensure_certificate(app, nginx_server_names(record["env"]))
            install_vhost(app, vhost)
    except PikuError as error:
        warning(f"the vhost of v{record['version']} could not be put back: {error.message}")


def install_vhost(app, text):
    """Put the checked vhost (None: none) in place and have nginx serve it."""
    if text is None and not os.path.exists(nginx_vhost_file(app)):
        return
    write_vhost(app, text)
    serve_vhost(app, text)


def write_vhost(app, text):
    """The app's vhost file (None: none) -- nginx serves it once reloaded (serve_vhost)."""
    if text is None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(nginx_vhost_file(app))
    else:
        make_folder(NGINX_LOGS)         # nginx writes its logs there but makes no folder
        guard_nginx_files(replacing=app)        # the path unit reloads nginx once the vhost is written;
        clear_nginx_files(app, text, master_only=True)  # its text was checked before the change committed
        write_atomic(nginx_vhost_file(app), text)


def serve_vhost(app, text):
    """nginx serves the vhost just written (reloaded, and checked to serve it), or none."""
    if text is not None:
        step(f"nginx: {app} answers for {' '.join(nginx_server_names_all(text))}")
    reload_nginx(app, text)


def start_front(release, generation):
    """Make sure the app's front listens on BIND_ADDRESS:PORT; start a new one if needed."""
    app, env = release.app, release.env
    unit = front_unit(env)
    if front_current(app, env):
        return unit
    stop_units(app, legacy_vassals(app, release.processes), graceful=True, wait=10)
    if os.path.exists(vassal_file(app, unit)):      # BIND_ADDRESS changed, PORT did not:
        stop_units(app, [unit], graceful=True, wait=10)     # the old front must let go of the port
    make_folder(os.path.join(LOG_ROOT, app))
    keep_room_for_rotation(os.path.join(LOG_ROOT, app, "front.log"))
    enable_vassal(app, unit, render_front(app, env))       # piku's own: no app code runs in it
    wake_emperor()
    deadline = time.monotonic() + 10
    host, port = env["BIND_ADDRESS"], int(env["PORT"])
    while time.monotonic() < deadline:
        if front_alive(app, env) and answers_http(host, port, env):
            return unit
        time.sleep(PROBE_INTERVAL)
    stop_units(app, [unit], graceful=False, wait=10)        # activate() then puts the live front back
    fail_generation(generation, generation.instances[0], f"the front on {bind_address(env)} did not start")


def restore_live_front(app):
    """After a change that did not commit: the live release's front listens, and no other (a
    new PORT's front is stopped; one stopped for a new BIND_ADDRESS is started again)."""
    try:
        record = live_release(app)
    except PikuError as error:
        warning(f"the front of {app} could not be checked: {error.message}")
        return
    wanted = None
    if record and http_sockets(app, record["gen"], record["scaling"], record["env"]):
        wanted = front_unit(record["env"])
    others = [unit for unit in front_units(app) if unit != wanted]
    if others:
        stop_units(app, others, graceful=True)
    if wanted and not front_current(app, record["env"]):
        enable_vassal(app, wanted, render_front(app, record["env"]))
        wake_emperor()


def answers_http(host, port, env):
    import http.client
    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", health_setting(env, "PIKU_HEALTHCHECK_PATH"), headers={"Host": health_host(env)})
        connection.getresponse().read()
        return True
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def drain_old(app, gen, front):
    """Stop every other generation and front of the app, gracefully, once traffic has moved."""
    old = [unit for unit in app_units(app)
           if (unit_generation(unit) is not None and unit_generation(unit) != gen)
           or (unit_generation(unit) is None and unit != front)]
    if old:
        wait_for_empty_queues([unit_runtime(app, unit, suffix) for unit in old for suffix in ("sock", "uws")])
        stop_units(app, old, graceful=True)


def wait_for_empty_queues(sockets):
    """Wait until no connection waits in these sockets' accept queues: a worker that stops
    gracefully finishes what it accepted, but what still waits in its queue would be reset."""
    time.sleep(DRAIN_SECONDS)
    deadline = time.monotonic() + DRAIN_MAX_SECONDS
    while time.monotonic() < deadline and queued_connections(sockets):
        time.sleep(PROBE_INTERVAL)


def queued_connections(sockets):
    """Connections waiting to be accepted on these listening unix sockets (0 when ss is missing)."""
    try:
        result = subprocess.run(["ss", "-xlH"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return 0        # without ss, the fixed DRAIN_SECONDS is all the wait there is
    wanted = set(sockets)
    waiting = 0
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[4] in wanted and WHOLE_NUMBER.fullmatch(parts[2]):
            waiting += int(parts[2])
    return waiting


def point_slots(app, sockets, prefix="slot"):
    """Re-link the slots to sockets (slot k -> socket k mod N). Each rename is atomic: the
    front and nginx connect per connection, so new connections go to the new sockets at once."""
    make_folder(runtime_dir(app))
    for slot in range(1, FRONT_SLOTS + 1):
        path = slot_path(app, slot, prefix)
        if not sockets:
            if os.path.lexists(path):
                os.unlink(path)
            continue
        target = sockets[(slot - 1) % len(sockets)]
        if not (os.path.islink(path) and os.readlink(path) == target):
            write_link(path, target, durable=False)     # runtime state: reconcile points them again


def link_logs(app, instances):
    """logs/APP/KIND.N.log always names the live instance's log (in logs/APP/gGEN/)."""
    folder = make_folder(os.path.join(LOG_ROOT, app))
    wanted = {f"{i.name}.log": os.path.relpath(i.log, folder) for i in instances}
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".log") and os.path.islink(path) and name not in wanted:
            os.unlink(path)
    for name, target in wanted.items():
        path = os.path.join(folder, name)
        if not (os.path.islink(path) and os.readlink(path) == target):
            write_link(path, target, durable=False)


# --- releases -----------------------------------------------------------------------

def load_releases(app):
    """The app's release records, oldest first ([] when there are none; damaged ones refused
    with the fix -- the next locked command rebuilds them, recover_records)."""
    text = read_text(releases_file(app))
    if not text.strip():
        return []
    try:
        records = json.loads(text)
    except (ValueError, RecursionError):
        records = None
    if not releases_shaped(records):
        raise PikuError(f"{releases_file(app)} is damaged", f"Rebuild it from the running workers (or the branch): "
                        f"{piku_command('deploy', app)}")
    return records


RELEASE_KEYS = {"version": int, "rev": str, "root": str, "env": dict, "config": dict, "scaling": dict, "gen": int}


def releases_shaped(records):
    """Are these release records as piku writes them (every key, each of its type)?"""
    return isinstance(records, list) and all(
        isinstance(record, dict) and all(isinstance(record.get(key), kind) for key, kind in RELEASE_KEYS.items())
        for record in records)


def save_releases(app, records):
    write_atomic(releases_file(app), json.dumps(records, indent=1) + "\n", mode=0o600)


def live_release(app):
    records = load_releases(app)
    return records[-1] if records else None


def who_deploys():
    """Who asked: over SSH, the key's name (its fingerprint for keys added before keys had
    names, which are all 'default'); on the host itself, the user."""
    name, fingerprint = os.environ.get("NAME", ""), os.environ.get("FINGERPRINT", "")
    if fingerprint:
        return name if name and name != "default" else fingerprint
    return current_user()


def record_release(release, cause, gen, state="live"):
    """Append release to the app's records and write the files that describe what is live."""
    records = load_releases(release.app)
    record = {"version": records[-1]["version"] + 1 if records else 1, "rev": release.rev, "ref": release.ref,
              "root": release.root, "env": release.env, "config": release.config, "scaling": release.scaling,
              "environments": release.environments, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "by": who_deploys(), "cause": cause, "gen": gen, "state": state}
    commit_releases(release.app, records + [record])     # the commit point: the record names what is live
    try:
        write_live_files(release.app, record)
    except OSError as error:        # derived from the record: the next command writes them again
        warning(f"v{record['version']} is recorded as live, but {os.path.relpath(error.filename or 'a file', PIKU_ROOT)} could not "
                f"be written ({error.strerror}); the next command writes it from the release record")
    return record


def write_live_files(app, record):
    """LIVE_ENV, SCALING, the config:set settings and apps/APP, all from one release record."""
    for path, text, mode in ((live_env_file(app), format_env(record["env"]), 0o600),
                             (scaling_file(app), format_scaling(record["scaling"]), 0o644),
                             (config_file(app), format_env(record["config"]), 0o600)):
        if read_text(path, None) != text:
            write_atomic(path, text, mode=mode)
    switch_symlink(app_path(app), record["root"])


def switch_symlink(link, target):
    """Atomically make link point at target (an upstream host has a real folder there)."""
    if os.path.isdir(link) and not os.path.islink(link):
        shutil.rmtree(link)
    if os.path.islink(link) and os.readlink(link) == target:
        return
    write_link(link, target)


def release_from_record(app, record):
    """A kept release, ready to run again: its code, environment, settings and scaling."""
    root = record["root"]
    again = (f"Build it again from the branch: {piku_command('deploy', app)}" if record == live_release(app)
             else "Push that revision again instead.")
    if not os.path.isdir(root) or (project_site(root) in record["env"].get("PYTHONPATH", "").split(":")
                                   and not os.path.isdir(project_site(root))):
        raise PikuError(f"the code of v{record['version']} is no longer kept ({root} is gone)", again)
    gone = environments_gone(app, record)
    if gone:
        raise PikuError(f"the environment of v{record['version']} is no longer kept ({gone[0]})", again)
    processes = release_processes(root)
    return Release(app, record["rev"], root, processes, dict(record["env"]), dict(record["scaling"]),
                   {}, dict(record["config"]), record.get("ref") or "refs/heads/main",
                   environments=record_environments(app, record))


def keep_count(env):
    value = env.get("PIKU_KEEP_RELEASES", "").strip() or KEEP_RELEASES
    return max(1, int(value)) if WHOLE_NUMBER.fullmatch(value) else int(KEEP_RELEASES)


def record_environments(app, record):
    """The environments (folders in envs/APP/) a release record runs with: what its build listed,
    or for a record of an earlier piku.py, its VIRTUAL_ENV when that is one of piku's. (A
    VIRTUAL_ENV of the app's own settings, outside envs/APP/, is none of piku's business.)"""
    listed = record.get("environments")
    env = record.get("env") if isinstance(record.get("env"), dict) else {}
    paths = [*(listed if isinstance(listed, list) else []), env.get("VIRTUAL_ENV")]
    return list(dict.fromkeys(path for path in paths if piku_environment(app, path)))


def piku_environment(app, path):
    """Is path an environment piku names in envs/APP/ (written as piku writes it: a record that
    spells it otherwise names none)?"""
    return isinstance(path, str) and os.path.dirname(path) == env_dir(app) \
        and bool(ENVIRONMENT_NAME.fullmatch(os.path.basename(path)))


def environments_gone(app, record):
    """The environments a release record runs with that are gone (or were never finished); one
    only its build used (NAME-build) is not needed to run it again."""
    return [path for path in record_environments(app, record) if not build_only(path)
            and (not os.path.exists(os.path.join(path, ENV_MARKER)) or runtime_gone(app, path))]


def runtime_gone(app, path):
    """Is the runtime piku recorded for an environment gone (a Node piku or apt removed)?"""
    record = environment_record(app, path)
    runtime = read_text(record).strip() if record else ""
    return os.path.isabs(runtime) and not os.path.exists(runtime)


def prune(app):
    """Keep the last PIKU_KEEP_RELEASES releases with their code and environments; remove
    what neither a kept release nor a running generation uses."""
    records = load_releases(app)
    if not records:
        return
    kept = records[-keep_count(records[-1]["env"]):]
    for record in [record for record in kept[:-1] if environments_gone(app, record)]:
        notice(f"v{record['version']} is no longer kept: its environment is gone, so it could not run again")
        kept.remove(record)
    if len(kept) < len(records):
        save_releases(app, kept)
    roots = {record["root"] for record in kept}
    used = {path for record in kept for path in record_environments(app, record)}
    running = running_generations(app)
    for gen in running:
        try:
            meta = json.loads(read_text(generation_record(app, gen)) or "{}")
        except ValueError:
            continue
        if isinstance(meta, dict):
            roots.add(meta.get("root"))
            used.update(record_environments(app, {"environments": meta.get("environments"),
                                                  "env": {"VIRTUAL_ENV": meta.get("virtualenv")}}))
    parent = os.path.join(RELEASE_ROOT, app)
    for name in os.listdir(parent) if os.path.isdir(parent) else []:
        path = os.path.join(parent, name)
        if path not in roots and path.removesuffix(".site") not in roots:     # RELEASE.site: its packages
            shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(env_dir(app)):
        path = os.path.join(env_dir(app), name)
        if ENVIRONMENT_NAME.fullmatch(name) and path not in used:
            shutil.rmtree(path, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):      # (none for one built before the sandbox)
                os.unlink(runtime_record(app, path))
    prune_generation_folders(app, running)


def generation_pids(app, gen):
    """The masters of a stopped generation's vassals that still run (finishing their requests)."""
    prefix = f"{app}@"
    units = {os.path.basename(path)[len(prefix):-len(".info")]
             for path in glob.glob(glob.escape(sandbox_file(app, f"g{gen}.", "")[:-1]) + "*.info")}
    if not units:           # a generation outside the sandbox: its pidfiles are all there is
        units = {f"g{gen}.{os.path.basename(path)[:-len('.pid')]}"
                 for path in glob.glob(os.path.join(glob.escape(generation_dir(app, gen)), "*.pid"))}
    return [pid for pid in map(functools.partial(master_pid, app), sorted(units)) if pid_alive(pid)]


def prune_generation_folders(app, running):
    """Runtime folders of stopped generations go; their logs stay for the last few."""
    for path in glob.glob(os.path.join(runtime_dir(app), "g[0-9]*")):
        gen = os.path.basename(path)[1:]
        if gen.isdigit() and int(gen) not in running and not generation_pids(app, int(gen)):
            shutil.rmtree(path, ignore_errors=True)
            for record in glob.glob(os.path.join(SANDBOX_ROOT, glob.escape(f"{app}@g{gen}.")) + "*"):
                os.unlink(record)
    logs = sorted((path for path in glob.glob(os.path.join(LOG_ROOT, app, "g[0-9]*"))
                   if os.path.basename(path)[1:].isdigit()), key=lambda p: int(os.path.basename(p)[1:]))
    stale = [path for path in logs if int(os.path.basename(path)[1:]) not in running]
    for path in stale[:-3]:
        shutil.rmtree(path, ignore_errors=True)


# --- deploys, rollbacks and recovery ---------------------------------------------------

DEPLOY_BYTES = 200 * 2**20      # what one deploy needs under PIKU_ROOT at least: a release, an environment
DEPLOY_FILES = 10000            # ... and inodes: a Python environment alone holds thousands of files


def disk_problem():
    """Why one deploy may not fit under PIKU_ROOT now, or None. (A file system without an inode
    limit reports none.)"""
    stat = os.statvfs(PIKU_ROOT)
    if stat.f_bavail * stat.f_frsize < DEPLOY_BYTES:
        return f"only {stat.f_bavail * stat.f_frsize / 2**20:.0f} MB free under {PIKU_ROOT}"
    if stat.f_files and stat.f_favail < DEPLOY_FILES:
        return f"only {stat.f_favail} inodes (files) free under {PIKU_ROOT}"
    return None


def warn_disk():
    """Said before a push or deploy starts, when it may not fit."""
    if disk_problem():
        warning(f"{disk_problem()}: a deploy needs about {DEPLOY_BYTES // 2**20} MB and {DEPLOY_FILES} files; this one "
                "may stop half-way (nothing live changes if it does). See what takes the room: doctor")


def auto_restart(env):
    return env.get("PIKU_AUTO_RESTART", "true").lower() not in ("0", "false", "no", "off")


def deploy_app(app, rev, ref="refs/heads/main", cause="push", config=None, state="live", before=()):
    """Build rev of app and make it live, keeping a record of the attempt -> the record. The
    caller holds the app's lock. A push (state pending) leaves the old workers to drain once git
    has moved the branch (keep_lock_until_branch_moves): the push returns when the new release
    serves."""
    with DeployRecord(app, cause, before) as record:
        build_and_go_live(app, rev, ref, cause, config, state)
    return record


def build_and_go_live(app, rev, ref, cause, config, state):
    started = time.monotonic()
    step(f"Deploying {app} at {rev[:12]}")
    warn_disk()
    for folder in (DATA_ROOT, LOG_ROOT):
        make_folder(os.path.join(folder, app))
    root = new_release_dir(app, rev)
    release = Release(app, rev, root)
    try:
        checkout_revision(app, rev, root)
        release = plan_release(app, rev, root, ref, config)
        release.drain_later = state == "pending"
        run_phase(release, "preflight")
        build_release(release)
        run_phase(release, "release")
        go_live(release, cause, state)
    except OSError as error:        # a full disk, a permission: nothing live changed before the commit
        if release.committed:
            raise
        remove_release_dir(root)
        raise stopped_before_commit("the deploy", error)
    except BaseException:
        if not release.committed:
            remove_release_dir(root)
        raise
    prune(app)      # (a push's keeper prunes again once its old workers are gone)
    announce(release, time.monotonic() - started)


def go_live(release, cause, state="live"):
    """Activate release and record it, or -- with PIKU_AUTO_RESTART off and workers running --
    only record it; `restart` starts it."""
    app = release.app
    running = running_generations(app)
    if running and not auto_restart(release.env):
        with ClientWatch.shielded(), flocked(NAMES_LOCK):
            check_shared_names(app, release.env, release.processes)
            record_release(release, cause, max(running), state)
            release.committed = True
            ClientWatch.hold()
        step("PIKU_AUTO_RESTART is off: the running workers were left as they are; "
             f"'restart {app}' starts this release")
        return
    activate(release, lambda gen: record_release(release, cause, gen, state))


def announce(release, seconds):
    env = release.env
    record = live_release(release.app)
    version = f"v{record['version']}, " if record else ""
    workers = ", ".join(f"{kind}={count}" for kind, count in sorted(release.scaling.items())) or "none"
    step(f"Workers: {workers}", timed=False)
    if serves_http(release.processes):
        host = f"[{env['BIND_ADDRESS']}]" if ":" in env["BIND_ADDRESS"] else env["BIND_ADDRESS"]
        step(f"{release.app} is live at http://{host}:{env['PORT']}/ ({version}{seconds:.1f} s)", timed=False)
    else:
        step(f"{release.app} is live ({version}{seconds:.1f} s)", timed=False)


def rollback_app(app, version=None):
    """Run a kept release again -- no build -- and move the branch back to its revision."""
    with DeployRecord(app, f"rollback to v{version}" if version else "rollback"):
        run_kept_release(app, version)


def run_kept_release(app, version):
    started = time.monotonic()
    records = load_releases(app)
    if len(records) < 1 or (version is None and len(records) < 2):
        raise PikuError(f"{app} has no earlier release to roll back to", f"See them with: releases {app}")
    live = records[-1]
    target = records[-2] if version is None else next((r for r in records if r["version"] == version), None)
    if target is None:
        kept = ", ".join(f"v{r['version']}" for r in records)
        raise PikuError(f"v{version} is not a kept release of {app} (kept: {kept})", f"See them with: releases {app}")
    if target is live:
        raise PikuError(f"v{version} is already live")
    step(f"Rolling {app} back to v{target['version']} ({target['rev'][:12]})")
    release = release_from_record(app, target)
    release.ref = live.get("ref") or release.ref
    activate(release, lambda gen: commit_rollback(release, f"rollback to v{target['version']}", gen))
    prune(app)
    announce(release, time.monotonic() - started)


def commit_rollback(release, cause, gen):
    """A rollback's commit: recorded as pending, the branch moved back, then confirmed -- killed
    before the branch moves, the next command drops the pending record (reconcile)."""
    moves = branch_revision(release.app, release.ref) != release.rev
    record = record_release(release, cause, gen, "pending" if moves else "live")
    if moves:
        git("--git-dir", repo_path(release.app), "update-ref", release.ref, release.rev, env=git_env())
        confirm_release(release.app, release.rev)
    return record


def restart_app(app):
    """Start the live release again beside itself: new processes, same release."""
    record = live_release(app)
    if not record:
        raise not_deployed(app)
    activate(release_from_record(app, record), lambda gen: set_live_generation(app, gen))
    prune(app)


def set_live_generation(app, gen):
    """The live release now runs as generation gen (restart, or recovery after a crash)."""
    records = load_releases(app)
    records[-1]["gen"] = gen
    commit_releases(app, records)
    return records[-1]


def commit_releases(app, records):
    """Write the release records: the commit point of every change. A failure leaves the old
    records, and refuses the change."""
    try:
        save_releases(app, records)
    except OSError as error:
        raise PikuError(f"the release could not be recorded ({error.strerror}); nothing was changed",
                        f"Make room (df -h {PIKU_ROOT}), then try again.")


def branch_revision(app, ref):
    """The commit ref points at in the app's repo, or None."""
    try:
        return git("--git-dir", repo_path(app), "rev-parse", "--verify", "--quiet", ref + "^{commit}",
                   env=git_env()).stdout.strip() or None
    except PikuError:
        return None


def git_env():
    """The environment for git outside a hook's quarantine (no GIT_* from the hook)."""
    return {key: value for key, value in os.environ.items() if not key.startswith("GIT_")}


def confirm_release(app, rev):
    records = load_releases(app)
    if records and records[-1].get("state") == "pending" and records[-1]["rev"] == rev:
        records[-1]["state"] = "live"
        save_releases(app, records)


def records_problem(app):
    """What is wrong with the app's release records ('missing', 'empty', 'damaged'), or None.
    Missing is a problem only once the app's branch exists (it was deployed)."""
    text = read_text(releases_file(app), None)
    if text is None:
        return "missing" if any(branch_revision(app, ref) for ref in app_branches(app)) else None
    if not text.strip():
        return "empty"
    try:
        records = json.loads(text)
    except (ValueError, RecursionError):
        return "damaged"
    if not releases_shaped(records):
        return "damaged"
    return "empty" if not records and any(branch_revision(app, ref) for ref in app_branches(app)) else None


def app_branches(app):
    """The refs the app's repo has under refs/heads."""
    try:
        listed = git("--git-dir", repo_path(app), "for-each-ref", "--format=%(refname)", "refs/heads/", env=git_env())
    except PikuError:
        return []
    return listed.stdout.split()


def recover_records(app):
    """Release records that are missing, empty (a power cut before they reached the disk) or
    damaged are rebuilt from what runs: the newest running generation whose revision the branch
    names. Without one, nothing is stopped: the app keeps serving, and `deploy APP` builds the
    branch again. Returns the problem that remains, or None."""
    problem = records_problem(app)
    if problem is None:
        return None
    if problem == "damaged":
        os.replace(releases_file(app), releases_file(app) + ".damaged")
        warning(f"{releases_file(app)} was damaged; it is kept as releases.json.damaged")
    for gen in sorted(running_generations(app), reverse=True):
        record = record_from_generation(app, gen)
        if record:
            save_releases(app, [record])
            warning(f"the release records of {app} were {problem}: rebuilt v{record['version']} from the running "
                    f"workers ({record['rev'][:12]}, generation {gen})")
            return None
    warning(f"the release records of {app} are {problem}, and no running worker runs the branch's commit: "
            f"the workers were left running; 'deploy {app}' builds the branch again")
    return problem


def record_from_generation(app, gen):
    """A release record for a running generation, from its generation record (None: it names no
    revision the branch has, or was written by an earlier piku.py)."""
    try:
        meta = json.loads(read_text(generation_record(app, gen)) or "{}")
    except ValueError:
        return None
    if not isinstance(meta, dict) or not all(key in meta for key in ("rev", "ref", "root", "env", "config")):
        return None
    if branch_revision(app, meta["ref"]) != meta["rev"] or not isinstance(meta["env"], dict):
        return None
    scaling = {}
    for unit in app_units(app):
        match = GENERATION_UNIT.fullmatch(unit)
        if match and int(match.group(1)) == gen:
            scaling[match.group(2)] = max(scaling.get(match.group(2), 0), int(match.group(3)))
    record = {"version": 1, "rev": meta["rev"], "ref": meta["ref"], "root": meta["root"], "env": meta["env"],
              "config": meta["config"], "scaling": scaling, "created": time.strftime("%Y-%m-%d %H:%M:%S"),
              "by": "piku", "cause": "rebuilt from the running workers", "gen": gen, "state": "live"}
    record["environments"] = record_environments(app, dict(record, environments=meta.get("environments")))
    return record


def not_deployed(app):
    """The refusal of a command that needs a live release when there is none."""
    if records_problem(app):
        return PikuError(f"{app} has no release record (its records are {records_problem(app)})",
                         f"Build the branch again: {piku_command('deploy', app)}")
    return PikuError(f"{app} has not been deployed yet", "Push to deploy it.")


def reconcile(app, vhost=True):
    """Finish or undo what an interrupted command left, so that the live workers, the files
    and the branch describe one release. Runs under the app's lock before every change (and,
    without rewriting the vhost, when doctor settles an app)."""
    if recover_records(app):
        return          # nothing to compare with: the workers stay as they are
    records = load_releases(app)
    if records and records[-1].get("state") == "pending":
        pending = records[-1]
        if branch_revision(app, pending["ref"]) == pending["rev"]:
            confirm_release(app, pending["rev"])
        else:
            warning(f"v{pending['version']} never reached the branch (its deploy was interrupted); "
                    "the release before it stays live")
            save_releases(app, records[:-1])
            vhost = True        # it may have written its own vhost before it was stopped
    live = live_release(app)
    running = running_generations(app)
    if live is None:
        stop_units(app, list(app_units(app)), graceful=True)
        return
    if live["gen"] in running:
        stop_unrecorded(app, live)
        sockets = http_sockets(app, live["gen"], live["scaling"], live["env"])
        point_slots(app, sockets)
        usockets = uwsgi_sockets(app, live["gen"], live["scaling"], live["env"])
        if usockets:
            point_slots(app, usockets, "uslot")
        if vhost:
            restore_vhost(app, live)
        drain_old(app, live["gen"], front_unit(live["env"]) if sockets else None)
        write_live_files(app, live)
    elif running:
        warning(f"the workers of v{live['version']} are not running; starting them again")
        activate(release_from_record(app, live), lambda gen: set_live_generation(app, gen))
        write_live_files(app, live)


def stop_unrecorded(app, live):
    """Instances of the live generation its record does not count (a ps:scale killed before
    its commit started them): stopped, so what runs is what ps shows."""
    extra = [unit for unit in app_units(app) if unit_generation(unit) == live["gen"]
             and int(GENERATION_UNIT.fullmatch(unit).group(3)) > live["scaling"].get(
                 GENERATION_UNIT.fullmatch(unit).group(2), 0)]
    if extra:
        warning(f"stopping {', '.join(sorted(extra))}: started by a command that did not finish")
        stop_units(app, extra, graceful=True)


def scale_app(app, changes):
    """Start or stop instances of the live generation; new ones are checked before they get traffic."""
    records = load_releases(app)
    live = records[-1]
    release = release_from_record(app, live)
    old = live["scaling"]
    new = scaling_for(release.processes, old, changes)
    gen = live["gen"]
    running = gen in running_generations(app)
    added = {(kind, index) for kind, count in new.items() for index in range(old.get(kind, 0) + 1, count + 1)}
    generation = plan_generation(release, gen, new, only=added)
    try:
        if running:
            start_generation(generation)
            check_generation(generation)
        live["scaling"] = new
        commit_releases(app, records)
    except BaseException as error:       # nothing live changed: the instances it started go again
        stop_units(app, [instance.unit for instance in generation.instances], graceful=False, wait=15.0)
        if isinstance(error, OSError):
            raise stopped_before_commit("the scaling", error)
        raise
    try:
        write_atomic(scaling_file(app), format_scaling(new))
        if running:
            switch_scaled(app, release, gen, old, new)
    except OSError as error:
        live_but(app, " ".join(f"{kind}={count}" for kind, count in sorted(new.items())) + " is recorded", error)
    return new


def switch_scaled(app, release, gen, old, new):
    """After ps:scale's commit: traffic and logs to the instances it names, the others stopped."""
    point_slots(app, http_sockets(app, gen, new, release.env))
    link_logs(app, [Instance(app, gen, kind, index) for kind, count in new.items() for index in range(1, count + 1)])
    removed = [Instance(app, gen, kind, index).unit for kind, count in old.items()
               for index in range(new.get(kind, 0) + 1, count + 1)]
    if removed:
        wait_for_empty_queues([unit_runtime(app, unit, "sock") for unit in removed])
        stop_units(app, removed, graceful=True, wait=15.0)     # gone before a ps:scale up names them again


def deployed_revision(app):
    """The commit the live release runs, or (hosts from before release records) HEAD's."""
    record = live_release(app)
    if record:
        return record["rev"], record.get("ref") or "refs/heads/main"
    try:
        rev = git("--git-dir", repo_path(app), "rev-parse", "--verify", "--quiet", "HEAD^{commit}").stdout.strip()
        ref = git("--git-dir", repo_path(app), "symbolic-ref", "HEAD").stdout.strip()
        return (rev, ref) if rev else (None, None)
    except PikuError:
        return None, None


@contextlib.contextmanager
def locked(app):
    """`with locked(app) as lock:` -- take the app's lock, then finish what an interrupted
    command left, so every change starts from one consistent release."""
    with AppLock(app) as lock:
        still_there(app)
        reconcile(app)
        yield lock


def settle(app):
    """What doctor does first for each app: when no change of it is under way, finish or undo
    what an interrupted one left (reconcile), so that what it reports -- and what visitors get --
    agrees with the branch and the record. A change under way settles the app itself."""
    if not may_settle() or not os.path.isdir(repo_path(app)):
        return
    with lock_if_free(app) as free:
        if free:
            reconcile(app, vhost=False)     # what nginx is given, doctor checks and names the fix of


def may_settle():
    """May this process finish what an interrupted command left? Not update's check of a new
    piku.py (PIKU_DOCTOR_READ_ONLY: it only looks), nor another user -- root -- who must not own
    piku's files or miss the piku user's processes."""
    return not os.environ.get("PIKU_DOCTOR_READ_ONLY") and os.stat(PIKU_ROOT).st_uid == os.getuid()


@contextlib.contextmanager
def lock_if_free(app):
    """`with lock_if_free(app) as free:` -- the app's lock if no command holds it (free is True),
    else nothing: a command under way finishes its own work."""
    make_folder(LOCK_ROOT)
    with open(os.path.join(LOCK_ROOT, app + ".lock"), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def still_there(app):
    """A command that waited for the app's lock behind `destroy` finds the app gone and stops,
    so it cannot bring back a destroyed app's settings or records for a new app to inherit.
    (A destroy that was stopped after its commit point, it finishes first.)"""
    if is_destroyed(app):
        finish_destroy(app)
    if not app_exists(app):
        raise PikuError(f"app '{app}' no longer exists: it was destroyed while this command waited",
                        "Nothing was changed. Push to create it again.")


##############################################################################
# Process control
##############################################################################

GENERATION_UNIT = LazyPattern(r"g([0-9]+)\.([A-Za-z0-9_-]+)\.([0-9]+)")


def app_units(app, folder=UWSGI_ENABLED):
    """{unit: vassal path} of the app's vassals ('front.PORT' and 'gGEN.KIND.N')."""
    prefix = f"{app}@"
    units = {}
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith(prefix) and name.endswith(".ini"):
            units[name[len(prefix):-4]] = os.path.join(folder, name)
    return units


def unit_generation(unit):
    match = GENERATION_UNIT.fullmatch(unit)
    return int(match.group(1)) if match else None


def running_generations(app):
    return {unit_generation(unit) for unit in app_units(app) if unit_generation(unit) is not None}


def front_units(app):
    return [unit for unit in app_units(app) if unit.startswith("front.")]


def unit_runtime(app, unit, suffix):
    match = GENERATION_UNIT.fullmatch(unit)
    if match:
        return os.path.join(generation_dir(app, int(match.group(1))), f"{match.group(2)}.{match.group(3)}.{suffix}")
    return os.path.join(runtime_dir(app), f"{unit}.{suffix}")


def front_current(app, env):
    """Is the app's front running, and listening where env says?"""
    return front_alive(app, env) and read_text(vassal_file(app, front_unit(env))) == render_front(app, env)


def front_alive(app, env, unit=None):
    unit = unit or front_unit(env)
    pid = master_pid(app, unit)
    return bool(pid and pid_alive(pid) and os.path.exists(vassal_file(app, unit)))


def legacy_vassals(app, processes):
    """Vassals an earlier piku.py wrote (APP_KIND.N.ini): stopped once, before the front starts."""
    names = {f"{app}_{kind}.{index}.ini" for kind in processes for index in range(1, FRONT_SLOTS + 1)}
    return [name for name in os.listdir(UWSGI_ENABLED) if name in names] if os.path.isdir(UWSGI_ENABLED) else []


def pidfile_pid(path):
    """The PID a uWSGI pidfile names (0: none). Pidfiles lie where app code writes: read
    without following links."""
    text = read_app_file(path, 64).strip()
    return int(text) if WHOLE_NUMBER.fullmatch(text) else 0


def wake_emperor():
    """Ask the emperor to scan uwsgi-enabled now instead of at its next one-second tick."""
    pid = pidfile_pid(EMPEROR_PID)
    if pid:
        try:
            os.kill(pid, signal.SIGWINCH)
        except OSError:
            pass        # not ours or gone: the emperor's own scan finds the change within a second


def fifo_command(path, command):
    """Write a master FIFO command; False when no master reads that FIFO."""
    try:
        fifo = open_app_file(path, os.O_WRONLY, stat.S_ISFIFO)     # a link planted there is not followed
    except OSError:
        return False
    try:
        os.write(fifo, command)
        return True
    except OSError:             # EPIPE: its master went away meanwhile
        return False
    finally:
        os.close(fifo)


def stop_units(app, units, graceful=True, wait=0.0):
    """Disable vassals (the emperor then stops them); gracefully: requests in progress finish.

    units are the app's unit names, or legacy vassal file names. With wait, return once
    their processes are gone (or warn after that many seconds)."""
    pids = []
    for unit in units:
        legacy = unit.endswith(".ini")
        path = os.path.join(UWSGI_ENABLED, unit) if legacy else vassal_file(app, unit)
        pidfile = os.path.join(UWSGI_ROOT, unit[:-4] + ".pid") if legacy else unit_runtime(app, unit, "pid")
        pids.append((pidfile_pid(pidfile) if legacy else master_pid(app, unit),
                     None if legacy else unit_runtime(app, unit, "fifo")))
        if os.path.exists(path):
            os.unlink(path)
        if not legacy:
            forget_vassal(app, unit)
    if not units:
        return
    wake_emperor()
    for pid, fifo in pids:
        if fifo and pid and pid_alive(pid):
            fifo_command(fifo, b"q" if graceful else b"Q")
    deadline = time.monotonic() + wait
    while wait and time.monotonic() < deadline and any(pid and pid_alive(pid) for pid, _ in pids):
        for pid, fifo in pids:
            if fifo and pid and pid_alive(pid):
                fifo_command(fifo, b"\n")       # wakes the master before its one-second tick
        time.sleep(PROBE_INTERVAL)
    left = [str(pid) for pid, _ in pids if wait and pid and pid_alive(pid)]
    if left:
        warning(f"processes still running after {wait:.0f} s: {', '.join(left)}")


def stop_app(app, wait=15.0):
    """Stop every worker and the front of the app."""
    stop_units(app, list(app_units(app)), graceful=True, wait=wait)


def daemon_pids(master):
    """The commands a vassal runs with attach-daemon: its children that uWSGI started in a
    session of their own (as it does each attach-daemon), neither uWSGI nor piku's log rotation
    (a cron job of the master's, log_rotation). (In a sandbox the master is PID 1, so what a
    command leaves behind becomes its child too: those are in the command's session.)"""
    try:
        exe = os.readlink(f"/proc/{master}/exe")
    except OSError:
        return []
    found = []
    for child in child_pids(master) or []:
        try:
            program = os.readlink(f"/proc/{child}/exe")     # first: a fork of the master that is about to
            if program == exe:                              # exec its cron job is still uWSGI here
                continue
            with open(f"/proc/{child}/cmdline", "rb") as cmdline:
                rotation = LOG_ROTATION_MARK.encode() in cmdline.read()
            with open(f"/proc/{child}/stat", "rb") as stat_file:
                leader = int(stat_file.read().rsplit(b")", 1)[1].split()[3]) == child
            if leader and not rotation and os.readlink(f"/proc/{child}/exe") == program:
                found.append(child)
        except (OSError, ValueError, IndexError):
            continue
    return found


def process_table():
    """{pid: (parent pid, its environment's words, its command words)} of this user's processes."""
    table = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{entry}").st_uid != os.getuid():
                continue
            with open(f"/proc/{entry}/stat", "rb") as stat:
                parent = int(stat.read().rsplit(b")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as environ, open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                table[int(entry)] = (parent, environ.read().split(b"\0"), cmdline.read().split(b"\0"))
        except (OSError, IndexError, ValueError):
            continue        # gone meanwhile, or not ours to read
    return table


def stray_processes(app):
    """{pid: command} of the app's processes (its environment names it) that neither the emperor
    nor a piku command started: what a worker left running when its master died. Only while the
    emperor runs (without it doctor says so first)."""
    emperor = running_emperor()
    if not emperor:
        return {}
    table = process_table()
    marks = {f"APP={app}".encode(), f"PIKU_ROOT={PIKU_ROOT}".encode()}
    piku_script = os.fsencode(PIKU_SCRIPT)

    def anchored(pid):
        for _ in range(64):
            if pid == emperor or pid in table and piku_script in table[pid][2]:
                return True
            if pid not in table:
                return False
            pid = table[pid][0]
        return False
    return {pid: b" ".join(words).decode(errors="replace").strip() for pid, (parent, environ, words) in table.items()
            if marks <= set(environ) and not anchored(parent)}


def child_pids(pid):
    """The direct children of pid (None when /proc cannot tell)."""
    try:
        return [int(child) for child in read_text(f"/proc/{pid}/task/{pid}/children").split()]
    except (OSError, ValueError):
        return None


def pid_alive(pid):
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
exec env PIKU_ROOT=$root $piku git-hook $stage $app
""")


def install_hooks(app):
    """(Re)write the repo's pre-receive hook so it calls this piku.py. (The post-receive hook of
    earlier versions is removed: the process that holds the lock until git moved the branch now
    points HEAD at it, which saves a second Python start-up on every push.)"""
    values = {"root": shlex.quote(PIKU_ROOT), "piku": shlex.join(piku_entry()), "app": shlex.quote(app)}
    text = HOOK_TEMPLATE.substitute(values, purpose="deploys each push before git accepts it", stage="--stage=pre")
    hook = os.path.join(repo_path(app), "hooks", "pre-receive")
    if read_text(hook, None) != text or not os.access(hook, os.X_OK):
        write_atomic(hook, text, mode=0o755)
    post = os.path.join(repo_path(app), "hooks", "post-receive")
    if "installed by piku" in read_text(post):
        os.unlink(post)


def ensure_repo(app):
    finish_destroy_left(app)
    if is_destroyed(app):
        raise PikuError(f"{app} is being destroyed", "Push again when its destroy has finished.")
    path = repo_path(app)
    if not os.path.exists(os.path.join(path, "HEAD")):
        with flocked(NAMES_LOCK):       # two first pushes of 'Shop' and 'shop' at once: one is first
            check_new_app_name(app)
            make_folder(path)           # 0700, and what git writes in it follows piku's umask: no one else reads it
            git("init", "--quiet", "--bare", path)
    install_hooks(app)
    return path


def check_new_app_name(app):
    """Refuse a new app whose name is another's as nginx compares the names made from it."""
    clash = next((other for other in list_apps() if other != app and app_name_key(other) == app_name_key(app)), None)
    if clash:
        shown = f" by '{clash}'" if visible_to_key(clash) else ""
        raise PikuError(f"the app name '{app}' is taken{shown}: app names are compared without case, as nginx "
                        "compares the upstream and zone names made from them", "Pick another name.")


def git_path_to_app(path):
    """The path git sends ('app', '/app' from ssh:// URLs) -> a validated app name."""
    name = path[1:] if path.startswith("/") else path
    return validate_app_name(name)


OBJECT_ID = LazyPattern(r"[0-9a-f]{40}|[0-9a-f]{64}")
BRANCH_REF = LazyPattern(r"refs/heads/(?![-.])(?!.*(?:\.\.|@\{|//|/\.|\.lock/|\.lock$))[A-Za-z0-9._/-]{1,200}(?<![/.])")


def read_ref_updates(stream):
    """pre-receive stdin -> [(old, new, ref)]. Only full object ids and plain ref names pass:
    nothing from this stream may reach git as an option."""
    updates = []
    for line in stream:
        parts = line.split()
        if len(parts) != 3:
            continue
        old, new, ref = parts
        if not (OBJECT_ID.fullmatch(old) and OBJECT_ID.fullmatch(new)) or not ref.startswith("refs/"):
            raise PikuError(f"not a ref update git sends: {line.strip()[:120]!r}")
        updates.append((old, new, ref))
    return updates


def branch_to_deploy(updates):
    """The last branch the push creates or moves, and the ones it leaves undeployed."""
    branches = [(old, new, ref) for old, new, ref in updates if BRANCH_REF.fullmatch(ref) and new != ZERO_REV]
    if not branches:
        return None, []
    return branches[-1], [ref for _, _, ref in branches[:-1]]


BRANCH_WAIT_SECONDS = 120


def keep_lock_until_branch_moves(lock, app, ref, rev, receive_pack, record):
    """Hand the app's lock to a small process that holds it until git has moved the branch and
    the old workers have drained.

    git moves the branch after the pre-receive hook exits; until then no other change of the
    app may start (it would see the old branch). When git moved it, the release is confirmed
    and the old workers stop once their queues are empty (reconcile: what the next command
    does too if this process is killed), then what they ran is pruned; both go into the push's
    record, and git's `gc --auto` runs (often nothing to do). If git gave up instead (the push
    failed after the hook), the previous release, still running, goes back live, so the branch
    always names what is served."""
    sys.stdout.flush()
    sys.stderr.flush()
    ClientWatch.stop()          # the deploy is done; and fork() wants a process of one thread
    if os.fork():
        lock.handed_over = True
        return
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        keep = lock.handle.fileno()
        os.closerange(3, keep)
        os.closerange(keep + 1, 65536)
        deadline = time.monotonic() + BRANCH_WAIT_SECONDS
        while time.monotonic() < deadline and branch_revision(app, ref) != rev \
                and process_identity(receive_pack[0]) == receive_pack:      # that git, not a reused PID
            time.sleep(PROBE_INTERVAL)
        if branch_revision(app, ref) == rev:
            finish_push(app, ref, rev, record)
        else:
            reconcile(app)
    except BaseException:       # nobody can read an error here; the next command reconciles
        pass
    finally:
        os._exit(0)


def finish_push(app, ref, rev, record):
    """What a push leaves to do once git has moved the branch, the app's lock still held."""
    moved = time.monotonic()
    confirm_release(app, rev)
    git("--git-dir", repo_path(app), "symbolic-ref", "HEAD", ref, env=git_env())
    started = time.monotonic()
    reconcile(app, vhost=False)
    prune(app)          # what the old workers ran, when no kept release needs it
    record.add_after("git moved the branch", moved, None)
    record.add_after("the old workers drained and stopped", started, time.monotonic())
    # in the foreground, under the lock: a destroy must not remove the repo under it
    git("--git-dir", repo_path(app), "-c", "gc.autoDetach=false", "gc", "--auto", "--quiet", env=git_env())


##############################################################################
# Export
##############################################################################
# A kept release as an OCI image, written by piku itself (as ko, jib and apko do): layers
# appended to a base, no daemon, the same bytes every time. One tar writer makes every layer:
# entries sorted, owned by 0:0 with no names, PAX, one mtime (the commit's), hard links as
# files, no sockets or devices, every parent folder written as it is on the host, and gzip
# with mtime 0 and no file name.

class DigestWriter(io.RawIOBase):
    """A write-only stream that passes what it is given on (or nowhere) and hashes it."""

    def __init__(self, target=None):
        self.target, self.sha, self.size = target, hashlib.sha256(), 0

    def writable(self):
        return True

    def write(self, data):
        self.sha.update(data)
        self.size += len(data)
        if self.target is not None:
            self.target.write(data)
        return len(data)

    @property
    def digest(self):
        return "sha256:" + self.sha.hexdigest()


@record(frozen=True)
class Layer:
    """A layer written to a file: its blob's digest and size, and the digest of its tar."""
    path: str               # the gzipped tar
    digest: str             # sha256:... of the gzipped bytes (the blob)
    size: int
    diff_id: str            # sha256:... of the tar (the config's rootfs.diff_ids)


def layer_entries(roots):
    """{path in the image: host path} of everything below each root and every folder above it.
    A root is a host folder shown at its own path, or (host folder, its path in the image): a
    tree whose top is the image's / ('/'), its parents then left to the layers below. Links are
    kept as links, never followed."""
    entries = {}
    for root in roots:
        host, image = root if isinstance(root, tuple) else (root, root)
        host, image = os.path.normpath(host), os.path.normpath(image)
        parent = os.path.dirname(image)
        while image != "/" and parent != "/":
            entries.setdefault(parent.lstrip("/"), parent if host == image else None)
            parent = os.path.dirname(parent)
        if image != "/":
            entries[image.lstrip("/")] = host
        if os.path.isdir(host) and not os.path.islink(host):
            for folder, folders, names in os.walk(host):
                for name in folders + names:
                    path = os.path.join(folder, name)
                    entries[os.path.join(image, os.path.relpath(path, host)).lstrip("/")] = path
    return {name: path for name, path in entries.items() if path is not None}


def layer_member(name, host, mtime, owner=0, below=None):
    """The tar header of one entry (None: a socket, FIFO or device, which no image holds) and,
    for a file, what opens its content (read as it is written, never held whole: a .pyc aside)."""
    import tarfile              # (here: only export uses it, and every command would pay its import)
    info = os.lstat(host)
    member = tarfile.TarInfo(name)
    member.mode, member.mtime = stat.S_IMODE(info.st_mode), mtime
    member.uid = member.gid = owner
    member.uname = member.gname = ""
    if stat.S_ISDIR(info.st_mode):
        member.type = tarfile.DIRTYPE
        if below and name in below:     # a folder the layers below have: as they have it
            member.mode, member.uid, member.gid = below[name]
        return member, None
    if stat.S_ISLNK(info.st_mode):
        member.type, member.linkname = tarfile.SYMTYPE, os.readlink(host)
        return member, None
    if not stat.S_ISREG(info.st_mode):
        return None, None
    member.size = info.st_size              # (a hard link is written as the file it is)
    if not name.endswith(".pyc") or info.st_size > PYC_REWRITTEN_MAX:
        return member, lambda: open_same_file(host, info)
    with open_same_file(host, info) as handle:
        data = pyc_for_mtime(handle.read(), host, mtime)
    return member, lambda: io.BytesIO(data)


def open_same_file(path, seen):
    """path opened without following a link or blocking, and only if it is still the regular
    file lstat saw (seen): nothing swapped in meanwhile is read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or (info.st_dev, info.st_ino, info.st_size) != \
            (seen.st_dev, seen.st_ino, seen.st_size):
        os.close(fd)
        raise OSError(errno.ESTALE, "it changed while the image was written", path)
    return os.fdopen(fd, "rb")


PYC_REWRITTEN_MAX = 16 * 1024 * 1024     # a bigger .pyc is written as it is (and never read whole)


def pyc_for_mtime(data, host, mtime):
    """A timestamp .pyc (PEP 552 flags 0) that matched its source on the host gets the image's
    source mtime, so it still matches once every file has that mtime: else every start
    recompiles (or cannot, as a non-root user). Other .pyc files are left as they are."""
    source = os.path.join(os.path.dirname(os.path.dirname(host)), os.path.basename(host).split(".", 1)[0] + ".py")
    try:
        info = os.lstat(source)         # (a link is no source of the release's: nothing is learnt through it)
    except OSError:
        return data
    if len(data) < 16 or int.from_bytes(data[4:8], "little") != 0 or not stat.S_ISREG(info.st_mode):
        return data
    if int.from_bytes(data[8:12], "little") != int(info.st_mtime) & 0xFFFFFFFF or \
            int.from_bytes(data[12:16], "little") != info.st_size & 0xFFFFFFFF:
        return data
    return data[:8] + (mtime & 0xFFFFFFFF).to_bytes(4, "little") + data[12:]


def write_layer(roots, target, mtime, owner=0, skip=None, below=None):
    """The layer of roots (host folders, at their own paths) as a reproducible gzipped tar at
    target -> Layer. owner: the uid and gid of its entries; skip(path in the image): left out;
    below: {folder: (mode, uid, gid)} of the layers below, which such a folder keeps."""
    entries = layer_entries(roots)
    return write_entries({name: host for name, host in entries.items() if not (skip and skip(name))},
                         target, mtime, owner, below)


def layer_folders(path):
    """{folder: (mode, uid, gid)} of a gzipped layer's folders."""
    import tarfile
    with tarfile.open(path, "r:gz") as archive:
        return {member.name.rstrip("/"): (member.mode, member.uid, member.gid)
                for member in archive if member.isdir()}


def write_entries(entries, target, mtime, owner=0, below=None):
    """{path in the image: host path} as a reproducible gzipped tar at target -> Layer."""
    import gzip
    import tarfile
    with open(target, "wb") as output:
        blob = DigestWriter(output)
        with gzip.GzipFile(filename="", mode="wb", fileobj=blob, mtime=0, compresslevel=6) as compressed:
            tar_stream = DigestWriter(compressed)
            with tarfile.open(fileobj=tar_stream, mode="w|", format=tarfile.PAX_FORMAT) as archive:
                for name in sorted(entries):
                    member, content = layer_member(name, entries[name], mtime, owner, below)
                    if member is None:
                        continue
                    if content is None:
                        archive.addfile(member)
                        continue
                    with content() as handle:
                        archive.addfile(member, handle)
    return Layer(target, blob.digest, blob.size, tar_stream.digest)


# The default base: the host's own Debian/Ubuntu packages a Python or Node runtime needs, at the
# versions the host has (alternatives: the first one the host has), unpacked without root.
BASE_PACKAGES = ("libc6", "libgcc-s1", "libstdc++6", "libssl3|libssl3t64", "zlib1g", "libffi8", "libsqlite3-0",
                 "liblzma5", "libbz2-1.0", "libexpat1", "libuuid1", "libncursesw6", "libtinfo6",
                 "libreadline8|libreadline8t64", "libcrypt1", "tzdata", "ca-certificates", "netbase", "dash")
IMAGE_USER = ("piku", 10001)        # the non-root user an image runs as
IMAGE_ROOT_FILES = {
    "etc/passwd": f"root:x:0:0:root:/root:/bin/sh\n{IMAGE_USER[0]}:x:{IMAGE_USER[1]}:{IMAGE_USER[1]}::/tmp:/bin/sh\n",
    "etc/group": f"root:x:0:\n{IMAGE_USER[0]}:x:{IMAGE_USER[1]}:\n",
}


def base_package_versions(packages):
    """[name=version] of the packages the host has installed (the first of each 'a|b' it has)."""
    names = [name for group in packages for name in group.split("|")]
    result = subprocess.run(["dpkg-query", "-W", "-f", "${Package}=${Version} ${db:Status-Status}\n", *names],
                            capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
    have = dict(line.split()[0].split("=", 1) for line in result.stdout.splitlines()
                if line.endswith(" installed") and "=" in line.split()[0])
    found, missing = [], []
    for group in packages:
        name = next((name for name in group.split("|") if name in have), None)
        (found.append(f"{name}={have[name]}") if name else missing.append(group))
    if missing:
        raise PikuError(f"the host has no {', '.join(missing)}: piku builds the image's base from the host's own "
                        "packages", "Give a base you trust: export APP --base FILE (an oci-archive).")
    return found


def package_files(versions):
    """{path in the image: host path} of the files the host's dpkg installed for the packages
    (each name=version), parents resolved as the host resolves them (merged /usr: /lib is a link
    to usr/lib, kept as one), and the bytecode Debian compiled beside each .py at install."""
    result = subprocess.run(["dpkg-query", "-L", *[version.split("=", 1)[0] for version in versions]],
                            capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
    entries = {}
    for line in result.stdout.splitlines():
        if not line.startswith("/") or line in ("/", "/."):
            continue
        path = os.path.join(os.path.realpath(os.path.dirname(line)), os.path.basename(line))
        if not os.path.lexists(path):
            continue        # (a file the sysadmin removed, or one dpkg diverted)
        parent = os.path.dirname(path)
        while parent != "/":
            entries.setdefault(parent.lstrip("/"), parent)
            parent = os.path.dirname(parent)
        entries[path.lstrip("/")] = path
        if path.endswith(".py"):
            for compiled in glob.glob(os.path.join(glob.escape(os.path.dirname(path)), "__pycache__",
                                                   glob.escape(os.path.basename(path)[:-3]) + ".*.pyc")):
                entries.setdefault(os.path.dirname(compiled).lstrip("/"), os.path.dirname(compiled))
                entries[compiled.lstrip("/")] = compiled
    for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):        # merged /usr's links
        if os.path.islink("/" + top):
            entries[top] = "/" + top
    return entries


def write_base_layer(versions, target, mtime):
    """The default base as one layer at target: the files of the host's own packages (exactly
    the versions the release was built and checked on; no download, no root), /tmp (1777), the
    CA bundle the host uses, passwd and group with the image's user. -> Layer"""
    entries = package_files(versions)
    with tempfile.TemporaryDirectory(prefix="piku-base-", dir=TOOL_ROOT) as work:
        for name, text in IMAGE_ROOT_FILES.items():
            with open(os.path.join(work, os.path.basename(name)), "w") as handle:
                handle.write(text)
            os.chmod(os.path.join(work, os.path.basename(name)), 0o644)
            entries[name] = os.path.join(work, os.path.basename(name))
        for folder, mode in (("tmp", 0o1777), ("var-tmp", 0o1777), ("root", 0o700)):
            os.mkdir(os.path.join(work, folder), mode)
            os.chmod(os.path.join(work, folder), mode)
            entries[folder.replace("-", "/")] = os.path.join(work, folder)
        for folder in ("var", "etc", "usr", "usr/local", "usr/local/bin"):
            entries.setdefault(folder, "/" + folder)
        for folder in ("etc/ssl", "etc/ssl/certs"):
            entries.setdefault(folder, "/" + folder)
        entries["etc/ssl/certs/ca-certificates.crt"] = os.path.realpath("/etc/ssl/certs/ca-certificates.crt")
        return write_entries(entries, target, mtime)


# --- what an image of a release holds --------------------------------------------------------

EXPORT_SKIPPED = ("test", "idlelib", "tkinter", "turtledemo", "lib2to3/tests", "ensurepip")   # of a runtime's
EXPORT_PORT = "8000"                    # lib/pythonX.Y; PORT when the orchestrator gives none
EXPORT_HOST_SETTINGS = ("PORT", "BIND_ADDRESS", "HOME", "USER", "DATA_ROOT", "LOG_ROOT", "PIKU_ROOT", "APP")
EXPORT_CACHE = os.path.join(TOOL_ROOT, "export")        # layers kept by what decides them
LAUNCHER = "/usr/local/bin/piku-launch"


@record
class ExportPlan:
    """What an image of one kept release is made of, decided before anything is written."""
    app: str
    record: dict
    processes: dict
    packages: list          # name=version of the host's packages in the default base
    runtimes: list          # host folders (or files) of the interpreters, not the system's
    environments: list      # the environments the release runs with, and its site folder
    server: str             # how wsgi runs: 'gunicorn' or 'uwsgi' (the host's, standalone)
    mtime: int              # the commit's time: every file's mtime


def debian_package_of(path):
    """The host package that installed path (None: none did)."""
    result = subprocess.run(["dpkg-query", "-S", os.path.realpath(path)], capture_output=True, text=True,
                            env=dict(os.environ, LC_ALL="C"))
    return result.stdout.split(":", 1)[0].strip() if result.returncode == 0 and result.stdout else None


def package_closure(names):
    """The packages and, following Depends and Pre-Depends, every library package (lib*) they
    need, as the host has them installed: [name=version]."""
    result = subprocess.run(["dpkg-query", "-W", "-f", "${Package}\t${Version}\t${db:Status-Status}\t${Depends}, "
                             "${Pre-Depends}\n"], capture_output=True, text=True, env=dict(os.environ, LC_ALL="C"))
    installed = {fields[0]: (fields[1], fields[3]) for fields in
                 (line.split("\t") for line in result.stdout.splitlines()) if len(fields) == 4 and fields[2] == "installed"}
    seen, pending, found = set(), list(names), []
    while pending:
        name = pending.pop()
        if name in seen or name not in installed:
            continue
        seen.add(name)
        version, depends = installed[name]
        found.append(f"{name}={version}")
        for alternatives in depends.split(","):
            first = alternatives.split("|")[0].strip().split(" ")[0].split(":")[0]
            if first.startswith("lib") and first not in seen:
                pending.append(first)
    return sorted(found)


def plan_export(app, record):
    """-> ExportPlan for a kept release record; PikuError for what cannot be exported yet."""
    root = record["root"]
    if not os.path.isdir(root) or environments_gone(app, record):
        raise PikuError(f"v{record['version']} of {app} is no longer on the host (its code or environment "
                        "is gone)", f"Export a kept release: releases {app}")
    processes = release_processes(root)
    packages, runtimes = list(BASE_PACKAGES), []
    environments = [path for path in record_environments(app, record) if not build_only(path)]
    for path in environments:
        more_packages, more_runtimes = export_runtime(app, record, path)
        packages += more_packages
        runtimes += [runtime for runtime in more_runtimes if runtime not in runtimes]
    site = project_site(root)
    environments += [site] if os.path.isdir(site) else []
    venv = record["env"].get("VIRTUAL_ENV", "")
    server = "gunicorn" if not isinstance(venv, str) or has_module(venv, "gunicorn") or "wsgi" not in processes \
        else "uwsgi"
    if server == "uwsgi":
        packages += ["uwsgi-core", "uwsgi-plugin-python3"]
    return ExportPlan(app, record, processes, packages, runtimes, environments, server,
                      commit_time(app, record["rev"]))


def export_runtime(app, record, path):
    """What the image needs of the interpreter an environment was built with -> (the host's
    packages to add to the base, folders or files for the runtime layer)."""
    record_file = environment_record(app, path)
    runtime = read_text(record_file).strip() if record_file else ""
    if not os.path.isabs(runtime) or not os.path.exists(runtime):
        raise PikuError(f"v{record['version']} of {app} runs with {os.path.basename(path)}, whose interpreter "
                        "piku has no record of (an environment an earlier piku.py built), so its image would "
                        "not be self-contained", f"Deploy it again (deploy {app}), then export the new release.")
    owner = debian_package_of(runtime)
    python = re.fullmatch(r"python(3\.[0-9]+)(-minimal)?", owner or "")
    if python:          # Debian's own Python: its packages join the base
        return ([f"python{python.group(1)}{suffix}" for suffix in ("", "-minimal")] +
                [f"libpython{python.group(1)}{suffix}" for suffix in ("-minimal", "-stdlib")]), []
    if owner:           # the host's own binary of another runtime (NodeSource's node): the file alone
        return [], [os.path.realpath(runtime)]
    if runtime.startswith(TOOL_ROOT + os.sep):
        return [], runtime_folders(runtime)
    prefix = next((folder for folder in tool_folders(runtime)
                   if glob.glob(os.path.join(glob.escape(folder), "lib", "python3*"))), None)
    if prefix is None:
        raise PikuError(f"the interpreter of v{record['version']} ({runtime}) is not one piku can put in an "
                        "image: neither the host's package nor an installation folder of its own",
                        "Deploy with a Python uv manages or Debian's, then export again.")
    return [], list(dict.fromkeys([prefix, os.path.realpath(prefix)]))     # (a link to it, and it)


def commit_time(app, rev):
    try:
        return int(git("--git-dir", repo_path(app), "log", "-1", "--format=%ct", rev).stdout.strip())
    except (PikuError, ValueError):
        return 0


def image_env(plan):
    """The image's Env: what the release runs with, less what belongs to the host (its paths,
    its port) and less the config:set layer and anything secret (the orchestrator gives those)."""
    record, env = plan.record, dict(plan.record["env"])
    configured = set(record.get("config") or {})
    kept = {key: value for key, value in env.items()
            if key not in configured and key not in EXPORT_HOST_SETTINGS and not is_secret(key)
            and not key.startswith(("NGINX_", "ACME_", "PIKU_"))}
    kept.update(PORT=EXPORT_PORT, BIND_ADDRESS="0.0.0.0", DATA_ROOT="/data", APP=plan.app)
    return [f"{key}={value}" for key, value in sorted(kept.items())]


def launcher_text(plan):
    """The image's entrypoint: runs one Procfile kind (the app's HTTP kind by default) with PORT
    and BIND_ADDRESS as the orchestrator gives them."""
    env, root = plan.record["env"], plan.record["root"]
    cases = []
    for kind, process in sorted(plan.processes.items()):
        if worker_class(kind) == "cron":
            continue
        if kind in ("wsgi", "asgi") and plan.server == "gunicorn":
            workers = setting_number(env, ("GUNICORN_WORKERS", "WEB_CONCURRENCY"), 2)
            worker = ["--worker-class", "uvicorn_worker.UvicornWorker"] if kind == "asgi" else []
            line = 'exec "$VIRTUAL_ENV/bin/gunicorn" --bind "$BIND_ADDRESS:$PORT" ' + shlex.join(
                ["--workers", str(workers), "--chdir", root, *worker, process.command])
        elif kind == "wsgi":
            plugin = glob.glob("/usr/lib/uwsgi/plugins/python3*_plugin.so")
            line = 'exec /usr/bin/uwsgi-core --http-socket "$BIND_ADDRESS:$PORT" ' + shlex.join(
                ["--plugin", os.path.realpath(plugin[0]) if plugin else "python3", "--master", "--processes",
                 str(setting_number(env, ("UWSGI_PROCESSES",), 2)), "--virtualenv", env.get("VIRTUAL_ENV", ""),
                 "--chdir", root, "--module", process.command, "--die-on-term", "--need-app"])
        elif kind == "static":
            continue        # (a static site is served by the orchestrator's web server, from the image)
        else:
            line = "exec /bin/sh -c " + shlex.quote(process.command)
        cases.append(f"  {kind}) {line} ;;")
    default = next((kind for kind in HTTP_APP_KINDS if kind in plan.processes), "")
    kinds = " ".join(kind for kind in sorted(plan.processes) if f"  {kind})" in "".join(cases))
    return "\n".join([
        "#!/bin/sh",
        f"# written by piku: runs one Procfile kind of {plan.app} v{plan.record['version']} ({kinds})",
        f'kind="${{1:-{default}}}"',
        '[ $# -gt 0 ] && shift',
        f': "${{PORT:={EXPORT_PORT}}}" "${{BIND_ADDRESS:=0.0.0.0}}"',
        "export PORT BIND_ADDRESS",
        f"cd {shlex.quote(root)} || exit 1",
        'case "$kind" in',
        *cases,
        f'  *) echo "piku-launch: no such kind: $kind (this image has: {kinds})" >&2; exit 64 ;;',
        "esac", ""])


def cached_layer(key, write):
    """A layer kept in EXPORT_CACHE by what decides its bytes (key), else write(target) -> Layer."""
    name = fingerprint_digest(key)[:32]
    path, meta = os.path.join(EXPORT_CACHE, name + ".tar.gz"), os.path.join(EXPORT_CACHE, name + ".json")
    try:
        layer = Layer(path, **json.loads(read_nofollow(meta, 65536)))
        if os.path.getsize(path) == layer.size:
            return layer
    except (OSError, ValueError, TypeError):
        pass            # (not made yet, or cut short: made again)
    make_folder(EXPORT_CACHE)
    fd, partial = tempfile.mkstemp(dir=EXPORT_CACHE, prefix=".layer-")     # (two exports at once: one each)
    os.close(fd)
    try:
        layer = write(partial)
        os.replace(layer.path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):      # (renamed already)
            os.unlink(partial)
        raise
    write_atomic(meta, json.dumps({"digest": layer.digest, "size": layer.size, "diff_id": layer.diff_id}))
    return Layer(path, layer.digest, layer.size, layer.diff_id)


def runtime_skipped(name):
    """A runtime's test suites and GUI toolkits: no served app imports them."""
    parts = name.split("/")
    for index, part in enumerate(parts[:-1]):
        if re.fullmatch(r"python3\.[0-9]+", part) and index and parts[index - 1] == "lib":
            return "/".join(parts[index + 1:]).startswith(EXPORT_SKIPPED)
    return False


def export_layers(plan, work, base=None):
    """The runtime, environment and app layers of plan -> [(Layer, what made it)], after the
    default base's when no base is given (base: the digests of a given base's layers and
    {folder: (mode, uid, gid)} of them). A folder the base has keeps its owner and mode; piku's
    own files belong to the image's user."""
    user = IMAGE_USER[1]
    layers = []
    if base is None:
        versions = sorted(set(base_package_versions(plan.packages)) | set(
            package_closure(["uwsgi-core", "uwsgi-plugin-python3"]) if plan.server == "uwsgi" else []))
        bundle = os.path.realpath("/etc/ssl/certs/ca-certificates.crt")
        default = cached_layer(["base", 1, versions, IMAGE_ROOT_FILES, stat_key(bundle)],
                               lambda target: write_base_layer(versions, target, 0))
        layers.append((default, "piku: the host's packages " + " ".join(versions)))
        base = ([default.digest], layer_folders(default.path))
    below_key, below = base
    for runtime in plan.runtimes:
        layers.append((cached_layer(["runtime", 1, runtime, stat_key(runtime), below_key],
                                    lambda target, runtime=runtime: write_layer([runtime], target, 0, user,
                                                                                runtime_skipped, below)),
                       f"piku: the runtime {runtime}"))
    environments = [path for path in plan.environments if not path.endswith(".site")]
    if environments:
        markers = [read_nofollow(os.path.join(path, ENV_MARKER), 1024 * 1024) for path in environments]
        layers.append((cached_layer(["environments", 1, environments, markers, below_key],
                                    lambda target: write_layer(environments, target, 0, user, below=below)),
                       f"piku: the environment {' '.join(environments)}"))
    launcher, data = os.path.join(work, "piku-launch"), os.path.join(work, "data")
    with open(launcher, "w") as handle:
        handle.write(launcher_text(plan))
    os.chmod(launcher, 0o755)
    os.mkdir(data, 0o700)
    roots = [plan.record["root"], *[path for path in plan.environments if path.endswith(".site")],
             (launcher, LAUNCHER), (data, "/data")]
    layers.append((write_layer(roots, os.path.join(work, "app.tar.gz"), plan.mtime, user, below=below),
                   f"piku: {plan.app} v{plan.record['version']} at {plan.record['rev'][:12]}"))
    return layers


def base_folders(manifest, blobs):
    """(the layers' digests, {folder: (mode, uid, gid)} of them, upper layers last) of a given base."""
    import tarfile
    folders = {}
    for layer in manifest["layers"]:
        try:
            with tarfile.open(fileobj=io.BytesIO(blobs[layer["digest"]]), mode="r:*") as archive:
                folders.update({member.name.rstrip("/").removeprefix("./"): (member.mode, member.uid, member.gid)
                                for member in archive if member.isdir()})
        except (tarfile.TarError, EOFError, OSError):
            continue            # (a compression this Python does not read: its folders are not known)
    return [layer["digest"] for layer in manifest["layers"]], folders


def image_config(plan, base_config, layers):
    """The image's config: the base's, with piku's layers, entrypoint, settings and labels."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(plan.mtime))
    architecture = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(os.uname().machine, os.uname().machine)
    config = json.loads(json.dumps(base_config or {"architecture": architecture, "os": "linux"}))
    config.update(created=created, architecture=config.get("architecture") or architecture, os="linux")
    runtime = config.setdefault("config", {})
    http = next((kind for kind in HTTP_APP_KINDS if kind in plan.processes), None)
    labels = dict(runtime.get("Labels") or {})
    labels.update({"org.opencontainers.image.revision": plan.record["rev"],
                   "org.opencontainers.image.created": created,
                   "org.opencontainers.image.source": f"piku:{plan.app}",
                   "io.piku.app": plan.app, "io.piku.release": f"v{plan.record['version']}",
                   "io.piku.fingerprint": " ".join(os.path.basename(path) for path in plan.environments)})
    runtime.update(Entrypoint=[LAUNCHER], Cmd=[http] if http else [], Env=image_env(plan),
                   WorkingDir=plan.record["root"], User=f"{IMAGE_USER[1]}:{IMAGE_USER[1]}", Labels=labels)
    if http:
        runtime["ExposedPorts"] = {f"{EXPORT_PORT}/tcp": {}}
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = [*rootfs.get("diff_ids", []), *(layer.diff_id for layer, _ in layers)]
    config["history"] = [*config.get("history", []),
                         *({"created": created, "created_by": what} for _, what in layers)]
    return config


def export_image(app, record, target, base_file=None):
    """Write the image of a kept release to target (an oci-archive), renamed into place only
    once it is whole. -> the manifest's digest"""
    plan = plan_export(app, record)
    make_folder(EXPORT_CACHE)
    with tempfile.TemporaryDirectory(dir=EXPORT_CACHE, prefix=".export-") as work:
        base_manifest, base_config, blobs = read_image_archive(base_file) if base_file else ({"layers": []}, None, {})
        layers = export_layers(plan, work, base_folders(base_manifest, blobs) if base_file else None)
        config = canonical_json(image_config(plan, base_config, layers))
        config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
        manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                    "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
                    "layers": [*base_manifest["layers"],
                               *({"mediaType": OCI_LAYER, "digest": layer.digest, "size": layer.size}
                                 for layer, _ in layers)]}
        blobs = {**blobs, config_digest: config, **{layer.digest: layer.path for layer, _ in layers}}
        partial = os.path.join(work, "image.tar")
        digest = write_image_archive(partial, blobs, manifest, f"{app}:v{record['version']}", plan.mtime)
        try:
            shutil.move(partial, target + ".partial")
            os.replace(target + ".partial", target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):  # (renamed, or never begun)
                os.unlink(target + ".partial")
            raise
    return digest


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYOUT = b'{"imageLayoutVersion":"1.0.0"}'


def canonical_json(value):
    """JSON as image digests need it: keys sorted, no spaces, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def blob_name(digest):
    return "blobs/" + digest.replace(":", "/", 1)


def write_image_archive(target, blobs, manifest, tag, mtime):
    """An oci-archive at target: oci-layout, index.json naming the manifest by tag, every blob
    (blobs: {digest: host file or bytes}), and Docker's manifest.json beside them (docker load
    of Docker < 25 reads only that). Entries sorted, owned by 0:0, one mtime."""
    import tarfile
    manifest_bytes = canonical_json(manifest)
    manifest_digest = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    index = {"schemaVersion": 2, "mediaType": OCI_INDEX,
             "manifests": [{"mediaType": OCI_MANIFEST, "digest": manifest_digest, "size": len(manifest_bytes),
                            "annotations": {"org.opencontainers.image.ref.name": tag}}]}
    docker = [{"Config": blob_name(manifest["config"]["digest"]), "RepoTags": [tag],
               "Layers": [blob_name(layer["digest"]) for layer in manifest["layers"]]}]
    files = {"oci-layout": OCI_LAYOUT, "index.json": canonical_json(index), "manifest.json": canonical_json(docker),
             blob_name(manifest_digest): manifest_bytes, **{blob_name(digest): blob for digest, blob in blobs.items()}}
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as archive:
        for folder in ("blobs", "blobs/sha256"):
            member = tarfile.TarInfo(folder)
            member.type, member.mode, member.mtime = tarfile.DIRTYPE, 0o755, mtime
            archive.addfile(member)
        for name in sorted(files):
            content = files[name]
            member = tarfile.TarInfo(name)
            member.mode, member.mtime = 0o644, mtime
            if isinstance(content, bytes):
                member.size = len(content)
                archive.addfile(member, io.BytesIO(content))
            else:
                member.size = os.path.getsize(content)
                with open(content, "rb") as handle:
                    archive.addfile(member, handle)
    return manifest_digest


def read_image_archive(path):
    """An oci-archive (a base the sysadmin trusts) -> (manifest, config, {digest: bytes}) of its
    one image; PikuError when it is not one."""
    import tarfile
    try:
        with tarfile.open(path, "r:*") as archive:
            names = set(archive.getnames())

            def read(name, limit=64 * 1024 * 1024):
                member = archive.getmember(name)
                if not member.isfile() or member.size > limit:
                    raise PikuError(f"{path}: {name} is not a file piku reads")
                return archive.extractfile(member).read()
            if "oci-layout" not in names or "index.json" not in names:
                raise PikuError(f"{path} is not an OCI image archive (no oci-layout and index.json)",
                                "Give an oci-archive: skopeo copy docker://IMAGE oci-archive:base.tar")
            index = json.loads(read("index.json"))
            descriptor = index["manifests"][0]
            manifest = json.loads(read(blob_name(descriptor["digest"])))
            if manifest.get("mediaType", descriptor.get("mediaType")) == OCI_INDEX:
                raise PikuError(f"{path} holds an index of several images, not one",
                                "Copy one platform's image: skopeo copy --override-arch amd64 ...")
            config = json.loads(read(blob_name(manifest["config"]["digest"])))
            blobs = {layer["digest"]: read(blob_name(layer["digest"]), 16 * 1024 ** 3) for layer in manifest["layers"]}
    except (OSError, tarfile.TarError, KeyError, IndexError, TypeError, ValueError, AttributeError, EOFError,
            RecursionError) as error:
        raise PikuError(f"{path} is not an OCI image archive piku can read ({type(error).__name__}: {error})",
                        "Give an oci-archive: skopeo copy docker://IMAGE oci-archive:base.tar") from None
    for digest, data in blobs.items():
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise PikuError(f"{path}: the layer {digest} does not match its digest", "Copy the base again.")
    return manifest, config, blobs


##############################################################################
# Doctor
##############################################################################
# One small function per check, registered in order. A check yields Findings; every problem
# says the command that fixes it, for the user running doctor: a command line to paste (as
# that user, or as root when it says so), never prose. `doctor` runs the host's checks and
# every app's, `doctor APP` one app's (with its health check). The order is the order to fix
# in: host before apps, and an app's rebuilds (deploy) before its restarts, so the fix lines
# pasted top to bottom leave a clean report.

@record
class Finding:
    level: str          # OK, WARN or FAIL
    message: str
    fix: str = ""       # a command line that fixes it
    as_root: bool = False   # the fix needs root
    also: str = ""      # another way, or what to look at


HOST_CHECKS, APP_CHECKS = [], []


def host_check(function):
    HOST_CHECKS.append(function)
    return function


def app_check(function):
    APP_CHECKS.append(function)
    return function


def piku_command(*args):
    """A piku command as the user running doctor types it: over ssh, ssh and the command; on
    the host, this very piku.py under this Python."""
    if over_ssh():
        return ssh_prefix() + shlex.join(args)
    return shlex.join([sys.executable or SYSTEM_PYTHON, PIKU_SCRIPT, *args])


def over_ssh():
    """Is this command one an ssh key sent (the forced command names the key)?"""
    return bool(os.environ.get("FINGERPRINT"))


def ssh_prefix():
    return f"ssh {current_user()}@{socket.gethostname()} "


def root_fix(level, message, command, also=""):
    """A finding whose fix needs root (just the command, when root runs doctor)."""
    return Finding(level, message, command, as_root=os.geteuid() != 0, also=also)


def systemd_units(user):
    """The units `install` writes for user: uwsgi-piku.service, piku-nginx.path, piku-nginx.service."""
    return f"uwsgi-{user}.service", f"{user}-nginx.path", f"{user}-nginx.service"


UNIT_USER = LazyPattern(r"^User=(\S+)\s*$", re.M)
UNIT_EMPEROR = LazyPattern(r"^ExecStart=\S*uwsgi\s(?:.*\s)?--ini[ =](\S+)", re.M)


def installed_emperors():
    """The systemd units on this host that run a piku emperor (`install`'s, or written by hand
    as docs/INSTALL.md shows): {emperor config: (unit, user)}. A unit counts when the config it
    runs is one piku's setup wrote; a unit this user cannot read, or not text, is no piku's."""
    found = {}
    for path in sorted(glob.glob(os.path.join(SYSTEMD_UNITS, "*.service"))):
        text, emperor, user = readable_text(path), None, None
        if text:
            emperor, user = UNIT_EMPEROR.search(text), UNIT_USER.search(text)
        if emperor and EMPEROR_MARK in readable_text(emperor.group(1)):
            found.setdefault(emperor.group(1), (os.path.basename(path), user.group(1) if user else "root"))
    return found


def readable_text(path, limit=65536):
    """The start of a file of the host's, or "" when this user cannot read it (a unit of root's)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read(limit)
    except OSError:
        return ""


def not_set_up():
    """doctor before setup: what to do instead (as root on an installed host: ask its user; as
    root on a host that is not one yet: install)."""
    installed = list(installed_emperors().values())
    if os.geteuid() == 0 and not installed and "PIKU_ROOT" not in os.environ:
        return Finding("FAIL", "piku is not installed on this host", shlex.join([SYSTEM_PYTHON, PIKU_SCRIPT, "install"]),
                       also="it installs the packages, the piku user, uv and the units (docs/INSTALL.md); "
                       "to run piku as root here instead: " + piku_command("setup"))
    if os.geteuid() == 0 and installed:
        unit, user = installed[0]
        home = os.path.expanduser(f"~{user}")
        return Finding("FAIL", f"piku is not set up for root (no PIKU_ROOT at {PIKU_ROOT}); this host's "
                       f"piku user is {user}", shlex.join(["runuser", "-u", user, "--", SYSTEM_PYTHON,
                                                           os.path.join(home, "piku.py"), "doctor"]))
    return Finding("FAIL", f"piku is not set up here (no PIKU_ROOT at {PIKU_ROOT})", piku_command("setup"))


@host_check
def check_folders():
    for folder in PIKU_DIRS:
        if not os.path.isdir(folder):
            yield Finding("FAIL", f"{folder} is missing", piku_command("setup"))
        elif not os.access(folder, os.W_OK | os.X_OK):
            yield root_fix("FAIL", f"{folder} is not writable by {current_user()}",
                           f"chown -R {current_user()}: {shlex.quote(PIKU_ROOT)}")
    yield Finding("OK", f"piku's folders under {PIKU_ROOT}")


def uv_install_commands(home):
    """How the piku user gets uv from PyPI (what `install` runs as that user)."""
    venv = os.path.join(home, ".local", "share", "piku", "uv")
    link = os.path.join(home, ".local", "bin", "uv")
    return [[SYSTEM_PYTHON, "-m", "venv", venv],
            [os.path.join(venv, "bin", "pip"), "install", "-q", "--disable-pip-version-check", "uv"],
            ["mkdir", "-p", os.path.dirname(link)], ["ln", "-sfn", os.path.join(venv, "bin", "uv"), link]]


def shell_line(commands):
    """Commands as one line to paste, the user's home written as ~ where that reads the same."""
    line = " && ".join(shlex.join(command) for command in commands)
    home = os.path.expanduser("~")
    return line.replace(f" {home}/", " ~/") if shlex.quote(home) == home else line


def python_has_venv():
    """Can the system's Python make a venv with pip (Debian: python3-venv)?"""
    try:
        return subprocess.run([SYSTEM_PYTHON, "-c", "import ensurepip"], capture_output=True).returncode == 0
    except OSError:
        return False


def apps_needing_uv():
    """The apps whose live release a uv buildpack builds: without uv, none of them can change."""
    needing = []
    for app in list_apps():
        record = live_release(app)
        try:
            pack = record and select_buildpack(record["root"], dict.fromkeys(record["scaling"]))
        except (PikuError, OSError):
            continue
        if pack and getattr(pack, "needs_uv", False):
            needing.append(app)
    return needing


@host_check
def check_uv():
    uv = find_uv(build_tool_env(base_env("doctor")), required=False)
    if not uv:
        needing = apps_needing_uv()
        venv_missing = not python_has_venv()
        yield Finding("FAIL" if needing else "WARN", "uv is not installed for this user: " +
                      (f"{', '.join(needing)} cannot be deployed or changed" if needing else
                       "apps with a pyproject.toml cannot build"),
                      shell_line(uv_install_commands(os.path.expanduser("~"))),
                      also=("first, as root: apt-get install python3-venv; " if venv_missing else "") +
                      "or with uv's own installer: curl -LsSf https://astral.sh/uv/install.sh | sh")
        return
    yield Finding("OK", f"{tool_version(uv)} at {uv}")
    pythons = available_pythons(uv, build_tool_env(base_env("doctor")))
    yield (Finding("OK", "Pythons uv can find: " + ", ".join(pythons)) if pythons else
           Finding("WARN", "uv finds no Python", f"{uv} python install 3.12", also="or, as root: apt-get install python3"))


@host_check
def check_uwsgi():
    if not shutil.which("uwsgi"):
        yield root_fix("FAIL", "uWSGI is not installed", "apt-get install uwsgi uwsgi-plugin-python3")
        return
    embedded = probe_uwsgi_python()
    yield (Finding("OK", f"uWSGI's python3 plugin embeds Python {embedded}") if embedded else
           root_fix("WARN", "uWSGI has no Python plugin: wsgi: apps are served by gunicorn",
                    "apt-get install uwsgi-plugin-python3"))


def emperor_runs_wrapper(pid):
    """Did the emperor (pid) start after its config -- with the vassal wrapper -- was last written?"""
    if f"emperor-wrapper = {SANDBOX_WRAPPER}" not in read_text(EMPEROR_CONFIG):
        return False
    started = process_started(pid)
    try:
        written = os.stat(EMPEROR_CONFIG).st_mtime - (time.time() - uptime())
    except OSError:
        return False
    return started is None or started / os.sysconf("SC_CLK_TCK") >= written - 1


def start_emperor_fix():
    """How the user running doctor starts this PIKU_ROOT's emperor: its systemd unit where systemd
    runs one, else uWSGI itself, detached."""
    unit = installed_emperors().get(EMPEROR_CONFIG)
    if unit and systemd_running():
        return root_fix("FAIL", "the uWSGI emperor is not running: no worker starts or stops",
                        f"systemctl start {unit[0]}")
    uwsgi = shutil.which("uwsgi") or "/usr/bin/uwsgi"
    return Finding("FAIL", "the uWSGI emperor is not running: no worker starts or stops",
                   shlex.join(["setsid", "-f", uwsgi, "--ini", EMPEROR_CONFIG]),
                   also="where systemd runs, a unit should run it: install (as root) writes one, docs/INSTALL.md"
                   if systemd_running() else "")


@host_check
def check_emperor():
    pid = pidfile_pid(EMPEROR_PID)
    if not (pid and pid_alive(pid)):
        yield start_emperor_fix()
        return
    watched = read_text(EMPEROR_CONFIG)
    if f"emperor = {UWSGI_ENABLED}" not in watched:
        yield Finding("FAIL", f"the emperor's config does not watch {UWSGI_ENABLED}", piku_command("setup"),
                      also="then restart the emperor")
        return
    yield Finding("OK", f"the uWSGI emperor runs (pid {pid}) and watches {UWSGI_ENABLED}")


def restart_emperor_fix():
    """(fix, as_root) that restarts this PIKU_ROOT's emperor."""
    unit = installed_emperors().get(EMPEROR_CONFIG)
    if unit and systemd_running():
        return f"systemctl restart {unit[0]}", True
    uwsgi = shutil.which("uwsgi") or "/usr/bin/uwsgi"
    return (f"kill -INT $(cat {shlex.quote(EMPEROR_PID)}) && "
            + shlex.join(["setsid", "-f", uwsgi, "--ini", EMPEROR_CONFIG]), False)


@host_check
def check_sandbox():
    mode = sandbox_mode()
    if mode == "off":
        yield Finding("WARN", "PIKU_SANDBOX=off: every app's code runs as the piku user and can read and change "
                      "every other app's files, piku's, and the files nginx's root master opens",
                      f"remove PIKU_SANDBOX=off from {HOST_ENV}",
                      also="docs/SECURITY.md")
        return
    level = "FAIL" if mode == "required" else "WARN"
    if not sandbox_problem(fresh=True) and emperor_problem():
        fix, as_root = restart_emperor_fix()
        setup = f"emperor-wrapper = {SANDBOX_WRAPPER}" in read_text(EMPEROR_CONFIG)
        yield Finding(level, f"NO SANDBOX for workers: {emperor_problem()[0]}, so new workers start outside "
                      "their sandbox" + (" -- or, with PIKU_SANDBOX=required, not at all" if mode == "required"
                                         else ""), fix, as_root=as_root and os.geteuid() != 0,
                      also="" if setup else f"first, as the piku user: {piku_command('setup')}")
        return
    problem = sandbox_problem(fresh=True)
    if problem:
        why, fix = problem
        message = ("NO SANDBOX: an app's code cannot run in its sandbox here, so "
                   + ("no push is accepted (PIKU_SANDBOX=required)" if mode == "required" else
                      "it runs as the piku user (every app's files, and those nginx's root master opens, are "
                      "open to it), and keys limited to some apps cannot push") + f": {why}")
        yield root_fix(level, message, fix[len("As root: "):]) if fix.startswith("As root: ") else \
            Finding(level, message, also=fix)
        return
    system = shutil.which("bwrap", path=DEFAULT_PATH)
    if bwrap_binary() == BWRAP_COPY and system and read_bytes(BWRAP_COPY) != read_bytes(system):
        yield root_fix("WARN", f"piku's copy of bubblewrap ({BWRAP_COPY}) differs from the system's {system} "
                       "(updated since install copied it)", f"python3 {PIKU_SCRIPT} install")
    yield Finding("OK", f"apps run in their sandbox: bubblewrap ({bwrap_binary()}) starts one as {current_user()}"
                  + ("" if "--disable-userns" in bwrap_options() else
                     "; this bubblewrap cannot stop nested user namespaces (--disable-userns needs 0.8)"))


@host_check
def check_app_names():
    """Apps an earlier piku.py let differ only in case: nginx reads their upstreams as one."""
    spellings = {}
    for app in filter(visible_to_key, list_apps()):
        spellings.setdefault(app_name_key(app), []).append(app)
    for apps in (apps for apps in spellings.values() if len(apps) > 1):
        yield Finding("FAIL", f"the apps {', '.join(apps)} differ only in case: nginx takes the upstream names made "
                      "from them for one, and refuses to load both", also="push one of them under a new name, then "
                      f"destroy the old one ({piku_command('destroy', apps[-1])})")


@host_check
def check_nginx():
    vhosts = sorted(glob.glob(os.path.join(NGINX_ROOT, "*.conf")))
    if not vhosts:
        yield Finding("OK", "no app uses nginx (no NGINX_SERVER_NAME)")
        return
    if not nginx_binary():
        yield root_fix("FAIL", f"{len(vhosts)} vhost(s) but nginx is not installed", "apt-get install nginx")
        return
    yield nginx_reload_finding()


def nginx_reload_finding():
    if host_setting("PIKU_NGINX_RELOAD"):
        return Finding("OK", f"nginx is reloaded by {host_setting('PIKU_NGINX_RELOAD')}")
    owner = installed_emperors().get(EMPEROR_CONFIG)
    user = owner[1] if owner else current_user()
    path_unit = systemd_units(user)[1]
    problem = "nothing reloads nginx when a vhost changes"
    if systemd_running():
        if subprocess.run(["systemctl", "is-active", "--quiet", path_unit], capture_output=True).returncode == 0:
            return Finding("OK", f"nginx is reloaded by systemd's {path_unit}")
        if os.path.exists(os.path.join(SYSTEMD_UNITS, path_unit)):
            return root_fix("WARN", problem, f"systemctl enable --now {path_unit}")
        return Finding("WARN", problem, also=f"as root, write piku's path unit {path_unit} and its service "
                       "(docs/NGINX.md, option 1), then: systemctl enable --now " + path_unit)
    if os.geteuid() == 0:       # root's own piku: no sudo to go through
        return Finding("WARN", problem, f"echo \"PIKU_NGINX_RELOAD='{nginx_binary() or '/usr/sbin/nginx'} -s reload'\" "
                       f">> {shlex.quote(HOST_ENV)}")
    rule = f"{user} ALL=(root) NOPASSWD: /usr/sbin/nginx -s reload"
    setting = "PIKU_NGINX_RELOAD='sudo -n /usr/sbin/nginx -s reload'"
    return root_fix("WARN", problem, ("" if shutil.which("sudo") else "apt-get install -y sudo && ") +
                    f"echo {shlex.quote(rule)} > /etc/sudoers.d/{user}-nginx && "
                    f"echo {shlex.quote(setting)} >> {shlex.quote(HOST_ENV)}",
                    also="a narrow sudo rule (docs/NGINX.md)")


@host_check
def check_certificates():
    """Each app's HTTPS certificate: expired is FAIL, expiring within 21 days WARN, and a failed
    renewal or a self-signed stand-in says why."""
    for app in list_apps():
        crt, _ = certificate_files(app)
        if not os.path.exists(crt):
            continue
        state = certificate_state(app)
        expires = certificate_expiry(crt)
        renew = piku_command("acme:renew") if state.get("issued") else piku_command("deploy", app)
        if expires is None:
            yield Finding("FAIL", f"{app}: its certificate {crt} cannot be read", piku_command("deploy", app))
            continue
        days = (expires - time.time()) / 86400
        what = "certificate" if state.get("issued") else "self-signed certificate"
        renewal = (state.get("renewal") or {}).get("error")
        if days <= 0:
            yield Finding("FAIL", f"{app}: its {what} expired {-days:.0f} day(s) ago: browsers refuse the site", renew)
        elif days < CERTIFICATE_WARN_DAYS:
            yield Finding("WARN", f"{app}: its {what} expires in {days:.0f} day(s)"
                          + (f"; the last renewal failed: {last_line(renewal)}" if renewal else ""), renew)
        elif renewal:
            yield Finding("WARN", f"{app}: the last renewal of its certificate failed: {last_line(renewal)}",
                          renew, also="once the cause above is fixed")
        elif not state.get("issued"):
            yield Finding("WARN", f"{app}: HTTPS uses a self-signed certificate"
                          + (f" ({last_line(state['error'])})" if state.get("error") else ""),
                          renew, also="once the cause above is fixed")
        else:
            yield Finding("OK", f"{app}: its certificate is valid for {days:.0f} more days")


@host_check
def check_keys():
    lines = [line for line in read_text(authorized_keys_file()).splitlines() if line.strip()
             and not line.startswith("#")]
    keys = read_keys()
    if not keys:
        yield Finding("WARN", "no SSH key is set up: nobody can push",
                      piku_command("setup:ssh", "-", "--name", "NAME") + " < KEY.pub",
                      also="KEY.pub: a developer's public key; NAME: whose it is")
    for line in lines:
        if "ssh-command" in line and not any(key.line == line for key in keys):
            yield Finding("WARN", f"a malformed piku entry in {authorized_keys_file()}: {line[:60]}...",
                          also="remove that line, then add the key again with setup:ssh")
    if keys:
        yield Finding("OK", f"{len(keys)} SSH key(s): " + ", ".join(key.name for key in keys))


@host_check
def check_disk():
    stat = os.statvfs(PIKU_ROOT)
    free = stat.f_bavail * stat.f_frsize
    inodes = stat.f_favail / stat.f_files if stat.f_files else 1.0
    level = "FAIL" if disk_problem() else "WARN" if free < 2 * 2**30 or inodes < 0.05 else "OK"
    yield Finding(level, f"{free / 2**30:.1f} GiB and {inodes:.0%} of inodes free for builds"
                  + (f": {disk_problem()}, less than one deploy needs" if level == "FAIL" else ""),
                  also="" if level == "OK" else f"see what takes it: du -sh {shlex.quote(PIKU_ROOT)}/*; "
                  "remove apps you no longer need (destroy APP) and old logs")


@host_check
def check_destroys():
    """A destroy stopped half-way that the finish (before the checks) could not complete."""
    allowed = key_apps()
    marks = os.listdir(LOCK_ROOT) if os.path.isdir(LOCK_ROOT) else []
    for app in sorted(name[:-len(".destroyed")] for name in marks if name.endswith(".destroyed")):
        if APP_NAME.fullmatch(app) and (allowed is None or app in allowed):
            yield Finding("FAIL", f"{app}: its destroy stopped half-way and what is left of it could not be "
                          "removed (the message above says what)", piku_command("destroy", app))


@app_check
def check_app_settings(app, record):
    try:
        plan_release(app, record["rev"], record["root"], record.get("ref") or "refs/heads/main", record["config"],
                     say=False)
    except PikuError as error:
        yield Finding("FAIL", f"{app}: {error.message}", also=error.hint)
        return
    yield Finding("OK", f"{app}: Procfile and settings are valid")


@app_check
def check_app_logs(app, record):
    folder = os.path.join(LOG_ROOT, app)
    if os.path.isdir(folder) and not os.path.islink(folder) and os.access(folder, os.W_OK | os.X_OK):
        return
    message = f"{app}: its log folder {folder} is not a writable folder: its workers cannot start"
    if os.path.islink(folder) or not os.path.isdir(folder):
        yield Finding("FAIL", message, f"rm -f {shlex.quote(folder)} && mkdir -m 0700 {shlex.quote(folder)}")
    elif os.stat(folder).st_uid == os.getuid():
        yield Finding("FAIL", message, f"chmod u+rwx {shlex.quote(folder)}")
    else:
        yield root_fix("FAIL", message, f"chown {current_user()}: {shlex.quote(folder)}")


@app_check
def check_app_vhost(app, record):
    path = nginx_vhost_file(app)
    if os.path.lexists(path + ".refused"):
        yield Finding("FAIL", f"{app}: its vhost was set aside ({path}.refused): it named what nginx's root master "
                      "must not open, so nginx does not serve it", piku_command("deploy", app),
                      also=f"a deploy writes it again from the app's settings; then: rm {shlex.quote(path)}.refused")
    if not os.path.exists(path) or not nginx_binary():
        return
    text = read_text(path)
    try:
        problems = check_nginx_files(text, app, sockets=True)
    except NginxSyntaxError:
        problems = []       # nginx -t below says what is wrong
    for problem in problems:      # the master's: FAIL (its next reload stops on them); the workers': WARN
        level = "FAIL" if problem.master else "WARN"
        if problem.remove:
            yield Finding(level, f"{app}: {problem.text}", f"rm {shlex.quote(problem.remove)}",
                          also="no app's code writes there in its sandbox: find what put it there")
        else:
            yield Finding(level, f"{app}: {problem.text}", piku_command("deploy", app),
                          also="a deploy writes the vhost again from the app's settings")
    if problems:
        return
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            check_vhost(app, text)
    except PikuError:
        yield Finding("FAIL", f"{app}: nginx refuses its vhost ({path})", piku_command("deploy", app),
                      also="a deploy writes it again from the app's settings")
        return
    yield Finding("OK", f"{app}: nginx accepts its vhost")


@app_check
def check_app_python(app, record):
    env = record["env"]
    venv = env.get("VIRTUAL_ENV")
    if not venv or "wsgi" not in record["scaling"] or env.get("WSGI_SERVER", "uwsgi") != "uwsgi":
        return
    if not piku_environment(app, venv):
        return          # (a VIRTUAL_ENV the app set: nothing of its own is run outside its sandbox)
    embedded = probe_uwsgi_python()
    have = environment_python(venv)     # what its marker says: its bin/python its build could rewrite
    if not have:
        return          # the environment check below says so
    if not embedded or minor(embedded) != minor(have):
        yield Finding("FAIL", f"{app}: its environment runs Python {have} but uWSGI now embeds "
                      f"{embedded or 'no Python'}: its wsgi worker cannot import its packages",
                      piku_command("deploy", app),
                      also="a deploy builds again and picks the WSGI server from the app's settings; or: "
                      + piku_command("config:set", app, "WSGI_SERVER=gunicorn"))
    else:
        yield Finding("OK", f"{app}: Python {have}, as uWSGI embeds")


@app_check
def check_app_environments(app, record):
    for kept in load_releases(app):
        gone = environments_gone(app, kept)
        if gone:
            live = kept["version"] == record["version"]
            runtimes = [read_text(environment_record(app, path)).strip() for path in gone if runtime_gone(app, path)]
            what = (f"the runtime v{kept['version']}'s environment was built with is gone ({', '.join(runtimes)})"
                    if runtimes else f"the environment of v{kept['version']} is gone ({', '.join(gone)})")
            yield Finding("FAIL" if live else "WARN", f"{app}: {what}" +
                          ("; the live workers use it" if live else "; it cannot be rolled back to"),
                          piku_command("deploy" if live else "restart", app),
                          also="a deploy builds it again" if live else
                          f"a restart (or the next deploy) stops keeping v{kept['version']}")


@app_check
def check_app_nodes(app, record):
    """The Node each kept release's environments were built for is still there, at that version
    (an apt upgrade of the host's nodejs changes it under the release: native addons stop loading)."""
    for kept in load_releases(app):
        for path in record_environments(app, kept):
            binary = node_of(app, path)
            if binary is None:
                continue
            try:
                built = json.loads(read_nofollow(os.path.join(path, ENV_MARKER), 65536) or "{}").get("node")
            except (ValueError, AttributeError):
                built = None
            if not os.path.isabs(binary) or not os.path.exists(binary):
                continue            # (check_app_environments: a release whose runtime is gone)
            now = node_version_of(binary)
            if now == built:
                continue
            what = f"the Node of v{kept['version']} ({binary}) is now {now}; its environment was built for {built}"
            if kept["version"] == record["version"]:
                yield Finding("FAIL", f"{app}: {what}, and the live workers run on it", piku_command("deploy", app),
                              also="a deploy installs the dependencies again for the Node there is (native addons "
                              "are built for one Node)")
            else:
                yield Finding("WARN", f"{app}: {what}; a rollback to it runs on {now}, where its native addons "
                              "(if any) may not load")


@app_check
def check_app_workers(app, record):
    down = [f"{kind}.{index}" for kind, count in sorted(record["scaling"].items()) for index in range(1, count + 1)
            if not pid_alive(master_pid(app, Instance(app, record["gen"], kind, index).unit))]
    yield (Finding("FAIL", f"{app}: not running: {', '.join(down)}", piku_command("restart", app)) if down else
           Finding("OK", f"{app}: v{record['version']}'s {sum(record['scaling'].values())} worker(s) run"))
    outside = [f"{kind}.{index}" for kind, count in sorted(record["scaling"].items()) for index in range(1, count + 1)
               if os.path.exists(sandbox_file(app, Instance(app, record["gen"], kind, index).unit, "host"))]
    if outside and sandbox_mode() != "off" and not sandbox_problem() and not emperor_problem():
        yield Finding("WARN", f"{app}: {', '.join(outside)} run outside the app's sandbox (started by an earlier "
                      "piku.py, or while the sandbox could not start)", piku_command("restart", app))


@app_check
def check_app_strays(app, record):
    """Processes of the app that no worker started (a master that died left them): a second copy
    of a worker, running whatever code it had."""
    strays = stray_processes(app)
    if strays:
        listed = ", ".join(f"{pid} ({command[:40]})" for pid, command in sorted(strays.items()))
        yield Finding("FAIL", f"{app}: {len(strays)} process(es) run its code that no worker started (their "
                      f"master died): {listed}", "kill " + " ".join(map(str, sorted(strays))),
                      also="they belong to no release: ps does not count them and no deploy stops them")


def run_doctor(apps, health):
    findings = []
    for check in (HOST_CHECKS if not health else []):
        findings += list(check())
    for app in apps:
        try:
            settle(app)
        except PikuError as error:      # what it could not settle, the checks below report
            findings.append(Finding("WARN", f"{app}: {error.message}", also=error.hint))
        except OSError as error:
            findings.append(Finding("WARN", f"{app}: what an interrupted command left could not be settled: "
                                    f"{error.strerror} ({error.filename})", also="the checks below say why"))
        lost = records_problem(app)
        if lost:
            findings.append(Finding("FAIL", f"{app}: its release records are {lost}; its workers "
                                    "keep running", piku_command("deploy", app),
                                    also="any command that changes the app first rebuilds them from the running "
                                    "workers; deploy also builds the branch again"))
            continue
        record = live_release(app)
        if record and not os.path.isdir(record["root"]):
            findings.append(Finding("FAIL", f"{app}: the folder of its live release v{record['version']} is gone "
                                    f"({record['root']}); its workers run what they had loaded",
                                    piku_command("deploy", app), also="deploy builds the branch's commit again"))
            findings += list(check_app_workers(app, record))
            continue
        if record is None:
            findings.append(Finding("WARN", f"{app}: not deployed yet", also="push to deploy it: git push piku main"))
            continue
        for check in APP_CHECKS:
            findings += list(check(app, record))
        if health:
            findings += list(check_app_health(app, record))
    return findings


def check_app_health(app, record):
    env = record["env"]
    if not any(worker_kind(kind, env).http for kind in record["scaling"]):
        return
    if answers_http(env["BIND_ADDRESS"], int(env["PORT"]), env):
        yield Finding("OK", f"{app}: {health_setting(env, 'PIKU_HEALTHCHECK_PATH')} answers on {bind_address(env)}")
    else:
        yield Finding("FAIL", f"{app}: nothing answers on {bind_address(env)}", piku_command("restart", app),
                      also=f"its log says why: {piku_command('logs', app, '--no-follow')}")


def fix_label(finding):
    """`fix` for a line the user running doctor pastes; over ssh, a command for the server's
    shell says so, and whose."""
    if over_ssh() and not finding.fix.startswith(ssh_prefix()):
        return f"fix, on the server as {'root' if finding.as_root or os.geteuid() == 0 else current_user()}"
    return "fix, as root" if finding.as_root else "fix"


def show_findings(findings):
    """The report: a line per finding, and under a problem its fix and what else to know."""
    for finding in findings:
        click.echo(f"{finding.level:<4}  {finding.message}")
        if finding.level == "OK":
            continue
        if finding.fix:
            click.echo(f"      {fix_label(finding)}: {finding.fix}")
        if finding.also:
            click.echo(f"      note: {finding.also}")


##############################################################################
# Install and update
##############################################################################
# `install` (as root) turns a fresh Debian or Ubuntu host into a piku host. Each step is one
# small function, registered in order, that looks first and does only what is missing, and
# returns what it changed (None: nothing) -- so a second run changes nothing and says so.
# `update FILE` swaps piku.py for a new one only after that one passed a self-check.

INSTALL_PACKAGES = ("git", "uwsgi", "uwsgi-plugin-python3", "iproute2", "nginx", "openssl", "openssh-server",
                    "ca-certificates", "python3", "python3-venv", "python3-click", "python3-dotenv",
                    "python3-psutil", "python3-watchdog", "bubblewrap")
SYSTEM_PYTHON = "/usr/bin/python3"
SYSTEMD_UNITS = "/etc/systemd/system"
NGINX_CONF_D = "/etc/nginx/conf.d"
# What the installer passes on to the downloads it makes as the piku user (pip, uv): your
# proxy and certificate settings, nothing else of root's environment.
PASSED_ON = LazyPattern(r"(?i)(https?|no|all)_proxy|SSL_CERT_(FILE|DIR)|REQUESTS_CA_BUNDLE|PIP_[A-Z_]+|"
                       r"UV_[A-Z_]+|LANG|LC_[A-Z]+")
EMPEROR_UNIT = string.Template("""\
# written by piku.py install: the uWSGI emperor that runs $user's apps (docs/INSTALL.md)
[Unit]
Description=uWSGI emperor for piku ($user)
After=network.target

[Service]
User=$user
Group=$group
WorkingDirectory=$home
ExecStart=$uwsgi --ini $config
Restart=always
KillSignal=SIGTERM
Type=simple

[Install]
WantedBy=multi-user.target
""")


@record
class InstallTarget:
    user: str
    home: str               # the user's home (known once the user exists)
    key: str = None         # the first SSH public key's text
    key_name: str = None

    @property
    def piku_py(self):
        return os.path.join(self.home, "piku.py")

    @property
    def root(self):
        return os.path.join(self.home, ".piku")

    def units(self):
        return systemd_units(self.user)


INSTALL_STEPS = []


def install_step(function):
    INSTALL_STEPS.append(function)
    return function


def as_user(target, args, input=None):
    """Run args as the target user, in its home, with its own HOME and PATH."""
    env = {key: value for key, value in os.environ.items() if PASSED_ON.fullmatch(key)}
    env.update(HOME=target.home, USER=target.user, LOGNAME=target.user,
               PATH=f"{os.path.join(target.home, '.local', 'bin')}:{DEFAULT_PATH}")
    runuser = shutil.which("runuser") or "/usr/sbin/runuser"
    result = subprocess.run([runuser, "-u", target.user, "--", *args], env=env, cwd=target.home, input=input,
                            text=True, capture_output=True)
    if result.returncode != 0:
        raise PikuError(f"{' '.join(os.path.basename(arg) for arg in args[:3])} failed as {target.user} "
                        f"(exit code {result.returncode}):\n{(result.stderr or result.stdout).strip()}")
    return result


def dpkg_installed(package):
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return result.returncode == 0 and result.stdout.startswith("install ok installed")


def apt_install(packages):
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run_command(["apt-get", "update", "-qq"], env=env, capture=True, what="apt-get update")
    run_command(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *packages], env=env, capture=True,
                what="apt-get install")


def systemd_running():
    return os.path.isdir("/run/systemd/system")


def file_digest(*paths):
    """What a set of files holds (missing ones included), to tell whether a step changed them."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(f"{path}\0{read_text(path, None)}\0".encode())
    return digest.hexdigest()


@install_step
def install_debian_packages(target):
    missing = [package for package in INSTALL_PACKAGES if not dpkg_installed(package)]
    if missing:
        apt_install(missing)
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import tomllib"], capture_output=True)
    if probe.returncode != 0 and not dpkg_installed("python3-tomli"):     # Ubuntu 22.04's Python 3.10
        apt_install(["python3-tomli"])
        missing.append("python3-tomli")
    return f"installed {', '.join(missing)}" if missing else None


@install_step
def install_user(target):
    changes = []
    try:
        account = pwd.getpwnam(target.user)
    except KeyError:
        run_command(["useradd", "--create-home", "--home-dir", target.home, "--shell", "/bin/bash",
                     "--user-group", "-K", "HOME_MODE=0750", target.user], capture=True, what="useradd")
        account = pwd.getpwnam(target.user)
        changes.append(f"created the user {target.user}")
    target.home = account.pw_dir
    shadow = next((line.split(":") for line in read_text("/etc/shadow").splitlines()
                   if line.split(":")[0] == target.user), None)
    if shadow and shadow[1].startswith("!"):    # locked: sshd without PAM refuses it; '*' is no password either
        run_command(["usermod", "-p", "*", target.user], capture=True, what="usermod")
        changes.append("unlocked it for ssh keys (no password)")
    mode = os.stat(target.home).st_mode & 0o777
    if mode & 0o050 != 0o050:       # nginx reaches sockets and static files through the user's group
        mode = (mode | 0o050) & ~0o007
        os.chmod(target.home, mode)
        changes.append(f"{target.home} is now mode {mode:o}")
    group = grp.getgrgid(account.pw_gid)
    if "www-data" in {entry.pw_name for entry in pwd.getpwall()} and "www-data" not in group.gr_mem:
        run_command(["usermod", "-aG", group.gr_name, "www-data"], capture=True, what="usermod")
        changes.append(f"nginx (www-data) joined the group {group.gr_name}")
    return "; ".join(changes) or None


@install_step
def install_piku_file(target):
    if os.path.realpath(target.piku_py) == PIKU_SCRIPT:
        return None
    current = read_bytes(target.piku_py)
    if current == read_bytes(PIKU_SCRIPT):
        return None
    if current is not None:
        warning(f"{target.piku_py} differs from this piku.py and was left as it is; to replace it: "
                f"python3 {target.piku_py} update {PIKU_SCRIPT}")
        return None
    account = pwd.getpwnam(target.user)
    shutil.copyfile(PIKU_SCRIPT, target.piku_py)
    os.chown(target.piku_py, account.pw_uid, account.pw_gid)
    os.chmod(target.piku_py, 0o755)
    return f"copied piku.py to {target.piku_py}"


def read_bytes(path):
    try:
        with open(path, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        return None


APPARMOR_PROFILE = "/etc/apparmor.d/piku-bwrap"
APPARMOR_TEMPLATE = string.Template("""\
# written by piku.py install: lets piku's own copy of bubblewrap ($bwrap, which only root
# and the group $group may run) make the user namespaces of the apps' sandboxes, on a host whose
# AppArmor restricts them (kernel.apparmor_restrict_unprivileged_userns=1: Ubuntu 24.04 and later).
# No other program gets that permission. Run piku.py install again after bubblewrap updates.
abi <abi/4.0>,
include <tunables/global>

profile piku-bwrap $bwrap flags=(unconfined) {
  userns,

  include if exists <local/piku-bwrap>
}
""")


def apparmor_restricts_userns():
    return read_text("/proc/sys/kernel/apparmor_restrict_unprivileged_userns").strip() == "1"


@install_step
def install_sandbox(target):
    """Where AppArmor restricts user namespaces, the narrowest permission piku's sandboxes need:
    a copy of bwrap only the piku user's group may run, and a profile allowing that copy alone."""
    if not apparmor_restricts_userns():
        return None
    source = shutil.which("bwrap", path=DEFAULT_PATH)
    if not source:
        raise PikuError("bubblewrap is not installed", "apt-get install bubblewrap, then run install again")
    group = grp.getgrgid(pwd.getpwnam(target.user).pw_gid).gr_name
    changed = []
    if read_bytes(BWRAP_COPY) != read_bytes(source):
        os.makedirs(os.path.dirname(BWRAP_COPY), mode=0o755, exist_ok=True)
        staged = BWRAP_COPY + ".new"
        shutil.copyfile(source, staged)
        os.chown(staged, 0, grp.getgrnam(group).gr_gid)
        os.chmod(staged, 0o750)
        os.replace(staged, BWRAP_COPY)
        changed.append(f"copied {source} to {BWRAP_COPY}")
    profile = APPARMOR_TEMPLATE.substitute(bwrap=BWRAP_COPY, group=group)
    if read_text(APPARMOR_PROFILE, None) != profile or changed:
        write_atomic(APPARMOR_PROFILE, profile)
        run_command(["apparmor_parser", "-r", APPARMOR_PROFILE], capture=True, what="apparmor_parser")
        changed.append(f"loaded the AppArmor profile {APPARMOR_PROFILE}")
    return "; ".join(changed) or None


@install_step
def install_uv(target):
    for path in (os.path.join(target.home, ".local", "bin", "uv"), "/usr/local/bin/uv", "/usr/bin/uv"):
        if os.access(path, os.X_OK):
            return None
    for command in uv_install_commands(target.home):     # what doctor's fix for a missing uv runs too
        as_user(target, command)
    link = os.path.join(target.home, ".local", "bin", "uv")
    return f"installed {as_user(target, [link, '--version']).stdout.strip()} as {link} (from PyPI)"


@install_step
def install_setup(target):
    written = [os.path.join(target.root, "uwsgi", "uwsgi.ini"),
               *(os.path.join(target.root, "systemd", name) for name in ("piku-nginx.path", "piku-nginx.service"))]
    folders = [os.path.join(target.root, os.path.relpath(folder, PIKU_ROOT)) for folder in PIKU_DIRS]

    def snapshot():
        return file_digest(*written), [os.path.isdir(folder) for folder in folders]
    before = snapshot()
    as_user(target, [SYSTEM_PYTHON, target.piku_py, "setup"])
    return None if snapshot() == before else f"ran setup: {target.root} and its emperor config"


@install_step
def install_units(target):
    emperor, nginx_path, nginx_service = target.units()
    group = grp.getgrgid(pwd.getpwnam(target.user).pw_gid).gr_name
    texts = {emperor: EMPEROR_UNIT.substitute(user=target.user, group=group, home=target.home,
                                              uwsgi=shutil.which("uwsgi") or "/usr/bin/uwsgi",
                                              config=os.path.join(target.root, "uwsgi", "uwsgi.ini")),
             nginx_path: read_text(os.path.join(target.root, "systemd", "piku-nginx.path")),
             nginx_service: read_text(os.path.join(target.root, "systemd", "piku-nginx.service"))}
    written = [name for name, text in texts.items()
               if read_text(os.path.join(SYSTEMD_UNITS, name), None) != text]
    for name in written:
        write_atomic(os.path.join(SYSTEMD_UNITS, name), texts[name])
    changes = [f"wrote {', '.join(written)} in {SYSTEMD_UNITS}"] if written else []
    if not systemd_running():
        notice(f"systemd is not running here: start the emperor as its unit would: runuser -u {target.user} -- "
               f"uwsgi --ini {os.path.join(target.root, 'uwsgi', 'uwsgi.ini')}")
        return "; ".join(changes) or None
    if written:
        run_command(["systemctl", "daemon-reload"], capture=True)
    for unit in (emperor, nginx_path):
        active = subprocess.run(["systemctl", "is-active", "--quiet", unit]).returncode == 0
        enabled = subprocess.run(["systemctl", "is-enabled", "--quiet", unit]).returncode == 0
        if not (active and enabled):
            run_command(["systemctl", "enable", "--now", unit], capture=True)
            changes.append(f"enabled and started {unit}")
        elif unit == emperor and emperor in written:
            run_command(["systemctl", "restart", unit], capture=True)
            changes.append(f"restarted {unit}")
    return "; ".join(changes) or None


@install_step
def install_nginx_include(target):
    path = os.path.join(NGINX_CONF_D, f"{target.user}.conf")
    text = (f"# written by piku.py install: the vhosts of {target.user}'s apps (docs/NGINX.md)\n"
            f"include {os.path.join(target.root, 'nginx')}/*.conf;\n")
    if read_text(path, None) == text:
        return None
    old = read_text(path, None)
    write_atomic(path, text)
    checked = subprocess.run([nginx_binary() or "/usr/sbin/nginx", "-t", "-q"], capture_output=True, text=True)
    if checked.returncode != 0:
        if old is None:
            os.unlink(path)
        else:
            write_atomic(path, old)
        raise PikuError(f"nginx refuses its config with {path}: {checked.stderr.strip()}",
                        "Fix the nginx config (nginx -t), then run install again.")
    if systemd_running() and subprocess.run(["systemctl", "is-active", "--quiet", "nginx"]).returncode == 0:
        run_command(["systemctl", "reload", "nginx"], capture=True)
    return f"nginx includes {target.user}'s vhosts ({path})"


@install_step
def install_key(target):
    keys = os.path.join(target.home, ".ssh", "authorized_keys")
    if target.key is None:
        if "ssh-command" not in read_text(keys):
            notice(f"no SSH key yet: add one with  python3 {PIKU_SCRIPT} install --key KEY.pub  (or, as "
                   f"{target.user}: python3 ~/piku.py setup:ssh KEY.pub)")
        return None
    before = read_text(keys, None)
    as_user(target, [SYSTEM_PYTHON, target.piku_py, "setup:ssh", "-",
                     *(["--name", target.key_name] if target.key_name else [])], input=target.key)
    return None if read_text(keys, None) == before else "added the SSH key"


def install_host(target):
    """Run every install step; -> the list of (step, what it changed)."""
    if os.geteuid() != 0:
        raise PikuError("install needs root", f"Run: sudo python3 {PIKU_SCRIPT} install")
    if not shutil.which("apt-get"):
        raise PikuError("install knows Debian and Ubuntu hosts only (no apt-get here)",
                        "Follow the manual steps in docs/INSTALL.md.")
    changes = []
    for install in INSTALL_STEPS:
        name = install.__name__.removeprefix("install_").replace("_", " ")
        change = install(target)
        step(f"{name}: {change or 'nothing to change'}")
        if change:
            changes.append((name, change))
    return changes


def self_check(candidate):
    """Refuse a piku.py that does not import, whose --version fails, or whose doctor finds a
    FAIL that this one does not. -> its version"""
    version = subprocess.run([sys.executable, candidate, "--version"], capture_output=True, text=True)
    if version.returncode != 0 or not version.stdout.startswith("piku, version "):
        raise PikuError(f"the new piku.py does not run: {(version.stderr or version.stdout).strip()[-500:]}",
                        "Nothing was replaced. Check the file you passed.")
    fails = {}
    for script in (PIKU_SCRIPT, candidate):
        report = subprocess.run([sys.executable, script, "doctor"], capture_output=True, text=True,
                                env=dict(os.environ, PIKU_DOCTOR_READ_ONLY="1")).stdout     # it only looks
        fails[script] = {line for line in report.splitlines() if line.startswith("FAIL ")}
    new = sorted(fails[candidate] - fails[PIKU_SCRIPT])
    if new:
        raise PikuError("the new piku.py's doctor finds what this one does not:\n" + "\n".join(new),
                        "Nothing was replaced. Fix that (or report it), then update again.")
    return version.stdout.split()[-1]


def update_script(new_file):
    """Replace the running piku.py with new_file after its self-check, keeping the old one."""
    text = read_bytes(new_file)
    if text is None:
        raise PikuError(f"{new_file} not found")
    folder, info = os.path.dirname(PIKU_SCRIPT), os.stat(PIKU_SCRIPT)
    handle, candidate = tempfile.mkstemp(dir=folder, prefix=".piku-candidate-", suffix=".py")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(text)
        os.chmod(candidate, info.st_mode & 0o777)
        if os.geteuid() == 0:
            os.chown(candidate, info.st_uid, info.st_gid)
        version = self_check(candidate)
        shutil.copy2(PIKU_SCRIPT, PIKU_SCRIPT + ".previous")
        os.replace(candidate, PIKU_SCRIPT)
    finally:
        if os.path.exists(candidate):
            os.unlink(candidate)
    return version


def revert_script():
    previous = PIKU_SCRIPT + ".previous"
    if not os.path.exists(previous):
        raise PikuError(f"there is no {previous} to go back to", "It is kept by `update`.")
    swap = PIKU_SCRIPT + ".swap"
    shutil.copy2(PIKU_SCRIPT, swap)
    os.replace(previous, PIKU_SCRIPT)
    os.replace(swap, previous)


##############################################################################
# CLI
##############################################################################

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# What the common commands look like, for the messages about the mistakes people make with them.
EXAMPLES = {
    "config": "config myapp", "config:get": "config:get myapp PYTHON_VERSION",
    "config:set": "config:set myapp PYTHON_VERSION=3.12", "config:unset": "config:unset myapp PYTHON_VERSION",
    "config:live": "config:live myapp", "deploy": "deploy myapp", "destroy": "destroy myapp",
    "logs": "logs myapp -n 50", "ps": "ps myapp", "ps:scale": "ps:scale myapp web=2",
    "releases": "releases myapp", "rollback": "rollback myapp v3", "run": "run myapp -- python manage.py shell",
    "restart": "restart myapp", "stop": "stop myapp", "setup:ssh": "setup:ssh ~/alice.pub --name alice",
    "keys:remove": "keys:remove alice", "deploys": "deploys myapp 12", "doctor": "doctor myapp",
}


class PikuGroup(click.Group):
    """click's group, with messages for the mistakes people make instead of usage dumps."""

    def resolve_command(self, context, args):
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(context, name) is None:
            raise self.unknown(name)
        return super().resolve_command(context, args)

    def unknown(self, name):
        """The answer to a name that is no command (or no command for whoever asks)."""
        visible = [command for command, value in self.commands.items() if not value.hidden]
        close = difflib.get_close_matches(name, visible, n=1, cutoff=0.6)
        return PikuError(f"'{name}' is not a piku command" + (f"; did you mean '{close[0]}'?" if close else ""),
                         "See the commands with: help" + (f" (for example: {EXAMPLES[close[0]]})"
                                                            if close and close[0] in EXAMPLES else ""))


def usage_problem(error):
    """A click usage error (a missing or extra argument) as piku's two lines."""
    context = error.ctx
    name = context.info_name if context and context.parent else None
    if name is None:
        return PikuError(error.format_message(), "See the commands with: help")
    args = [value for value in (context.params or {}).values() if isinstance(value, str)]
    mixed_up = next((value for value in args if "=" in value and SETTING_KEY.fullmatch(value.split("=", 1)[0])), None)
    usage = context.get_usage().replace("Usage: piku ", "", 1).replace("[OPTIONS] ", "")
    example = f"for example: {EXAMPLES[name]}" if name in EXAMPLES else f"see: {name} --help"
    hint = f"Write it as '{usage}', {example}." + (apps_hint() if "APP" in usage else "")
    if mixed_up and "APP" in usage:
        return PikuError(f"{name} needs the app's name first; {mixed_up!r} looks like a setting", hint)
    return PikuError(f"{name}: {error.format_message().rstrip('.')}", hint)


def apps_hint():
    apps = visible_apps(key_apps())
    return f" Your apps: {', '.join(apps)}." if apps else ""


def visible_apps(allowed, destroyed=False):
    """The existing apps a key sees (allowed: its apps, None for every app), and those whose
    destroy was stopped half-way if asked."""
    return [app for app in list_apps()
            if (allowed is None or app in allowed) and (destroyed or not is_destroyed(app))]


@click.group(cls=PikuGroup, context_settings=CONTEXT)
@click.version_option(PIKU_VERSION, prog_name="piku")
def cli():
    """piku: git push deploys for one Linux host.

    Deploy with `git push piku main`; manage apps with the commands below
    (over SSH: ssh piku@host COMMAND ...; a key that sees one app may leave
    the app's name out).
    """


@cli.command("apps")
def cmd_apps():
    """List apps (* marks the running ones)."""
    for app in finish_destroys(visible_apps(key_apps(), destroyed=True)):
        click.echo(("* " if app_units(app) else "  ") + app)


@cli.command("config")
@click.argument("app")
def cmd_config(app):
    """Show the settings made with config:set (secrets masked)."""
    require_app(app)
    click.echo(format_env(masked_settings(load_config(app))), nl=False)


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
    """Show the environment the running app sees (secrets masked)."""
    require_app(app)
    if not os.path.exists(live_env_file(app)):
        raise PikuError(f"{app} has not been deployed yet", "Push to deploy it.")
    click.echo(format_env(masked_settings(load_live_env(app))), nl=False)


def change_config(app, update):
    """Apply update to the app's settings and redeploy with them; they are saved only when
    the new release passed its checks (a refused value changes nothing)."""
    with locked(app):
        settings = load_config(app, repair=True)
        saved = dict(settings)
        update(settings)
        rev, ref = deployed_revision(app)
        if not rev:
            write_atomic(config_file(app), format_env(settings), mode=0o600)
            step(f"Saved; {app} has not been deployed yet, the settings apply on the first push")
            return
        try:
            deploy_app(app, rev, ref, cause=f"config: {' '.join(sorted(changed_keys(saved, settings)))}",
                       config=settings)
        except PikuError:
            if (live_release(app) or {}).get("config") != settings:     # (after its commit it says what is live)
                problem("the settings were not changed; the running app was left as it was")
            raise


def changed_keys(before, after):
    return {key for key in set(before) | set(after) if before.get(key) != after.get(key)} or {"(none)"}


@cli.command("config:set")
@click.argument("app")
@click.argument("settings", nargs=-1, required=True, metavar="KEY=VALUE...")
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
@click.argument("settings", nargs=-1, required=True, metavar="KEY...")
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
    """Deploy the app again from its live commit (a new release)."""
    require_app(app)
    with locked(app):
        rev, ref = deployed_revision(app)
        if not rev:
            raise PikuError(f"nothing has been pushed to {app} yet", "Push first: git push piku main")
        deploy_app(app, rev, ref, cause="deploy")


def set_aside_cache(app):
    """nginx's cache of a destroyed app: renamed at once (a new app of that name starts with an
    empty one), then removed as far as the piku user may -- nginx's workers own what they wrote."""
    cache = os.path.join(CACHE_ROOT, app)
    if os.path.isdir(cache) and not os.path.islink(cache):
        os.replace(cache, os.path.join(CACHE_ROOT, f".destroyed-{app}-{time.strftime('%Y%m%d%H%M%S')}"))
    for aside in glob.glob(os.path.join(CACHE_ROOT, glob.escape(f".destroyed-{app}-")) + "[0-9]" * 14):
        shutil.rmtree(aside, ignore_errors=True)        # (and what a destroy stopped half-way left)
        if os.path.exists(aside):
            warning(f"{aside} holds nginx's cached answers, which only root may remove: rm -rf {aside}")


@cli.command("destroy")
@click.argument("app")
def cmd_destroy(app):
    """Remove the app (its data/APP folder is kept)."""
    validate_app_name(app)
    if not is_destroyed(app):
        require_app(app)
    with AppLock(app):
        if not is_destroyed(app):
            still_there(app)
            try:
                write_atomic(destroy_mark(app), f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n", mode=0o600)
            except OSError as error:
                if not is_destroyed(app):   # (renamed into place, then its folder's fsync failed: committed)
                    raise PikuError(f"{app} was not destroyed: {destroy_mark(app)} could not be written "
                                    f"({error.strerror}); nothing was changed",
                                    f"See what the disk says (df -h {PIKU_ROOT}; df -i; dmesg) and run destroy "
                                    "again.") from None
        finish_destroy(app)
    data = os.path.join(DATA_ROOT, app)
    if os.path.isdir(data):
        notice(f"kept {data}; remove it yourself if you no longer need it")
    step(f"{app} destroyed")


def destroy_mark(app):
    """locks/APP.destroyed: the commit point of `destroy`, written (durably) before anything of the
    app is removed and removed last. While it is there the app is gone for every command, and the
    next piku process that touches the name -- a command for it, `apps`, doctor, a push -- finishes
    the removal (finish_destroy)."""
    return os.path.join(LOCK_ROOT, app + ".destroyed")


def is_destroyed(app):
    return os.path.lexists(destroy_mark(app))


def finish_destroys(apps):
    """apps without the destroyed ones: a destroy that was stopped half-way is finished first."""
    for app in apps:
        finish_destroy_left(app)
    return [app for app in apps if app_exists(app)]


def finish_destroy_left(app):
    """Finish the destroy of app that was stopped after its commit point, unless a command holds
    the app's lock (that one finishes it) or this process only looks (may_settle). What cannot be
    removed is said, and the app stays out of every list. Outside the app's lock only."""
    if not is_destroyed(app) or not may_settle():
        return
    with lock_if_free(app) as free:
        if free and is_destroyed(app):
            warning(f"finishing the destroy of {app}, which was stopped half-way")
            try:
                finish_destroy(app, quiet=True)
            except PikuError as error:
                problem(f"{error.message}\n{error.hint}")


def finish_destroy(app, quiet=False):
    """Remove everything of a destroyed app but its data folder, in an order that can be run again
    from any point: the vhost first (nginx stops sending visitors), then its processes, its files,
    and the mark last. Under the app's lock."""
    try:
        write_vhost(app, None)
        serve_vhost(app, None)          # even when the vhost had gone already: a stopped destroy may
        remove_app_files(app, quiet)    # have removed it before nginx was reloaded
        os.unlink(destroy_mark(app))
        fsync_folder(LOCK_ROOT)
    except OSError as error:
        raise PikuError(f"{app} is destroyed, but {error.filename or 'one of its files'} could not be removed "
                        f"({error.strerror})",
                        f"Its workers and vhost are gone or going; run '{piku_command('destroy', app)}' "
                        "again to finish.") from None


def remove_app_files(app, quiet):
    legacy = [os.path.join(ACME_WWW, "lego", "certificates", os.path.basename(lego_certificate(app, [name])))
              + suffix for name in certificate_state(app).get("names", [])
              for suffix in (".crt", ".key", ".issuer.crt", ".json")]     # lego's shared folder of earlier versions
    logs = [nginx_log(app, kind) + suffix for kind in ("access", "error") for suffix in ("", ".1")]
    for path in (*certificate_files(app), os.path.join(NGINX_ROOT, f"{app}.acme"), *legacy, *logs):
        if os.path.lexists(path):
            os.unlink(path)
    stop_app(app)
    set_aside_cache(app)
    for record in glob.glob(os.path.join(SANDBOX_ROOT, glob.escape(app + "@")) + "*"):
        os.unlink(record)
    # the repo and apps/APP last: the name is free for a new app only when all else has gone
    for path in (env_dir(app), os.path.join(LOG_ROOT, app), os.path.join(RELEASE_ROOT, app), runtime_dir(app),
                 os.path.join(TMP_ROOT, app), os.path.join(UV_CACHE_ROOT, app), app_path(app), repo_path(app)):
        if os.path.islink(path):
            os.unlink(path)
        elif os.path.isdir(path):
            if not quiet:
                step(f"Removing {path}")
            shutil.rmtree(path)


LOG_LINK = LazyPattern(r"g[0-9]+/[A-Za-z0-9_-]+\.[0-9]+\.log")


def log_file_of(path):
    """The file a log name in logs/APP/ stands for. piku's own link to the live instance's log
    (KIND.N.log -> gGEN/KIND.N.log) is read, not followed, and must name a log of the app's
    own generations; anything else there that is a link is refused (OSError)."""
    if os.path.islink(path):
        target = os.readlink(path)
        if not LOG_LINK.fullmatch(target):
            raise OSError(errno.ELOOP, "a link piku did not make", path)
        return os.path.join(os.path.dirname(path), target)
    return path


class LogFollower:
    """One log (followed by its name in logs/APP/, usually piku's link to the live instance's
    file): prints what is new, starts again at the top when piku's rotation empties it, and when
    the file is replaced -- a redeploy re-links the name -- finishes the old file before it reads the new one. The
    history shown first is read from the file's end, so a huge log costs only those lines."""

    def __init__(self, path, prefix, lines):
        self.path, self.prefix, self.partial = path, prefix, b""
        self.fd = open_app_file(log_file_of(path))
        self.inode = os.fstat(self.fd).st_ino
        history, self.offset = tail_lines(self.fd, lines)
        for line in history:
            click.echo(f"{prefix} | {line.rstrip()}")

    def folder(self):
        return os.path.dirname(log_file_of(self.path))

    def read(self):
        self.drain()
        try:
            fd = open_app_file(log_file_of(self.path))
        except OSError:
            return          # between a rename and the new file: the next event brings it
        info = os.fstat(fd)
        if info.st_ino == self.inode and info.st_size >= self.offset:
            os.close(fd)
            return
        if info.st_ino == self.inode:
            self.drain_copy()   # emptied in place by piku's rotation: what it had not shown is in the copy
        self.drain()        # what reached the old file before the writer moved
        if self.partial:
            click.echo(f"{self.prefix} | {self.partial.decode(errors='replace').rstrip()}")
        os.close(self.fd)
        self.fd, self.inode, self.offset, self.partial = fd, info.st_ino, 0, b""
        self.drain()

    def drain_copy(self):
        """Show what the rotation's copy (LOG.old) holds beyond what was shown of the log."""
        try:
            copy = open_app_file(log_file_of(self.path) + ".old")
        except OSError:
            return          # no copy (it could not be made): those lines are gone
        live, self.fd = self.fd, copy
        try:
            self.drain()
        finally:
            self.fd = live
            os.close(copy)

    def drain(self):
        while True:
            chunk = os.pread(self.fd, 65536, self.offset)
            if not chunk:
                return
            self.offset += len(chunk)
            *lines, self.partial = (self.partial + chunk).split(b"\n")
            for line in lines:
                click.echo(f"{self.prefix} | {line.decode(errors='replace').rstrip()}")

    def close(self):
        os.close(self.fd)


def follow_logs(logs, lines, follow):
    """Print the last lines of each log, prefixed with its label (the worker), then follow them:
    inotify (watchdog) says when a log changed, so a new line is shown at once, with no polling.
    logs: [(label, path)]"""
    width = max(len(label) for label, _ in logs)
    followers = []
    for label, path in logs:
        try:
            followers.append(LogFollower(path, label.ljust(width), lines))
        except OSError as error:
            warning(f"{os.path.basename(path)} is not shown: {error.strerror}")
    if not follow or not followers:
        return
    import threading
    changed = threading.Event()
    folders = {follower.folder() for follower in followers} | {os.path.dirname(path) for _, path in logs}
    observer = watch_folders(folders, changed)
    try:
        while not output_gone():
            changed.wait(1.0 if observer else 0.5)      # the timeout only notices a client that left
            changed.clear()
            for follower in followers:
                follower.read()
            if observer:        # a redeploy links a new generation's folder: watch it too
                with contextlib.suppress(OSError):      # a folder gone meanwhile: the 1 s timeout still reads
                    watch_more(observer, {follower.folder() for follower in followers}, changed)
    finally:
        if observer:
            observer.stop()
        for follower in followers:
            follower.close()


def watch_folders(folders, changed):
    """A watchdog observer that sets changed on any change in folders (None without watchdog)."""
    try:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
    except ImportError:
        return None     # the 0.5 s loop in follow_logs reads the files instead

    class Changed(FileSystemEventHandler):
        def on_any_event(self, event):
            changed.set()
    observer = Observer()
    observer.piku_handler, observer.piku_folders = Changed(), set()
    watch_more(observer, folders, changed)
    observer.daemon = True
    observer.start()
    return observer


def watch_more(observer, folders, changed):
    for folder in folders - observer.piku_folders:
        observer.schedule(observer.piku_handler, folder, recursive=False)
        observer.piku_folders.add(folder)


@cli.command("logs")
@click.argument("app")
@click.argument("process", default="*")
@click.option("-n", "--lines", default=20, show_default=True, type=click.IntRange(0, 100000),
              help="Lines of history to show per log.")
@click.option("--follow/--no-follow", default=True, show_default=True, help="Keep printing new lines.")
def cmd_logs(app, process, lines, follow):
    """Show and follow the app's logs (all workers, or one kind)."""
    require_app(app)
    if process != "*" and not re.fullmatch(r"[A-Za-z0-9_-]+", process):
        raise PikuError(f"invalid process name {process!r}")
    logs = {os.path.basename(path)[:-4]: path for path in sorted(glob.glob(os.path.join(LOG_ROOT, app,
                                                                                        f"{process}.*.log")))}
    if process in ("*", "nginx"):
        logs.update((f"nginx.{kind}", nginx_log(app, kind)) for kind in ("access", "error")
                    if os.path.lexists(nginx_log(app, kind)))
    if not logs:
        raise PikuError(f"no logs for {app}" + ("" if process == "*" else f" process '{process}'"))
    try:
        follow_logs(sorted(logs.items()), lines, follow)
    except KeyboardInterrupt:
        pass


RESTART_MARKERS = LazyPattern(r"\[uwsgi-daemons\] respawning|Respawned uWSGI worker")


def instance_status(instance, record, psutil):
    """What `ps` shows of one worker instance (its uWSGI master and everything under it)."""
    status = {"worker": instance.name, "pid": None, "state": "stopped", "cpu_percent": 0.0, "rss_bytes": 0,
              "uptime_seconds": 0, "restarts": 0, "release": f"v{record['version']}",
              "processes": []}
    pid = master_pid(instance.app, instance.unit)
    if not (pid and pid_alive(pid) and os.path.exists(instance.vassal)):
        return status, []
    log = "\n".join(line for path in (instance.log + ".old", instance.log) for line in log_tail(path, 100000))
    restarts = len(RESTART_MARKERS.findall(log))
    status.update(pid=pid, state="running", restarts=restarts)
    try:
        master = psutil.Process(pid)
        family = [master, *master.children(recursive=True)]
        status["uptime_seconds"] = int(time.time() - master.create_time())
    except psutil.Error:
        return status, []
    return status, family


def measure_processes(statuses, psutil):
    """CPU % over a 0.2 s window and the memory of every process, summed per instance."""
    for _, family in statuses:
        for process in family:
            with contextlib.suppress(psutil.Error):
                process.cpu_percent(None)
    time.sleep(0.2)
    for status, family in statuses:
        for process in family:
            with contextlib.suppress(psutil.Error):      # it ended meanwhile: not counted
                status["cpu_percent"] += process.cpu_percent(None)
                status["rss_bytes"] += process.memory_info().rss
                status["processes"].append(process.pid)
        status["cpu_percent"] = round(status["cpu_percent"], 1)


def format_duration(seconds):
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def ps_inputs(app):
    """What `ps` needs: the live release record and psutil (refused with the fix otherwise)."""
    require_app(app)
    record = live_release(app)
    if not record:
        raise not_deployed(app)
    try:
        import psutil
    except ImportError:
        raise PikuError("ps needs psutil", "Install it on the server: apt-get install python3-psutil")
    return record, psutil


@cli.command("ps")
@click.argument("app")
@click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")
def cmd_ps(app, as_json):
    """Show the app's workers: PID, state, CPU, memory, uptime, restarts, release."""
    try:
        record, psutil = ps_inputs(app)
    except PikuError as error:
        if not as_json:
            raise
        click.echo(json.dumps({"app": app, "error": error.message, "hint": error.hint}, indent=1))
        raise SystemExit(1)     # a script reads the JSON; the ' !' lines would be noise
    statuses = [instance_status(Instance(app, record["gen"], kind, index), record, psutil)
                for kind, count in sorted(record["scaling"].items()) for index in range(1, count + 1)]
    measure_processes(statuses, psutil)
    rows = [status for status, _ in statuses]
    strays = stray_processes(app)
    if as_json:
        click.echo(json.dumps({"app": app, "release": f"v{record['version']}", "rev": record["rev"],
                               "generation": record["gen"], "workers": rows,
                               "strays": [{"pid": pid, "command": command} for pid, command in sorted(strays.items())]},
                              indent=1))
        return
    click.echo(f"{app} v{record['version']} ({record['rev'][:12]}), generation {record['gen']}")
    click.echo(f"{'WORKER':<16} {'PID':>8} {'STATE':<8} {'CPU%':>6} {'RSS':>9} {'UPTIME':>8} {'RESTARTS':>8} RELEASE")
    for row in rows:
        click.echo(f"{row['worker']:<16} {row['pid'] or '-':>8} {row['state']:<8} {row['cpu_percent']:>6.1f} "
                   f"{row['rss_bytes'] / 2**20:>7.1f}MB {format_duration(row['uptime_seconds']):>8} "
                   f"{row['restarts']:>8} {row['release']}")
    for pid, command in sorted(strays.items()):
        warning(f"stray: PID {pid} ({command[:60]}) runs {app}'s code, but no worker started it (its master "
                f"died); end it on the server: kill {pid}")


@cli.command("ps:scale")
@click.argument("app")
@click.argument("settings", nargs=-1, required=True, metavar="KIND=N...")
def cmd_ps_scale(app, settings):
    """Set worker counts: ps:scale APP web=2 worker=0."""
    require_app(app)
    with locked(app):
        record = live_release(app)
        if not record:
            raise not_deployed(app)
        processes = release_processes(record["root"])
        scaling = scale_app(app, parse_scale_args(settings, processes))
        step("Workers: " + ", ".join(f"{kind}={count}" for kind, count in sorted(scaling.items())))


def run_view(app, env, args, terminal):
    """`run`'s sandbox -> (view, args, the fd of its seccomp program or None)."""
    if "/" not in args[0] and not shutil.which(args[0], path=env.get("PATH")):
        raise PikuError(f"command not found: {args[0]}", "Use 'run APP -- sh -c \"...\"' for shell syntax.")
    cwd = app_path(app)
    root = os.path.realpath(cwd)          # apps/APP: a link to the live release, there too
    environments = record_environments(app, live_release(app) or {"env": env})
    view = View(app, write=(app_data(app),), read=(root, *release_environment(app, root, environments)),
                links=((root, cwd),), cwd=cwd, terminal=terminal)
    # ^C and ^\ reach every process of the terminal's group: bwrap ignores them (inherited from
    # piku), and the command gets their default back from env, as it has without a sandbox.
    # The terminal is the caller's: nothing in the sandbox may type into it (TERMINAL_SECCOMP)
    write_wrapper()
    program = os.open(TERMINAL_SECCOMP, os.O_RDONLY | os.O_CLOEXEC) if terminal else None
    if terminal:
        ignore_terminal_signals()
    return view, ["env", "--default-signal=INT,QUIT", "--", *args], program


def ignore_terminal_signals():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)


@cli.command("run", short_help="Run a command with the app's live settings.", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("app")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def cmd_run(app, command):
    """Run a command in the app's folder with its live settings, in the app's sandbox: the live
    release read-only, DATA_ROOT and /tmp writable, nothing of other apps (docs/SECURITY.md).

    Example: run APP -- ls -la
    """
    require_app(app)
    if not os.path.exists(live_env_file(app)):
        raise PikuError(f"{app} has not been deployed yet", "Push to deploy it.")
    env = dict(load_live_env(app), PWD=app_path(app))
    command = command[1:] if command[0] == "--" else command
    if not command:
        raise PikuError("no command given", "Example: run APP -- ls -la")
    terminal, args, cwd, program, view = sys.stdin.isatty(), list(command), app_path(app), None, None
    if app_sandboxed(app):
        view, args, program = run_view(app, env, args, terminal)
    try:        # with a terminal, ssh's hang-up reaches the command itself; without one, it is ended
        with launch(view, args, env, program) as (argv, run_env, fds):
            process = subprocess.Popen(argv, cwd=cwd, env=run_env, start_new_session=not terminal, pass_fds=fds)
    except FileNotFoundError:
        raise PikuError(f"command not found: {command[0]}", "Use 'run APP -- sh -c \"...\"' for shell syntax.")
    except OSError as error:
        raise PikuError(f"cannot run {command[0]}: {error.strerror}")
    if terminal:                # ^C is the command's to handle (an interactive shell keeps running)
        ignore_terminal_signals()
    try:
        returncode = process.wait()
    except BaseException:       # the client went (ClientWatch), or ^C without a terminal
        kill_session(process)
        raise
    sys.exit(returncode)


@cli.command("restart")
@click.argument("app")
def cmd_restart(app):
    """Restart the app's workers beside the running ones (or start stopped ones)."""
    require_app(app)
    with locked(app):
        step(f"Restarting {app}")
        restart_app(app)


@cli.command("stop")
@click.argument("app")
def cmd_stop(app):
    """Stop the app's workers (restart starts them again)."""
    require_app(app)
    with locked(app):
        if not app_units(app):
            raise PikuError(f"{app} is not running")
        stop_app(app)
        step(f"Stopped {app}")


@cli.command("releases")
@click.argument("app")
def cmd_releases(app):
    """List the app's kept releases, newest first."""
    require_app(app)
    records = load_releases(app)
    if not records:
        raise PikuError(f"{app} has no releases yet", "Push to deploy it.")
    for record in reversed(records):
        mark = "live" if record is records[-1] and record.get("state") == "live" else \
            "live, branch pending" if record is records[-1] else ""
        click.echo(f"v{record['version']:<4} {record['rev'][:7]}  {record['created']}  {record['cause']}"
                   f" (by {record.get('by') or '?'})" + (f"  [{mark}]" if mark else ""))


def load_deploys(app):
    folder = deploys_dir(app)
    records = []
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if re.fullmatch(r"[0-9]+\.json", name):
            try:
                records.append(json.loads(read_text(os.path.join(folder, name))))
            except ValueError:
                continue        # a record cut short by a full disk: the others still count
    return sorted(records, key=lambda record: record.get("id", 0))


@cli.command("doctor")
@click.argument("app", required=False)
def cmd_doctor(app):
    """Check the host (and every app), or one app with its health check: OK / WARN / FAIL."""
    if not os.path.isdir(PIKU_ROOT):
        findings = [not_set_up()]
    else:
        if app:
            require_app(app)
        findings = run_doctor([app] if app else finish_destroys(list_apps()), health=bool(app))
    show_findings(findings)
    failed = sum(finding.level == "FAIL" for finding in findings)
    warned = sum(finding.level == "WARN" for finding in findings)
    click.echo(f"{len(findings)} checks: {failed} FAIL, {warned} WARN")
    if failed:
        raise SystemExit(1)     # the report is the message; no ' !' lines to add


@cli.command("deploys")
@click.argument("app")
@click.argument("deploy_id", required=False, metavar="[ID]")
def cmd_deploys(app, deploy_id):
    """List the app's deploy attempts, newest first, or show one: its output and step times."""
    require_app(app)
    records = load_deploys(app)
    if not deploy_id:
        if not records:
            raise PikuError(f"{app} has no deploy records yet", "Push to deploy it.")
        for record in reversed(records):
            click.echo(f"{record['id']:>4}  {record['when']}  {deploy_outcome(record):<11}  "
                       f"{record['seconds']:>7.1f} s  "
                       f"{record['cause']} (by {record.get('by') or '?'})")
        return
    record = next((record for record in records if str(record.get("id")) == deploy_id.lstrip("#")), None)
    if record is None:
        raise PikuError(f"{app} has no deploy {deploy_id!r}", f"See them with: deploys {app}")
    click.echo(f"deploy {record['id']} of {app}: {record['cause']} (by {record.get('by') or '?'}), {record['when']}, "
               f"{deploy_outcome(record)} in {record['seconds']:.1f} s")
    for line in deploy_waterfall(record):
        click.echo(line)
    click.echo(record.get("output", ""), nl=False)


def deploy_waterfall(record):
    """A record's steps as lines: when each started, from where the push reached the host (the
    ssh connection, or the first of piku's processes), and how long it took."""
    steps = record.get("steps", [])
    if any(len(step) < 3 for step in steps):        # a record of an earlier piku.py: durations only
        return [f"  {seconds:>6.2f} s  {message}" for message, seconds, *_ in steps]
    rows = [(at, seconds, message) for message, seconds, at in steps]
    rows += [(at, None, what) for what, at in record.get("before", [])]
    rows += [(at, seconds, f"after the push returned: {message}") for message, seconds, at in record.get("after", [])]
    origin = min([0, *(at for at, _, _ in rows)])
    since = ("the ssh connection" if any(what.startswith("sshd") for what, _ in record.get("before", []))
             else "the push's first process" if record.get("before") else "the deploy's start")
    lines = [f"   start    took  (seconds from {since})"]
    for at, seconds, message in sorted(rows, key=lambda row: row[0]):
        lines.append(f"  {at - origin:>6.3f}  {'' if seconds is None else f'{seconds:.3f}':>6}  {message}")
    return lines


def kept_record(app, number):
    """The kept release vN of app (None: the live one) -> its record; PikuError naming the kept."""
    records = load_releases(app)
    if not records:
        raise PikuError(f"{app} has no releases yet", "Push to deploy it, then export it.")
    record = records[-1] if number is None else next((record for record in records if record["version"] == number), None)
    if record is None:
        kept = ", ".join(f"v{record['version']}" for record in records)
        raise PikuError(f"v{number} of {app} is not kept (kept: {kept})", f"See them with: releases {app}")
    return record


@cli.command("export")
@click.argument("app")
@click.argument("version", required=False, metavar="[vN]")
@click.option("--output", "-o", metavar="FILE", help="Write the archive to FILE on the host (default: standard output).")
@click.option("--base", metavar="FILE", help="An oci-archive to build on (default: a slim base of the host's packages).")
@click.option("--env-file", metavar="FILE", help="Write the config:set settings the image leaves out to FILE.")
def cmd_export(app, version, output, base, env_file):
    """Write a kept release (default: the live one) as an OCI image archive, for Kubernetes,
    Nomad, Docker or Podman: ssh piku@host export APP > APP.tar (docs/EXPORT.md)."""
    require_app(app)
    if key_apps() is not None and (output or base or env_file):
        raise PikuError("--output, --base and --env-file name files on the host, which this key may not",
                        f"Export to standard output: ssh ... export {app} > {app}.tar")
    if output is None and sys.stdout.isatty():
        raise PikuError("the image would be written to a terminal", f"Redirect it: export {app} > {app}.tar, or "
                        "give --output FILE")
    number = release_number(app, version)
    base = os.path.abspath(base) if base else (host_setting("PIKU_EXPORT_BASE").strip() or None)
    archive = sys.stdout.buffer         # only the archive goes there: what piku says goes to stderr
    target = os.path.abspath(output) if output else None
    try:
        with contextlib.redirect_stdout(sys.stderr):
            if target is None:          # written whole under the lock, streamed after it (a slow reader
                make_folder(EXPORT_CACHE)   # holds no lock)
                fd, target = tempfile.mkstemp(dir=EXPORT_CACHE, prefix=".stream-")
                os.close(fd)
            with locked(app):
                record = kept_record(app, number)
                digest = export_image(app, record, target, base)
        if not output:
            with open(target, "rb") as handle:
                shutil.copyfileobj(handle, archive)
            archive.flush()
    except OSError as error:
        raise PikuError(f"the image could not be written: {error.strerror} ({error.filename or output or 'stdout'}); "
                        "nothing was left behind", "Free some disk space, check the folder's permissions, or write "
                        "it elsewhere.") from None
    finally:
        if not output and target:
            with contextlib.suppress(FileNotFoundError):      # (the mkstemp file: never kept)
                os.unlink(target)
    click.echo(f"-----> {app} v{record['version']} exported: {digest}", err=True)
    report_left_out(record, env_file)


def report_left_out(record, env_file):
    """Name the config:set settings the image leaves out; env_file: write the non-secret ones."""
    settings = sorted(record.get("config") or {})
    if settings:
        click.echo(f"       settings to give the orchestrator (config:set, not in the image): {', '.join(settings)}",
                   err=True)
    if env_file:
        lines = [f"{key}={value}" for key, value in sorted((record.get("config") or {}).items()) if not is_secret(key)]
        lines += [f"# {key}: a secret, not written" for key in settings if is_secret(key)]
        write_atomic(os.path.abspath(env_file), "\n".join(lines) + "\n", mode=0o600)


@cli.command("rollback")
@click.argument("app")
@click.argument("version", required=False)
def cmd_rollback(app, version):
    """Run a kept release again (default: the one before the live one); no build."""
    require_app(app)
    number = release_number(app, version)
    with locked(app):
        rollback_app(app, number)


def release_number(app, version):
    """vN (or N) as typed -> N; None for None."""
    if version is None:
        return None
    match = re.fullmatch(r"v?([0-9]{1,9})", version)
    if not match:
        raise PikuError(f"{version!r} is not a release", f"Name one like v3; see them with: releases {app}")
    return int(match.group(1))


NGINX_PATH_UNIT = string.Template("""\
# written by piku setup: reload nginx when piku writes a vhost or a certificate (docs/NGINX.md)
[Path]
PathChanged=$nginx_root

[Install]
WantedBy=multi-user.target
""")
NGINX_SERVICE_UNIT = string.Template("""\
# written by piku setup: started by piku-nginx.path
[Service]
Type=oneshot
ExecStart=$nginx -t -q
ExecStart=/usr/bin/systemctl reload nginx
""")


def refresh_vhosts():
    """Vhosts an earlier piku.py wrote are written again from their app's live release, so that
    every served folder has disable_symlinks and every path is where NGINX_FILES puts it."""
    for path in sorted(glob.glob(os.path.join(NGINX_ROOT, "*.conf"))):
        app = os.path.basename(path)[:-len(".conf")]
        if not is_app_name(app):
            continue
        try:
            with AppLock(app):
                record = live_release(app)
                if record and check_nginx_files(read_text(path), app):
                    restore_vhost(app, record)
        except (PikuError, NginxSyntaxError) as error:
            warning(f"the vhost of {app} was left as it was ({getattr(error, 'message', error)}); see: doctor")


def move_earlier_uv_caches():
    """The apps' uv caches were in cache/.uv/ (piku.py of #17), beside nginx's cache folders: they
    move to uv/ (a cache: where uv/ has one already, the earlier one is removed)."""
    earlier = os.path.join(CACHE_ROOT, ".uv")
    if not os.path.isdir(earlier) or os.path.islink(earlier):
        return
    with contextlib.suppress(OSError):      # not there, or not empty: then it stays
        os.rmdir(UV_CACHE_ROOT)
    try:
        if os.path.lexists(UV_CACHE_ROOT):
            raise FileExistsError(errno.EEXIST, "uv/ has caches already", UV_CACHE_ROOT)
        os.rename(earlier, UV_CACHE_ROOT)
    except OSError:         # there already, or cache/ is on another disk: a cache is made again
        shutil.rmtree(earlier)


@cli.command("setup")
def cmd_setup():
    """Create the ~/.piku folders and the uWSGI emperor config."""
    step(f"Running in Python {sys.version.split()[0]}, PIKU_ROOT={PIKU_ROOT}")
    move_earlier_uv_caches()
    for path in (PIKU_ROOT, *PIKU_DIRS):
        make_folder(path)
        os.chmod(path, FOLDER_MODES[path])      # earlier versions left them to the umask
    make_folder(NGINX_LOGS)
    config = EMPEROR_CONFIG
    write_wrapper()
    record_earlier_environments()
    earlier = describe_earlier_vassals()
    if earlier:
        notice(f"{len(earlier)} vassal(s) written by an earlier piku.py keep running outside a sandbox "
               "until their app is restarted (doctor lists them)")
    if read_text(config, None) != render_emperor():     # a rewrite would tell doctor the emperor is stale
        write_atomic(config, render_emperor())
        step(f"Wrote {config}")
    refresh_vhosts()
    refresh_keys()
    failed = cache_bytecode()
    if failed:
        warning(f"could not cache piku.py's bytecode ({failed}): every piku command compiles it anew (~50 ms)")
    for tool in ("git", "uwsgi"):
        if not shutil.which(tool):
            warning(f"'{tool}' is not installed; deploys need it (apt-get install {tool})")
    notice(f"start the emperor with: uwsgi --ini {config}")
    units = make_folder(SYSTEMD_FOLDER)
    for name, text in (("piku-nginx.path", NGINX_PATH_UNIT.substitute(nginx_root=NGINX_ROOT)),
                       ("piku-nginx.service", NGINX_SERVICE_UNIT.substitute(nginx=nginx_binary() or "/usr/sbin/nginx"))):
        write_atomic(os.path.join(units, name), text)
    notice(f"nginx reloads when a vhost changes once root installs: cp {units}/piku-nginx.* /etc/systemd/system/ "
           "&& systemctl enable --now piku-nginx.path  (docs/NGINX.md)")


@cli.command("install")
@click.option("--user", "user", default="piku", show_default=True, help="The user that owns ~/.piku and runs the apps.")
@click.option("--home", help="Its home when the user is created (default: /home/USER).")
@click.option("--key", "key_file", help="A developer's SSH public key to let in (- reads it from stdin).")
@click.option("--key-name", help="That key's name (default: its comment).")
def cmd_install(user, home, key_file, key_name):
    """As root: make this Debian/Ubuntu host a piku host (packages, user, uv, systemd units, nginx, first
    key). Running it again changes nothing."""
    if not APP_NAME.fullmatch(user) or "." in user:
        raise PikuError(f"invalid user name {user!r}", "Use letters, digits, '_' and '-'.")
    key = None
    if key_file is not None:
        key = read_key_file(key_file)
    started = time.monotonic()
    target = InstallTarget(user, os.path.abspath(home or os.path.join("/home", user)), key, key_name)
    changes = install_host(target)
    seconds = time.monotonic() - started
    if not changes:
        step(f"Nothing changed: this host was already set up for piku ({target.user}, {target.root}) -- {seconds:.1f} s")
        return
    step(f"piku is installed for {target.user} in {seconds:.1f} s ({len(changes)} step(s) changed something). "
         f"From a laptop: git remote add piku {target.user}@{socket.getfqdn()}:APP && git push piku main")


@cli.command("update")
@click.argument("new_file", required=False)
@click.option("--revert", is_flag=True, help="Go back to the piku.py the last update replaced.")
def cmd_update(new_file, revert):
    """Replace this piku.py with NEW_FILE once it passes a self-check (imports, --version, no new doctor
    FAIL); the old one is kept as piku.py.previous."""
    if revert:
        revert_script()
        step(f"Back to the previous piku.py; the one it replaced is now {PIKU_SCRIPT}.previous "
             "(update --revert swaps them again)")
        return
    if not new_file:
        raise PikuError("which file?", "Run: update /path/to/new/piku.py  (or: update --revert)")
    version = update_script(new_file)
    step(f"Updated {PIKU_SCRIPT} to piku {version}; the old one is {PIKU_SCRIPT}.previous")
    result = subprocess.run([sys.executable, PIKU_SCRIPT, "setup"], capture_output=True, text=True)
    if result.returncode != 0:
        warning(f"setup with the new piku.py failed: {(result.stderr or result.stdout).strip()}")
    else:
        notice("Ran setup with it.")
    notice(f"Go back with: {os.path.basename(sys.executable)} {PIKU_SCRIPT} update --revert")


AUTHORIZED_KEY = LazyPattern(r"((?:sk-)?(?:ssh|ecdsa)-[A-Za-z0-9@.-]+) ([A-Za-z0-9+/]+={0,3})(?: ([^\r\n]*))?")
KEY_NAME = LazyPattern(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")
KEY_COMMANDS = frozenset({"apps", "help"})     # what a limited key may run besides commands for its apps


@record
class Key:
    name: str
    fingerprint: str
    apps: list          # None: every app
    line: str


def authorized_keys_line(key_text, fingerprint, name="default", apps=None):
    """The forced-command authorized_keys entry for one public key."""
    match = AUTHORIZED_KEY.fullmatch(key_text.strip())
    if not match:
        raise PikuError("that is not an SSH public key",
                        "Pass the .pub file, for example: setup:ssh ~/.ssh/id_ed25519.pub")
    # a pty is allowed (`run` needs one for an interactive shell); nothing is forwarded
    options = "no-agent-forwarding,no-user-rc,no-X11-forwarding,no-port-forwarding"
    return f'{forced_command(fingerprint, name, apps)},{options} {match.group(1)} {match.group(2)}'


def forced_command(fingerprint, name, apps):
    """The command="..." option of a key's line: this piku.py's ssh-command, with the key's name,
    fingerprint and apps."""
    command = ["env", f"FINGERPRINT={fingerprint}", f"NAME={name}"]
    if apps is not None:
        command.append(f"APPS={','.join(apps)}")
    if os.environ.get("PIKU_ROOT"):
        command.append(f"PIKU_ROOT={PIKU_ROOT}")
    command += piku_entry("ssh-command")
    forced = " ".join(shlex.quote(part) for part in command).replace("\\", "\\\\").replace('"', '\\"')
    return f'command="{forced}"'


def authorized_keys_file():
    return os.path.join(os.path.expanduser("~"), ".ssh", "authorized_keys")


@contextlib.contextmanager
def authorized_keys_lock():
    """setup:ssh and keys:remove read authorized_keys, change it and write it back: one at a
    time, so two of them racing lose no key and bring no removed key back."""
    folder = os.path.dirname(authorized_keys_file())
    os.makedirs(folder, mode=0o700, exist_ok=True)      # sshd's StrictModes: ~/.ssh is the user's alone
    with flocked(os.path.join(folder, ".piku-authorized_keys.lock")):
        yield


KEY_FILE_MAX = 64 * 1024        # a public key is one line of a few kilobytes


def read_key_file(source):
    """The text of a public key file ('-': stdin): a regular file or stdin, at most KEY_FILE_MAX
    bytes of UTF-8 (a device such as /dev/zero would never end)."""
    if source == "-":
        data = sys.stdin.buffer.read(KEY_FILE_MAX + 1)
    else:
        try:
            fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PikuError(f"public key file '{source}' not found")
        except OSError as error:
            raise PikuError(f"public key file '{source}' cannot be read: {error.strerror}")
        if not stat.S_ISREG(os.fstat(fd).st_mode):     # (before fdopen, which refuses a folder)
            os.close(fd)
            raise PikuError(f"'{source}' is not a file", "Pass the .pub file, for example: setup:ssh ~/alice.pub")
        with os.fdopen(fd, "rb") as handle:
            data = handle.read(KEY_FILE_MAX + 1)
    if len(data) > KEY_FILE_MAX:
        raise PikuError(f"the public key is longer than {KEY_FILE_MAX} bytes", "Pass one .pub file: one line.")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PikuError("that is not an SSH public key (not UTF-8 text)",
                        "Pass the .pub file, for example: setup:ssh ~/.ssh/id_ed25519.pub")


FORCED_COMMAND = LazyPattern(r'^command="((?:[^"\\]|\\.)*)"')
KEY_SETTING = LazyPattern(r"(?:FINGERPRINT|NAME|APPS|PIKU_ROOT)=.*")       # what authorized_keys_line sets


def forced_command_words(line):
    """The words of an authorized_keys line's forced command when it is piku's, else None."""
    match = FORCED_COMMAND.match(line)
    try:
        words = shlex.split(re.sub(r"\\(.)", r"\1", match.group(1))) if match else []
    except ValueError:
        return None
    return words if "ssh-command" in words else None


def read_keys():
    """The piku keys in authorized_keys (lines without piku's forced command are left alone)."""
    keys = []
    for line in read_text(authorized_keys_file()).splitlines():
        words = forced_command_words(line)
        if words is None:
            continue
        settings = dict(word.split("=", 1) for word in words if KEY_SETTING.fullmatch(word))
        apps = settings.get("APPS")
        keys.append(Key(settings.get("NAME", "default"), settings.get("FINGERPRINT", "?"),
                        None if apps is None else [app for app in apps.split(",") if app], line))
    return keys


def refresh_keys():
    """Rewrite this piku's keys whose forced command an earlier piku.py wrote (one that ran
    piku.py as a script, compiled anew for every ssh command), keeping each key's name,
    fingerprint and apps. Keys of another piku.py or PIKU_ROOT are left alone."""
    if not os.path.exists(authorized_keys_file()):
        return
    with authorized_keys_lock():
        lines, changed = read_text(authorized_keys_file()).splitlines(), 0
        ours = os.path.abspath(os.environ["PIKU_ROOT"]) if os.environ.get("PIKU_ROOT") else None
        for key in read_keys():
            words = forced_command_words(key.line)
            root = next((word.split("=", 1)[1] for word in words if word.startswith("PIKU_ROOT=")), None)
            if PIKU_SCRIPT not in words or (os.path.abspath(root) if root else None) != ours:
                continue
            # the command alone: the key's other options (from=, no-pty, expiry-time=...) stay as they are
            line = forced_command(key.fingerprint, key.name, key.apps) + key.line[FORCED_COMMAND.match(key.line).end():]
            if line != key.line:
                lines[lines.index(key.line)], changed = line, changed + 1
        if changed:
            write_atomic(authorized_keys_file(), "\n".join(lines) + "\n", mode=0o600)
            step(f"Rewrote the forced command of {changed} key(s) for this piku.py")


def default_key_name(comment, fingerprint):
    """A name for a key added without --name: its comment (alice@laptop), else its fingerprint."""
    candidate = re.sub(r"[^A-Za-z0-9._@-]", "-", (comment or "").strip())[:64].strip("-.")
    return candidate if candidate and KEY_NAME.fullmatch(candidate) else "key-" + fingerprint.split(":")[-1][:12]


def key_apps():
    """The apps the ssh key in use may touch (None: all, as for a key without --apps or on the host)."""
    apps = os.environ.get("APPS") if over_ssh() else None
    return None if apps is None else {app for app in apps.split(",") if app}


GROUP_OPTIONS = ("--help", "-h", "--version")


def ssh_invocation(args, allowed):
    """Parse a command line that came over ssh exactly as the CLI runs it, check what it would
    run, and return that very parse to be invoked: -> a click context, or None for `--help` or
    `--version` alone. What is checked is what runs, so no spelling -- '--' or an option before
    the command, an app named the way git names it, an app argument after '--' -- gets past it.

    Nobody reaches the internal and server-only commands; a key limited to some apps (allowed
    is their set) reaches no host command and no other app, and learns of none."""
    if args[0].startswith("-"):
        if len(args) == 1 and args[0] in GROUP_OPTIONS:
            return None
        raise PikuError(f"{args[0]!r} cannot come before the command over ssh",
                        "Write the command first: ssh piku@host COMMAND [ARGS...]  (see: ssh piku@host help)")
    group = click.Context(cli, info_name="piku")
    name, command, rest = cli.resolve_command(group, list(args))
    if name in INTERNAL_COMMANDS:       # answered as a name that is no command: nothing to learn here
        raise cli.unknown(name)
    if name in SERVER_ONLY_COMMANDS:
        raise PikuError(f"'{name}' runs on the server itself, not over ssh", "Log in to the server as root "
                        "(install) or as the piku user (update) and run it there.")
    context = parse_for_app(group, name, command, rest, allowed)
    if allowed is not None:
        check_key_access(name, command, invocation_app(name, context.params), allowed)
    return context


# Commands that act on an app only when it is named: what they do is not undone, or git names it.
NAMED_APP_COMMANDS = frozenset({"destroy", "git-receive-pack", "git-upload-pack"})


def parse_for_app(group, name, command, rest, allowed):
    """The parse of a command line. A per-app command written without its app (`config:set
    KEY=VALUE`, `logs`, `ps --json`; `doctor` from a key limited to apps), from a key that sees
    exactly one app, acts on that app and says so on its first line (on stderr: stdout may be a
    script's JSON or a setting's value). It is taken as written when it parses as written and
    its app word can be an app's name; otherwise that app goes first. `destroy` and git's
    commands are always as written; a key that sees several apps gets the refusal with their
    names."""
    try:
        context, refusal = command.make_context(name, list(rest), parent=group), None
    except click.UsageError as error:
        context, refusal = None, error
    # an app a command may go without (doctor) is the host's for a key of every app
    takes_app = any(param.name == "app" and (param.required or allowed is not None) for param in command.params)
    visible = visible_apps(allowed) if takes_app and name not in NAMED_APP_COMMANDS else []
    if len(visible) == 1 and (context is None or not is_app_name(context.params.get("app"))):
        try:
            implied = command.make_context(name, [visible[0], *rest], parent=group)
        except click.UsageError:
            implied = None
        if implied is not None:
            click.echo(f"-----> {name} {visible[0]}: {visible[0]} is the only app this key can see", err=True)
            return implied
    if refusal is not None:
        raise refusal
    return context


def invocation_app(name, params):
    """The app a parsed command acts on (None: none), named as the command itself will take it."""
    app = params.get("app")
    if app is not None and name in ("git-receive-pack", "git-upload-pack"):
        return git_path_to_app(app)
    return app


def check_key_access(name, command, app, allowed):
    """Refuse, before any work, what a key limited to some apps may not do: a command that does
    not act on one app is the host's (setup:ssh, keys, doctor without an app, and any such
    command added later), unless it is one of KEY_COMMANDS. An app it may not see gets the same
    answer as one that does not exist."""
    takes_app = any(param.name == "app" for param in command.params)
    if takes_app and app is None:       # doctor without an app: the host's; with one of the key's, its app's
        raise PikuError(f"'{name}' without an app is the host's: name one of this key's apps",
                        f"Write it as '{name} APP'; this key may use: " + (", ".join(sorted(allowed)) or "no app"))
    if name not in KEY_COMMANDS and not takes_app:
        raise PikuError(f"'{name}' needs a key that may manage the whole host",
                        "Ask the host's administrator; this key may use: " + (", ".join(sorted(allowed)) or "no app"))
    if app is not None and validate_app_name(app) not in allowed:
        raise PikuError(f"app '{app}' not found", "This key's apps: " + (", ".join(sorted(allowed)) or "none"))


@cli.command("setup:ssh")
@click.argument("public_key_file")
@click.option("--name", help="The key's name (in `keys` and in releases); default: the key's comment.")
@click.option("--apps", help="Comma-separated apps this key may push to and manage; default: every app.")
def cmd_setup_ssh(public_key_file, name, apps):
    """Allow an SSH public key (- reads it from stdin)."""
    text = read_key_file(public_key_file)
    key = next((line.strip() for line in text.splitlines() if line.strip()), "")
    fingerprint = key_fingerprint(key)
    match = AUTHORIZED_KEY.fullmatch(key)
    name = name if name is not None else default_key_name(match.group(3) if match else "", fingerprint)
    if not KEY_NAME.fullmatch(name):
        raise PikuError(f"invalid key name {name!r}", "Use letters, digits, '.', '_', '@' and '-' (at most 64).")
    app_list = None if apps is None else [validate_app_name(app.strip()) for app in apps.split(",") if app.strip()]
    line = authorized_keys_line(key, fingerprint, name, app_list)
    with authorized_keys_lock():
        keys = read_keys()
        if any(other.name == name and other.fingerprint != fingerprint for other in keys):
            raise PikuError(f"another key is already named {name!r}", "Pick another name with --name, or remove it "
                            f"first: keys:remove {name}")
        old = next((other for other in keys if other.fingerprint == fingerprint), None)
        if old is not None and old.line == line:
            step(f"Key {fingerprint} is already set up")
            return
        lines = [existing for existing in read_text(authorized_keys_file()).splitlines()
                 if old is None or existing != old.line]
        write_atomic(authorized_keys_file(), "\n".join([*lines, line]) + "\n", mode=0o600)
    scope = f"apps: {', '.join(app_list) or 'none'}" if app_list is not None else "every app"
    step(f"{'Updated' if old else 'Added'} key {fingerprint} as {name!r} ({scope})")


def key_fingerprint(key):
    with tempfile.NamedTemporaryFile("w", suffix=".pub") as temp:
        temp.write(key + "\n")
        temp.flush()
        try:
            return run_command(["ssh-keygen", "-lf", temp.name], capture=True, what="ssh-keygen").stdout.split()[1]
        except PikuError:
            raise PikuError("that is not a valid SSH public key",
                            "Pass the .pub file, for example: setup:ssh ~/.ssh/id_ed25519.pub")


@cli.command("acme:renew")
@click.option("--days", default=RENEW_DAYS, show_default=True, type=click.IntRange(1, 36500),
              help="Renew the certificates that expire within this many days.")
def cmd_acme_renew(days):
    """Renew the apps' ACME certificates that expire soon (the daily job does this)."""
    check_renewals(renew_certificates(days))
    step("Certificates checked: every one is fresh or was renewed")


def check_renewals(failed):
    if failed:
        raise PikuError(f"{len(failed)} certificate(s) could not be renewed: {', '.join(failed)}",
                        "See the reasons above; fix them, then run: acme:renew")


@cli.command("daily", hidden=True)
def cmd_daily():
    """INTERNAL: what the daily job runs -- rotate nginx's logs of the apps, renew certificates.
    Each part runs whatever happened to the other; the job fails if either did."""
    step(f"Daily job of {PIKU_ROOT}, {time.strftime('%Y-%m-%d %H:%M:%S')}")
    try:
        rotated = rotate_nginx_logs()
    except (PikuError, OSError) as error:
        rotated, trouble = [], getattr(error, "message", None) or str(error)
        problem(f"rotating the nginx logs failed: {trouble}")
    else:
        trouble = None
    if rotated:
        step(f"Rotated the nginx logs of {', '.join(rotated)}")
    check_renewals(renew_certificates(spread=True))
    if trouble:
        raise PikuError("the nginx logs were not rotated (above)", "Fix that; the next daily job rotates them.")


@cli.command("keys")
def cmd_keys():
    """List the SSH keys piku lets in: name, fingerprint, apps."""
    keys = read_keys()
    if not keys:
        notice("no keys yet; add one with: setup:ssh KEYFILE [--name NAME] [--apps a,b]")
    for key in keys:
        click.echo(f"{key.name:24} {key.fingerprint}  {'(all apps)' if key.apps is None else ','.join(key.apps)}")


@cli.command("keys:remove")
@click.argument("name")
def cmd_keys_remove(name):
    """Remove the SSH key called NAME."""
    with authorized_keys_lock():
        keys = [key for key in read_keys() if key.name == name]
        if not keys:
            raise PikuError(f"no key is named {name!r}", "See the keys with: keys")
        gone = {key.line for key in keys}
        lines = [line for line in read_text(authorized_keys_file()).splitlines() if line not in gone]
        write_atomic(authorized_keys_file(), "".join(line + "\n" for line in lines), mode=0o600)
    step(f"Removed key {name!r} ({', '.join(key.fingerprint for key in keys)})")


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
    if not args:
        args = ["help"]
    check_text_args(args)
    context = ssh_invocation(args, key_apps())
    if context is None:
        raise SystemExit(main(args))        # --help or --version: nothing runs
    if context.info_name in CHANGING_COMMANDS:
        outlive_a_kill(context.params.get("app"))
    with context:
        context.command.invoke(context)


CHANGING_COMMANDS = frozenset({"config:set", "config:unset", "ps:scale", "restart", "rollback", "deploy", "destroy",
                               "stop"})


def outlive_a_kill(app):
    """Over ssh, a command that changes an app runs in a child of this process, which only waits:
    when the child is killed (kill -9, the out-of-memory killer), the client is told so and what
    to do, instead of ssh's bare exit status 255. Signals for the command are passed on."""
    sys.stdout.flush()
    sys.stderr.flush()
    ClientWatch.stop()          # (a fork takes no threads along: the child starts its own watch)
    child = os.fork()
    if child == 0:
        ClientWatch.start()
        return
    terminal = os.isatty(0)         # (with a terminal, its ^C and hang-up reach the child themselves)
    for number in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
        signal.signal(number, signal.SIG_IGN if terminal and number != signal.SIGTERM else
                      lambda number, frame: os.kill(child, number))
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    status = os.waitpid(child, 0)[1]
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) not in (signal.SIGHUP, signal.SIGPIPE):
        with contextlib.suppress(OSError, ClientGone):      # the client may be gone too
            killed = f"the command was killed (signal {os.WTERMSIG(status)}) before it finished"
            if is_destroyed(app):
                problem(f"{killed}: {app} is destroyed, and the next command that names it removes what is left")
                problem(f"Finish it now: {ssh_prefix()}destroy {app}")
            else:
                problem(f"{killed}: {app} runs the release it ran before, or the new one if it had gone live")
                problem(f"The next command for {app} finishes or undoes what it left; settle it and see what is "
                        f"live: {ssh_prefix()}doctor {app}")
    os._exit(1 if os.WIFSIGNALED(status) else os.waitstatus_to_exitcode(status))


# Hidden commands that only piku itself runs (hooks, the forced command): never over ssh.
# git-receive-pack and git-upload-pack are what `git push` and `git clone` ask for.
INTERNAL_COMMANDS = frozenset({"ssh-command", "git-hook", "daily"})
SERVER_ONLY_COMMANDS = frozenset({"install", "update"})     # typed on the server itself, never over ssh


@cli.command("git-receive-pack", hidden=True)
@click.argument("app")
def cmd_git_receive_pack(app):
    """INTERNAL: receive a push (creates the repo on the first one)."""
    app = git_path_to_app(app)
    warn_disk()             # before git unpacks anything: it fails first, and says less
    path = ensure_repo(app)
    sys.stdout.flush()
    # git's own `gc --auto` would run before the push returns: the push's keeper runs it after
    os.execvp("git", ["git", "-c", "receive.autogc=false", "receive-pack", path])


@cli.command("git-upload-pack", hidden=True)
@click.argument("app")
def cmd_git_upload_pack(app):
    """INTERNAL: serve a clone or fetch."""
    app = git_path_to_app(app)
    if not os.path.isdir(repo_path(app)) or is_destroyed(app):
        raise PikuError(f"app '{app}' not found")
    os.execvp("git", ["git", "upload-pack", repo_path(app)])


@cli.command("git-hook", hidden=True)
@click.argument("app")
@click.option("--stage", type=click.Choice(["pre", "post"]), default="pre")
def cmd_git_hook(app, stage):
    """INTERNAL: the repo's pre-receive hook: deploy the push. (post: hooks of earlier versions.)"""
    validate_app_name(app)
    deploy, skipped = branch_to_deploy(read_ref_updates(sys.stdin))
    if not deploy:
        return
    old, rev, ref = deploy
    if stage == "post":        # the post-receive hook of earlier versions: the keeper points HEAD now
        return
    for other in skipped:
        warning(f"{other} was pushed but not deployed: one branch is deployed per push")
    receive_pack = process_identity(os.getppid())
    ClientWatch.watch_client_of(receive_pack[0])
    before = push_processes(os.getpid())
    with locked(app) as lock:
        current = branch_revision(app, ref) or ZERO_REV
        if current != old:
            raise PikuError(f"{ref} moved while this push waited (now {current[:12]})",
                            "Fetch, merge or rebase, and push again.")
        record = deploy_app(app, rev, ref, cause="push", state="pending", before=before)
        keep_lock_until_branch_moves(lock, app, ref, rev, receive_pack, record)


def prepare_process():
    """What a piku process needs before it runs a command: files it creates are never anyone
    else's (UMASK), and a write to a pipe or socket whose reader has gone -- a client that left,
    a worker that died while the health check talked to it -- is an error piku handles (EPIPE),
    never a signal that kills it half-way through a deploy. (Python already ignores SIGPIPE;
    this says so where a reader looks for it, and nothing may restore SIG_DFL.)"""
    os.umask(UMASK)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    sys.stdout, sys.stderr = Output(sys.stdout), Output(sys.stderr)
    ClientWatch.start()


def check_text_args(args):
    """Every argument must be text: bytes that are not UTF-8 (a value typed as $'\\xff') reach
    Python as lone surrogates, which no file, config or environment can hold."""
    for index, arg in enumerate(args, 1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError as error:
            raw = arg.encode("utf-8", "backslashreplace" if not 0xdc80 <= ord(arg[error.start]) <= 0xdcff
                             else "surrogateescape")
            shown = raw.decode("ascii", "backslashreplace")[:60]
            raise PikuError(f"argument {index} ({shown}) is not UTF-8 text "
                            f"(byte 0x{ord(arg[error.start]) & 0xff:02x})",
                            "Settings, names and commands are UTF-8 text; encode binary values (base64).")


def main(args=None):
    """Run the CLI; turn PikuError into ' !     ' lines and exit code 1."""
    try:
        check_text_args(sys.argv[1:] if args is None else args)
        cli.main(args=args, prog_name="piku", standalone_mode=False)
    except ClientGone:
        silence_output()
        return 1
    except BrokenPipeError:
        if not output_gone():
            raise               # not our reader: a pipe or socket of someone else's is a bug to see
        silence_output()
        return 1
    except PikuError as error:
        problem(error.message)
        if error.hint:
            problem(error.hint)
        return 1
    except click.exceptions.Exit as done:
        return done.exit_code
    except click.UsageError as error:
        problem_lines = usage_problem(error)
        problem(problem_lines.message)
        problem(problem_lines.hint)
        return 2
    except click.ClickException as error:
        error.show()
        return error.exit_code
    except click.Abort:
        problem("aborted")
        return 1
    except OSError as error:
        problem(f"piku could not go on: {error.strerror or error}" + (f" ({error.filename})" if error.filename else ""))
        problem("Check free disk space (df -h) and the permissions of PIKU_ROOT, then try again.")
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if _COLLECTING:
    gc.enable()


def run_piku():
    """Run the command line: `python3 piku.py ...` and piku's own entry points (piku_entry)."""
    prepare_process()
    try:
        code = main()
    except SystemExit as done:      # a command's own exit status (run, doctor, ps --json)
        if not (done.code is None or isinstance(done.code, int)):
            raise
        code = done.code or 0
    end_process(code)


def end_process(code):
    """End this piku process with code, without Python's tidying of everything it loaded (~5 ms
    of every command; nothing of it needs doing: piku's files are written and closed as it goes,
    its threads are daemons, it registers no exit handlers). What it printed goes out first."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError, ClientGone):     # (a reader that has gone)
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run_piku()
