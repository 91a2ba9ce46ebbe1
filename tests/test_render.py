"""Golden-file tests: rendered uWSGI configs are pinned exactly.

After an intended change, regenerate with:  PIKU_UPDATE_GOLDEN=1 make test
"""

import os
from pathlib import Path

import pytest

import piku
from piku import PikuError

GOLDEN = Path(__file__).resolve().parent / "golden"
ENV = {"APP": "shop", "BIND_ADDRESS": "127.0.0.1", "PORT": "8123", "HOME": "/home/piku",
       "SECRET": "p%d$(id)@(/etc/passwd);#x", "PATH": "/usr/bin:/bin"}


def check_golden(name, text):
    path = GOLDEN / name
    if os.environ.get("PIKU_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from the golden file"


@pytest.mark.parametrize("kind, command, golden", [
    ("web", "python3 app.py --log $(date +%d)", "web.ini"),
    ("worker", "python worker.py", "worker.ini"),
    ("wsgi", "shop.wsgi:application", "wsgi.ini"),
    ("static", "/public/", "static.ini"),
    ("cron-nightly", "*/15 3 * * * ./nightly.sh", "cron.ini"),
])
def test_vassals_match_their_golden_files(kind, command, golden):
    check_golden(golden, piku.render_vassal("shop", kind, 1, command, ENV))


def test_ipv6_bind_address():
    text = piku.render_vassal("shop", "wsgi", 2, "app:app", dict(ENV, BIND_ADDRESS="::1"))
    assert "http-socket = [::1]:8123\n" in text
    assert "logto = /home/piku/.piku/logs/shop/wsgi.2.log\n" in text


def test_emperor_matches_its_golden_file():
    check_golden("emperor.ini", piku.render_emperor())


def test_uwsgi_escaping_keeps_values_literal():
    assert piku.uwsgi_escape("100% $(x) @(y) $HOME") == "100%% %(piku_dollar)(x) %(piku_at)(y) $HOME"
    with pytest.raises(PikuError):
        piku.uwsgi_escape("a\n[uwsgi]\nplugin = evil")


def test_a_setting_cannot_add_lines_to_a_vassal():
    with pytest.raises(PikuError):
        piku.render_vassal("shop", "web", 1, "python app.py", dict(ENV, EVIL="x\nattach-daemon = rm -rf /"))
    with pytest.raises(PikuError):
        piku.render_vassal("shop", "web", 1, "python app.py\nattach-daemon = evil", ENV)


def test_uwsgi_numbers_are_checked():
    with pytest.raises(PikuError) as error:
        piku.render_vassal("shop", "wsgi", 1, "app:app", dict(ENV, UWSGI_PROCESSES="2; evil"))
    assert "UWSGI_PROCESSES must be a whole number" in error.value.message


VENV_ENV = dict(ENV, VIRTUAL_ENV="/home/piku/.piku/envs/shop/python-0123456789abcdef", WSGI_SERVER="uwsgi")


def test_wsgi_vassal_with_an_environment_matches_its_golden_file():
    check_golden("wsgi-virtualenv.ini", piku.render_vassal("shop", "wsgi", 1, "shop.wsgi:app", VENV_ENV))


def test_gunicorn_vassal_and_config_match_their_golden_files():
    env = dict(VENV_ENV, WSGI_SERVER="gunicorn", GUNICORN_WORKERS="3")
    check_golden("wsgi-gunicorn.ini", piku.render_vassal("shop", "wsgi", 1, "shop.wsgi:app", env))
    check_golden("gunicorn.conf.py", piku.render_gunicorn_config("shop", "wsgi", 1, env))


def test_gunicorn_config_values_are_python_literals():
    env = dict(VENV_ENV, WSGI_SERVER="gunicorn", WEB_CONCURRENCY="2", BIND_ADDRESS="::1")
    text = piku.render_gunicorn_config("shop", "wsgi", 2, env)
    namespace = {}
    exec(compile(text, "gunicorn.conf.py", "exec"), namespace)
    assert namespace["bind"] == ["[::1]:8123"] and namespace["workers"] == 2
    assert namespace["accesslog"] == "/home/piku/.piku/logs/shop/wsgi.2.access.log"
    with pytest.raises(PikuError):
        piku.render_gunicorn_config("shop", "wsgi", 1, dict(env, GUNICORN_WORKERS="4; import os"))
