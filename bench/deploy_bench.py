#!/usr/bin/env python3
"""Deploy timings of the uv buildpack on examples/flask-uwsgi, with a warm uv cache.

Measures, each RUNS times (median reported):
  cold      first deploy of a new app: git push until the app answers over HTTP
  code      code-only redeploy: push until the new code answers (uv sync skipped)
  deps      dependency-change redeploy: push until the new code answers, with a new
            package added (a new environment is built beside the live one)
  sync      the same `uv sync` piku runs for `deps`, on its own, into a fresh environment
and the ratio/overhead deps - sync. Needs uv on PATH, uWSGI with its python3 plugin, and
Debian's python3.11 (the Python uWSGI embeds). Run: make bench  (or python3 bench/deploy_bench.py)
"""

import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PIKU = ["/usr/bin/python3", str(REPO / "piku.py")]
RUNS = int(os.environ.get("BENCH_RUNS", "5"))
EXTRA_PACKAGES = ["six", "idna", "certifi", "packaging", "pyparsing", "attrs", "toml", "zipp", "tomli", "wheel"]
SYNC_ARGS = ["sync", "--no-default-groups", "--no-install-project", "--python", "/usr/bin/python3.11", "--locked"]


def run(args, cwd=None, env=None, check=True):
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
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
        self.env = {key: value for key, value in os.environ.items() if not key.startswith(("GIT_", "PIKU_"))}
        self.env.update(PIKU_ROOT=str(self.work / "piku"), PATH=f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
                        UV_PYTHON_DOWNLOADS="never", UV_CACHE_DIR=str(self.work / "uv-cache"), UV_SYSTEM_CERTS="1",
                        GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@example.com",
                        GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="b@example.com")
        run([*PIKU, "setup"], env=self.env)
        self.emperor = subprocess.Popen(["uwsgi", "--ini", str(self.work / "piku" / "uwsgi" / "uwsgi.ini")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True)

    def stop(self):
        self.emperor.send_signal(signal.SIGTERM)
        try:
            self.emperor.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.emperor.pid, signal.SIGKILL)

    def checkout(self, name):
        path = self.work / "src" / name
        shutil.copytree(REPO / "examples" / "flask-uwsgi", path)
        run(["git", "init", "-q", "-b", "main"], cwd=path, env=self.env)
        self.commit(path, "first")
        return path

    def commit(self, path, message):
        run(["git", "add", "-A"], cwd=path, env=self.env)
        run(["git", "commit", "-q", "--allow-empty", "-m", message], cwd=path, env=self.env)

    def push(self, path, app):
        started = time.monotonic()
        run(["git", "push", "-q", "--receive-pack", " ".join(PIKU + ["git-receive-pack"]), app, "HEAD:main"],
            cwd=path, env=self.env)
        return started

    def url(self, app, path="/"):
        live = (self.work / "piku" / "envs" / app / "LIVE_ENV").read_text()
        port = next(line.split("=", 1)[1].strip("'") for line in live.splitlines() if line.startswith("PORT="))
        return f"http://127.0.0.1:{port}{path}"

    def mark(self, path, marker):
        source = (REPO / "examples" / "flask-uwsgi" / "wsgi.py").read_text()
        (path / "wsgi.py").write_text(source.replace("Hello from", f"{marker} from"))

    def with_package(self, path, count):
        """pyproject.toml + uv.lock with the first `count` extra packages."""
        deps = ", ".join(f'"{name}"' for name in ["flask>=3.0", *EXTRA_PACKAGES[:count]])
        text = (REPO / "examples" / "flask-uwsgi" / "pyproject.toml").read_text()
        (path / "pyproject.toml").write_text(text.replace('["flask>=3.0"]', f"[{deps}]"))
        run([self.uv, "lock", "-q"], cwd=path, env=self.env)


def measure(bench):
    results = {"cold": [], "code": [], "deps": [], "deps_push": [], "sync": []}
    # warm the uv cache with every package the dependency runs will need
    warm = bench.checkout("warm")
    bench.with_package(warm, len(EXTRA_PACKAGES))
    run([bench.uv, *SYNC_ARGS], cwd=warm, env=dict(bench.env, UV_PROJECT_ENVIRONMENT=str(bench.work / "warm-env")))

    for run_index in range(RUNS):
        app = f"cold{run_index}"
        path = bench.checkout(app)
        started = bench.push(path, app)
        results["cold"].append(wait_for(bench.url(app), f"Hello from {app}") - started)

    path = bench.checkout("app")
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
    return results


def main():
    work = tempfile.mkdtemp(prefix="piku-bench-")
    bench = Bench(work)
    try:
        results = measure(bench)
    finally:
        bench.stop()
        shutil.rmtree(work, ignore_errors=True)
    medians = {name: statistics.median(values) for name, values in results.items()}
    print(f"piku deploy benchmark, {RUNS} runs each, medians (seconds); uv {run([bench.uv, '--version']).stdout.split()[1]}")
    for name, label in (("cold", "cold first deploy (push -> answer)"),
                        ("code", "code-only redeploy (push -> new code answers)"),
                        ("deps", "dependency-change redeploy (push -> new code answers)"),
                        ("deps_push", "dependency-change git push alone (build + activate)"),
                        ("sync", "the same uv sync on its own")):
        print(f"  {label:55s} {medians[name]:6.2f}   runs: {' '.join(f'{v:.2f}' for v in results[name])}")
    print(f"  {'overhead over uv sync, push -> new code answers':55s} {medians['deps'] - medians['sync']:6.2f}")
    print(f"  {'overhead over uv sync, git push alone':55s} {medians['deps_push'] - medians['sync']:6.2f}")
    print(json.dumps({"runs": results, "medians": medians}))


if __name__ == "__main__":
    main()
