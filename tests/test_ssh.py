"""Integration: git push and piku commands through a real sshd on 127.0.0.1.

The whole path a user takes is real: a throwaway Unix user owns ~/.piku and a copy of
piku.py, `piku.py setup:ssh` writes its ~/.ssh/authorized_keys, a private sshd (own
config, own host key, own port) lets that key in, and sshd runs the forced command
piku wrote. Nothing is mocked, so the tests need root (CI runs as root) and
/usr/sbin/sshd; they skip otherwise.
"""

import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, PIKU_PY, PYTHON, Emperor, clean_env, fetch, kill_and_wait, wait_for_body, wait_until

WEB = EXAMPLES / "web"
SSHD = "/usr/sbin/sshd"
APP = "sshapp"

pytestmark = [
    pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                       reason="needs root: creates a Unix user and runs a private sshd"),
    pytest.mark.skipif(not os.path.exists(SSHD),
                       reason=f"{SSHD} is missing (apt-get install openssh-server)"),
    pytest.mark.skipif(not all(shutil.which(tool) for tool in ("ssh", "ssh-keygen", "git", "uwsgi",
                                                                 "runuser", "useradd", "userdel")),
                       reason="needs ssh, ssh-keygen, git, uwsgi, runuser, useradd and userdel"),
]


def run(args, check=True, timeout=60, **kwargs):
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{shlex.join(map(str, args))} exited {result.returncode}:\n"
                             f"{result.stdout}\n{result.stderr}")
    return result


def free_tcp_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path, lines=40):
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError as error:
        return f"({path}: {error})"


class SshHost:
    """One throwaway piku user on this machine, reachable through a private sshd."""

    def __init__(self, base):
        self.base = base
        self.user = "pikut" + secrets.token_hex(4)
        self.home = base / "home" / self.user
        self.root = self.home / ".piku"
        self.piku_py = self.home / "piku.py"
        self.client = base / "client"
        self.key = self.client / "id_ed25519"
        self.sshd_dir = base / "sshd"
        self.sshd_log = self.sshd_dir / "sshd.log"
        self.port = None
        self.sshd = None
        self.emperor = None
        self.user_created = False
        self.made_run_sshd = False

    # --- set up -------------------------------------------------------------

    def create_user(self):
        (self.base / "home").mkdir(mode=0o755)
        run(["useradd", "--create-home", "--home-dir", str(self.home), "--shell", "/bin/bash",
             "--user-group", self.user])
        self.user_created = True
        # useradd leaves the account locked ('!'); sshd without PAM refuses locked accounts.
        # '*' unlocks it without giving it a password.
        run(["usermod", "-p", "*", self.user])
        # As a sysadmin would: a copy of piku.py the user owns (the checkout may sit under a
        # folder the user cannot enter).
        shutil.copy2(PIKU_PY, self.piku_py)
        shutil.chown(self.piku_py, self.user, self.user)

    def make_keys(self):
        self.client.mkdir(mode=0o755)          # the user reads the .pub; the key itself is 0600
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "piku-ssh-test", "-f", str(self.key)])
        self.sshd_dir.mkdir(mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.sshd_dir / "host_ed25519")])

    def piku(self, *args, check=True, timeout=120, input=None):
        """Run the user's piku.py as the user, with the default PIKU_ROOT (~/.piku)."""
        env = clean_env(HOME=str(self.home), USER=self.user, LOGNAME=self.user)
        assert "PIKU_ROOT" not in env
        return run(["runuser", "-u", self.user, "--", PYTHON, str(self.piku_py), *args],
                   check=check, timeout=timeout, env=env, cwd=self.home, input=input)

    def start_sshd(self):
        if not os.path.isdir("/run/sshd"):          # privilege separation folder
            os.makedirs("/run/sshd", mode=0o755)
            self.made_run_sshd = True
        self.port = free_tcp_port()
        config = self.sshd_dir / "sshd_config"
        config.write_text(f"""\
Port {self.port}
ListenAddress 127.0.0.1
HostKey {self.sshd_dir / "host_ed25519"}
PidFile {self.sshd_dir / "sshd.pid"}
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
StrictModes yes
PermitRootLogin no
AllowUsers {self.user}
PrintMotd no
LogLevel VERBOSE
""")
        run([SSHD, "-t", "-f", str(config)])
        log = open(self.sshd_log, "w")
        try:
            self.sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()

        def listening():
            if self.sshd.poll() is not None:
                raise AssertionError(f"sshd exited {self.sshd.returncode}:\n{tail(self.sshd_log)}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return True
            except OSError:
                return False
        wait_until(listening, timeout=15, message=f"sshd to listen on 127.0.0.1:{self.port}")

    # --- client side --------------------------------------------------------

    def ssh_options(self, key=None):
        return ["-i", str(key or self.key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR",
                "-o", "ConnectTimeout=10"]

    def ssh(self, *words, check=False, timeout=120, key=None):
        """ssh USER@127.0.0.1 -p PORT WORDS...: ssh joins the words with spaces, like a shell user's."""
        return run(["ssh", *self.ssh_options(key), "-p", str(self.port), f"{self.user}@127.0.0.1", *words],
                   check=check, timeout=timeout, env=clean_env(), stdin=subprocess.DEVNULL)

    def git_env(self, key=None):
        return clean_env(GIT_SSH_COMMAND=shlex.join(["ssh", *self.ssh_options(key)]),
                         GIT_AUTHOR_NAME="dev", GIT_AUTHOR_EMAIL="dev@example.com",
                         GIT_COMMITTER_NAME="dev", GIT_COMMITTER_EMAIL="dev@example.com")

    def url(self, app):
        return f"ssh://{self.user}@127.0.0.1:{self.port}/{app}"

    def live_env(self, app):
        text = (self.root / "envs" / app / "LIVE_ENV").read_text()
        import piku as piku_module
        return dict(piku_module.parse_env_text(text, "LIVE_ENV"))

    def diagnostics(self):
        parts = [f"--- sshd log\n{tail(self.sshd_log)}",
                 f"--- uwsgi emperor log\n{tail(self.root / 'uwsgi' / 'uwsgi.log')}"]
        for log in sorted((self.root / "logs").glob("*/*.log")) if (self.root / "logs").is_dir() else []:
            parts.append(f"--- {log}\n{tail(log)}")
        return "\n".join(parts)

    # --- tear down ----------------------------------------------------------

    def close(self):
        errors = []
        if self.emperor is not None:
            try:
                self.emperor.stop()
            except Exception as error:  # keep tearing down
                errors.append(f"emperor: {error!r}")
        if self.sshd is not None and self.sshd.poll() is None:
            self.sshd.send_signal(signal.SIGTERM)
            try:
                self.sshd.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.sshd.kill()
                self.sshd.wait()
        if self.user_created:
            self.kill_user_processes()
            result = run(["userdel", self.user], check=False)
            if result.returncode != 0:
                errors.append(f"userdel {self.user}: {result.stderr.strip()}")
        if self.made_run_sshd:
            try:
                os.rmdir("/run/sshd")
            except OSError:
                pass
        shutil.rmtree(self.base, ignore_errors=True)
        if errors:
            raise AssertionError("teardown: " + "; ".join(errors))

    def kill_user_processes(self):
        """Anything still running as the throwaway user was started by these tests: end it by PID."""
        import psutil
        try:
            uid = int(run(["id", "-u", self.user]).stdout)
        except AssertionError:
            return
        leftovers = []
        for proc in psutil.process_iter(["uids"]):
            uids = proc.info.get("uids")
            if uids and uid in (uids.real, uids.effective):
                leftovers.append(proc)
        kill_and_wait(leftovers)


@pytest.fixture(scope="module")
def host():
    base = Path(tempfile.mkdtemp(prefix="piku-ssh-test-"))
    base.chmod(0o755)                    # the user must be able to reach its home below it
    server = SshHost(base)
    try:
        server.create_user()
        server.make_keys()
        server.piku("setup")
        server.setup_ssh = server.piku("setup:ssh", str(server.key) + ".pub")
        server.emperor = Emperor(server.root, user=server.user)
        server.start_sshd()
        yield server
    finally:
        server.close()


def working_copy(host, work, message):
    """The example web app, committed in a fresh git working copy at work."""
    shutil.copytree(WEB, work)
    env = host.git_env()
    run(["git", "init", "--quiet", "--initial-branch", "main"], cwd=work, env=env)
    run(["git", "add", "--all"], cwd=work, env=env)
    run(["git", "commit", "--quiet", "-m", message], cwd=work, env=env)
    return work


@pytest.fixture(scope="module")
def deployed(host, tmp_path_factory):
    """The example web app, committed in a fresh working copy and pushed over ssh as APP."""
    work = working_copy(host, tmp_path_factory.mktemp("ssh-work") / APP, "first version")
    env = host.git_env()
    started = time.monotonic()
    result = run(["git", "push", host.url(APP), "HEAD:main"], check=False, timeout=300, cwd=work, env=env)
    result.output = result.stdout + result.stderr
    result.seconds = time.monotonic() - started
    result.work = work
    return result


# --- the authorized_keys entry --------------------------------------------------

def test_setup_ssh_writes_a_forced_command_entry(host):
    assert "Added key" in host.setup_ssh.stdout
    keys_file = host.home / ".ssh" / "authorized_keys"
    lines = keys_file.read_text().splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith('command="'), line
    options = line.rsplit('"', 1)[1].split()[0]        # what follows the command="..."
    assert "ssh-command" in line
    assert {"no-port-forwarding", "no-agent-forwarding"} <= set(options.lstrip(",").split(",")), line
    assert str(host.piku_py) in line and PYTHON in line, line
    assert "PIKU_ROOT=" not in line, "the default ~/.piku needs no override"
    public = (host.client / "id_ed25519.pub").read_text().split()
    assert line.endswith(f"{public[0]} {public[1]}"), line
    # sshd's StrictModes insists on these; they are what lets the pushes below in at all.
    stat = keys_file.stat()
    assert stat.st_mode & 0o077 == 0 and (keys_file.parent.stat().st_mode & 0o077) == 0
    assert stat.st_uid == int(run(["id", "-u", host.user]).stdout)
    # Running it again leaves the file alone.
    again = host.piku("setup:ssh", str(host.key) + ".pub")
    assert "already set up" in again.stdout
    assert keys_file.read_text().splitlines() == lines


# --- git push through sshd --------------------------------------------------------

def test_git_push_over_ssh_deploys_and_serves_the_app(host, deployed):
    assert deployed.returncode == 0, f"push failed:\n{deployed.output}\n{host.diagnostics()}"
    assert f"-----> Deploying {APP}" in deployed.output, deployed.output
    assert f"-----> {APP} is live at http://127.0.0.1:" in deployed.output, deployed.output
    assert (host.root / "repos" / APP / "hooks" / "pre-receive").exists()
    assert f"Accepted publickey for {host.user} from 127.0.0.1" in host.sshd_log.read_text(), \
        host.diagnostics()
    env = host.live_env(APP)
    try:
        wait_for_body(f"http://127.0.0.1:{env['PORT']}/", f"Hello from {APP}! GREETING=hello")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{host.diagnostics()}") from None
    # The server's branch is the pushed commit.
    local = run(["git", "rev-parse", "HEAD"], cwd=deployed.work).stdout.strip()
    server = run(["git", "--git-dir", str(host.root / "repos" / APP), "rev-parse", "main"]).stdout.strip()
    assert server == local
    # Piku commands work over the same connection setup.
    listing = host.ssh("apps")
    assert listing.returncode == 0, listing.stderr
    assert f"* {APP}" in listing.stdout.splitlines(), listing.stdout
    # The release records which key pushed it: its name, from the key's comment.
    releases = host.ssh("releases", APP)
    assert releases.returncode == 0, releases.stderr
    assert "push (by piku-ssh-test)" in releases.stdout.splitlines()[0] and "[live" in releases.stdout, \
        releases.stdout


def test_config_set_over_ssh_redeploys_with_the_new_value(host, deployed):
    assert deployed.returncode == 0, deployed.output
    port = host.live_env(APP)["PORT"]
    # What `ssh host config:set APP "GREETING='hi there'"` sends: the quotes reach piku,
    # which splits the line with shlex, so the value keeps its space.
    result = host.ssh("config:set", APP, "GREETING='hi there'")
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}\n{host.diagnostics()}"
    assert f"-----> Setting GREETING for {APP}" in result.stdout, result.stdout
    assert host.live_env(APP)["GREETING"] == "hi there"
    assert host.live_env(APP)["PORT"] == port, "PORT must stay stable across deploys"
    try:
        wait_for_body(f"http://127.0.0.1:{port}/", f"Hello from {APP}! GREETING=hi there")
    except AssertionError as error:
        raise AssertionError(f"{error}\n{host.diagnostics()}") from None
    shown = host.ssh("config:get", APP, "GREETING")
    assert shown.returncode == 0 and shown.stdout.strip() == "hi there", (shown.stdout, shown.stderr)


# --- the forced command never hands SSH_ORIGINAL_COMMAND to a shell ----------------

@pytest.mark.parametrize("template", [
    "apps; touch {target}",
    "apps && touch {target}",
    "nosuchcommand || touch {target}",
    "apps | touch {target}",
    "apps $(touch {target})",
    "apps `touch {target}`",
    "touch {target}",
])
def test_shell_metacharacters_never_reach_a_shell(host, template):
    target = Path("/tmp") / f"piku-ssh-pwned-{secrets.token_hex(6)}"
    assert not target.exists()
    try:
        result = host.ssh(template.format(target=target))
        assert not target.exists(), f"{template!r} ran a shell command:\n{result.stdout}\n{result.stderr}"
        assert result.returncode != 0, result.stdout
        # 255 is ssh's own failure (no connection, key refused): that would prove nothing.
        assert result.returncode != 255, f"ssh failed:\n{result.stderr}\n{host.diagnostics()}"
        assert "is not a piku command" in result.stderr or "unexpected extra argument" in result.stderr, \
            result.stderr
    finally:
        if target.exists():
            target.unlink()


def test_ssh_without_a_command_shows_help_not_a_shell(host):
    result = host.ssh()
    assert result.returncode == 0, result.stderr
    assert "piku: git push deploys" in result.stdout, result.stdout


# --- app names are checked before git sees them ----------------------------------

def test_push_to_an_invalid_app_name_is_refused(host, tmp_path):
    work = working_copy(host, tmp_path / "evil", "evil")
    env = host.git_env()
    result = run(["git", "push", host.url("../evil"), "HEAD:main"], check=False, timeout=120, cwd=work, env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "invalid app name '../evil'" in output, f"{output}\n{host.diagnostics()}"
    assert not (host.root / "evil").exists()
    assert not (host.root / "repos" / "evil").exists()
    assert "evil" not in host.ssh("apps").stdout


def test_internal_commands_cannot_be_reached_over_ssh(host, deployed):
    """The git-hook attack from the review: a revision that is really a git option."""
    victim = host.home / "victim.txt"
    victim.write_text("untouched\n")
    shutil.chown(victim, host.user, host.user)
    attack = "0 --index-output=%s refs/heads/main\n" % victim
    for words in (["git-hook", APP], ["git-hook", "--stage=post", APP], ["ssh-command"]):
        result = run(["ssh", *host.ssh_options(), "-p", str(host.port), f"{host.user}@127.0.0.1", *words],
                     check=False, timeout=60, env=clean_env(), input=attack)
        assert result.returncode == 1, (words, result.stdout, result.stderr)
        assert f"'{words[0]}' is not a piku command" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    assert victim.read_text() == "untouched\n"
    # what only a sysadmin types on the server: never over ssh, not even for a key of every app
    piku_py = host.piku_py.read_bytes()
    for words in (["update", str(victim)], ["install", "--user", host.user]):
        result = host.ssh(*words)
        assert result.returncode == 1 and f"'{words[0]}' runs on the server itself" in result.stderr, result.stderr
    assert host.piku_py.read_bytes() == piku_py
    head = run(["git", "--git-dir", str(host.root / "repos" / APP), "symbolic-ref", "HEAD"]).stdout.strip()
    assert head == "refs/heads/main"


def test_a_logs_follower_ends_when_its_client_disconnects(host, deployed):
    import psutil
    assert deployed.returncode == 0, deployed.output
    client = subprocess.Popen(["ssh", *host.ssh_options(), "-p", str(host.port), f"{host.user}@127.0.0.1",
                               "logs", APP], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, env=clean_env())

    def followers():
        return [proc for proc in psutil.process_iter(["username", "cmdline"])
                if proc.info["username"] == host.user and "ssh-command" in (proc.info["cmdline"] or [])]
    try:
        assert client.stdout.readline(), "the follower printed the log's last lines"
        wait_until(lambda: followers(), message="the follower to run on the server")
    finally:
        client.kill()
        client.wait()
    wait_until(lambda: not followers(), timeout=15, message="the follower to end after its client went")


# --- per-key access ------------------------------------------------------------------

OTHER = "otherapp"


@pytest.fixture(scope="module")
def bob(host, deployed, tmp_path_factory):
    """A second key that may use APP only, and a second app it must not see."""
    assert deployed.returncode == 0, deployed.output
    key = host.client / "bob"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bob@laptop", "-f", str(key)])
    added = host.piku("setup:ssh", str(key) + ".pub", "--name", "bob", "--apps", APP)
    assert "as 'bob' (apps: sshapp)" in added.stdout, added.stdout
    work = working_copy(host, tmp_path_factory.mktemp("other") / OTHER, "other")
    env = host.git_env()
    run(["git", "push", host.url(OTHER), "HEAD:main"], cwd=work, env=env, timeout=300)
    return key


def test_keys_lists_names_fingerprints_and_apps(host, bob):
    listing = host.ssh("keys")
    assert listing.returncode == 0, listing.stderr
    lines = {line.split()[0]: line for line in listing.stdout.splitlines()}
    assert lines["bob"].endswith(" sshapp") and "SHA256:" in lines["bob"]
    assert lines["piku-ssh-test"].endswith("(all apps)")


def test_a_restricted_key_pushes_and_manages_its_app_only(host, deployed, bob, sandbox_works):
    assert host.ssh("apps", key=bob).stdout.split() == ["*", APP]
    assert OTHER in host.ssh("apps").stdout
    work = deployed.work
    env = host.git_env(bob)
    run(["git", "commit", "--quiet", "--allow-empty", "-m", "pushed by bob"], cwd=work, env=env)
    pushed = run(["git", "push", host.url(APP), "HEAD:main"], check=False, cwd=work, env=env, timeout=300)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert "push (by bob)" in host.ssh("releases", APP, key=bob).stdout.splitlines()[0]
    assert host.ssh("config:set", APP, "FROM=bob", key=bob).returncode == 0

    for words in (["config", OTHER], ["config:set", OTHER, "X=1"], ["logs", OTHER, "-n", "1"], ["ps", OTHER],
                  ["releases", OTHER], ["run", OTHER, "true"], ["destroy", OTHER], ["ps:scale", OTHER, "web=2"]):
        refused = host.ssh(*words, key=bob)
        ghost = host.ssh(*[("ghostapp" if word == OTHER else word) for word in words], key=bob)
        assert refused.returncode == 1 and f" !     app '{OTHER}' not found" in refused.stderr, (words, refused.stderr)
        assert refused.stderr.replace(OTHER, "X") == ghost.stderr.replace("ghostapp", "X"), \
            "an app the key may not see looks like one that does not exist"
        assert "This key's apps: sshapp" in refused.stderr
    attempt = run(["git", "push", host.url(OTHER), "HEAD:main"], check=False, cwd=work, env=env, timeout=120)
    assert attempt.returncode != 0 and f"app '{OTHER}' not found" in attempt.stderr, attempt.stderr
    clone = run(["git", "clone", "-q", host.url(OTHER), str(work.parent / "stolen")], check=False, env=env)
    assert clone.returncode != 0 and not (work.parent / "stolen" / "app.py").exists()
    for words in (["keys"], ["setup:ssh", "-"], ["keys:remove", "bob"], ["setup"]):
        refused = host.ssh(*words, key=bob)
        assert refused.returncode == 1 and "needs a key that may manage the whole host" in refused.stderr, words
    assert "FROM" not in (host.root / "envs" / OTHER / "LIVE_ENV").read_text()


@pytest.mark.parametrize("template", ["config {other}; touch {target}", "config $(touch {target})",
                                      "config `touch {target}`", "config sshapp\ntouch {target}",
                                      "apps && touch {target}"])
def test_a_restricted_keys_command_line_runs_nothing_else(host, bob, template):
    target = Path("/tmp") / f"piku-ssh-pwned-{secrets.token_hex(6)}"
    try:
        result = host.ssh(template.format(other=OTHER, target=target), key=bob)
        assert result.returncode not in (0, 255), result.stdout + result.stderr
        assert not target.exists()
        assert "Traceback" not in result.stderr
    finally:
        if target.exists():
            target.unlink()


def test_the_commands_people_type_first_get_the_form_they_need(host, bob, sandbox_works):
    """`ssh piku@host config:set PYTHON_VERSION=3.10` -- the form people type first: a key that
    sees one app means that app; a key that sees several is asked which, with their names."""
    result = host.ssh("config:set", "FROM_BOB='no app named'", key=bob)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.splitlines()[0] == f"-----> config:set {APP}: {APP} is the only app this key can see"
    assert f"-----> Setting FROM_BOB for {APP}" in result.stdout and OTHER not in result.stdout + result.stderr
    assert host.live_env(APP)["FROM_BOB"] == "no app named"
    shown = host.ssh("config:get", "FROM_BOB", key=bob)
    assert shown.stdout == "no app named\n" and shown.stderr.startswith(f"-----> config:get {APP}: "), shown
    for words in (["destroy"], ["logs", OTHER, "-n", "1"]):       # destroy names its app; an app's name is taken as one
        assert host.ssh(*words, key=bob).returncode != 0

    several = host.ssh("config:set", "PYTHON_VERSION=3.10")      # this key sees both apps
    assert several.returncode == 2 and "Usage:" not in several.stderr, several.stderr
    assert "config:set needs the app's name first; 'PYTHON_VERSION=3.10' looks like a setting" in several.stderr
    assert "Write it as 'config:set APP KEY=VALUE...'" in several.stderr
    assert f"Your apps: {', '.join(sorted([APP, OTHER]))}." in several.stderr, several.stderr
    typo = host.ssh("confg:set", APP, "A=1", key=bob)
    assert "'confg:set' is not a piku command; did you mean 'config:set'?" in typo.stderr


CLIENT = PIKU_PY.parent / "piku_client.py"


def client(host, cwd, *args, home, stdin=subprocess.DEVNULL, **env):
    """The laptop client, as a developer runs it in a checkout (its own HOME for ssh's socket)."""
    return run([PYTHON, str(CLIENT), *args], check=False, cwd=cwd, stdin=stdin, timeout=120,
               env=dict(host.git_env(), HOME=str(home), **env))


def short_home():
    """A HOME whose ~/.ssh/piku-%C fits a unix socket path, as a laptop's does."""
    return Path(tempfile.mkdtemp(prefix="pk", dir="/tmp"))


def test_the_laptop_client_runs_server_commands_for_the_checkouts_app(host, deployed, tmp_path):
    import statistics
    work, home = deployed.work, short_home()
    nowhere = client(host, tmp_path, "releases", home=home)
    assert nowhere.returncode == 1 and "piku remote piku@yourhost" in nowhere.stderr, nowhere.stderr
    added = client(host, work, "remote", f"ssh://{host.user}@127.0.0.1:{host.port}", home=home)
    assert added.returncode == 0 and f"/{APP}" in added.stdout, added.stderr
    try:
        timings = []
        for _ in range(3):
            started = time.monotonic()
            listed = client(host, work, "releases", home=home)
            timings.append(time.monotonic() - started)
            assert listed.returncode == 0 and "[live" in listed.stdout, listed.stderr
        changed = client(host, work, "config:set", "CLIENT_SAYS=hello there", home=home)
        assert changed.returncode == 0, changed.stderr
        assert host.live_env(APP)["CLIENT_SAYS"] == "hello there"
        env = client(host, work, "run", "--", "env", home=home)
        assert "CLIENT_SAYS=hello there" in env.stdout and f"APP={APP}" in env.stdout, env.stderr
        other = client(host, work, "--app", "ghostapp", "ps", home=home)
        assert other.returncode == 1 and "app 'ghostapp' not found" in other.stderr
        # the first call opened the shared connection; the next ones skip the handshake
        print(f"client: first call {timings[0]:.3f} s, then {statistics.median(timings[1:]):.3f} s")
        assert list((home / ".ssh").glob("piku-*")), "a ControlMaster socket is kept for the next call"
    finally:
        for socket_path in (home / ".ssh").glob("piku-*"):
            run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "dummy"], check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_piku_run_gets_a_terminal_when_the_developer_has_one(host, deployed, tmp_path):
    import pty
    home = tmp_path / "home"
    home.mkdir()
    client(host, deployed.work, "remote", f"ssh://{host.user}@127.0.0.1:{host.port}", home=home)
    env = dict(host.git_env(), HOME=str(home))
    env["GIT_SSH_COMMAND"] += " -o ControlMaster=no"
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(deployed.work)
        os.execve(PYTHON, [PYTHON, str(CLIENT), "run", "--", "sh", "-c", "test -t 0 && test -t 1 && echo TERMINAL; tty"],
                  env)
    output = b""
    try:
        while True:
            try:
                chunk = os.read(fd, 1024)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.waitpid(pid, 0)
    # a terminal: in the app's sandbox the caller's is its console (bwrap's /dev)
    assert b"TERMINAL" in output and (b"/dev/pts/" in output or b"/dev/console" in output), output


def test_piku_init_writes_a_starter_procfile_for_the_project_it_finds(tmp_path):
    project = tmp_path / "shop"
    project.mkdir()
    (project / "pyproject.toml").write_text("[project]\nname = 'shop'\ndependencies = ['flask']\n")
    (project / "app.py").write_text("from flask import Flask\napp = Flask(__name__)\n")
    made = run([PYTHON, str(CLIENT), "init"], cwd=project, env=clean_env(HOME=str(tmp_path)))
    assert (project / "Procfile").read_text() == "wsgi: app:app\n"
    assert re.fullmatch(r"3\.[0-9]+\n", (project / ".python-version").read_text())
    assert (project / "ENV").exists() and "wrote Procfile" in made.stdout
    (project / "main.py").write_text("from fastapi import FastAPI\napp = FastAPI()\n")
    (project / "app.py").unlink()
    (project / "Procfile").unlink()
    run([PYTHON, str(CLIENT), "init"], cwd=project, env=clean_env(HOME=str(tmp_path)))
    assert (project / "Procfile").read_text() == "asgi: main:app\n"


def test_options_before_the_command_give_a_limited_key_nothing(host, bob):
    """The review's reproductions: '--' (or any option) before the command once ran it unchecked."""
    assert host.ssh("config:set", OTHER, "SECRET_TOKEN=other-secret-8812").returncode == 0
    keys_file = host.home / ".ssh" / "authorized_keys"
    keys, piku_py = keys_file.read_text(), host.piku_py.read_bytes()
    evil = host.client / "evil"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "evil", "-f", str(evil)])
    attempts = [["--", "--", "config:get", OTHER, "SECRET_TOKEN"], ["--", "config:get", OTHER, "SECRET_TOKEN"],
                ["config:get", "--", OTHER, "SECRET_TOKEN"], ["--", "--", "update", str(host.piku_py)],
                ["--", "git-upload-pack", f"/{OTHER}"], ["-x", "config", OTHER], ["--help", "config", OTHER]]
    for words in attempts:
        result = host.ssh(*words, key=bob)
        assert "other-secret-8812" not in result.stdout + result.stderr, words
        assert result.returncode != 0 or "Usage:" in result.stdout, (words, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
    added = run(["ssh", *host.ssh_options(bob), "-p", str(host.port), f"{host.user}@127.0.0.1", "--", "--",
                 "setup:ssh", "-", "--name", "evil"], check=False, input=(evil.with_suffix(".pub")).read_text(),
                env=clean_env())
    assert added.returncode == 1 and "'--' cannot come before the command over ssh" in added.stderr, added.stderr
    assert keys_file.read_text() == keys and host.piku_py.read_bytes() == piku_py


def sleeping(host, marker):
    """The host user's processes running `sleep MARKER` (what a test's command runs)."""
    import psutil
    return [proc for proc in psutil.process_iter(["username", "cmdline"])
            if proc.info["username"] == host.user and proc.info["cmdline"] == ["sleep", marker]]


def drop_client_of(host, client, marker, timeout):
    """Once the server runs `sleep MARKER` for client, kill the client; the sleep must end too."""
    try:
        wait_until(lambda: sleeping(host, marker), message="the command to run on the server")
    finally:
        client.kill()
        client.wait()
    wait_until(lambda: not sleeping(host, marker), timeout=timeout, message="the command to end after its client went")


def test_run_without_a_terminal_ends_when_its_client_goes(host, deployed):
    assert deployed.returncode == 0, deployed.output
    client = subprocess.Popen(["ssh", *host.ssh_options(), "-p", str(host.port), f"{host.user}@127.0.0.1", "run",
                               APP, "--", "sleep", "304"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=clean_env())
    drop_client_of(host, client, "304", timeout=20)


def test_a_push_whose_ssh_client_disconnects_stops_and_frees_the_app(host, deployed):
    import fcntl
    assert deployed.returncode == 0, deployed.output
    work, env = deployed.work, host.git_env()
    (work / "Procfile").write_text("web: python3 app.py\nrelease: sleep 305\n")
    run(["git", "commit", "--quiet", "-am", "a release that waits"], cwd=work, env=env)
    before = sorted(p.name for p in (host.root / "uwsgi-enabled").glob(f"{APP}@*.ini"))
    push = subprocess.Popen(["git", "push", host.url(APP), "HEAD:main"], cwd=work, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    drop_client_of(host, push, "305", timeout=30)
    with open(host.root / "locks" / f"{APP}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert sorted(p.name for p in (host.root / "uwsgi-enabled").glob(f"{APP}@*.ini")) == before
    run(["git", "reset", "--quiet", "--hard", "HEAD~1"], cwd=work, env=env)


def test_the_client_never_hands_ssh_an_option_and_names_the_app_git_names(host, deployed, tmp_path):
    work, home = deployed.work, short_home()
    pwned = work / "PWNED"          # what the review's remote would create, ssh running `touch PWNED` here
    try:
        for url in ("-oProxyCommand=touch PWNED:myapp", "ssh://-oProxyCommand=touch PWNED@h/myapp"):
            run(["git", "remote", "remove", "piku"], cwd=work, check=False)
            run(["git", "remote", "add", "piku", "--", url], cwd=work)
            refused = client(host, work, "ps", home=home)
            assert refused.returncode == 1 and "is not a server address piku can use" in refused.stderr, refused.stderr
        refused = client(host, work, "ps", home=home, PIKU_SERVER="-oProxyCommand=touch PWNED", PIKU_APP=APP)
        assert refused.returncode == 1 and "is not a server address piku can use" in refused.stderr
        assert not pwned.exists(), "ssh ran a local command"
        # a remote ending in .git names the app 'APP.git' for git push; the client targets the same one
        run(["git", "remote", "set-url", "piku", f"ssh://{host.user}@127.0.0.1:{host.port}/{APP}.git"], cwd=work)
        same = client(host, work, "config", home=home)
        assert same.returncode == 1 and f"app '{APP}.git' not found" in same.stderr, same.stderr
    finally:
        run(["git", "remote", "set-url", "piku", f"ssh://{host.user}@127.0.0.1:{host.port}/{APP}"], cwd=work,
            check=False)
        for socket_path in (home / ".ssh").glob("piku-*"):
            run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "dummy"], check=False)
        shutil.rmtree(home, ignore_errors=True)


def test_a_removed_key_is_let_in_no_more(host, bob):
    assert host.ssh("apps", key=bob).returncode == 0
    removed = host.ssh("keys:remove", "bob")
    assert removed.returncode == 0 and "Removed key 'bob'" in removed.stdout, removed.stderr
    assert host.ssh("apps", key=bob).returncode == 255, "sshd refuses the key"
    assert "bob" not in host.ssh("keys").stdout


def test_a_change_killed_on_the_server_tells_its_client_why(host, deployed, tmp_path):
    """kill -9 (or the out-of-memory killer) of a command that changes an app: the ssh client
    gets the reason and what to do, not ssh's bare 255; the app keeps serving and its lock is free."""
    import fcntl

    import psutil
    work = working_copy(host, tmp_path / "killedapp", "a release that waits")
    (work / "Procfile").write_text("web: python3 app.py\nrelease: sleep $RELEASE_SLEEP\n")
    (work / "ENV").write_text("RELEASE_SLEEP=0\n")
    env = host.git_env()
    run(["git", "add", "--all"], cwd=work, env=env)
    run(["git", "commit", "--quiet", "-m", "a release phase"], cwd=work, env=env)
    run(["git", "push", host.url("killedapp"), "HEAD:main"], cwd=work, env=env, timeout=300)
    url = f"http://127.0.0.1:{host.live_env('killedapp')['PORT']}/"
    wait_for_body(url, "Hello from killedapp")
    client = subprocess.Popen(["ssh", *host.ssh_options(), "-p", str(host.port), f"{host.user}@127.0.0.1",
                               "config:set", "killedapp", "RELEASE_SLEEP=309"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        wait_until(lambda: sleeping(host, "309"), message="the release phase to run")
        commands = [proc for proc in psutil.process_iter(["username", "cmdline"])
                    if proc.info["username"] == host.user and "ssh-command" in (proc.info["cmdline"] or [])]
        working = [proc for proc in commands if proc.ppid() in {other.pid for other in commands}]
        assert len(working) == 1, commands
        working[0].kill()
        out, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 1, (client.returncode, out, err)
    assert " !     the command was killed (signal 9) before it finished: killedapp runs the release" in err, err
    assert "doctor killedapp" in err, err
    assert fetch(url)[1].startswith("Hello from killedapp")
    with open(host.root / "locks" / "killedapp.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    wait_until(lambda: not sleeping(host, "309"), timeout=20, message="the release phase to end with its command")
    again = host.ssh("config:set", "killedapp", "RELEASE_SLEEP=0")
    assert again.returncode == 0, again.stderr


def test_git_push_in_a_checkout_piku_remote_set_up_reuses_the_clients_connection(host, deployed, tmp_path):
    """Issue 20: `piku remote` has git push share the ssh connection piku's commands keep open,
    so a push after a command opens no new one (sshd accepts no second login)."""
    home = short_home()
    try:
        (home / ".ssh").mkdir(mode=0o700)
        (home / ".ssh" / "config").write_text(
            f"Host 127.0.0.1\n  IdentityFile {host.key}\n  IdentitiesOnly yes\n  StrictHostKeyChecking no\n"
            "  UserKnownHostsFile /dev/null\n  BatchMode yes\n  LogLevel ERROR\n")
        # ssh reads the config of the account's home, not $HOME's: `ssh` on PATH names this one
        (home / "bin").mkdir()
        (home / "bin" / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {home / ".ssh" / "config"} "$@"\n')
        (home / "bin" / "ssh").chmod(0o755)
        env = clean_env(HOME=str(home), GIT_AUTHOR_NAME="dev", GIT_AUTHOR_EMAIL="dev@example.com",
                        GIT_COMMITTER_NAME="dev", GIT_COMMITTER_EMAIL="dev@example.com")
        env["PATH"] = f"{home / 'bin'}:{env['PATH']}"
        work = deployed.work
        added = run([PYTHON, str(CLIENT), "remote", f"ssh://{host.user}@127.0.0.1:{host.port}"], cwd=work, env=env)
        assert "git push reuses the ssh connection" in added.stdout, added.stdout
        command = run(["git", "config", "core.sshCommand"], cwd=work, env=env).stdout
        assert "ControlMaster=auto" in command and str(home / ".ssh" / "piku-%C") in command, command
        logins = lambda: host.sshd_log.read_text().count(f"Accepted publickey for {host.user}")     # noqa: E731
        assert run([PYTHON, str(CLIENT), "releases"], cwd=work, env=env).returncode == 0
        before = logins()
        (work / "app.py").write_text((work / "app.py").read_text().replace("Hello from", "Shared from"))
        run(["git", "commit", "-qam", "over the shared connection"], cwd=work, env=env)
        pushed = run(["git", "push", "piku", "HEAD:main"], cwd=work, env=env, check=False, timeout=300)
        assert pushed.returncode == 0, pushed.stderr
        assert logins() == before, "the push went through the connection the command opened"
        again = run([PYTHON, str(CLIENT), "remote", f"ssh://{host.user}@127.0.0.1:{host.port}"], cwd=work, env=env)
        assert "already reuses" in again.stdout, "a second remote leaves it as it is"
    finally:
        for socket_path in (home / ".ssh").glob("piku-*"):
            run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "dummy"], check=False)
        shutil.rmtree(home, ignore_errors=True)
