"""Unit tests: Python version requests, requires-python, the WSGI server choice, fingerprints."""

import pytest

import piku
from piku import BuildContext, PikuError, parse_procfile


@pytest.mark.parametrize("version, spec, allowed", [
    ("3.11.2", None, True), ("3.11.2", "", True),
    ("3.11.2", ">=3.10", True), ("3.11.2", ">=3.12", False), ("3.11.2", ">=3.10,<3.12", True),
    ("3.11.2", ">=3.10, <3.11", False), ("3.11.2", "==3.11.*", True), ("3.11.2", "==3.12.*", False),
    ("3.11.2", "!=3.11.*", False), ("3.11.2", "~=3.10", True), ("3.11.2", "~=3.11.3", False),
    ("3.11.2", "~=3.11.0", True), ("3.11.2", "<=3.11", False), ("3.11.0", "<=3.11", True),
    ("3.11.2", ">3.11", True), ("3.11.2", "==3.11.2", True), ("3.11.2", "nonsense", False),
])
def test_version_allowed(version, spec, allowed):
    assert piku.version_allowed(version, spec) is allowed


@pytest.mark.parametrize("value", ["3", "3.12", "3.12.4", "3.13t", "cpython@3.12", "pypy@3.10", ">=3.11,<3.13",
                                   "==3.12.*", " 3.12 "])
def test_python_requests_uv_understands(value):
    assert piku.validate_python_request(value, "test") == value.strip()


@pytest.mark.parametrize("value", ["latest", "python3.12", "3.12; rm -rf /", "/usr/bin/python3", "", "3..12",
                                   "three"])
def test_python_requests_that_are_refused(value):
    with pytest.raises(PikuError) as error:
        piku.validate_python_request(value, ".python-version")
    assert "(from .python-version) is not a Python version uv understands" in error.value.message


def test_wsgi_server_choice():
    assert piku.choose_wsgi_server(None, "3.11.9", "3.11.2")[0] == "uwsgi"
    assert piku.choose_wsgi_server("auto", "3.12.1", "3.11.2") == (
        "gunicorn", "the app runs on Python 3.12.1 but uWSGI embeds Python 3.11.2")
    assert piku.choose_wsgi_server("GUNICORN", "3.11.2", "3.11.2")[0] == "gunicorn"
    assert piku.choose_wsgi_server("auto", "3.11.2", None)[0] == "gunicorn"
    assert piku.choose_wsgi_server("uwsgi", "3.11.7", "3.11.2")[0] == "uwsgi"
    with pytest.raises(PikuError) as error:
        piku.choose_wsgi_server("uwsgi", "3.12.1", "3.11.2", "shop")
    assert "config:set shop PYTHON_VERSION=3.11" in error.value.hint
    assert "config:set shop WSGI_SERVER=gunicorn" in error.value.hint
    with pytest.raises(PikuError) as error:
        piku.choose_wsgi_server("mod_wsgi", "3.12.1", "3.11.2")
    assert "is not one of auto, uwsgi, gunicorn" in error.value.message


def context_for(tmp_path, procfile="wsgi: app:app\n", config=None, repo_env=None, files=None):
    for name, text in (files or {}).items():
        (tmp_path / name).write_text(text)
    env = {**piku.base_env("shop"), **(repo_env or {}), **(config or {})}
    return BuildContext("shop", str(tmp_path), parse_procfile(procfile), env, config or {}, repo_env or {})


def test_python_request_priority(tmp_path):
    files = {".python-version": "3.12\n", "pyproject.toml": '[project]\nrequires-python = ">=3.10"\n'}
    both = context_for(tmp_path, config={"PYTHON_VERSION": "3.10"}, repo_env={"PYTHON_VERSION": "3.13"}, files=files)
    assert piku.resolve_python_request(both) == piku.PythonRequest("3.10", "config:set PYTHON_VERSION")
    repo = context_for(tmp_path, repo_env={"PYTHON_VERSION": "3.13"})
    assert piku.resolve_python_request(repo) == piku.PythonRequest("3.13", "PYTHON_VERSION in the app's ENV")
    assert piku.resolve_python_request(context_for(tmp_path)).source == ".python-version"


def test_uwsgi_python_is_asked_for_only_when_uwsgi_serves_and_requires_python_allows(tmp_path):
    embedded = piku.uwsgi_python_version()
    if not embedded:
        pytest.skip("uWSGI with a python3 plugin is not installed")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nrequires-python = ">=3.8"\n')
    request = piku.resolve_python_request(context_for(tmp_path))
    assert request.value == piku.minor(embedded) and request.source.startswith("uWSGI, which embeds Python 3.")
    assert piku.resolve_python_request(context_for(tmp_path, procfile="web: python app.py\n")).value is None
    assert piku.resolve_python_request(context_for(tmp_path, config={"WSGI_SERVER": "gunicorn"})).value is None
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nrequires-python = ">=3.99"\n')
    assert piku.resolve_python_request(context_for(tmp_path)).value is None


def test_requires_python_reads_pyproject(tmp_path):
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\nrequires-python = ">=3.11,<4"\n')
    assert piku.requires_python(str(tmp_path)) == ">=3.11,<4"
    (tmp_path / "pyproject.toml").write_text('[project\nbroken')
    with pytest.raises(PikuError) as error:
        piku.requires_python(str(tmp_path))
    assert "pyproject.toml cannot be parsed" in error.value.message


def test_buildpack_detection_order(tmp_path):
    processes = parse_procfile("web: python app.py\n")
    assert piku.select_buildpack(str(tmp_path), processes).name == "generic"
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    assert piku.select_buildpack(str(tmp_path), processes).name == "python-uv"
    (tmp_path / "requirements.txt").write_text("flask\n")
    assert piku.select_buildpack(str(tmp_path), processes).name == "python-requirements"
    assert piku.select_buildpack(str(tmp_path), parse_procfile("static: .\n")).name == "python-requirements"
    (tmp_path / "requirements.txt").unlink()
    (tmp_path / "pyproject.toml").unlink()
    assert piku.select_buildpack(str(tmp_path), parse_procfile("static: .\n")).name == "static"


def test_fingerprint_follows_the_inputs_that_decide_the_environment(tmp_path):
    pack = piku.UvBuildpack()
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "app.py").write_text("print(1)\n")
    context = context_for(tmp_path)
    python = piku.Interpreter("/usr/bin/python3.11", "3.11.2")

    def digest(ctx=context, interpreter=python, env=None, gunicorn=False):
        return piku.fingerprint_digest(pack.fingerprint(ctx, None, interpreter, env or {}, gunicorn))

    base = digest()
    (tmp_path / "app.py").write_text("print(2)\n")
    assert digest() == base, "code changes do not change the environment"
    assert digest(env={"UV_CACHE_DIR": "/elsewhere"}) == base
    assert digest(env={"UV_INDEX_URL": "https://mirror.example/simple"}) != base
    assert digest(interpreter=piku.Interpreter("/usr/bin/python3.12", "3.12.1")) != base
    assert digest(gunicorn=True) != base
    (tmp_path / "uv.lock").write_text("version = 1\n")
    assert digest() != base
    (tmp_path / "pyproject.toml").write_text("[project]\ndependencies = ['six']\n")
    assert digest() != base


def test_environment_intact_needs_the_marker_and_the_interpreter(tmp_path):
    fingerprint = {"a": 1}
    venv = tmp_path / "env"
    (venv / "bin").mkdir(parents=True)
    assert not piku.environment_intact(str(venv), fingerprint)
    (venv / piku.ENV_MARKER).write_text(piku.fingerprint_text(fingerprint))
    assert not piku.environment_intact(str(venv), fingerprint), "no interpreter"
    (venv / "bin" / "python").symlink_to("/usr/bin/python3")
    assert piku.environment_intact(str(venv), fingerprint)
    assert not piku.environment_intact(str(venv), {"a": 2})


def test_default_gunicorn_workers_is_bounded():
    assert 2 <= piku.default_gunicorn_workers() <= 8
