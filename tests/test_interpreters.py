"""Unit tests: Python version requests, requires-python, the WSGI server choice, fingerprints."""

import json
import os
import re

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
    """The first manifest present in PYTHON_MANIFESTS decides: a lock before a list."""
    processes = parse_procfile("web: python app.py\n")

    def chosen(procfile=processes):
        return piku.select_buildpack(str(tmp_path), procfile).name

    assert chosen() == "generic"
    (tmp_path / "Pipfile").write_text("[packages]\n")
    assert chosen() == "python-pipenv"
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    assert chosen() == "python-uv"
    (tmp_path / "requirements.txt").write_text("flask\n")
    assert chosen() == "python-requirements"
    assert chosen(parse_procfile("static: .\n")) == "python-requirements"
    (tmp_path / "Pipfile.lock").write_text("{}")
    assert chosen() == "python-pipenv"
    (tmp_path / "poetry.lock").write_text("")
    assert chosen() == "python-poetry"
    (tmp_path / "uv.lock").write_text("version = 1\n")
    assert chosen() == "python-uv"
    for name in ("uv.lock", "poetry.lock", "Pipfile.lock", "requirements.txt", "pyproject.toml", "Pipfile"):
        (tmp_path / name).unlink()
    assert chosen(parse_procfile("static: .\n")) == "static"


def test_a_poetry_1_project_without_its_lock_goes_to_poetry_which_asks_for_the_lock(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.poetry]\nname = 'a'\n[tool.poetry.dependencies]\nsix = '*'\n")
    assert piku.select_buildpack(str(tmp_path), parse_procfile("web: x\n")).name == "python-poetry"
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'a'\ndependencies = []\n")
    assert piku.select_buildpack(str(tmp_path), parse_procfile("web: x\n")).name == "python-uv"
    (tmp_path / "pyproject.toml").write_text("[project\n")       # unreadable: uv reports it
    assert piku.select_buildpack(str(tmp_path), parse_procfile("web: x\n")).name == "python-uv"


def test_packaged_projects_follow_uv_and_poetry_rules():
    assert not piku.is_packaged({"project": {}})
    assert piku.is_packaged({"project": {}, "build-system": {}})
    assert not piku.is_packaged({"build-system": {}, "tool": {"uv": {"package": False}}})
    assert piku.is_packaged({"tool": {"uv": {"package": True}}})
    assert not piku.is_packaged({"build-system": {}, "tool": {"poetry": {"package-mode": False}}})


def test_poetry_python_constraints_become_pep_440():
    assert piku.poetry_constraint("^3.10") == ">=3.10,<4"
    assert piku.poetry_constraint("~3.10") == ">=3.10,<3.11"
    assert piku.poetry_constraint(">=3.9,<3.13") == ">=3.9,<3.13"
    assert piku.poetry_constraint(">=3.9 <3.13") == ">=3.9,<3.13"
    assert piku.poetry_constraint("3.11.*") == "==3.11.*"
    assert piku.poetry_constraint("*") is None
    assert piku.poetry_constraint("^3.8 || ^3.12") is None
    assert piku.version_allowed("3.11.2", piku.poetry_constraint("^3.10"))
    assert not piku.version_allowed("3.11.2", piku.poetry_constraint("~3.12"))


def test_local_requirements_stay_inside_the_release(tmp_path):
    (tmp_path / "packages" / "lib").mkdir(parents=True)
    root = str(tmp_path)
    assert piku.local_requirement(".", root) == "."
    assert piku.local_requirement("./packages/lib ; python_version >= '3.10'", root) == "packages/lib"
    assert piku.local_requirement(f"lib @ file://{tmp_path}/packages/lib", root) == "packages/lib"
    assert piku.local_requirement("flask==3.1.3", root) is None
    with pytest.raises(PikuError, match="outside the pushed code"):
        piku.local_requirement("../elsewhere", root)
    with pytest.raises(PikuError, match="outside the pushed code"):
        piku.local_requirement("evil @ file:///etc", root)


def test_secrets_are_masked_and_left_out_of_fingerprints(tmp_path):
    settings = {"UV_INDEX_CORP_USERNAME": "alice", "UV_INDEX_CORP_PASSWORD": "hunter2x", "DEBUG": "1",
                "UV_INDEX": "corp=https://bob:s3cret@pypi.corp.example/simple", "SECRET_KEY": "dj-key"}
    masked = piku.masked_settings(settings)
    assert masked["UV_INDEX_CORP_PASSWORD"] == masked["UV_INDEX_CORP_USERNAME"] == masked["SECRET_KEY"] == "****"
    assert masked["UV_INDEX"] == "corp=https://****@pypi.corp.example/simple"
    assert masked["DEBUG"] == "1"
    line = "error: 401 from https://bob:s3cret@pypi.corp.example for alice/hunter2x"
    assert piku.mask_secrets(line, piku.secret_values(settings)) == \
        "error: 401 from https://****@pypi.corp.example for ****/****"


def test_fingerprint_follows_the_inputs_that_decide_the_environment(tmp_path):
    pack = piku.UvBuildpack()
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "app.py").write_text("print(1)\n")
    context = context_for(tmp_path)
    python = piku.Interpreter("/usr/bin/python3.11", "3.11.2")

    def digest(ctx=context, interpreter=python, env=None, servers=()):
        return piku.fingerprint_digest(pack.fingerprint(ctx, None, interpreter, env or {}, servers))

    base = digest()
    (tmp_path / "app.py").write_text("print(2)\n")
    assert digest() == base, "code changes do not change the environment"
    assert digest(env={"UV_CACHE_DIR": "/elsewhere"}) == base
    assert digest(env={"UV_INDEX_URL": "https://mirror.example/simple"}) != base
    assert digest(env={"UV_INDEX_CORP_PASSWORD": "a"}) == digest(env={"UV_INDEX_CORP_PASSWORD": "b"}) == base
    assert digest(env={"UV_INDEX_URL": "https://u:a@mirror.example/simple"}) == \
        digest(env={"UV_INDEX_URL": "https://u:b@mirror.example/simple"})
    assert digest(interpreter=piku.Interpreter("/usr/bin/python3.12", "3.12.1")) != base
    assert digest(servers=["gunicorn"]) != base
    assert digest(servers=["gunicorn", "uvicorn-worker"]) not in (base, digest(servers=["gunicorn"]))
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


def test_uv_downloads_no_python_unless_the_host_or_the_app_allows_it(monkeypatch, tmp_path):
    monkeypatch.delenv("UV_PYTHON_DOWNLOADS", raising=False)
    monkeypatch.setattr(piku, "UV_CONFIG_FILES", (str(tmp_path / "uv.toml"),))
    assert piku.build_tool_env({})["UV_PYTHON_DOWNLOADS"] == "never"
    assert piku.build_tool_env({"UV_PYTHON_DOWNLOADS": "automatic"})["UV_PYTHON_DOWNLOADS"] == "automatic"
    assert not piku.python_downloads_allowed(piku.build_tool_env({}))
    (tmp_path / "uv.toml").write_text('python-downloads = "automatic"\n')
    assert "UV_PYTHON_DOWNLOADS" not in piku.build_tool_env({}), "the host's uv.toml decides"
    assert piku.python_downloads_allowed(piku.build_tool_env({}))
    monkeypatch.setenv("UV_PYTHON_DOWNLOADS", "manual")
    assert piku.build_tool_env({})["UV_PYTHON_DOWNLOADS"] == "manual"


def test_required_uv_version_is_checked_against_the_hosts_uv(monkeypatch, tmp_path):
    monkeypatch.setitem(piku._PROBES, "/opt/uv", "uv 0.13.9 (x86_64-unknown-linux-gnu)")
    piku.check_uv_version("/opt/uv", {"tool": {"uv": {"required-version": ">=0.5"}}}, str(tmp_path))
    piku.check_uv_version("/opt/uv", {"tool": {"uv": {"required-version": "0.13.9"}}}, str(tmp_path))
    with pytest.raises(PikuError) as error:
        piku.check_uv_version("/opt/uv", {"tool": {"uv": {"required-version": ">=0.14,<1"}}}, str(tmp_path))
    assert error.value.message == ("this project requires uv >=0.14,<1 ([tool.uv] required-version), "
                                   "but the server has uv 0.13.9")
    (tmp_path / "uv.toml").write_text('required-version = "==0.12.*"\n')
    with pytest.raises(PikuError):
        piku.check_uv_version("/opt/uv", {}, str(tmp_path))


def test_a_programs_version_is_kept_only_for_the_file_itself_never_for_a_shim(tmp_path, monkeypatch):
    """Issue 20 keeps `uv --version` and a Python's version between pushes, keyed by the file the
    program is; a version manager's shim (a script, or a link to a program of another name) is
    asked every time, since what it runs can change with no file changing."""
    monkeypatch.setattr(piku, "PROBES_CACHE", str(tmp_path / "probes.json"))
    monkeypatch.setattr(piku, "_PROBES", {})
    real = os.path.realpath("/usr/bin/python3")
    link = tmp_path / "python3"
    link.symlink_to(real)
    shim = tmp_path / "shim-python"
    shim.write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    shim.chmod(0o755)
    version = piku.interpreter_version(real)
    assert re.fullmatch(r"3\.[0-9]+\.[0-9]+", version)
    for path in (link, shim):
        assert piku.interpreter_version(str(path)) == version
    assert piku.program_key(str(shim)) is None and piku.program_key(str(link))[1] == real
    kept = json.loads((tmp_path / "probes.json").read_text())
    assert sorted(kept.values()) == [[version, True]] * 2, "the file and the link to it; never the shim"
    # a kept answer is used as it is (a changed file would have another key)
    key = piku.fingerprint_digest(["python version", piku.program_key(real)])
    (tmp_path / "probes.json").write_text(json.dumps({**kept, key: ["9.9.9", True]}))
    assert piku.interpreter_version(real) == "9.9.9" and piku.interpreter_version(str(shim)) == version
    for junk in ("null", "[1, 2]", "\"text\"", "{"):         # a damaged cache: asked again, no traceback
        (tmp_path / "probes.json").write_text(junk)
        assert piku.interpreter_version(real) == version
