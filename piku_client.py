#!/usr/bin/env python3
"""piku: the laptop side of piku.py. One file, Python's standard library only (3.8+, the
Python macOS and Linux ship), so it can be copied anywhere on PATH as `piku`, or installed
with `pip install .` / `uv tool install .` from a piku.py checkout.

In an app's git checkout it finds the server and the app from the `piku` git remote
(`piku@host:app` or `ssh://piku@host:port/app`), and runs the server's command for that app
over ssh:

    piku config:set PYTHON_VERSION=3.12     ->  ssh piku@host config:set app PYTHON_VERSION=3.12
    piku logs -n 50                         ->  ssh piku@host logs app -n 50
    piku run -- python manage.py shell      ->  ssh -t piku@host run app -- python manage.py shell

`--remote NAME` picks another remote, `--app NAME` another app; PIKU_SERVER (user@host or
user@host:port) and PIKU_APP work without a checkout. `piku init` writes a starter Procfile
for the project it finds; `piku remote piku@host [APP]` adds the git remote. ssh reuses one
connection between calls for a minute (ControlMaster), so a second command skips the
handshake, and `piku remote` has `git push` in that checkout share it (core.sshCommand); the
ssh command is $GIT_SSH_COMMAND when set, as for git, else `ssh`.

The server itself is piku.py (installed alongside as `piku-server`).
"""

import os
import re
import shlex
import subprocess
import sys

VERSION = "0.1.0"
# Server commands that take the app as their first argument: the client puts it there.
APP_COMMANDS = frozenset({"config", "config:get", "config:set", "config:unset", "config:live", "deploy", "deploys", "doctor",
                          "destroy", "logs", "ps", "ps:scale", "releases", "rollback", "run", "restart", "stop"})
SCP_LIKE = re.compile(r"^(?:(?P<user>[^@/]+)@)?(?P<host>[^:/]+):(?P<path>.+)$")
SSH_URL = re.compile(r"^ssh://(?:(?P<user>[^@/]+)@)?(?P<host>[^:/]+)(?::(?P<port>[0-9]+))?(?P<path>/.+)$")
# The server's rule for app names (piku.py's APP_NAME and validate_app_name), which it applies to
# the path git sends: one leading '/' dropped, nothing else changed ('myapp.git' is the app
# 'myapp.git' there), so `piku` and `git push` always name the same app.
APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def app_from_path(path):
    """The app a remote's path names, exactly as the server reads the path git sends it."""
    name = path[1:] if path.startswith("/") else path
    if not APP_NAME.fullmatch(name) or ".." in name:
        raise ClientError(f"the remote's path {path!r} is not an app name the server accepts",
                          "Use piku@host:APP, APP being letters, digits, '.', '_' and '-' (as git push sends it)")
    return name


def check_host(server):
    """user@host as ssh will read it: nothing that ssh could take for an option."""
    user, _, host = server.rpartition("@")
    if not host or host.startswith("-") or user.startswith("-") or any(c.isspace() for c in server):
        raise ClientError(f"{server!r} is not a server address piku can use",
                          "Use piku@yourhost (a host name or address, not starting with '-')")
    return server
SSH_DIR = os.path.join(os.path.expanduser("~"), ".ssh")


def control_options():
    """Share one ssh connection for a minute; none when the socket path would be too long for
    a unix socket (ssh's %C is 40 characters)."""
    path = os.path.join(SSH_DIR, "piku-%C")
    if len(path) - 2 + 40 > 100:
        return []
    os.makedirs(SSH_DIR, mode=0o700, exist_ok=True)
    return ["-o", "ControlMaster=auto", "-o", "ControlPersist=60", "-o", f"ControlPath={path}"]


class ClientError(Exception):
    def __init__(self, message, hint=""):
        super().__init__(message)
        self.message, self.hint = message, hint


def git(*args):
    try:
        result = subprocess.run(["git", *args], capture_output=True, text=True)
    except FileNotFoundError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def parse_remote(url):
    """A git remote URL -> (user@host, port or None, app)."""
    match = SSH_URL.match(url) or SCP_LIKE.match(url)
    if not match:
        raise ClientError(f"the remote URL {url!r} is not an ssh address", "Use piku@host:app")
    host = check_host((match.group("user") + "@" if match.group("user") else "") + match.group("host"))
    port = match.groupdict().get("port")
    return host, port, app_from_path(match.group("path"))


def find_target(remote, app):
    """(server, port, app) from --remote/--app, PIKU_SERVER/PIKU_APP, or the git remote."""
    server = os.environ.get("PIKU_SERVER")
    port = None
    if server and not remote:
        match = re.fullmatch(r"(?P<host>[^:]+)(?::(?P<port>[0-9]{1,5}))?", server)
        if not match:
            raise ClientError(f"PIKU_SERVER={server!r} is not user@host or user@host:port")
        app = app or os.environ.get("PIKU_APP")
        return check_host(match.group("host")), match.group("port"), app and app_from_path(app)
    name = remote or "piku"
    url = git("remote", "get-url", name)
    if not url:
        where = "this folder is not a git checkout" if git("rev-parse", "--git-dir") is None \
            else f"this checkout has no git remote named '{name}'"
        raise ClientError(f"{where}, so piku does not know your server",
                          "Add one with: piku remote piku@yourhost [APP]  (or set PIKU_SERVER=piku@yourhost "
                          "and PIKU_APP=APP)")
    server, port, remote_app = parse_remote(url)
    chosen = app or os.environ.get("PIKU_APP")
    return server, port, app_from_path(chosen) if chosen else remote_app


def ssh_command():
    command = os.environ.get("GIT_SSH_COMMAND") or os.environ.get("GIT_SSH") or "ssh"
    return shlex.split(command)


def run_on_server(server, port, words, tty=False):
    # `--` ends ssh's options: whatever the remote says, the server is never read as one
    args = [*ssh_command(), *control_options(), *(["-p", port] if port else []), *(["-t"] if tty else []),
            "--", check_host(server), *(shlex.quote(word) for word in words)]
    return subprocess.call(args)


def server_words(command, rest, app):
    """The server's command line: the app goes first after app commands."""
    if command in APP_COMMANDS:
        if not app:
            raise ClientError(f"'{command}' needs an app, and none is known here",
                              "Run it in the app's checkout, or pass --app NAME")
        if command == "run" and rest[:1] == ["--"]:
            rest = rest[1:]
        return [command, app, *(["--"] if command == "run" else []), *rest]
    return [command, *rest]


# --- local commands -------------------------------------------------------------------

def cmd_remote(args):
    """piku remote USER@HOST [APP]: add the `piku` git remote (APP: this folder's name);
    ssh://USER@HOST:PORT for a server on another port."""
    if not args:
        raise ClientError("piku remote needs the server", "For example: piku remote piku@example.com")
    top = git("rev-parse", "--show-toplevel")
    if top is None:
        raise ClientError("this folder is not a git checkout", "Run 'git init' first.")
    app = args[1] if len(args) > 1 else os.path.basename(top)
    if not APP_NAME.fullmatch(app) or ".." in app:
        raise ClientError(f"{app!r} is not a valid app name", "Pass one: piku remote piku@host myapp")
    server = args[0]
    url = f"{server.rstrip('/')}/{app}" if server.startswith("ssh://") else f"{server}:{app}"
    parse_remote(url)           # the same checks every later command makes
    if git("remote", "get-url", "piku"):
        git("remote", "set-url", "piku", url)
    else:
        git("remote", "add", "piku", url)
    print(f"-----> git remote 'piku' is {url}: deploy with 'git push piku main'")
    share_connection()
    return 0


def share_connection():
    """Have `git push` in this checkout reuse the ssh connection piku's commands keep open (a
    push then skips ssh's handshake, ~0.2 s): the checkout's core.sshCommand, unless it has one
    or the environment chooses git's ssh (GIT_SSH_COMMAND, GIT_SSH)."""
    options = control_options()
    wanted = shlex.join(["ssh", *options])
    current = git("config", "--local", "core.sshCommand")
    chosen = next((name for name in ("GIT_SSH_COMMAND", "GIT_SSH") if os.environ.get(name)), None)
    if current == wanted:
        print("       git push already reuses piku's ssh connection in this checkout")
        return
    if current or chosen or not options:
        why = ("core.sshCommand is already set here" if current else f"{chosen} is set" if chosen
               else "the connection's socket path would be too long")
        print(f"       git push opens its own ssh connection ({why}); to share piku's, see docs/CLIENT.md "
              "(ControlMaster in ~/.ssh/config)")
        return
    if git("config", "--local", "core.sshCommand", wanted) is None:
        print("       could not set core.sshCommand here: git push opens its own ssh connection")
        return
    print("-----> git push reuses the ssh connection piku's commands keep open for a minute (this checkout's "
          "core.sshCommand, for all its remotes; undo: git config --unset core.sshCommand)")


def starter_procfile(root):
    """A Procfile (and the files it needs) for the project found in root."""
    files = {}
    if os.path.exists(os.path.join(root, "manage.py")):
        settings = next((name for name in sorted(os.listdir(root))
                         if os.path.isfile(os.path.join(root, name, "wsgi.py"))), "mysite")
        files["Procfile"] = f"wsgi: {settings}.wsgi:application\nrelease: python manage.py migrate --noinput\n"
    elif any(os.path.exists(os.path.join(root, name)) for name in ("pyproject.toml", "requirements.txt",
                                                                      "poetry.lock", "Pipfile")):
        module = next((name[:-3] for name in ("wsgi.py", "app.py", "main.py")
                       if os.path.exists(os.path.join(root, name))), "app")
        text = open(os.path.join(root, module + ".py")).read() if os.path.exists(os.path.join(root, module + ".py")) else ""
        kind = "asgi" if re.search(r"\b(FastAPI|Starlette)\(", text) else "wsgi"
        variable = "application" if re.search(r"^application\s*=|def application\(", text, re.M) else "app"
        files["Procfile"] = f"{kind}: {module}:{variable}\n"
        if os.path.exists(os.path.join(root, "pyproject.toml")) and not os.path.exists(
                os.path.join(root, ".python-version")):
            files[".python-version"] = "%d.%d\n" % sys.version_info[:2]
    elif os.path.isdir(os.path.join(root, "public")) or os.path.exists(os.path.join(root, "index.html")):
        files["Procfile"] = "static: public\n" if os.path.isdir(os.path.join(root, "public")) else "static: .\n"
    else:
        files["Procfile"] = "web: python3 app.py    # listen on $BIND_ADDRESS:$PORT\n"
    files["ENV"] = "# settings for every process of the app (dotenv lines); config:set overrides them\n"
    return files


def cmd_init(args):
    """piku init: write a starter Procfile (and ENV, .python-version) for this project."""
    root = git("rev-parse", "--show-toplevel") or os.getcwd()
    for name, text in starter_procfile(root).items():
        path = os.path.join(root, name)
        if os.path.exists(path):
            print(f"       {name} exists; left as it is")
            continue
        with open(path, "w") as handle:
            handle.write(text)
        print(f"-----> wrote {name}: {text.splitlines()[0]}")
    return 0


LOCAL = {"remote": cmd_remote, "init": cmd_init}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    remote = app = None
    while argv and argv[0] in ("--remote", "--app", "-r", "-a"):
        if len(argv) < 2:
            print(f" !     {argv[0]} needs a value", file=sys.stderr)
            return 2
        if argv[0] in ("--remote", "-r"):
            remote = argv[1]
        else:
            app = argv[1]
        argv = argv[2:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] == "--version":
        print(f"piku client {VERSION}")
        return 0
    try:
        if argv[0] in LOCAL:
            return LOCAL[argv[0]](argv[1:])
        server, port, app = find_target(remote, app)
        words = server_words(argv[0], argv[1:], app)
        return run_on_server(server, port, words, tty=argv[0] == "run" and sys.stdin.isatty())
    except ClientError as error:
        print(f" !     {error.message}", file=sys.stderr)
        if error.hint:
            print(f" !     {error.hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
