#!/usr/bin/env python3
"""Deploy timings of the uv buildpack on examples/flask-uwsgi, with a warm uv cache (each app has
its own: the bench seeds it from one it warms).

Measures, each RUNS times (median reported):
  cold      first deploy of a new app: git push until the app answers over HTTP
  code      code-only redeploy: push until the new code answers (uv sync skipped)
  deps      dependency-change redeploy: push until the new code answers, with a new
            package added (a new environment is built beside the live one)
  sync      the same `uv sync` piku runs for `deps`, on its own, into a fresh environment
  rollback  `piku rollback` until the previous code answers (no build)
  switch    for uWSGI wsgi, gunicorn wsgi (Python 3.12, when there) and `web: gunicorn`: a
            code-only redeploy while 2 clients send requests on 127.0.0.1 -- failed requests
            and the slowest answer
  apps      with 1, 10 and 30 small apps deployed on one host: the next code-only deploy, the
            memory (PSS) of the emperor, of each app's processes and of piku's own per app (its
            front), and with 30: the emperor restarted (a reboot) until all 30 answer
  shapes    for a flat uv app (examples/flask-uwsgi), a packaged one (examples/uv-package,
            installed into each release) and a Poetry one (examples/poetry): code-only and
            dependency-change redeploys (push -> new code answers), and the build step alone
            ("Python environment ready in") of the code-only pushes
  sandbox   a code-only redeploy sandboxed and with PIKU_SANDBOX=off (alternating), one process
            started in a worker's view and alone, the memory bubblewrap adds per vassal, one
            app's uv cache on disk, and a first deploy with that cache empty and warm
  nginxfiles  the check of every vhost against NGINX_FILES that runs before each nginx reload,
            with 1, 10, 50 and 100 apps' vhosts
  node      examples/express: code-only redeploys alternating with examples/flask-uwsgi's (the
            ratio), dependency-change redeploys against a bare `npm ci --omit=dev` of each lock
  export    `export` of examples/flask-uwsgi with the export cache empty and after code-only
            pushes: seconds, the archive's size and its app layer's
  startup   piku's start-up through the entry points it writes (issue 20): `--version` and `apps`
            through the forced command of a key (sh -c, SSH_ORIGINAL_COMMAND, as sshd runs it),
            the git hook with nothing to deploy, and the same two as `python3 piku.py`
  waterfall the median waterfall of code-only redeploys (examples/flask-uwsgi): each step's start
            and duration from the deploy records (`deploys APP ID`), the drain after the push
  ssh       code-only redeploys through a real sshd on 127.0.0.1 (root, the bench's own key),
            alternating a fresh ssh connection each time with one reused (ControlMaster, as
            `piku remote` sets up), and `ssh HOST apps` with and without it
  durable   one of piku's writes (temporary file, fsync, rename, folder fsync) against a plain
            rename, and the process guard that runs each command of a vassal outside a sandbox:
            its start-up and its resident memory
and the ratio/overhead deps - sync. Needs uv on PATH, uWSGI with its python3 plugin, and
Debian's python3.11 (the Python uWSGI embeds). Run: make bench  (or python3 bench/deploy_bench.py;
BENCH_ONLY=apps,switch runs a subset)
"""

import collections
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIKU = ["/usr/bin/python3", str(REPO / "piku.py")]


def launcher():
    """What piku's entry points run (the forced command, the hook): piku.py from cached bytecode."""
    import sys
    sys.path.insert(0, str(REPO))
    import piku
    return ["/usr/bin/python3", "-I", "-c", piku.PIKU_LAUNCHER, "__main__", str(REPO / "piku.py")]
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
ONLY = set(filter(None, os.environ.get("BENCH_ONLY", "").split(",")))
PYENV = Path("/root/.pyenv/versions")
EXTRA_PACKAGES = ["six", "idna", "certifi", "packaging", "pyparsing", "attrs", "toml", "zipp", "tomli", "wheel"]
SYNC_ARGS = ["sync", "--no-install-local", "--python", "/usr/bin/python3.11", "--locked", "--compile-bytecode",
             "--no-default-groups"]


def run(args, cwd=None, env=None, check=True, pass_fds=()):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, pass_fds=pass_fds)
    if check and result.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")
    return result


def wait_for(url, expected, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if expected in response.read().decode():
                    return time.monotonic()
        except OSError:
            pass
        time.sleep(0.01)
    raise SystemExit(f"{url} never answered with {expected!r}")


class Bench:
    def __init__(self, work):
        self.work = Path(work)
        self.uv = shutil.which("uv") or str(REPO / ".venv" / "bin" / "uv")
        bin_dir = self.work / "bin"
        bin_dir.mkdir()
        (bin_dir / "uv").symlink_to(os.path.realpath(self.uv))
        self.poetry = shutil.which("poetry") or str(REPO / ".venv" / "bin" / "poetry")
        if os.path.exists(self.poetry):
            (bin_dir / "poetry").symlink_to(self.poetry)
        pythons = self.work / "pythons"        # the pyenv builds, as uv-managed Pythons (nothing downloaded)
        pythons.mkdir()
        for build in sorted(PYENV.glob("3.1[02-9].*")) if PYENV.is_dir() else []:
            run(["/usr/bin/python3", str(REPO / "tools" / "pythons.py"), "--copy", str(build),
                 str(pythons / f"cpython-{build.name}-linux-x86_64-gnu")])
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("GIT_", "PIKU_"))}
        self.env.update(PIKU_ROOT=str(self.work / "piku"), PATH=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
                        UV_PYTHON_INSTALL_DIR=str(pythons),
                        UV_PYTHON_DOWNLOADS="never", UV_CACHE_DIR=str(self.work / "uv-cache"), UV_SYSTEM_CERTS="1",
                        GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@example.com",
                        GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="b@example.com")
        run([*PIKU, "setup"], env=self.env)        # (it caches piku.py's bytecode)
        self.entry = launcher()
        self.start_emperor()

    def start_emperor(self):
        self.emperor = subprocess.Popen(["uwsgi", "--ini", str(self.work / "piku" / "uwsgi" / "uwsgi.ini")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        return time.monotonic()

    def stop(self):
        self.emperor.send_signal(signal.SIGTERM)
        try:
            self.emperor.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.emperor.pid, signal.SIGKILL)

    def checkout(self, name, example="flask-uwsgi"):
        path = self.work / "src" / name
        shutil.copytree(REPO / "examples" / example, path)
        run(["git", "init", "-q", "-b", "main"], cwd=path, env=self.env)
        self.commit(path, "first")
        return path

    def commit(self, path, message):
        run(["git", "add", "-A"], cwd=path, env=self.env)
        run(["git", "commit", "-q", "--allow-empty", "-m", message], cwd=path, env=self.env)

    def push(self, path, app):
        started = time.monotonic()
        # as the forced command runs it (piku.py from its cached bytecode), over the local transport
        self.output = run(["git", "push", "-q", "--receive-pack", shlex.join([*self.entry, "git-receive-pack"]), app,
                           "HEAD:main"], cwd=path, env=self.env).stderr
        return started

    def url(self, app, path="/"):
        live = (self.work / "piku" / "envs" / app / "LIVE_ENV").read_text()
        port = next(line.split("=", 1)[1].strip("'") for line in live.splitlines() if line.startswith("PORT="))
        return f"http://127.0.0.1:{port}{path}"

    def mark(self, path, marker, example="flask-uwsgi", main="wsgi.py"):
        source = (REPO / "examples" / example / main).read_text()
        (path / main).write_text(source.replace("Hello from", f"{marker} from"))

    def seed_cache(self, app):
        """Each app builds with a uv cache of its own: warm it as the bench's shared one is."""
        cache = self.work / "piku" / "cache" / ".uv" / app / "cache"
        if not cache.exists() and (self.work / "uv-cache").exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            run(["cp", "-a", str(self.work / "uv-cache"), str(cache)])

    def piku(self, *args):
        return run([*PIKU, *args], env=self.env)

    def with_package(self, path, count):
        """pyproject.toml + uv.lock with the first `count` extra packages."""
        deps = ", ".join(f'"{name}"' for name in ["flask>=3.0", *EXTRA_PACKAGES[:count]])
        text = (REPO / "examples" / "flask-uwsgi" / "pyproject.toml").read_text()
        (path / "pyproject.toml").write_text(text.replace('["flask>=3.0"]', f"[{deps}]"))
        run([self.uv, "lock", "-q"], cwd=path, env=self.env)


class Load:
    """2 clients sending GETs to one loopback URL until stopped (at most 60 s): failures and latency."""

    def __init__(self, port, clients=2):
        self.port, self.failed, self.latencies, self.stopping = port, 0, [], threading.Event()
        self.deadline = time.monotonic() + 60
        self.threads = [threading.Thread(target=self.loop, daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def loop(self):
        while not self.stopping.is_set() and time.monotonic() < self.deadline:
            started = time.monotonic()
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            try:
                connection.request("GET", "/")
                response = connection.getresponse()
                response.read()
                ok = response.status < 500
            except (OSError, http.client.HTTPException):
                ok = False
            finally:
                connection.close()
            self.latencies.append(time.monotonic() - started)
            self.failed += not ok

    def stop(self):
        self.stopping.set()
        for thread in self.threads:
            thread.join()
        return self


def measure_deploys(bench, results):
    # warm the uv cache with every package the dependency runs will need
    warm = bench.checkout("warm")
    bench.with_package(warm, len(EXTRA_PACKAGES))
    run([bench.uv, *SYNC_ARGS], cwd=warm, env=dict(bench.env, UV_PROJECT_ENVIRONMENT=str(bench.work / "warm-env")))

    for run_index in range(RUNS):
        app = f"cold{run_index}"
        path = bench.checkout(app)
        bench.seed_cache(app)
        started = bench.push(path, app)
        results["cold"].append(wait_for(bench.url(app), f"Hello from {app}") - started)

    path = bench.checkout("app")
    bench.seed_cache("app")
    bench.push(path, "app")
    wait_for(bench.url("app"), "Hello from app")
    for run_index in range(RUNS):
        marker = f"Code{run_index}"
        bench.mark(path, marker)
        bench.commit(path, marker)
        started = bench.push(path, "app")
        results["code"].append(wait_for(bench.url("app"), marker) - started)

    for run_index in range(RUNS):
        marker = f"Deps{run_index}"
        bench.mark(path, marker)
        bench.with_package(path, run_index + 1)
        bench.commit(path, marker)
        started = bench.push(path, "app")
        results["deps_push"].append(time.monotonic() - started)
        results["deps"].append(wait_for(bench.url("app"), marker) - started)
        # the same sync on its own, into a fresh environment, same inputs
        venv = bench.work / f"alone-{run_index}"
        began = time.monotonic()
        run([bench.uv, *SYNC_ARGS], cwd=path, env=dict(bench.env, UV_PROJECT_ENVIRONMENT=str(venv)))
        results["sync"].append(time.monotonic() - began)

    for run_index in range(RUNS if RUNS > 1 else 0):
        # v(N) -> v(N-1): the previous release runs again, no build
        marker = f"Deps{RUNS - 2 + run_index % 2}"
        started = time.monotonic()
        bench.piku("rollback", "app")
        results["rollback"].append(wait_for(bench.url("app"), marker) - started)





SWITCH_SERVERS = {   # name -> (example, file with "Hello from", Python it needs)
    "uwsgi": ("flask-uwsgi", "wsgi.py", None),
    "gunicorn": ("flask-gunicorn", "wsgi.py", "3.12"),
    "web-gunicorn": ("requirements", "app.py", None),
    "web-plain": ("web", "app.py", None),      # Python's http.server, one process binding its PORT
}


def measure_switch(bench, results):
    for server, (example, main, python) in SWITCH_SERVERS.items():
        if python and not any(PYENV.glob(f"{python}.*")):
            print(f"  (skipping {server}: Python {python} is not installed)")
            continue
        path = bench.checkout(f"sw-{server}", example)
        bench.push(path, f"sw-{server}")
        url = bench.url(f"sw-{server}")
        wait_for(url, "Hello from")
        port = int(url.rsplit(":", 1)[1].strip("/"))
        for run_index in range(RUNS):
            marker = f"Switch{run_index}"
            bench.mark(path, marker, example, main)
            bench.commit(path, marker)
            load = Load(port)
            time.sleep(0.3)
            started = bench.push(path, f"sw-{server}")
            answered = wait_for(url, marker) - started
            time.sleep(0.3)
            load.stop()
            results.setdefault(f"switch_{server}", []).append(answered)
            results.setdefault(f"failed_{server}", []).append(load.failed)
            results.setdefault(f"worst_{server}", []).append(max(load.latencies))
            results.setdefault(f"requests_{server}", []).append(len(load.latencies))


def pss_mb(pids):
    import psutil
    total = 0
    for pid in pids:
        try:
            total += psutil.Process(pid).memory_full_info().pss
        except psutil.Error:
            pass
    return total / 2**20


def sandbox_inits(bench, app):
    """PIDs of the init bubblewrap runs in each of the app's sandboxed vassals (its report)."""
    pids = []
    for info in (bench.work / "piku" / "sandbox").glob(f"{app}@*.info"):
        try:
            pids.append(int(json.loads(info.read_text())["child-pid"]))
        except (OSError, ValueError, KeyError):
            pass
    return pids


def app_pids(bench, app):
    """Every process of the app: its sandboxes (bwrap, its init and all below) and its front."""
    import psutil
    tops = [psutil.Process(pid).ppid() for pid in sandbox_inits(bench, app) if psutil.pid_exists(pid)]
    return process_trees(tops) + front_pids(bench, app)


def process_trees(tops):
    """Each of these processes and all below it."""
    import psutil
    pids = []
    for pid in tops:
        try:
            top = psutil.Process(pid)
            pids += [top.pid, *(child.pid for child in top.children(recursive=True))]
        except (psutil.Error, ValueError):
            pass
    return pids


def measure_apps(bench, results):
    """Deploy small apps (examples/web) until 1, 10, 30 are live; time one more code-only
    deploy at each size and take the memory of what runs."""
    deployed = 0
    for size in (1, 10, 30):
        while deployed < size:
            path = bench.checkout(f"many{deployed}", "web")
            bench.push(path, f"many{deployed}")
            wait_for(bench.url(f"many{deployed}"), "Hello from")
            deployed += 1
        times = []
        path = bench.work / "src" / "many0"
        for run_index in range(RUNS):
            marker = f"Size{size}x{run_index}"
            bench.mark(path, marker, "web", "app.py")
            bench.commit(path, marker)
            started = bench.push(path, "many0")
            times.append(wait_for(bench.url("many0"), marker) - started)
        time.sleep(2)       # drained generations exit
        per_app = [pss_mb(app_pids(bench, f"many{index}")) for index in range(size)]
        results[f"apps_{size}_deploy"] = times
        results[f"apps_{size}_mb_per_app"] = [statistics.median(per_app)]
        results[f"apps_{size}_emperor_mb"] = [pss_mb([bench.emperor.pid])]
        results[f"apps_{size}_front_mb"] = [statistics.median(pss_mb(front_pids(bench, f"many{index}"))
                                                              for index in range(size))]
    urls = [bench.url(f"many{index}") for index in range(deployed)]
    for _ in range(max(1, RUNS // 2)):
        bench.stop()            # what a reboot does to the workers; the records and files stay
        started = bench.start_emperor()
        for url in urls:
            wait_for(url, "from", timeout=120)
        results["apps_30_restart"].append(time.monotonic() - started)


def front_pids(bench, app):
    """piku's own processes for an app: its front (the master and its worker)."""
    tops = []
    for pidfile in (bench.work / "piku" / "uwsgi" / app).glob("front.*.pid"):
        try:
            tops.append(int(pidfile.read_text()))
        except (OSError, ValueError):
            pass
    return process_trees(tops)


SHAPES = {     # name -> (example, the file the code-only change edits, how a dependency is added)
    "flat": ("flask-uwsgi", "wsgi.py", "uv"),
    "packaged": ("uv-package", "src/hello_pkg/greeting.py", "uv"),
    "poetry": ("poetry", "app.py", "poetry"),
    "poetry-uv": ("poetry", "app.py", "poetry"),     # the piku user has no Poetry: uv tool run's pinned one
}


def measure_shapes(bench, results):
    for shape, (example, main, tool) in SHAPES.items():
        if tool == "poetry" and not os.path.exists(bench.poetry):
            print(f"  (poetry is not installed: the {shape} app is not measured)")
            continue
        host_poetry = bench.work / "bin" / "poetry"
        if shape == "poetry-uv" and host_poetry.is_symlink():
            host_poetry.unlink()
        app = f"shape-{shape}"
        path = bench.checkout(app, example)
        source = (REPO / "examples" / example / main).read_text()
        bench.push(path, app)
        wait_for(bench.url(app), "from")
        for run_index in range(RUNS):
            marker = f"Code{run_index}"
            (path / main).write_text(source.replace("Hello from", f"{marker} from").replace('"Hello"', f'"{marker}"'))
            bench.commit(path, marker)
            started = bench.push(path, app)
            results[f"shape_{shape}_code"].append(wait_for(bench.url(app), f"{marker} from") - started)
            ready = re.search(r"Python environment ready in ([0-9.]+) s", bench.output)
            results[f"shape_{shape}_build"].append(float(ready.group(1)))
        for run_index in range(RUNS):
            marker = f"Deps{run_index}"
            (path / main).write_text(source.replace("Hello from", f"{marker} from").replace('"Hello"', f'"{marker}"'))
            package = EXTRA_PACKAGES[run_index % len(EXTRA_PACKAGES)]
            if tool == "uv":
                run([bench.uv, "add", "-q", "--no-sync", package], cwd=path, env=bench.env)
            else:
                run([bench.poetry, "add", "-q", "--lock", "--no-interaction", package], cwd=path, env=bench.env)
            bench.commit(path, marker)
            started = bench.push(path, app)
            results[f"shape_{shape}_deps"].append(wait_for(bench.url(app), f"{marker} from") - started)


def du_mb(path):
    return int(run(["du", "-sb", str(path)]).stdout.split()[0]) / 2**20


def measure_sandbox(bench, results):
    """What the sandbox costs: a code-only redeploy sandboxed (PIKU_SANDBOX=auto) and not (off),
    alternating; one process started in a worker's view (bubblewrap as the vassal wrapper runs
    it) against the same process alone; the memory bubblewrap adds to a vassal; one app's own uv
    cache on disk; a first deploy with that app's cache empty and with it warm."""
    settings = bench.work / "piku" / "piku.env"
    path = bench.checkout("sbx")
    bench.push(path, "sbx")
    url = bench.url("sbx")
    wait_for(url, "Hello from sbx")
    for run_index in range(RUNS):
        for mode in ("auto", "off"):
            settings.write_text(f"PIKU_SANDBOX={mode}\n")
            marker = f"Sbx{mode}{run_index}"
            bench.mark(path, marker)
            bench.commit(path, marker)
            started = bench.push(path, "sbx")
            results[f"sandbox_code_{mode}"].append(wait_for(url, marker) - started)
    settings.write_text("")
    bench.mark(path, "Hello")
    bench.commit(path, "sandboxed again")
    bench.push(path, "sbx")
    wait_for(url, "Hello from sbx")
    time.sleep(2)
    view = next((bench.work / "piku" / "sandbox").glob("sbx@*.wsgi.1.view"))
    bwrap = shutil.which("bwrap")
    for _ in range(max(RUNS, 20)):
        with open(view, "rb") as args:         # as the vassal wrapper starts bubblewrap
            began = time.monotonic()
            run([bwrap, "--args", str(args.fileno()), "--", "/bin/true"], env={"PATH": "/usr/bin:/bin"},
                pass_fds=(args.fileno(),))
            results["sandbox_start_in"].append((time.monotonic() - began) * 1000)
        began = time.monotonic()
        run(["/bin/true"], env={"PATH": "/usr/bin:/bin"})
        results["sandbox_start_out"].append((time.monotonic() - began) * 1000)
    import psutil
    inits = [pid for pid in sandbox_inits(bench, "sbx") if psutil.pid_exists(pid)]     # the live ones
    outer = [psutil.Process(pid).ppid() for pid in inits]
    results["sandbox_vassal_mb"] = [pss_mb(inits + outer) / max(1, len(inits))]
    results["sandbox_cache_mb"] = [du_mb(bench.work / "piku" / "uv" / "sbx")]
    cache = bench.work / "piku" / "uv"
    for run_index in range(RUNS):
        for warm in (False, True):
            app = f"first{'w' if warm else 'e'}{run_index}"
            if warm:
                run(["cp", "-a", str(cache / "sbx"), str(cache / app)])     # its uv cache and tool folder
            path = bench.checkout(app)
            started = bench.push(path, app)
            results[f"sandbox_first_{'warm' if warm else 'empty'}"].append(
                wait_for(bench.url(app), f"Hello from {app}") - started)


NGINX_FILES_PROBE = """
import os, statistics, sys, time
sys.path.insert(0, sys.argv[1])
import piku
for folder in (piku.PIKU_ROOT, *piku.PIKU_DIRS):
    piku.make_folder(folder)
release = piku.Release("app0", "0" * 40, os.path.join(piku.RELEASE_ROOT, "app0", "v1"),
                       piku.parse_procfile("wsgi: app:app\\n"), {"APP": "app0", "BIND_ADDRESS": "127.0.0.1",
                       "PORT": "8000", "NGINX_SERVER_NAME": "app0.example.com", "NGINX_CACHE_PREFIXES": "/c"})
text = piku.finish_vhost(piku.render_nginx(release))
for index in range(int(sys.argv[2])):
    with open(os.path.join(piku.NGINX_ROOT, f"app{index}.conf"), "w") as out:
        out.write(text.replace("app0", f"app{index}"))
fresh, cold, warm = [], [], []
for _ in range(15):
    for times in (fresh, cold, warm):   # no cache; what an earlier command kept; this command's own
        piku.nginx_named_paths.cache_clear()
        if times is not warm:
            piku._NAMED_PATHS.clear()
        if times is fresh and os.path.exists(piku.NGINX_PATHS_CACHE):
            os.unlink(piku.NGINX_PATHS_CACHE)
        began = time.perf_counter()
        piku.guard_nginx_files()
        times.append((time.perf_counter() - began) * 1000)
print(statistics.median(fresh), statistics.median(cold), statistics.median(warm))
"""


def measure_nginx_files(bench, results):
    """What checking every vhost against NGINX_FILES costs before a reload, with 1 to 100 apps."""
    for size in NGINX_FILES_SIZES:
        with tempfile.TemporaryDirectory(prefix="piku-nginx-files-") as root:
            output = run(["/usr/bin/python3", "-c", NGINX_FILES_PROBE, str(REPO), str(size)],
                         env=dict(os.environ, PIKU_ROOT=root)).stdout
            fresh, cold, warm = output.split()[-3:]
            results[f"nginx_files_{size}_fresh"].append(float(fresh))
            results[f"nginx_files_{size}"].append(float(cold))
            results[f"nginx_files_{size}_again"].append(float(warm))


NGINX_FILES_SIZES = (1, 10, 50, 100)

DURABLE_PROBE = """
import os, statistics, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
import piku
folder = os.path.join(piku.PIKU_ROOT, "w")
os.makedirs(folder)
def renamed(path, text):
    handle, temp = tempfile.mkstemp(dir=folder)
    with os.fdopen(handle, "w") as out:
        out.write(text)
    os.replace(temp, path)
for write in (piku.write_atomic, renamed):
    began = time.perf_counter()
    for index in range(50):
        write(os.path.join(folder, str(index)), "x" * 2000)
    print((time.perf_counter() - began) / 50 * 1000)
with open(os.path.join(folder, "guard.py"), "w") as out:
    out.write(piku.PROCESS_GUARD_TEXT)
print(folder)
"""


def measure_durable(results):
    """A durable write against a plain rename; the process guard's start-up and memory."""
    with tempfile.TemporaryDirectory(prefix="piku-durable-") as root:
        for _ in range(RUNS):
            shutil.rmtree(os.path.join(root, "w"), ignore_errors=True)
            durable, renamed, folder = run(["/usr/bin/python3", "-c", DURABLE_PROBE, str(REPO)],
                                           env=dict(os.environ, PIKU_ROOT=root)).stdout.split()
            results["durable_write"].append(float(durable))
            results["renamed_write"].append(float(renamed))
            guard = ["/usr/bin/python3", "-I", "-S", os.path.join(folder, "guard.py"), "10"]
            began = time.perf_counter()
            run([*guard, "true"])
            results["guard_start"].append((time.perf_counter() - began) * 1000)
            sleeper = subprocess.Popen([*guard, "sleep 30"], start_new_session=True)
            time.sleep(0.5)
            with open(f"/proc/{sleeper.pid}/status") as status:
                rss = next(line for line in status if line.startswith("VmRSS:")).split()[1]
            results["guard_rss"].append(int(rss) / 1024)
            os.killpg(sleeper.pid, signal.SIGKILL)
            sleeper.wait()


NODE_PACKAGES = ["left-pad", "kleur", "is-number", "camelcase", "escape-string-regexp", "slash", "ansi-regex",
                 "picomatch", "yocto-queue", "strip-final-newline"]


def measure_node(bench, results):
    """examples/express: a code-only redeploy alternating with the Python app's (the ratio), and
    dependency-change redeploys against a bare `npm ci --omit=dev` of the same lock with the same
    (warm) cache."""
    python = bench.checkout("py")
    bench.push(python, "py")
    wait_for(bench.url("py"), "Hello from py")
    node = bench.checkout("node", example="express")
    bench.push(node, "node")
    wait_for(bench.url("node"), "Hello from")
    for run_index in range(RUNS):
        for app, path, example, main in (("py", python, "flask-uwsgi", "wsgi.py"), ("node", node, "express", "server.js")):
            marker = f"Code{run_index}"
            bench.mark(path, marker, example, main)
            bench.commit(path, marker)
            started = bench.push(path, app)
            results[f"node_code_{app}"].append(wait_for(bench.url(app), marker) - started)
    npm_env = dict(bench.env, npm_config_cache=str(bench.work / "piku" / "uv" / "node" / "npm"),
                   npm_config_update_notifier="false")
    for run_index in range(RUNS):
        marker = f"Deps{run_index}"
        bench.mark(node, marker, "express", "server.js")
        run(["npm", "install", "--package-lock-only", "--no-audit", "--no-fund", NODE_PACKAGES[run_index % len(NODE_PACKAGES)]],
            cwd=node, env=npm_env)
        bench.commit(node, marker)
        started = bench.push(node, "node")
        results["node_deps"].append(wait_for(bench.url("node"), marker) - started)
        alone = bench.work / f"npm-alone-{run_index}"
        alone.mkdir()
        for name in ("package.json", "package-lock.json"):
            shutil.copy(node / name, alone / name)
        began = time.monotonic()
        run(["npm", "ci", "--omit=dev", "--no-audit", "--no-fund"], cwd=alone, env=npm_env)
        results["node_npm_ci"].append(time.monotonic() - began)


def measure_export(bench, results):
    """examples/flask-uwsgi: `export` with the export cache empty (the base built from the host's
    packages), then after each code-only push (base, runtime and environment layers reused)."""
    path = bench.checkout("img")
    bench.push(path, "img")
    wait_for(bench.url("img"), "Hello from img")
    cache = bench.work / "piku" / "tools" / "export"
    for run_index in range(RUNS):
        shutil.rmtree(cache, ignore_errors=True)
        target = bench.work / f"cold-{run_index}.tar"
        began = time.monotonic()
        bench.piku("export", "img", "--output", str(target))
        results["export_cold"].append(time.monotonic() - began)
        results["export_mb"].append(target.stat().st_size / 2**20)
        target.unlink()
    for run_index in range(RUNS):
        marker = f"Image{run_index}"
        bench.mark(path, marker)
        bench.commit(path, marker)
        bench.push(path, "img")
        target = bench.work / f"warm-{run_index}.tar"
        began = time.monotonic()
        bench.piku("export", "img", "--output", str(target))
        results["export_code"].append(time.monotonic() - began)
        manifest = json.loads(run(["skopeo", "inspect", "--raw", f"oci-archive:{target}"]).stdout)
        results["export_app_mb"].append(manifest["layers"][-1]["size"] / 2**20)
        target.unlink()


def median_ms(command, env, runs=21, stdin=None):
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       stdin=subprocess.DEVNULL if stdin is None else open(stdin))
        times.append((time.perf_counter() - started) * 1000)
    return times


def bench_key(bench):
    """The bench's own ssh key, let in by setup:ssh into a home of the bench's: -> (key, forced command)."""
    home = bench.work / "home"
    if not (home / ".ssh" / "authorized_keys").exists():
        (home / ".ssh").mkdir(parents=True, mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(bench.work / "key")])
        run([*PIKU, "setup:ssh", str(bench.work / "key.pub"), "--name", "bench"], env=dict(bench.env, HOME=str(home)))
    line = (home / ".ssh" / "authorized_keys").read_text().splitlines()[-1]
    forced = re.match(r'command="((?:[^"\\]|\\.)*)"', line).group(1)
    return bench.work / "key", re.sub(r"\\(.)", r"\1", forced)


def measure_startup(bench, results):
    _, forced = bench_key(bench)
    env = dict(bench.env, HOME=str(bench.work / "home"))
    for what in ("--version", "apps"):
        results[f"startup_forced_{what}"] = median_ms(["/bin/sh", "-c", forced], dict(env, SSH_ORIGINAL_COMMAND=what))
        results[f"startup_script_{what}"] = median_ms([*PIKU, what], env)
    run(["/usr/bin/python3", "-c", "import sys; sys.path.insert(0, sys.argv[1]); import piku; piku.ensure_repo('hooked')",
         str(REPO)], env=env)
    hook = bench.work / "piku" / "repos" / "hooked" / "hooks" / "pre-receive"
    results["startup_hook"] = median_ms(["/bin/sh", str(hook)], env)


WATERFALL_LABELS = [(re.compile(pattern), label) for pattern, label in [
    (r"^sshd ", "ssh: sshd's processes"), (r"^piku ssh-command", "piku ssh-command"),
    (r"^git-receive-pack", "git-receive-pack (piku's, then git's)"), (r"^piku git-hook", "the hook (piku git-hook)"),
    (r"^Deploying ", "lock taken: checkout, plan"), (r"^Python environment ready|^Building with|^Fingerprint",
                                                     "build (environment reused)"),
    (r"^Starting ", "new worker started beside"), (r"^Health check", "health check"),
    (r"^Traffic moved", "switch"), (r"^Workers:|is live at", "announce"),
    (r"^after the push returned: git moved", "(after) git moved the branch"),
    (r"^after the push returned: the old workers", "(after) old workers drained")]]


def waterfall_rows(record):
    rows = [(message, at, seconds) for message, seconds, at in record["steps"]]
    rows += [(what, at, None) for what, at in record.get("before", [])]
    rows += [(f"after the push returned: {message}", at, seconds) for message, seconds, at in record.get("after", [])]
    origin = min(at for _, at, _ in rows)
    labelled = {}
    for message, at, seconds in rows:
        label = next((label for pattern, label in WATERFALL_LABELS if pattern.search(message)), message[:40])
        labelled.setdefault(label, (at - origin, seconds))
    return labelled


def measure_waterfall(bench, results, app="fall", push=None):
    path = bench.checkout(app)
    bench.seed_cache(app)
    bench.push(path, app)
    wait_for(bench.url(app), f"Hello from {app}")
    for run_index in range(RUNS):
        marker = f"Fall{run_index}"
        bench.mark(path, marker)
        bench.commit(path, marker)
        started = (push or bench.push)(path, app)
        answered = wait_for(bench.url(app), marker) - started
        folder = bench.work / "piku" / "envs" / app / "deploys"
        newest = max(folder.glob("*.json"), key=lambda p: int(p.stem))
        deadline = time.monotonic() + 10
        while len(json.loads(newest.read_text()).get("after", [])) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        for label, (at, seconds) in waterfall_rows(json.loads(newest.read_text())).items():
            results.setdefault("waterfall", {}).setdefault(label, []).append((at, seconds))
        results.setdefault("waterfall_answered", []).append(answered)


class Sshd:
    """sshd on 127.0.0.1 for root with the bench's key (the forced command setup:ssh wrote)."""

    def __init__(self, bench):
        self.key, _ = bench_key(bench)
        folder = bench.work / "sshd"
        folder.mkdir(mode=0o700)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / "host")])
        import socket
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        (folder / "config").write_text(f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {folder / 'host'}\n"
                                       f"PidFile {folder / 'pid'}\nUsePAM no\nPasswordAuthentication no\n"
                                       "KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n"
                                       "StrictModes no\n"      # (the bench's folders are under /tmp)
                                       f"AuthorizedKeysFile {bench.work / 'home' / '.ssh' / 'authorized_keys'}\n"
                                       # a home of the bench's: root's own shell start-up files (this
                                       # machine's run pyenv init) are no part of a push
                                       f"SetEnv HOME={bench.work / 'home'} PATH={bench.env['PATH']} "
                                       f"UV_CACHE_DIR={bench.env['UV_CACHE_DIR']} "
                                       f"UV_PYTHON_INSTALL_DIR={bench.env['UV_PYTHON_INSTALL_DIR']} "
                                       "UV_PYTHON_DOWNLOADS=never UV_SYSTEM_CERTS=1\n")
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        self.process = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(folder / "config")],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)
        self.control = bench.work / "cm-%C"
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)

    def ssh(self, reuse):
        options = ["-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
                   "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
        if reuse:       # what `piku remote` writes into the checkout's core.sshCommand
            options += ["-o", "ControlMaster=auto", "-o", "ControlPersist=60", "-o", f"ControlPath={self.control}"]
        return ["ssh", *options]

    def stop(self):
        self.process.terminate()
        self.process.wait(timeout=10)


def measure_ssh(bench, results):
    sshd = Sshd(bench)
    try:
        env = {reuse: dict(bench.env, GIT_SSH_COMMAND=" ".join(sshd.ssh(reuse))) for reuse in (False, True)}
        for reuse in (False, True):
            label = "reused" if reuse else "fresh"
            results[f"ssh_apps_{label}"] = [value / 1000 for value in median_ms(
                [*sshd.ssh(reuse), "-p", str(sshd.port), "root@127.0.0.1", "apps"], bench.env, runs=RUNS * 3)]

        def push_over(reuse):
            def push(path, app):
                started = time.monotonic()
                run(["git", "push", "-q", f"ssh://root@127.0.0.1:{sshd.port}/{app}", "HEAD:main"], cwd=path,
                    env=env[reuse])
                return started
            return push
        for reuse in (False, True):
            collected = {}
            measure_waterfall(bench, collected, app=f"ssh-{'reused' if reuse else 'fresh'}", push=push_over(reuse))
            results[f"ssh_code_{'reused' if reuse else 'fresh'}"] = collected["waterfall_answered"]
            if not reuse:
                results["ssh_waterfall"] = collected["waterfall"]
    finally:
        sshd.stop()


def print_waterfall(title, waterfall):
    print(f"  {title}")
    print(f"    {'step':45s} {'start, s':>9s} {'took, s':>8s}")
    for label, values in sorted(waterfall.items(), key=lambda item: statistics.median(at for at, _ in item[1])):
        took = [seconds for _, seconds in values if seconds is not None]
        print(f"    {label:45s} {statistics.median(at for at, _ in values):9.3f} "
              f"{statistics.median(took) if took else float('nan'):8.3f}")


MEASURES = {"deploys": measure_deploys, "switch": measure_switch, "apps": measure_apps, "shapes": measure_shapes,
            "sandbox": measure_sandbox, "nginxfiles": measure_nginx_files, "startup": measure_startup,
            "waterfall": measure_waterfall, "ssh": measure_ssh, "durable": lambda bench, results: measure_durable(results),
            "node": measure_node, "export": measure_export}       # BENCH_ONLY names, in the order they run


def measure(bench):
    results = collections.defaultdict(list)
    for name, run_part in MEASURES.items():
        if not ONLY or name in ONLY:
            run_part(bench, results)
    return {name: values for name, values in results.items() if values}


WATERFALLS = ("waterfall", "ssh_waterfall")


def main():
    work = tempfile.mkdtemp(prefix="piku-bench-")
    bench = Bench(work)
    try:
        results = measure(bench)
    finally:
        bench.stop()
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in results.items() if name not in WATERFALLS}
    print(f"piku deploy benchmark, {RUNS} runs each, medians; uv {run([bench.uv, '--version']).stdout.split()[1]}")
    labels = [("cold", "cold first deploy (push -> answer), s"),
              ("code", "code-only redeploy (push -> new code answers), s"),
              ("deps", "dependency-change redeploy (push -> new code answers), s"),
              ("deps_push", "dependency-change git push alone, s"),
              ("sync", "the same uv sync on its own, s"),
              ("rollback", "rollback (command -> previous code answers), s")]
    for server in SWITCH_SERVERS:
        labels += [(f"switch_{server}", f"{server}: push -> new code answers, under load, s"),
                   (f"failed_{server}", f"{server}: failed requests during the redeploy"),
                   (f"worst_{server}", f"{server}: slowest answer during the redeploy, s"),
                   (f"requests_{server}", f"{server}: requests sent during the redeploy")]
    for size in (1, 10, 30):
        labels += [(f"apps_{size}_deploy", f"{size} apps on the host: code-only redeploy, s"),
                   (f"apps_{size}_mb_per_app", f"{size} apps on the host: memory per app (PSS), MB"),
                   (f"apps_{size}_front_mb", f"{size} apps on the host: piku's own per app (its front, PSS), MB"),
                   (f"apps_{size}_emperor_mb", f"{size} apps on the host: the emperor (PSS), MB")]
    labels += [("apps_30_restart", "30 apps: emperor restarted until all 30 answer, s")]
    labels += [("startup_forced_--version", "--version through the forced command (sh -c), ms"),
               ("startup_forced_apps", "apps through the forced command (sh -c), ms"),
               ("startup_hook", "the git hook, nothing to deploy, ms"),
               ("startup_script_--version", "python3 piku.py --version, ms"),
               ("startup_script_apps", "python3 piku.py apps, ms"),
               ("waterfall_answered", "code-only redeploy, local transport (push -> new code answers), s"),
               ("ssh_code_fresh", "code-only redeploy over ssh, a new connection, s"),
               ("ssh_code_reused", "code-only redeploy over ssh, the connection reused, s"),
               ("ssh_apps_fresh", "ssh HOST apps, a new connection, s"),
               ("ssh_apps_reused", "ssh HOST apps, the connection reused, s")]
    for shape in SHAPES:
        labels += [(f"shape_{shape}_code", f"{shape} app: code-only redeploy, s"),
                   (f"shape_{shape}_build", f"{shape} app: its build step in that push, s"),
                   (f"shape_{shape}_deps", f"{shape} app: dependency-change redeploy, s")]
    labels += [("sandbox_code_auto", "code-only redeploy, sandboxed (PIKU_SANDBOX=auto), s"),
               ("sandbox_code_off", "code-only redeploy, not sandboxed (PIKU_SANDBOX=off), s"),
               ("sandbox_start_in", "one process (/bin/true) started in a worker's view, ms"),
               ("sandbox_start_out", "the same process started alone, ms"),
               ("sandbox_vassal_mb", "memory bubblewrap adds per vassal (PSS), MB"),
               ("sandbox_cache_mb", "one app's own uv cache (flask-uwsgi), MB"),
               ("sandbox_first_empty", "first deploy, the app's uv cache empty, s"),
               ("sandbox_first_warm", "first deploy, the app's uv cache warm, s")]
    for size in NGINX_FILES_SIZES:
        labels += [(f"nginx_files_{size}_fresh", f"every vhost checked before a reload, {size} apps, no cache, ms"),
                   (f"nginx_files_{size}", "... with the vhosts' paths kept by an earlier command, ms"),
                   (f"nginx_files_{size}_again", "... the same command's second check, ms")]
    labels += [("durable_write", "one durable write (fsync, rename, folder fsync), ms"),
               ("renamed_write", "... the same write renamed without fsync, ms"),
               ("guard_start", "the process guard: start, run `true`, end, ms"),
               ("guard_rss", "the process guard's resident memory, MiB")]
    labels += [("node_code_py", "code-only redeploy, Flask (uWSGI), alternating with Express, s"),
               ("node_code_node", "code-only redeploy, Express (examples/express), s"),
               ("node_deps", "Express: dependency-change redeploy (push -> new code answers), s"),
               ("node_npm_ci", "the same npm ci --omit=dev on its own, warm cache, s")]
    labels += [("export_cold", "export, the cache empty (base built from the host's packages), s"),
               ("export_code", "export after a code-only push (base, runtime, environment reused), s"),
               ("export_mb", "the image archive (Flask on Debian's Python and uWSGI), MB"),
               ("export_app_mb", "its app layer (what a code-only release adds), MB")]
    for name, label in labels:
        if name in results:
            print(f"  {label:60s} {medians[name]:8.3f}   runs: {' '.join(f'{v:.3f}' for v in results[name])}")
    if "sandbox_code_off" in medians:
        print(f"  {'code-only redeploy, sandboxed / not':60s} {medians['sandbox_code_auto'] / medians['sandbox_code_off']:8.3f}")
    if "node_code_node" in medians:
        print(f"  {'code-only redeploy, Express / Flask':60s} {medians['node_code_node'] / medians['node_code_py']:8.3f}")
        print(f"  {'overhead over npm ci, push -> new code answers, s':60s} {medians['node_deps'] - medians['node_npm_ci']:8.3f}")
    for name, title in (("waterfall", "median waterfall, code-only redeploys, local transport (s from the first "
                                       "process of the push)"),
                        ("ssh_waterfall", "median waterfall, code-only redeploys over ssh, a new connection each "
                                          "(s from sshd's first process of the connection)")):
        if name in results:
            print_waterfall(title, results[name])
    if "deps" in medians:
        print(f"  {'overhead over uv sync, push -> new code answers, s':60s} {medians['deps'] - medians['sync']:8.3f}")
        print(f"  {'overhead over uv sync, git push alone, s':60s} {medians['deps_push'] - medians['sync']:8.3f}")
    print(json.dumps({"runs": results, "medians": medians}))


if __name__ == "__main__":
    main()
