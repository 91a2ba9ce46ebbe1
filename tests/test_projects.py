"""Python apps as people write them: packaged uv projects and workspaces, Poetry and Pipenv
locks, ASGI, Django -- each pushed for real and asked over HTTP."""


import json
import os
import re
import shutil
import subprocess

from conftest import EXAMPLES, TEST_APPS, fetch, wait_for_body

UV_PACKAGE = EXAMPLES / "uv-package"


def venvs(piku, app):
    return sorted(p.name for p in (piku.root / "envs" / app).glob("python-*"))


def push_is_refused(app, url, lines, still):
    """Commit and push; the push must fail with each of lines, and url must still answer still."""
    app.commit("a change piku must refuse")
    result = app.push(check=False)
    assert result.returncode != 0, result.output
    for line in lines:
        assert line in result.output
    assert still in fetch(url)[1]
    return result


def test_packaged_app_runs_its_console_script_and_its_module_and_follows_each_release(
        piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(UV_PACKAGE, "pkg")
    first = app.push()
    assert "Found uv.lock, pyproject.toml: building with the python-uv buildpack" in first.output
    assert "--no-install-local" in first.output
    assert "Installing . into this release" in first.output
    wait_for_body(piku.url("pkg"), "Hello from pkg (hello-pkg 0.1.0)")
    built = venvs(piku, "pkg")

    app.write("src/hello_pkg/greeting.py", 'GREETING = "Howdy"\n')
    app.commit("code only")
    second = app.push()
    assert "uv sync skipped" in second.output and "Running uv sync" not in second.output
    wait_for_body(piku.url("pkg"), "Howdy from pkg")
    assert venvs(piku, "pkg") == built, "a code-only push builds no environment"

    uv_add(app, toolchain, "six")
    rebuilt = app.push()
    assert "Running uv sync" in rebuilt.output and "+ six==" in rebuilt.output
    assert "Installing . into this release" in rebuilt.output
    wait_for_body(piku.url("pkg"), "Howdy from pkg")
    assert len(venvs(piku, "pkg")) == 2

    app.write("Procfile", "wsgi: hello_pkg.wsgi:app\n")
    app.commit("served by uWSGI, as a module")
    third = app.push()
    assert "Serving wsgi with uwsgi" in third.output
    wait_for_body(piku.url("pkg"), "Howdy from pkg")
    assert piku.workers("pkg") == ["wsgi.1"]

    piku("rollback", "pkg", "v1")       # no build: v1's environment and its own installed code
    wait_for_body(piku.url("pkg"), "Hello from pkg (hello-pkg 0.1.0)")
    assert piku.workers("pkg") == ["web.1"]


def test_uv_workspace_deploys_the_member_named_by_uv_package(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(TEST_APPS / "uv-workspace", "ws")
    first = app.push()
    assert "--package api" in first.output
    assert "Installing packages/api, packages/lib into this release" in first.output
    wait_for_body(piku.url("ws"), "Hello from the lib member via api (six 1.16.0)")

    app.write("packages/lib/src/lib/__init__.py", 'def greeting():\n    return "Howdy from lib"\n')
    app.commit("a member's code only")
    second = app.push()
    assert "uv sync skipped" in second.output
    wait_for_body(piku.url("ws"), "Howdy from lib via api")

    refused = piku("config:set", "ws", "UV_PACKAGE=nosuch", check=False)
    assert refused.returncode != 0
    assert "UV_PACKAGE='nosuch' is not a member of this uv workspace (members: api, lib)" in refused.stderr
    assert "Howdy from lib" in fetch(piku.url("ws"))[1]

    app.write("ENV", "")
    push_is_refused(app, piku.url("ws"), ["a uv workspace without a root project",
                                          "config:set ws UV_PACKAGE=NAME (members: api, lib)"], "Howdy from lib")


def test_a_member_whose_pyproject_changed_without_uv_lock_is_refused(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(TEST_APPS / "uv-workspace", "ws")
    app.push()
    wait_for_body(piku.url("ws"), "Hello from the lib member")
    member = (app.path / "packages/lib/pyproject.toml").read_text()
    app.write("packages/lib/pyproject.toml", member.replace("dependencies = []", 'dependencies = ["idna"]'))
    push_is_refused(app, piku.url("ws"), ["uv.lock is out of date with pyproject.toml",
                                          "Run 'uv lock', commit uv.lock, and push again."], "Hello from the lib member")


def test_poetry_app_gets_exactly_its_locked_main_dependencies(piku, emperor, make_app, toolchain, tmp_path):
    toolchain.require("3.11", tools=["poetry"])
    toolchain.install_tools(piku, tmp_path / "piku-tools", "poetry")       # the host's own Poetry is preferred
    app = make_app(EXAMPLES / "poetry", "po")
    first = app.push()
    assert "Found poetry.lock, pyproject.toml: building with the python-poetry buildpack" in first.output
    assert f"Exporting the main dependencies of poetry.lock with poetry at {tmp_path}/piku-tools/poetry" \
        in first.output and "uv tool run" not in first.output
    wait_for_body(piku.url("po"), "with Flask 3.0.3")           # ^3.0 allows newer; the lock says 3.0.3
    assert fetch(piku.url("po", "/import/pytest"))[1] == "no\n"  # the dev group is left out
    built = venvs(piku, "po")

    source = (app.path / "app.py").read_text()
    app.write("app.py", source.replace("Hello from", "Howdy from"))
    app.commit("code only")
    second = app.push()
    assert "poetry and uv skipped" in second.output and "Exporting" not in second.output
    wait_for_body(piku.url("po"), "Howdy from po")
    assert venvs(piku, "po") == built

    pyproject = (app.path / "pyproject.toml").read_text()
    app.write("pyproject.toml", pyproject.replace('flask = "^3.0"', 'flask = "^3.0"\nsix = "*"'))
    push_is_refused(app, piku.url("po"), ["poetry.lock is out of date with pyproject.toml; nothing was changed",
                                          "Run 'poetry lock', commit poetry.lock, and push again."], "Howdy from po")

    app.write("pyproject.toml", pyproject)
    poetry = subprocess.run([toolchain.tools["poetry"], "add", "--lock", "--no-interaction", "six==1.16.0"],
                            cwd=app.path, capture_output=True, text=True, timeout=300)
    assert poetry.returncode == 0, poetry.stdout + poetry.stderr
    app.commit("six added with poetry add --lock")
    rebuilt = app.push()
    assert "Exporting the main dependencies" in rebuilt.output and "+ six==1.16.0" in rebuilt.output
    wait_for_body(piku.url("po", "/import/six"), "yes")
    assert "with Flask 3.0.3" in fetch(piku.url("po"))[1]


def test_poetry_2_project_and_pipenv_app_install_their_locks_exactly(piku, emperor, make_app, toolchain, tmp_path):
    """A fresh host: the piku user has no Poetry, no Pipenv and an empty uv cache."""
    toolchain.require("3.11")
    piku.env["UV_CACHE_DIR"] = str(tmp_path / "empty-uv-cache")
    assert not any(piku_user_has(piku, tool) for tool in ("poetry", "pipenv"))
    for source, name, tool, pinned in ((TEST_APPS / "poetry-project", "p2", "poetry",
                                        "poetry==2.5.1 and poetry-plugin-export==1.10.1"),
                                       (TEST_APPS / "pipenv-app", "pe", "pipenv", "pipenv==2026.10.3")):
        app = make_app(source, name)
        first = app.push()
        assert f"building with the python-{tool} buildpack" in first.output
        assert f"Fetching {pinned} into uv's cache (no {tool} is installed for the piku user)" in first.output
        assert f"with {pinned} (uv tool run: no {tool} is installed for the piku user)" in first.output, first.output
        wait_for_body(piku.url(name), "six 1.15.0 without iniconfig")    # newer six exists; the lock wins
    assert "Python 3.11 (from Pipfile.lock [requires])" in first.output

    pipfile = (app.path / "Pipfile").read_text()
    app.write("Pipfile", pipfile.replace('six = ">=1.15"', 'six = ">=1.15"\nidna = "*"'))
    refused = push_is_refused(app, piku.url("pe"), ["Pipfile.lock is out of date with Pipfile; nothing was changed",
                                                    "Run 'pipenv lock', commit Pipfile.lock, and push again."],
                              "six 1.15.0 without iniconfig")
    assert "Fetching" not in refused.output, "the pinned Pipenv comes from uv's cache once fetched"
    # an app whose uv keeps no cache (UV_NO_CACHE) gets the pinned Poetry fetched on each build
    rebuilt = piku("config:set", "p2", "UV_NO_CACHE=1")
    assert "Fetching poetry==2.5.1 and poetry-plugin-export==1.10.1" in rebuilt.stdout, rebuilt.stdout + rebuilt.stderr
    wait_for_body(piku.url("p2"), "six 1.15.0 without iniconfig")


def piku_user_has(piku, tool):
    return shutil.which(tool, path=piku.env["PATH"]) or os.path.exists(os.path.expanduser(f"~/.local/bin/{tool}"))


def uv_add(app, toolchain, *packages):
    """The developer adds a dependency: uv updates pyproject.toml and uv.lock."""
    result = subprocess.run([f"{toolchain.root}/bin/uv", "add", "--no-sync", *packages], cwd=app.path,
                            env=app.piku.env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    app.commit(f"add {' '.join(packages)}")


def test_fastapi_app_is_served_as_asgi_with_the_servers_it_lacks(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "fastapi", "fa")
    first = app.push()
    assert "Adding gunicorn and uvicorn-worker to the environment (the app does not depend on them" in first.output
    assert json.loads(wait_for_body(piku.url("fa", "/items/21"), "double")) == {"item_id": 21, "double": 42}
    assert json.loads(fetch(piku.url("fa"))[1])["message"] == "Hello from fa"
    assert piku.workers("fa") == ["asgi.1"]
    built = venvs(piku, "fa")

    app.write("main.py", (app.path / "main.py").read_text().replace("Hello from", "Howdy from"))
    app.commit("code only")
    second = app.push()
    assert "uv sync skipped" in second.output and "Adding gunicorn" not in second.output
    wait_for_body(piku.url("fa"), "Howdy from fa")
    assert venvs(piku, "fa") == built

    uv_add(app, toolchain, "uvicorn-worker")      # now the app pins its own servers
    third = app.push()
    assert "Running uv sync" in third.output and "Adding gunicorn" not in third.output
    wait_for_body(piku.url("fa"), "Howdy from fa")
    assert len(venvs(piku, "fa")) == 2

    piku("config:set", "fa", "GUNICORN_WORKERS=3")
    config = next((piku.root / "sandbox").glob("fa@g*.asgi.1.gunicorn.py")).read_text()
    assert "workers = 3" in config and "UvicornWorker" in config
    assert json.loads(fetch(piku.url("fa", "/items/2"))[1])["double"] == 4


def test_a_hand_written_uvicorn_web_line_keeps_working(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "fastapi", "uvi")
    uv_add(app, toolchain, "uvicorn")
    app.write("Procfile", "web: uvicorn main:app --host 127.0.0.1 --port $PORT\n")
    app.commit("web: uvicorn")
    pushed = app.push()
    assert "Adding gunicorn" not in pushed.output
    assert json.loads(wait_for_body(piku.url("uvi"), "Hello"))["message"] == "Hello from uvi"


def test_django_collects_static_files_and_migrates_in_data_root(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "django", "dj")
    first = app.push()
    assert "Django: running manage.py collectstatic --noinput" in first.output
    assert "static file copied to" in first.output or "static files copied to" in first.output
    assert "Running release: python manage.py migrate --noinput" in first.output
    database = piku.root / "data" / "dj" / "db.sqlite3"
    assert wait_for_body(piku.url("dj"), "Hello from Django") == f"Hello from Django (from {database})\n"
    assert database.is_file()
    status, css = fetch(piku.url("dj", "/static/hello/site.css"))
    assert status == 200 and "font-family" in css
    assert fetch(piku.url("dj", "/static/../manage.py"))[0] == 404

    app.write("hello/static/hello/site.css", "body { color: green; }\n")
    app.commit("a static file changed")
    second = app.push()
    assert "uv sync skipped" in second.output and "collectstatic" in second.output
    wait_for_body(piku.url("dj", "/static/hello/site.css"), "color: green")

    uv_add(app, toolchain, "six")
    rebuilt = app.push()
    assert "Running uv sync" in rebuilt.output and "collectstatic" in rebuilt.output
    assert "Hello from Django" in wait_for_body(piku.url("dj"), "Hello from Django")
    assert len(venvs(piku, "dj")) == 2

    skipped = piku("config:set", "dj", "DISABLE_COLLECTSTATIC=1")
    assert "DISABLE_COLLECTSTATIC is set: manage.py collectstatic skipped" in skipped.stdout
    assert fetch(piku.url("dj", "/static/hello/site.css"))[0] == 404       # nothing collected this time
    assert "Hello from Django" in fetch(piku.url("dj"))[1]


def test_private_index_credentials_stay_out_of_output_and_fingerprints(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "flask-uwsgi", "sec")
    app.push()
    wait_for_body(piku.url("sec"), "Hello from sec")
    built = venvs(piku, "sec")
    username, password = "corp-user-7731", "s3cret-pa55word-9918"
    changed = piku("config:set", "sec", f"UV_INDEX_CORP_USERNAME={username}", f"UV_INDEX_CORP_PASSWORD={password}")
    rotated = piku("config:set", "sec", "UV_INDEX_CORP_PASSWORD=another-pa55word-4417")
    for result in (changed, rotated):
        assert "uv sync skipped" in result.stdout, "changing credentials only rebuilds nothing"
    assert venvs(piku, "sec") == built
    shown = piku("config", "sec").stdout + piku("config:live", "sec").stdout + piku("releases", "sec").stdout
    assert "UV_INDEX_CORP_PASSWORD=****\n" in shown and "UV_INDEX_CORP_USERNAME=****\n" in shown
    everything = shown + changed.stdout + changed.stderr + rotated.stdout + rotated.stderr
    for secret in (username, password, "another-pa55word-4417"):
        assert secret not in everything
        for marker in (piku.root / "envs" / "sec").glob("python-*/.piku-fingerprint"):
            assert secret not in marker.read_text()
    assert piku("config:get", "sec", "UV_INDEX_CORP_PASSWORD").stdout == "another-pa55word-4417\n"

    moved = piku("config:set", "sec", "UV_INDEX_URL=https://pypi.org/simple")
    assert "Running uv sync" in moved.stdout, "a different index URL is a different environment"


def test_pyproject_without_dependencies_in_any_known_form_is_refused(piku, emperor, make_app, toolchain, tmp_path):
    toolchain.require("3.11")
    source = tmp_path / "tool-config-only"
    source.mkdir()
    (source / "pyproject.toml").write_text("[tool.black]\nline-length = 100\n")
    (source / "app.py").write_text("print('hi')\n")
    (source / "Procfile").write_text("worker: python app.py\n")
    app = make_app(source, "nodeps")
    result = app.push(check=False)
    assert result.returncode != 0
    assert "pyproject.toml names no dependencies in any form piku knows" in result.output
    assert "[project] table with 'dependencies = [...]'" in result.output
    assert "Traceback" not in result.output
    assert not list((piku.root / "envs" / "nodeps").glob("python-*")), "no environment was built"


def test_required_uv_version_the_host_lacks_is_a_clear_error(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "flask-uwsgi", "needsuv")
    pyproject = (app.path / "pyproject.toml").read_text()
    app.write("pyproject.toml", pyproject + '\n[tool.uv]\nrequired-version = ">=99.0"\n')
    app.commit("needs a future uv")
    result = app.push(check=False)
    assert result.returncode != 0
    have = subprocess.run([f"{toolchain.root}/bin/uv", "--version"], capture_output=True, text=True).stdout.split()[1]
    assert f"this project requires uv >=99.0 ([tool.uv] required-version), but the server has uv {have}" \
        in result.output
    assert "uv self update" in result.output


def test_the_push_says_which_manifest_it_used_and_which_it_ignored(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "flask-uwsgi", "both")
    app.write("requirements.txt", "flask==2.0.0\n")        # an old export beside the lock
    app.commit("a requirements.txt beside uv.lock")
    result = app.push()
    assert "-----> Found uv.lock, pyproject.toml: building with the python-uv buildpack" in result.output
    assert "ignored: requirements.txt (uv.lock comes first; the order is in docs/PYTHON.md)" in result.output
    assert "with Flask 3." in wait_for_body(piku.url("both"), "Hello from both")


class PrivateIndex:
    """A PEP 503 simple index on 127.0.0.1 that serves one wheel, only with HTTP basic auth."""

    def __init__(self, wheel, username, password):
        import base64
        import hashlib
        import http.server
        import threading
        wheel_bytes, name = wheel.read_bytes(), wheel.name
        digest = hashlib.sha256(wheel_bytes).hexdigest()
        expected = "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode()
        self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_HEAD(handler):
                handler.do_GET(body_too=False)

            def do_GET(handler, body_too=True):
                self.requests.append((handler.path, handler.headers.get("Authorization") == expected))
                if handler.headers.get("Authorization") != expected:
                    handler.send_response(401)
                    handler.send_header("WWW-Authenticate", 'Basic realm="corp"')
                    handler.end_headers()
                    return
                if handler.path.rstrip("/") == "/simple/tinypkg":
                    body, kind = f'<a href="/files/{name}#sha256={digest}">{name}</a>'.encode(), "text/html"
                elif handler.path == f"/files/{name}":
                    body, kind = wheel_bytes, "application/octet-stream"
                else:
                    handler.send_response(404)
                    handler.end_headers()
                    return
                handler.send_response(200)
                handler.send_header("Content-Type", kind)
                handler.send_header("Content-Length", str(len(body)))
                handler.end_headers()
                if body_too:
                    handler.wfile.write(body)

            def log_message(handler, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_a_private_index_gets_the_credentials_set_with_config_set_and_never_shows_them(
        piku, emperor, make_app, toolchain, tmp_path):
    toolchain.require("3.11")
    uv = f"{toolchain.root}/bin/uv"
    package = tmp_path / "tinypkg"
    env = dict(piku.env, UV_CACHE_DIR=str(tmp_path / "laptop-cache"))     # the laptop's cache, not the server's
    subprocess.run([uv, "init", "-q", "--lib", "--vcs", "none", "--name", "tinypkg", "--python", "3.11", str(package)],
                   env=env, check=True)
    pyproject = (package / "pyproject.toml").read_text()
    (package / "pyproject.toml").write_text(re.sub(r'requires-python = ".*"', 'requires-python = ">=3.10"', pyproject))
    (package / "src" / "tinypkg" / "__init__.py").write_text('SECRET_SAUCE = "from the private index"\n')
    subprocess.run([uv, "build", "-q", "--wheel", "--out-dir", str(tmp_path / "dist")], cwd=package, env=env, check=True)
    username, password = "corp-reader", "pa55-for-the-corp-index-8812"
    index = PrivateIndex(next((tmp_path / "dist").glob("*.whl")), username, password)
    try:
        app = make_app(TEST_APPS / "wsgi-plain", "corp")
        app.write("pyproject.toml", f'''[project]
name = "corp"
version = "0.1.0"
requires-python = ">=3.10"
dependencies = ["tinypkg"]

[[tool.uv.index]]
name = "corp"
url = "{index.url}"
explicit = true

[tool.uv.sources]
tinypkg = {{ index = "corp" }}
''')
        app.write("hello.py", "from tinypkg import SECRET_SAUCE\n\n\ndef application(environ, start_response):\n"
                              "    start_response('200 OK', [('Content-Type', 'text/plain')])\n"
                              "    return [SECRET_SAUCE.encode()]\n")
        app.write("Procfile", "wsgi: hello:application\n")
        subprocess.run([uv, "lock", "-q"], cwd=app.path, check=True, env=dict(
            env, UV_INDEX_CORP_USERNAME=username, UV_INDEX_CORP_PASSWORD=password))
        app.commit("depends on a private package")

        refused = app.push(check=False)
        assert refused.returncode != 0, "without credentials the private index refuses the build"
        assert "the package index refused the credentials (HTTP 401); nothing was changed" in refused.output
        assert "config:set APP UV_INDEX_<NAME>_USERNAME=... UV_INDEX_<NAME>_PASSWORD=..." in refused.output
        piku("config:set", "corp", f"UV_INDEX_CORP_USERNAME={username}", "UV_INDEX_CORP_PASSWORD=wrong-pa55-1234")
        wrong = app.push(check=False)
        assert wrong.returncode != 0, "a wrong password is refused too"
        piku("config:set", "corp", f"UV_INDEX_CORP_PASSWORD={password}")
        pushed = app.push()
        assert "+ tinypkg==0.1.0" in pushed.output
        assert wait_for_body(piku.url("corp"), "from the private index")
        assert any(authorized for path, authorized in index.requests if path.startswith("/files/"))
        rotated = piku("config:set", "corp", "UV_INDEX_CORP_PASSWORD=rotated-pa55-5521")
        assert "uv sync skipped" in rotated.stdout
        shown = [refused.output, wrong.output, pushed.output, rotated.stdout, rotated.stderr,
                 piku("config", "corp").stdout, piku("config:live", "corp").stdout, piku("releases", "corp").stdout]
        for text in shown:
            for secret in (password, "wrong-pa55-1234", "rotated-pa55-5521", username):
                assert secret not in text
    finally:
        index.close()


# --- every parsed file has one shape check -------------------------------------------------

SHAPED = {"pyproject.toml": [EXAMPLES / "poetry", EXAMPLES / "uv-package", TEST_APPS / "poetry-project",
                             TEST_APPS / "uv-workspace", TEST_APPS / "env-echo"],
          "uv.lock": [EXAMPLES / "uv-package", TEST_APPS / "uv-workspace", TEST_APPS / "env-echo"],
          "poetry.lock": [EXAMPLES / "poetry", TEST_APPS / "poetry-project"],
          "Pipfile.lock": [TEST_APPS / "pipenv-app"]}
ODD_VALUES = [1, 2.5, True, "text", [1, "a", {"x": 1}], {"x": 1}, [], {}, ["a", "b"], [{"name": 3}]]


def toml_text(data):
    """data as TOML: every top-level key with an inline value (enough to write any shape)."""
    def value(item):
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, (int, float)):
            return repr(item)
        if isinstance(item, str):
            return json.dumps(item)
        if isinstance(item, list):
            return "[" + ", ".join(value(part) for part in item) + "]"
        return "{" + ", ".join(f"{json.dumps(key)} = {value(part)}" for key, part in item.items()) + "}"
    return "".join(f"{json.dumps(key)} = {value(item)}\n" for key, item in data.items())


def paths_in(data, prefix=()):
    """Every (key path) in data, lists by index."""
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else []
    for key, item in items:
        yield (*prefix, key)
        yield from paths_in(item, (*prefix, key))


def mutated(data, rng):
    """A copy of data with the value at one path (one piku reads, half the time) replaced by
    a value of another shape."""
    import copy
    import piku as piku_module
    data = copy.deepcopy(data)
    paths = list(paths_in(data))
    read = [path for path in paths if all(isinstance(part, str) for part in path)
            and shape_has(piku_module.FILE_SHAPES, path)]
    path = rng.choice(read if read and rng.random() < 0.5 else paths or [("extra",)])
    target = data
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = rng.choice(ODD_VALUES)
    return data


def shape_has(shapes, path):
    return any(isinstance(shape, dict) and _shape_path(shape, path) for shape in shapes.values())


def _shape_path(shape, path):
    for part in path:
        if isinstance(shape, list):
            shape = shape[0]
        if not isinstance(shape, dict) or part not in shape:
            return False
        shape = shape[part]
    return True


def readers(name, root):
    """Every way piku reads the file name in the release at root."""
    import piku as piku_module
    import sys
    uv = shutil.which("uv") or os.path.join(os.path.dirname(sys.executable), "uv")
    if name == "pyproject.toml":
        return [lambda: piku_module.requires_python(root),
                lambda: piku_module.is_poetry_project(piku_module.read_pyproject(root)),
                lambda: piku_module.is_packaged(piku_module.read_pyproject(root)),
                lambda: piku_module.check_uv_version(uv, piku_module.read_pyproject(root), root),
                lambda: piku_module.select_buildpack(root, piku_module.parse_procfile("web: x\n"))]
    if name == "uv.lock":
        return [lambda: piku_module.workspace_members(root)]
    if name == "Pipfile.lock":
        return [lambda: piku_module.pipfile_python(root)]
    return [lambda: piku_module.read_shaped(root, name)]


def test_files_of_an_unexpected_shape_are_refused_with_the_key_not_a_traceback(tmp_path):
    import random
    import piku as piku_module
    rng = random.Random(6)
    refused = 0
    for name, sources in SHAPED.items():
        for source in sources:
            original = (source / name).read_text()
            data = json.loads(original) if name.endswith(".lock") and name.startswith("Pipfile") else \
                piku_module.load_toml(original, name)
            for trial in range(40):
                root = tmp_path / f"{name}-{source.name}-{trial}"
                shutil.copytree(source, root)
                changed = mutated(data, rng) if trial else data
                (root / name).write_text(json.dumps(changed) if name == "Pipfile.lock" else toml_text(changed))
                for read in readers(name, str(root)):
                    try:
                        read()
                    except piku_module.PikuError as error:
                        assert trial and error.message.startswith(f"{name}: "), (name, trial, error.message)
                        refused += 1
                shutil.rmtree(root)
    assert refused > 100, refused


def test_text_files_of_any_shape_get_a_message_not_a_traceback(tmp_path):
    """Procfile, ENV and .python-version: their parsers are their shape checks."""
    import random
    import piku as piku_module
    rng = random.Random(7)
    pieces = ["web: python app.py", "wsgi:", ":", "release: x", "cron: * * * * * x", "cron: 99 * * * * x", "A=1",
              "A='x", "export A=1", "=", "#", " ", "\t", "3.12", "3.12.1", "python-3.11", "pypy@3.10", ">=3.9",
              "\u00e9", "\x00", "static: ../..", "WEB: x", "a" * 70 + ": x", "worker: \\", "${X}", "[tool]"]
    refused = 0
    for _ in range(3000):
        text = "\n".join(rng.choice(pieces) for _ in range(rng.randint(0, 4)))
        for read in (lambda: piku_module.parse_procfile(text), lambda: piku_module.parse_env_text(text, "ENV"),
                     lambda: piku_module.validate_python_request(text.strip(), ".python-version")):
            try:
                read()
            except piku_module.PikuError:
                refused += 1
    assert refused > 1000, refused
