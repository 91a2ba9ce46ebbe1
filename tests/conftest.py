"""Shared fixtures: a temporary PIKU_ROOT, a real uWSGI emperor, real git pushes.

piku.py runs as a separate process, under Debian's /usr/bin/python3 with Debian's
click/python-dotenv/psutil (PIKU_TEST_PYTHON overrides), the way piku's own entry points (the
forced command, the git hook) run it: imported from cached bytecode (launcher). Tests that type
`python3 piku.py` as a sysadmin does run it so.
"""

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PIKU_PY = REPO / "piku.py"
EXAMPLES = REPO / "examples"
TEST_APPS = Path(__file__).resolve().parent / "apps"
PYTHON = os.environ.get("PIKU_TEST_PYTHON", "/usr/bin/python3")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Unit tests import piku.py; give it a fixed, fake root so rendered paths are stable.
os.environ["PIKU_ROOT"] = "/home/piku/.piku"
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tools"))
from pythons import copy_installation, other_pythons  # noqa: E402  (tools/pythons.py: also make demo's)


def launcher(script=PIKU_PY):
    """The command line piku's own entry points run script with (piku_entry): from cached bytecode."""
    import piku as piku_module
    return [PYTHON, "-I", "-c", piku_module.PIKU_LAUNCHER, "__main__", str(script)]


def clean_env(**extra):
    """The caller's environment without anything piku or git would pick up by accident."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("GIT_", "PIKU_", "SSH_"))}
    env.update(extra)
    return env


class Toolchain:
    """uv and the Pythons piku's builds may use, as a sysadmin would install them.

    uv gets a folder of its own on PATH (the test venv's python must not be found). The other
    Pythons this machine has, found as uv finds them (other_pythons), become uv "managed"
    installations in a folder of this session (UV_PYTHON_INSTALL_DIR), so nothing is
    downloaded. Debian's 3.11 is found on PATH as a system Python, like on a real Debian host.
    """

    def __init__(self, root):
        self.root = Path(root)
        bin_dir = self.root / "bin"
        bin_dir.mkdir(parents=True)
        uv = shutil.which("uv") or str(REPO / ".venv" / "bin" / "uv")
        self.has_uv = os.path.exists(uv)
        if self.has_uv:
            (bin_dir / "uv").symlink_to(os.path.realpath(uv))
        # Poetry and Pipenv as a developer has them (make deps puts them in .venv). The piku
        # user has neither, as on a fresh host: piku runs them through `uv tool run`; a test that
        # wants the host's own puts them on piku's PATH (install_tools).
        self.tools = {}
        for tool in ("poetry", "pipenv"):
            found = shutil.which(tool) or str(REPO / ".venv" / "bin" / tool)
            if os.path.exists(found):
                self.tools[tool] = found
        self.pythons = self.root / "pythons"
        self.pythons.mkdir()
        self.versions = {"3.11": "/usr/bin/python3.11"} if os.path.exists("/usr/bin/python3.11") else {}
        for minor, (version, prefix, interpreter) in sorted(other_pythons(uv if self.has_uv else None).items()):
            if minor in self.versions:
                continue
            if os.path.dirname(interpreter) in SYSTEM_PATH.split(":"):
                self.versions[minor] = interpreter      # on the piku user's PATH already (Ubuntu's python3.12)
                continue
            target = self.pythons / f"cpython-{version}-linux-x86_64-gnu"
            copy_installation(prefix, str(target))
            self.versions[minor] = str(target)
        # UV_SYSTEM_CERTS: this machine reaches PyPI through a proxy with its own CA in the
        # system store -- a fact of the test machine, not a piku default.
        self.env = {"PATH": f"{bin_dir}:{SYSTEM_PATH}", "UV_PYTHON_INSTALL_DIR": str(self.pythons),
                    "UV_PYTHON_DOWNLOADS": "never", "UV_CACHE_DIR": str(self.root / "uv-cache"),
                    "UV_SYSTEM_CERTS": "1"}

    def require(self, *minors, tools=()):
        if not self.has_uv:
            pytest.skip("uv is not installed (make deps installs it)")
        for tool in tools:
            if tool not in self.tools:
                pytest.skip(f"{tool} is not installed (make deps installs it)")
        missing = [minor for minor in minors if minor not in self.versions]
        if missing:
            pytest.skip(f"Python {', '.join(missing)} is not installed on this machine: install it where uv "
                        f"finds it (.venv/bin/uv python install {' '.join(missing)}, where downloads are "
                        "allowed; or a pyenv build), then run the tests again")

    def install_tools(self, piku, folder, *tools):
        """The sysadmin installs tools for the piku user: they come first on its PATH."""
        folder.mkdir(parents=True, exist_ok=True)
        for tool in tools:
            (folder / tool).symlink_to(self.tools[tool])
        piku.env["PATH"] = f"{folder}:{piku.env['PATH']}"


@pytest.fixture(scope="session")
def toolchain(tmp_path_factory):
    return Toolchain(tmp_path_factory.mktemp("toolchain"))


class Piku:
    """Runs piku.py commands against one PIKU_ROOT."""

    def __init__(self, root, toolchain=None, script=PIKU_PY):
        self.root, self.script = Path(root), Path(script)
        self.command = launcher(self.script)
        self.env = clean_env(**{"PIKU_ROOT": str(self.root), "PATH": SYSTEM_PATH, **(toolchain.env if toolchain else {})})

    def __call__(self, *args, input=None, check=True, timeout=300):
        result = subprocess.run([*self.command, *args], env=self.env, input=input,
                                capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"piku {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    def wait_unlocked(self, app, timeout=60):
        """Wait until no change of the app holds its lock (a push's drain after it returned)."""
        import fcntl
        path = self.root / "locks" / f"{app}.lock"
        deadline = time.monotonic() + timeout
        while path.exists():
            with open(path, "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"the lock of {app} was still held after {timeout} s")
            time.sleep(0.02)

    def live_env(self, app):
        text = (self.root / "envs" / app / "LIVE_ENV").read_text()
        import piku as piku_module
        return dict(piku_module.parse_env_text(text, "LIVE_ENV"))

    def url(self, app, path="/"):
        env = self.live_env(app)
        return f"http://{env['BIND_ADDRESS']}:{env['PORT']}{path}"

    def vassals(self, app, folder="uwsgi-enabled"):
        """The app's vassal files (APP@UNIT.ini)."""
        return sorted(p.name for p in (self.root / folder).glob(f"{app}@*.ini"))

    def workers(self, app):
        """The app's enabled worker instances, as KIND.N (any generation; the front left out)."""
        return sorted(name.split("@", 1)[1][:-4].split(".", 1)[1] for name in self.vassals(app)
                      if not name.split("@", 1)[1].startswith("front."))

    def master_pids(self, app):
        """Real PIDs of the app's running uWSGI masters (workers and front): for a vassal in its
        sandbox, the one child of the init bwrap reported; for the front, its pidfile."""
        pids = []
        for vassal in self.vassals(app):
            pid = self.master_pid(app, vassal[len(app) + 1:-len(".ini")])
            if pid and pid_alive(pid):
                pids.append(pid)
        return sorted(pids)

    def master_pid(self, app, unit):
        """The real PID of the uWSGI master of APP@UNIT (0: none)."""
        import json
        info = self.root / "sandbox" / f"{app}@{unit}.info"
        if info.exists():
            try:
                init = json.loads(info.read_text() or "{}").get("child-pid", 0)
                if "uwsgi" in os.readlink(f"/proc/{init}/exe"):
                    return init         # the master is the sandbox's PID 1
                children = Path(f"/proc/{init}/task/{init}/children").read_text().split()
            except (OSError, ValueError):
                return 0
            return int(children[0]) if children else 0
        match = re.fullmatch(r"g([0-9]+)\.(.+)", unit)
        pidfile = self.root / "uwsgi" / app / (f"g{match.group(1)}/{match.group(2)}.pid" if match else f"{unit}.pid")
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        return int(text) if text.isdigit() else 0

    def branch(self, app, ref="main"):
        result = subprocess.run(["git", "--git-dir", str(self.root / "repos" / app), "rev-parse", ref],
                                capture_output=True, text=True, env=clean_env())
        return result.stdout.strip()

    def releases(self, app):
        import json
        path = self.root / "envs" / app / "releases.json"
        return json.loads(path.read_text()) if path.exists() else []


class AppRepo:
    """A developer's working copy of an app, pushed with real `git push`."""

    def __init__(self, piku, source, path, name):
        self.piku, self.path, self.name = piku, Path(path), name
        shutil.copytree(source, self.path)
        self.git("init", "--quiet", "--initial-branch", "main")
        self.commit("first version")

    def git(self, *args, check=True):
        env = clean_env(GIT_AUTHOR_NAME="dev", GIT_AUTHOR_EMAIL="dev@example.com",
                        GIT_COMMITTER_NAME="dev", GIT_COMMITTER_EMAIL="dev@example.com")
        result = subprocess.run(["git", *args], cwd=self.path, env=env, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise AssertionError(f"git {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
        return result

    def write(self, relative, text):
        target = self.path / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)

    def commit(self, message="change"):
        self.git("add", "--all")
        self.git("commit", "--quiet", "--allow-empty", "-m", message)

    def push(self, check=True, branch="main", settle=True):
        """git push over the local transport into piku's git-receive-pack. The push returns before
        its old workers have drained (issue 20); with settle, this waits for that too (the app's
        lock free again), as the next command of the app would."""
        receive_pack = shlex.join([*self.piku.command, "git-receive-pack"])
        result = subprocess.run(["git", "push", "--receive-pack", receive_pack, self.name, f"HEAD:{branch}"],
                                cwd=self.path, env=self.piku.env, capture_output=True, text=True, timeout=900)
        result.output = result.stdout + result.stderr
        if settle:
            self.piku.wait_unlocked(self.name)
        if check and result.returncode != 0:
            raise AssertionError(f"push failed ({result.returncode}):\n{result.output}")
        return result


def fetch(url, timeout=5):
    """(status, body) of one GET."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for_body(url, expected, timeout=30):
    """Poll url until its body contains expected; return the body."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            status, body = fetch(url)
            last = (status, body)
            if status == 200 and expected in body:
                return body
        except (OSError, urllib.error.URLError) as error:
            last = error
        time.sleep(0.2)
    raise AssertionError(f"{url} never answered with {expected!r}; last answer: {last!r}")


class LoadLoop:
    """A bounded HTTP load on one loopback URL, in background threads, counting what a visitor
    would call a failure: refused, reset, timed out, 5xx, or slower than `slow` seconds.

    Stops after `limit` requests or `seconds`, whichever comes first, or at stop(). Each client
    waits `pause` seconds between requests."""

    def __init__(self, url, clients=2, limit=20000, seconds=120, slow=2.0, pause=0.0):
        import threading
        self.url, self.limit, self.slow, self.pause = url, limit, slow, pause
        self.deadline = time.monotonic() + seconds
        self.failures, self.bodies, self.count = [], {}, 0
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def run(self):
        import http.client
        from urllib.parse import urlsplit
        parts = urlsplit(self.url)
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            with self.lock:
                if self.count >= self.limit:
                    return
                self.count += 1
            started = time.monotonic()
            connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
            try:
                connection.request("GET", parts.path or "/")
                response = connection.getresponse()
                body = response.read().decode(errors="replace")
                outcome = f"HTTP {response.status}" if response.status >= 500 else None
            except (OSError, http.client.HTTPException) as error:
                body, outcome = None, type(error).__name__
            finally:
                connection.close()
            took = time.monotonic() - started
            if outcome is None and took > self.slow:
                outcome = f"slow ({took:.1f} s)"
            with self.lock:
                if outcome:
                    self.failures.append(outcome)
                else:
                    self.bodies[body] = self.bodies.get(body, 0) + 1
            if self.pause:
                self.stopping.wait(self.pause)      # (a test that needs the CPU for what it changes)

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=15)
        return self

    def served(self, text):
        """How many answers contained text."""
        return sum(count for body, count in self.bodies.items() if text in body)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def report(self):
        return f"{self.count} requests, {len(self.failures)} failed: {sorted(set(self.failures))}"


def wait_until(predicate, timeout=30, message="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {message}")


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class Emperor:
    """A real uWSGI emperor for one PIKU_ROOT; stop() ends it and everything under it."""

    def __init__(self, root, user=None):
        config = Path(root) / "uwsgi" / "uwsgi.ini"
        command = ["uwsgi", "--ini", str(config)]
        if user:
            command = ["runuser", "-u", user, "--", *command]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)

    def descendants(self):
        import psutil
        try:
            return psutil.Process(self.process.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self):
        """As a power cut would: every process under the emperor is stopped where it is (SIGSTOP,
        until no new one appears, so none forks away), then all are SIGKILLed. (A SIGTERM makes
        the emperor wait about 4 s for its vassals: over the suite, minutes.)"""
        import psutil
        frozen = []
        while True:
            family = [process for process in self.descendants() if process not in frozen]
            if not family:
                break
            for process in family:
                try:
                    process.suspend()
                except psutil.Error:
                    pass
            frozen += family
        self.process.kill()
        self.process.wait()
        kill_and_wait(frozen)


def kill_and_wait(processes):
    """SIGKILL each of these psutil processes (gone ones are fine), and reap them."""
    import psutil
    for process in processes:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=5)


def stop_process_tree(pid):
    """Stop a process a test caused to start (by its PID) and everything under it."""
    import psutil
    try:
        top = psutil.Process(pid)
        family = [top, *top.children(recursive=True)]
    except psutil.Error:
        return
    top.terminate()
    _, alive = psutil.wait_procs([top], timeout=15)
    kill_and_wait(family + [child for child in (top.children(recursive=True) if alive else []) if child not in family])


def free_port():
    return free_ports(1)[0]


def free_ports(count):
    """count different free TCP ports on loopback: every probe stays bound until all are chosen,
    so two servers started together never get the same port."""
    import socket
    probes = [socket.socket() for _ in range(count)]
    try:
        for probe in probes:
            probe.bind(("127.0.0.1", 0))
        return [probe.getsockname()[1] for probe in probes]
    finally:
        for probe in probes:
            probe.close()


NGINX_CONFIG = """\
# the test's own nginx: loopback only, run in the foreground by the test. Its workers run as a user
# that owns nothing of piku's and is only in piku's group (root's group here, as www-data is in the
# piku user's group on a host): what they serve, they serve through the group's permissions.
daemon off;
user nobody root;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log;
events {{ worker_connections 256; }}
http {{
    include /etc/nginx/mime.types;
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/body;
    proxy_temp_path {prefix}/proxy;
    uwsgi_temp_path {prefix}/uwsgi;
    fastcgi_temp_path {prefix}/fastcgi;
    scgi_temp_path {prefix}/scgi;
    include {piku_root}/nginx/*.conf;
}}
"""


class Nginx:
    """A real nginx on a free loopback port that includes piku's vhosts, as a host's nginx
    does; piku reloads it with PIKU_NGINX_RELOAD and finds its port in PIKU_NGINX_HTTP_PORT."""

    def __init__(self, prefix, piku):
        self.prefix = Path(prefix)
        self.prefix.mkdir(parents=True, exist_ok=True)
        # as a host's installer makes the piku user's home 750: the group may enter the folders
        # above PIKU_ROOT (pytest makes them 700); put back as they were at stop()
        self.opened = []
        for folder in piku.root.parents:
            mode = folder.stat().st_mode & 0o7777
            if not mode & 0o010:
                folder.chmod(mode | 0o010)
                self.opened.append((folder, mode))
        self.port, self.https_port = free_ports(2)
        self.config = self.prefix / "nginx.conf"
        self.config.write_text(NGINX_CONFIG.format(prefix=self.prefix, piku_root=piku.root))
        self.command = ["nginx", "-p", str(self.prefix), "-c", str(self.config), "-e", str(self.prefix / "error.log")]
        piku.env.update(PIKU_NGINX_HTTP_PORT=str(self.port), PIKU_NGINX_HTTPS_PORT=str(self.https_port),
                        PIKU_NGINX_RELOAD=" ".join([*self.command, "-s", "reload"]))
        self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: (self.prefix / "nginx.pid").exists(), message="nginx started")

    def url(self, path="/"):
        return f"http://127.0.0.1:{self.port}{path}"

    def get(self, path="/", host="localhost"):
        """(status, headers, body) of one GET with the given Host."""
        import http.client
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        try:
            connection.request("GET", path, headers={"Host": host})
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read().decode(errors="replace")
        finally:
            connection.close()

    def stop(self):
        self.process.send_signal(signal.SIGQUIT)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:       # its workers too: they are in its session
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for folder, mode in self.opened:
            folder.chmod(mode)


@pytest.fixture
def nginx(piku, tmp_path):
    if not shutil.which("nginx"):
        pytest.skip("nginx is not installed (make deps installs it)")
    running = Nginx(tmp_path / "nginx", piku)
    yield running
    running.stop()


class Pebble:
    """Debian's pebble, the ACME test CA, on loopback: its ACME server over TLS (a CA of the
    test's own), its http-01 checks sent to the test's nginx, and names resolved by
    pebble-challtestsrv's DNS to 127.0.0.1. Validation is real (no always-valid switch)."""

    def __init__(self, prefix, nginx, piku):
        self.prefix = Path(prefix)
        self.prefix.mkdir(parents=True)
        self.ca = self.prefix / "ca.crt"
        self.make_tls()
        self.port, self.management, dns, dns_management = free_ports(4)
        config = {"pebble": {"listenAddress": f"127.0.0.1:{self.port}",
                             "managementListenAddress": f"127.0.0.1:{self.management}",
                             "certificate": str(self.prefix / "tls.crt"), "privateKey": str(self.prefix / "tls.key"),
                             "httpPort": nginx.port, "tlsPort": nginx.https_port, "ocspResponderURL": "",
                             "externalAccountBindingRequired": False}}
        import json
        (self.prefix / "pebble.json").write_text(json.dumps(config))
        quiet = dict(stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
        self.dns = subprocess.Popen(["pebble-challtestsrv", "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "",
                                     "-tlsalpn01", "", "-management", f"127.0.0.1:{dns_management}",
                                     "-defaultIPv4", "127.0.0.1", "-defaultIPv6", ""],
                                    stdout=open(self.prefix / "dns.log", "w"), **quiet)
        self.pebble = subprocess.Popen(["pebble", "-config", str(self.prefix / "pebble.json"), "-dnsserver",
                                        f"127.0.0.1:{dns}"], stdout=open(self.prefix / "pebble.log", "w"),
                                       env=dict(os.environ, PEBBLE_VA_NOSLEEP="1", PEBBLE_WFE_NONCEREJECT="0"), **quiet)
        self.directory = f"https://127.0.0.1:{self.port}/dir"
        # lego trusts the CA pebble's own TLS is from: a setting of the host, in piku.env, as a
        # sysadmin with a private CA writes it (the daily job has no other environment)
        with open(piku.root / "piku.env", "a") as host_settings:
            host_settings.write(f"LEGO_CA_CERTIFICATES={self.ca}\n")
        # pebble logs "directory available" before it binds: ready is the directory served over TLS
        wait_until(self.serving, message="pebble to serve its directory")

    def tls(self):
        """A client context trusting the CA pebble's own TLS is from."""
        import ssl
        return ssl.create_default_context(cafile=str(self.ca))

    def serving(self):
        if self.pebble.poll() is not None:
            raise AssertionError(f"pebble exited: {(self.prefix / 'pebble.log').read_text()}")
        try:
            with urllib.request.urlopen(self.directory, context=self.tls(), timeout=5) as response:
                return b"newNonce" in response.read()
        except OSError:
            return False

    def make_tls(self):
        def openssl(*args):
            subprocess.run(["openssl", *args], check=True, capture_output=True)
        key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
        openssl("req", "-x509", *key, "-days", "2", "-subj", "/CN=piku test CA", "-keyout",
                str(self.prefix / "ca.key"), "-out", str(self.ca))
        openssl("req", *key, "-subj", "/CN=127.0.0.1", "-keyout", str(self.prefix / "tls.key"),
                "-out", str(self.prefix / "tls.csr"))
        (self.prefix / "san.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        openssl("x509", "-req", "-in", str(self.prefix / "tls.csr"), "-CA", str(self.ca), "-CAkey",
                str(self.prefix / "ca.key"), "-CAcreateserial", "-days", "2", "-extfile", str(self.prefix / "san.cnf"),
                "-out", str(self.prefix / "tls.crt"))

    def root(self):
        """The root pebble signs certificates with (new at every start), as PEM."""
        with urllib.request.urlopen(f"https://127.0.0.1:{self.management}/roots/0", context=self.tls()) as response:
            return response.read().decode()

    def stop(self):
        for process in (self.pebble, self.dns):
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def pebble(nginx, piku, tmp_path):
    if not (shutil.which("pebble") and shutil.which("pebble-challtestsrv") and shutil.which("lego")):
        pytest.skip("pebble and lego are not installed (make deps installs them)")
    running = Pebble(tmp_path / "pebble", nginx, piku)
    yield running
    running.stop()


@pytest.fixture
def piku(tmp_path, toolchain):
    tool = Piku(tmp_path / "piku", toolchain)
    tool("setup")
    return tool


@pytest.fixture
def sandbox_works():
    """For tests that need an app's sandbox (and keys limited to some apps, which require one):
    skipped with doctor's reason where none starts (a chroot: the kernel refuses it user namespaces)."""
    problem = sandbox_problem()
    if problem:
        pytest.skip(f"no sandbox starts on this machine (doctor says: {problem[0]}; fix: {problem[1]})")


def sandbox_problem():
    """Why no sandbox starts here, as doctor says it (tried now: nothing is remembered) -- or None."""
    import piku as piku_module
    bwrap = piku_module.bwrap_binary()
    return piku_module.probe_sandbox(bwrap) if bwrap else ("bubblewrap is not installed", "make deps installs it")


@pytest.fixture
def emperor(piku):
    running = Emperor(piku.root)
    yield running
    running.stop()


@pytest.fixture
def make_app(piku, tmp_path):
    """make_app(source_dir, name) -> AppRepo in a fresh working copy."""
    def make(source, name):
        return AppRepo(piku, source, tmp_path / "work" / name, name)
    return make


class WebSocket:
    """A small WebSocket client (RFC 6455, text frames) over TCP or TLS, for what nginx carries."""

    def __init__(self, port, host_name, path="/ws", tls=False, timeout=10):
        import base64
        import socket
        import ssl
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock = ssl._create_unverified_context().wrap_socket(raw, server_hostname=host_name) if tls else raw
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_name}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                          f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            if not chunk:
                break
            head += chunk
        self.status = int(head.split()[1]) if head else 0
        self.head = head.decode(errors="replace")

    def send(self, text):
        data, mask = text.encode(), os.urandom(4)
        size = bytes([0x80 | len(data)]) if len(data) < 126 else bytes([0xFE]) + len(data).to_bytes(2, "big")
        self.sock.sendall(bytes([0x81]) + size + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))

    def receive(self):
        head = self._exactly(2)
        length = head[1] & 0x7F
        if length == 126:
            length = int.from_bytes(self._exactly(2), "big")
        elif length == 127:
            length = int.from_bytes(self._exactly(8), "big")
        return self._exactly(length).decode()

    def _exactly(self, size):
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                raise ConnectionError("the WebSocket was closed")
            data += chunk
        return data

    def close(self):
        self.sock.close()


def event_stream(port, host_name, path="/events"):
    """GET an event stream through nginx: -> (seconds until the first event, seconds until the end, body)."""
    import socket
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_name}\r\nAccept: text/event-stream\r\n"
                     f"Connection: close\r\n\r\n".encode())
        data, first = b"", None
        while chunk := conn.recv(4096):
            data += chunk
            if first is None and b"data: first" in data:
                first = time.monotonic() - started
    return first, time.monotonic() - started, data.decode(errors="replace")
