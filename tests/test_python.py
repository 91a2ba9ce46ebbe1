"""The uv buildpack on real uv, real interpreters, real uWSGI and gunicorn."""

import os
import re
import subprocess
import time


from conftest import EXAMPLES, SYSTEM_PATH, fetch, wait_for_body

FLASK_UWSGI = EXAMPLES / "flask-uwsgi"
FLASK_GUNICORN = EXAMPLES / "flask-gunicorn"
REQUIREMENTS = EXAMPLES / "requirements"


def uv(app, toolchain, *args):
    """Run uv as the developer would, in the app's working copy."""
    env = dict(app.piku.env)
    result = subprocess.run([f"{toolchain.root}/bin/uv", *args], cwd=app.path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result


def served_python(piku, app):
    return fetch(piku.url(app, "/python"))[1].strip()


def venvs(piku, app):
    return sorted(p.name for p in (piku.root / "envs" / app).glob("python-*"))


def test_first_and_code_only_deploys(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(FLASK_UWSGI, "shop")
    first = app.push()
    assert "Found uv.lock, pyproject.toml: building with the python-uv buildpack" in first.output
    assert "-----> Python 3.11 (from uWSGI, which embeds Python 3.11" in first.output
    assert "Serving wsgi with uwsgi" in first.output
    assert "uv sync --no-install-local --python /usr/bin/python3.11 --locked --compile-bytecode --no-default-groups" in first.output
    body = wait_for_body(piku.url("shop"), "Hello from shop on Python 3.11")
    assert "with Flask 3." in body
    assert fetch(piku.url("shop", "/import/pytest"))[1] == "no\n"      # dev group left out
    assert piku.workers("shop") == ["wsgi.1"]
    built = venvs(piku, "shop")
    assert len(built) == 1

    app.write("wsgi.py", (FLASK_UWSGI / "wsgi.py").read_text().replace("Hello from", "Howdy from"))
    app.commit("code only")
    started = time.monotonic()
    second = app.push()
    wait_for_body(piku.url("shop"), "Howdy from shop on Python 3.11")
    elapsed = time.monotonic() - started
    assert "uv sync skipped" in second.output
    assert "Running uv sync" not in second.output
    ready = float(re.search(r"Python environment ready in ([0-9.]+) s", second.output).group(1))
    assert ready < 1.0, f"the skipped build step took {ready} s"
    assert venvs(piku, "shop") == built
    # not a timing target (that is bench/), just proof nothing slow happened
    assert elapsed < 15, elapsed


def test_dependency_change_builds_a_new_environment_beside_the_old(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(FLASK_UWSGI, "shop")
    app.push()
    wait_for_body(piku.url("shop", "/import/six"), "no")
    old = venvs(piku, "shop")
    uv(app, toolchain, "add", "--no-sync", "six")
    app.commit("add six")
    result = app.push()
    assert "Running uv sync" in result.output and "+ six==" in result.output
    wait_for_body(piku.url("shop", "/import/six"), "yes")
    new = venvs(piku, "shop")
    assert len(new) == 2 and set(old) < set(new), "the previous environment is kept beside the new one"
    live = piku.live_env("shop")["VIRTUAL_ENV"]
    assert live.endswith(next(iter(set(new) - set(old))))


def test_python_version_priority(piku, emperor, make_app, toolchain):
    toolchain.require("3.10", "3.11", "3.12", "3.13")
    app = make_app(FLASK_UWSGI, "pick")
    assert "Python 3.11 (from uWSGI, which embeds Python 3.11" in app.push().output
    wait_for_body(piku.url("pick", "/python"), "3.11")

    app.write(".python-version", "3.12\n")
    app.commit("pin 3.12")
    assert "-----> Python 3.12 (from .python-version)" in app.push().output
    wait_for_body(piku.url("pick", "/python"), "3.12")

    app.write("ENV", "PYTHON_VERSION=3.13\n")
    app.commit("ENV asks for 3.13")
    assert "-----> Python 3.13 (from PYTHON_VERSION in the app's ENV)" in app.push().output
    wait_for_body(piku.url("pick", "/python"), "3.13")

    result = piku("config:set", "pick", "PYTHON_VERSION=3.10")
    assert "-----> Python 3.10 (from config:set PYTHON_VERSION)" in result.stdout
    wait_for_body(piku.url("pick", "/python"), "3.10")
    cfg = (piku.root / "envs" / "pick").glob("python-*/pyvenv.cfg")
    assert any("version_info = 3.10." in path.read_text() for path in cfg), "a fresh environment on 3.10"

    piku("config:unset", "pick", "PYTHON_VERSION")
    wait_for_body(piku.url("pick", "/python"), "3.13")


def test_uv_default_when_nothing_is_requested(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(FLASK_UWSGI, "plainweb")
    app.write("Procfile", "web: python -m flask --app wsgi run --host $BIND_ADDRESS --port $PORT\n")
    app.commit("a web worker: uWSGI's Python does not matter")
    result = app.push()
    assert "Python: no version requested, using uv's default" in result.output
    expected = subprocess.run([f"{toolchain.root}/bin/uv", "python", "find", "--show-version"], cwd=app.path,
                              env=dict(piku.env, UV_PYTHON_PREFERENCE="managed"),
                              capture_output=True, text=True).stdout.strip()
    wait_for_body(piku.url("plainweb", "/python"), ".".join(expected.split(".")[:2]))


def test_requires_python_that_excludes_uwsgi_python_goes_to_gunicorn(piku, emperor, make_app, toolchain):
    toolchain.require("3.11", "3.12")
    app = make_app(FLASK_UWSGI, "modern")
    app.write("pyproject.toml", (FLASK_UWSGI / "pyproject.toml").read_text().replace(">=3.10", ">=3.12"))
    uv(app, toolchain, "lock")
    app.commit("needs 3.12+")
    result = app.push()
    assert "Python: no version requested, using uv's default" in result.output
    assert "Serving wsgi with gunicorn" in result.output
    wait_for_body(piku.url("modern", "/python"), "3.1")
    assert int(served_python(piku, "modern").split(".")[1]) >= 12


def test_312_wsgi_app_is_served_by_gunicorn_and_wsgi_server_uwsgi_refuses(piku, emperor, make_app, toolchain):
    toolchain.require("3.11", "3.12")
    app = make_app(FLASK_GUNICORN, "modern")
    result = app.push()
    assert "-----> Python 3.12 (from .python-version)" in result.output
    assert "Serving wsgi with gunicorn: the app runs on Python 3.12" in result.output
    assert "but uWSGI embeds Python 3.11" in result.output
    assert "Adding gunicorn to the environment (the app does not depend on it)" in result.output
    body = wait_for_body(piku.url("modern"), "Hello from modern on Python 3.12")
    conf = next((piku.root / "sandbox").glob("modern@g*.wsgi.1.gunicorn.py")).read_text()
    assert "bind = ['unix:" in conf
    wait_for_body(piku.url("modern"), "Hello from modern")
    log = (piku.root / "logs" / "modern" / "wsgi.1.log").read_text()
    assert "Booting worker" in log and '"GET / HTTP/1.1" 200' in log, "gunicorn logs into the instance's log"

    piku("config:set", "modern", "GUNICORN_WORKERS=3")
    assert gunicorn_workers(piku, "modern") == 3

    result = piku("config:set", "modern", "WSGI_SERVER=uwsgi", check=False)
    assert result.returncode == 1
    assert "WSGI_SERVER=uwsgi, but the app runs on Python 3.12" in result.stderr
    assert "config:set modern PYTHON_VERSION=3.11" in result.stderr
    assert "config:set modern WSGI_SERVER=gunicorn" in result.stderr
    assert "Traceback" not in result.stderr
    assert fetch(piku.url("modern"))[1] == body
    assert "WSGI_SERVER" not in piku("config", "modern").stdout

    app.write("ENV", "WSGI_SERVER=uwsgi\n")
    app.commit("insist on uWSGI")
    assert_rejected_and_still_serving(piku, "modern", piku.url("modern"), body, app.push(check=False),
                                      "WSGI_SERVER=uwsgi, but the app runs on Python 3.12",
                                      "config:set modern PYTHON_VERSION=3.11")

    piku("config:set", "modern", "PYTHON_VERSION=3.11", "WSGI_SERVER=uwsgi")
    wait_for_body(piku.url("modern", "/python"), "3.11")
    vassal = next((piku.root / "uwsgi-enabled").glob("modern@g*.wsgi.1.ini"))
    assert "attach-daemon" not in vassal.read_text()


def gunicorn_workers(piku, app, wanted=3, timeout=30):
    """Worker processes of the gunicorn master under the app's wsgi.1 vassal, once it settles."""
    import psutil
    deadline = time.monotonic() + timeout
    count = None
    while time.monotonic() < deadline:
        try:
            gen = next((piku.root / "uwsgi-enabled").glob(f"{app}@g*.wsgi.1.ini")).name.split("@")[1].split(".")[0]
            vassal = psutil.Process(piku.master_pid(app, f"{gen}.wsgi.1"))
            masters = [p for p in vassal.children() if "gunicorn" in " ".join(p.cmdline())]
            count = sum(len(master.children()) for master in masters)
        except (psutil.Error, ValueError, FileNotFoundError, StopIteration):
            count = None
        if count == wanted:
            return count
        time.sleep(0.3)
    return count


def assert_rejected_and_still_serving(piku, app, url, body, result, *messages):
    assert result.returncode != 0
    assert "pre-receive hook declined" in result.output
    for message in messages:
        assert message in result.output, message
    assert "Traceback" not in result.output
    assert fetch(url)[1] == body


def test_bad_builds_are_rejected_and_the_live_release_keeps_serving(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(FLASK_UWSGI, "safe")
    app.push()
    url = piku.url("safe")
    body = wait_for_body(url, "Hello from safe")
    good = app.git("rev-parse", "HEAD").stdout.strip()

    app.write("pyproject.toml", (FLASK_UWSGI / "pyproject.toml").read_text().replace(
        '"flask>=3.0"', '"flask>=3.0", "six"'))
    app.commit("forgot to lock")
    assert_rejected_and_still_serving(piku, "safe", url, body, app.push(check=False),
                                      "uv.lock is out of date with pyproject.toml",
                                      "Run 'uv lock', commit uv.lock, and push again.")

    app.git("reset", "--hard", good)
    app.write("pyproject.toml", (FLASK_UWSGI / "pyproject.toml").read_text().replace(
        '"flask>=3.0"', '"flask>=3.0", "piku-no-such-package-zzz"'))
    (app.path / "uv.lock").unlink()
    app.commit("a package that does not exist, no lock")
    assert_rejected_and_still_serving(piku, "safe", url, body, app.push(check=False),
                                      "no uv.lock", "piku-no-such-package-zzz",
                                      "the dependencies cannot be resolved")

    app.git("reset", "--hard", good)
    app.write(".python-version", "3.9\n")
    app.commit("a Python this server does not have")
    result = app.push(check=False)
    assert_rejected_and_still_serving(piku, "safe", url, body, result,
                                      "Python 3.9 is not available on this server; uv can find: ",
                                      "PYTHON_VERSION=X.Y")
    assert "3.11.2" in result.output

    app.git("reset", "--hard", good)
    app.write(".python-version", "three point twelve\n")
    app.commit("nonsense")
    assert_rejected_and_still_serving(piku, "safe", url, body, app.push(check=False),
                                      "is not a Python version uv understands")
    bad = piku("config:set", "safe", "PYTHON_VERSION=latest", check=False)
    assert bad.returncode == 1 and "is not a Python version uv understands" in bad.stderr
    server = app.git("--git-dir", str(piku.root / "repos" / "safe"), "rev-parse", "main").stdout.strip()
    assert server == good


def test_a_half_built_environment_is_never_used(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(FLASK_UWSGI, "shop")
    app.push()
    wait_for_body(piku.url("shop"), "Hello from shop")
    venv = piku.live_env("shop")["VIRTUAL_ENV"]
    (piku.root / "envs" / "shop" / venv.rsplit("/", 1)[1] / ".piku-fingerprint").unlink()
    app.commit("redeploy")
    result = app.push()
    assert "Running uv sync" in result.output, "an environment without its marker is rebuilt"
    wait_for_body(piku.url("shop"), "Hello from shop")


def test_requirements_txt_app_with_a_hand_written_gunicorn_line(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(REQUIREMENTS, "reqs")
    result = app.push()
    assert "Found requirements.txt: building with the python-requirements buildpack" in result.output
    assert "Installing requirements.txt" in result.output
    assert re.search(r"\+ gunicorn==", result.output), "uv pip install installed gunicorn from requirements.txt"
    assert "uv not found" not in result.output
    wait_for_body(piku.url("reqs"), "Hello from requirements.txt on Python 3.")
    app.commit("code only")
    assert "uv pip install skipped" in app.push().output


def test_uv_missing_is_a_clear_error(piku, make_app, toolchain):
    piku.env["PATH"] = "/usr/bin:/bin"
    app = make_app(FLASK_UWSGI, "nouv")
    result = app.push(check=False)
    assert result.returncode != 0
    assert "uv is not installed for the piku user" in result.output
    assert "pipx install uv" in result.output


def test_requirements_txt_without_uv_uses_venv_and_pip(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    piku.env["PATH"] = "/usr/bin:/bin"          # no uv here, nor in ~/.local/bin
    app = make_app(REQUIREMENTS, "pipapp")
    result = app.push()
    assert "uv not found: using venv and pip" in result.output
    assert "Successfully installed" in result.output
    wait_for_body(piku.url("pipapp"), "Hello from requirements.txt on Python 3.11")


def test_requires_python_conflict_is_rejected_with_the_fix(piku, emperor, make_app, toolchain):
    toolchain.require("3.11", "3.12")
    app = make_app(FLASK_UWSGI, "strict")
    app.push()
    url = piku.url("strict")
    body = wait_for_body(url, "Hello from strict")
    app.write("pyproject.toml", (FLASK_UWSGI / "pyproject.toml").read_text().replace(">=3.10", ">=3.12"))
    uv(app, toolchain, "lock")
    app.write(".python-version", "3.11\n")
    app.commit("asks for 3.11 but requires 3.12")
    assert_rejected_and_still_serving(piku, "strict", url, body, app.push(check=False),
                                      "incompatible with the project's Python requirement",
                                      "the Python version conflicts with requires-python",
                                      "Pick a version requires-python allows")


UV_RUN_SERVER = '''\
"""`web: uv run python serve.py`: the Flask app on wsgiref, saying which environment runs it."""
import os
import sys
from wsgiref.simple_server import make_server

from wsgi import app as flask_app


def app(environ, start_response):
    if environ["PATH_INFO"] == "/prefix":
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [sys.prefix.encode()]
    return flask_app(environ, start_response)


make_server(os.environ["BIND_ADDRESS"], int(os.environ["PORT"]), app).serve_forever()
'''


def test_uv_run_in_a_procfile_uses_the_release_environment_without_sync_or_network(
        piku, emperor, make_app, toolchain, tmp_path):
    """`web: uv run ...` as uv's docs write it, on a host whose uv cache is empty when workers
    start and whose index cannot be reached: no sync, no .venv in the release, no download."""
    toolchain.require("3.11")
    piku.env["UV_CACHE_DIR"] = str(tmp_path / "empty-uv-cache")
    home = tmp_path / "home"            # as `install` leaves it: uv in ~/.local/bin, which is not on PATH
    (home / ".local" / "bin").mkdir(parents=True)
    (home / ".local" / "bin" / "uv").symlink_to(toolchain.root / "bin" / "uv")
    piku.env.update(HOME=str(home), PATH=SYSTEM_PATH)
    uv_config = tmp_path / "app-uv-config"
    app = make_app(FLASK_UWSGI, "ur")
    app.write("serve.py", UV_RUN_SERVER)
    app.write("Procfile", "web: uv run python serve.py\n"
                          "release: uv run python -c \"import flask, sys; print('release runs in', sys.prefix)\"\n")
    app.write("ENV", f"XDG_CONFIG_HOME={uv_config}\n")     # where uv run in the app's processes reads uv.toml
    app.commit("uv run in the Procfile")
    first = app.push()
    venv = piku.live_env("ur")["VIRTUAL_ENV"]
    assert f"release runs in {venv}" in first.output, first.output
    assert wait_for_body(piku.url("ur", "/prefix"), venv) == venv

    # from now on uv finds an empty cache and an index nobody answers (the dev group, pytest, is
    # not in the environment: a sync would have to download it)
    (uv_config / "uv").mkdir(parents=True)
    (uv_config / "uv" / "uv.toml").write_text(f'cache-dir = "{tmp_path / "start-cache"}"\n'
                                              'index-url = "http://127.0.0.1:9/simple"\n')
    piku("restart", "ur")
    assert wait_for_body(piku.url("ur", "/prefix"), venv) == venv
    app.write("wsgi.py", (app.path / "wsgi.py").read_text().replace("Hello from", "Howdy from"))
    app.commit("code only")
    second = app.push()
    assert f"release runs in {venv}" in second.output and "uv sync skipped" in second.output, second.output
    wait_for_body(piku.url("ur"), "Howdy from ur")
    ran = piku("run", "ur", "--", "uv", "run", "python", "-c", "import flask, sys; print(sys.prefix)")
    assert ran.stdout.strip() == venv and "will be ignored" not in ran.stderr, ran.stdout + ran.stderr
    assert fetch(piku.url("ur", "/import/pytest"))[1] == "no\n"
    for record in piku.releases("ur"):
        assert not os.path.lexists(os.path.join(record["root"], ".venv")), record["root"]
    live = piku.live_env("ur")
    assert (live["UV_PROJECT_ENVIRONMENT"], live["UV_NO_SYNC"]) == (venv, "1")
