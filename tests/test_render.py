"""Golden-file tests: rendered uWSGI configs are pinned exactly.

After an intended change, regenerate with:  PIKU_UPDATE_GOLDEN=1 make test
"""

import os
import shutil
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


ROOT = "/home/piku/.piku/releases/shop/20261121-abc"


def instance(kind, index=1, gen=7):
    return piku.Instance("shop", gen, kind, index)


def render(kind, command, env, index=1, extra=()):
    return piku.render_vassal(instance(kind, index), command, env, ROOT, extra)


@pytest.mark.parametrize("kind, command, golden", [
    ("web", "python3 app.py --log $(date +%d)", "web.ini"),
    ("worker", "python worker.py", "worker.ini"),
    ("wsgi", "shop.wsgi:application", "wsgi.ini"),
    ("static", "/public/", "static.ini"),
    ("cron-nightly", "*/15 3 * * * ./nightly.sh", "cron.ini"),
])
def test_vassals_match_their_golden_files(kind, command, golden):
    check_golden(golden, render(kind, command, ENV))


def test_every_instance_has_its_own_files_under_its_app_and_generation():
    text = render("wsgi", "app:app", ENV, index=2)
    assert "http-socket = /home/piku/.piku/uwsgi/shop/g7/wsgi.2.sock\n" in text
    assert "logto = /home/piku/.piku/logs/shop/g7/wsgi.2.log\n" in text
    assert "pidfile = /home/piku/.piku/uwsgi/shop/g7/wsgi.2.pid\n" in text
    assert instance("wsgi", 2).vassal == "/home/piku/.piku/uwsgi-enabled/shop@g7.wsgi.2.ini"
    assert piku.Instance("shop_web", 7, "wsgi", 2).vassal != piku.Instance("shop", 7, "web_wsgi", 2).vassal


def test_the_front_matches_its_golden_file_and_takes_ipv6():
    check_golden("front.ini", piku.render_front("shop", ENV))
    assert "rawrouter = [::1]:8123\n" in piku.render_front("shop", dict(ENV, BIND_ADDRESS="::1"))


def test_emperor_matches_its_golden_file():
    check_golden("emperor.ini", piku.render_emperor())


def test_uwsgi_escaping_keeps_values_literal():
    assert piku.uwsgi_escape("100% $(x) @(y) $HOME") == "100%% %(piku_dollar)(x) %(piku_at)(y) $HOME"
    with pytest.raises(PikuError):
        piku.uwsgi_escape("a\n[uwsgi]\nplugin = evil")


def test_a_setting_cannot_add_lines_to_a_vassal():
    with pytest.raises(PikuError):
        render("web", "python app.py", dict(ENV, EVIL="x\nattach-daemon = rm -rf /"))
    with pytest.raises(PikuError):
        render("web", "python app.py\nattach-daemon = evil", ENV)


def test_uwsgi_numbers_are_checked():
    with pytest.raises(PikuError) as error:
        render("wsgi", "app:app", dict(ENV, UWSGI_PROCESSES="2; evil"))
    assert "UWSGI_PROCESSES must be a whole number" in error.value.message
    for odd in ("\u00b2", "\u0663", "1e3", "-1", "0", "9999999999"):
        with pytest.raises(PikuError):
            render("wsgi", "app:app", dict(ENV, UWSGI_PROCESSES=odd))


VENV_ENV = dict(ENV, VIRTUAL_ENV="/home/piku/.piku/envs/shop/python-0123456789abcdef", WSGI_SERVER="uwsgi")


def test_wsgi_vassal_with_an_environment_matches_its_golden_file():
    check_golden("wsgi-virtualenv.ini", render("wsgi", "shop.wsgi:app", VENV_ENV))


def test_gunicorn_vassal_and_config_match_their_golden_files():
    env = dict(VENV_ENV, WSGI_SERVER="gunicorn", GUNICORN_WORKERS="3")
    check_golden("wsgi-gunicorn.ini", render("wsgi", "shop.wsgi:app", env))
    check_golden("gunicorn.conf.py", piku.render_gunicorn_config(instance("wsgi"), env, ROOT))


def test_gunicorn_config_values_are_python_literals():
    env = dict(VENV_ENV, WSGI_SERVER="gunicorn", WEB_CONCURRENCY="2", BIND_ADDRESS="::1")
    text = piku.render_gunicorn_config(instance("wsgi", 2), env, ROOT)
    namespace = {}
    exec(compile(text, "gunicorn.conf.py", "exec"), namespace)
    assert namespace["bind"] == ["unix:/home/piku/.piku/uwsgi/shop/g7/wsgi.2.sock"] and namespace["workers"] == 2
    assert namespace["accesslog"] == "-" and namespace["chdir"] == ROOT
    with pytest.raises(PikuError):
        piku.render_gunicorn_config(instance("wsgi"), dict(env, GUNICORN_WORKERS="4; import os"), ROOT)


def test_values_reach_the_app_byte_for_byte_or_are_refused():
    env = dict(ENV, FORMAT="%(asctime)s %(levelname)s %(message)s", LEAD="  spaced", PCT="100%d")
    text = render("web", "python app.py", env)
    assert "env = FORMAT=%%(asctime)s %%(levelname)s %%(message)s\n" in text
    assert "env = LEAD=  spaced\n" in text
    for value in ("a%(chdir)b", "%(env)", "%(attach-daemon)", "%(piku_dollar)"):
        with pytest.raises(PikuError) as error:
            render("web", "python app.py", dict(ENV, TRICK=value))
        assert "which uWSGI would replace" in error.value.message
    for value in ("trailing ", "tab\t"):
        with pytest.raises(PikuError) as error:
            piku.validate_setting("TRAIL", value)
        assert "ends with a space or tab" in error.value.message


def test_asgi_vassal_and_config_run_gunicorn_with_uvicorns_worker():
    env = dict(VENV_ENV, GUNICORN_WORKERS="3")
    vassal = render("asgi", "main:app", env)
    assert "attach-daemon = exec /usr/bin/python3 -I -S /home/piku/.piku/sandbox/process-guard 20 " \
           "'exec /home/piku/.piku/envs/shop/python-0123456789abcdef/bin/gunicorn --config " \
           "/home/piku/.piku/sandbox/shop@g7.asgi.1.gunicorn.py main:app'\n" in vassal
    check_golden("asgi-gunicorn.conf.py", piku.render_gunicorn_config(instance("asgi"), env, ROOT))
    namespace = {}
    exec(compile(piku.render_gunicorn_config(instance("asgi"), env, ROOT), "gunicorn.conf.py", "exec"), namespace)
    assert namespace["worker_class"] in ("uvicorn_worker.UvicornWorker", "uvicorn.workers.UvicornWorker")
    assert namespace["bind"] == ["unix:/home/piku/.piku/uwsgi/shop/g7/asgi.1.sock"] and namespace["workers"] == 3
    assert "worker_class" not in piku.render_gunicorn_config(instance("wsgi"), env, ROOT)


def test_a_wsgi_vassal_puts_the_releases_own_packages_on_its_path():
    site = ROOT + ".site"
    text = render("wsgi", "shop.wsgi:app", dict(VENV_ENV, PYTHONPATH=f"{site}:/opt/extra"))
    assert f"pythonpath = {ROOT}\npythonpath = {site}\npythonpath = /opt/extra\n" in text


def test_static_paths_are_served_beside_wsgi_and_kept_inside_the_release(tmp_path):
    (tmp_path / "staticfiles").mkdir()
    (tmp_path / "escape").symlink_to("/etc")
    root = str(tmp_path)
    assert piku.static_paths({"NGINX_STATIC_PATHS": "/static/:staticfiles, /media:media/"}, root) == [
        ("/static/", f"{root}/staticfiles/"), ("/media/", f"{root}/media/")]
    with pytest.raises(PikuError, match="'/media/' is an absolute path"):       # refused, not rewritten
        piku.static_paths({"NGINX_STATIC_PATHS": "/media:/media/"}, root)
    for bad in ("/static/:escape", "/x/:../other", "static:staticfiles", "/a/../b/:x", "/static/", "/s p/:x",
                "/etc/:/etc", "/s/:/"):
        with pytest.raises(PikuError):
            piku.static_paths({"NGINX_STATIC_PATHS": bad}, root)


def nginx_release(tmp_path, procfile, **settings):
    root = tmp_path / "shop" / "release"       # as RELEASE_ROOT/APP/ID (releases_in)
    (root / "public").mkdir(parents=True, exist_ok=True)
    env = {**ENV, "NGINX_SERVER_NAME": "shop.example.com www.shop.example.com", "NGINX_IPV4_ADDRESS": "127.0.0.1",
           **settings}
    return piku.Release("shop", "0" * 40, str(root), piku.parse_procfile(procfile), env)


def stable(vhost, tmp_path):
    """The vhost without what differs between runs: the temporary folder, and its hash."""
    import re
    return re.sub(r'return 200 "[0-9a-f]{16}', 'return 200 "HASH', vhost.replace(str(tmp_path), "/RELEASES"))


def releases_in(tmp_path, monkeypatch):
    """The served folders of NGINX_FILES in tmp_path, where these tests' releases are."""
    files = tuple(piku.replace_fields(entry, folder=str(tmp_path)) if entry.folder == piku.RELEASE_ROOT else entry
                  for entry in piku.NGINX_FILES)
    monkeypatch.setattr(piku, "NGINX_FILES", files)


def test_nginx_vhosts_match_their_golden_files(tmp_path, monkeypatch):
    monkeypatch.setenv("PIKU_NGINX_HTTP_PORT", "8080")
    releases_in(tmp_path, monkeypatch)
    wsgi = nginx_release(tmp_path, "wsgi: shop.wsgi:app\n")
    text = piku.finish_vhost(piku.render_nginx(wsgi))
    check_golden("nginx-wsgi.conf", stable(text, tmp_path))
    assert "uwsgi_pass piku-shop-uslot;" in text and "listen [::]:8080;" in text
    web = nginx_release(tmp_path, "web: gunicorn app:app\n", NGINX_STATIC_PATHS="/media/:public", DISABLE_IPV6="yes")
    text = piku.finish_vhost(piku.render_nginx(web))
    check_golden("nginx-web.conf", stable(text, tmp_path))
    assert "proxy_pass http://piku-shop-slot;" in text and "[::]" not in text
    assert piku.render_nginx(nginx_release(tmp_path, "web: x\n", NGINX_SERVER_NAME="")) is None


def test_no_setting_reaches_nginx_as_syntax(tmp_path):
    for key, value in (("NGINX_SERVER_NAME", "a.example.com;include /etc/passwd"), ("NGINX_SERVER_NAME", "$host"),
                       ("NGINX_IPV4_ADDRESS", "127.0.0.1:80 default_server"), ("NGINX_IPV6_ADDRESS", "[::1];"),
                       ("NGINX_STATIC_PATHS", "/x/:public/$uri"), ("NGINX_CATCH_ALL", "/$uri")):
        with pytest.raises(PikuError):
            piku.render_nginx(nginx_release(tmp_path, "web: x\n", **{key: value}))


def test_nginx_buffers_only_what_it_caches_unless_told(tmp_path):
    plain = piku.render_nginx(nginx_release(tmp_path, "web: python3 app.py\n"))
    assert "proxy_buffering off;" in plain and "proxy_set_header Upgrade $http_upgrade;" in plain
    buffered = piku.render_nginx(nginx_release(tmp_path, "web: python3 app.py\n", NGINX_PROXY_BUFFERING="1"))
    assert "proxy_buffering on;" in buffered and "proxy_buffering off;" not in buffered
    for name in ("*.com", "*.com."):
        with pytest.raises(PikuError, match="would claim a whole top-level domain"):
            piku.nginx_server_names({"NGINX_SERVER_NAME": name})


def test_the_vassal_wrapper_matches_its_golden_file():
    """The emperor runs every vassal through it: described in its app's sandbox, as piku's own, or not at all."""
    if piku.bwrap_binary() != "/usr/bin/bwrap" or shutil.which("uwsgi") != "/usr/bin/uwsgi":
        pytest.skip("the golden file names Debian's /usr/bin/bwrap and /usr/bin/uwsgi")
    check_golden("vassal-wrapper.sh", piku.render_wrapper())


def test_the_apparmor_profile_lets_only_pikus_copy_of_bwrap_make_user_namespaces():
    """Ubuntu 24.04's AppArmor lets no unprivileged program make user namespaces: install loads a
    profile for piku's own copy of bwrap alone (not /usr/bin/bwrap, which every user may run)."""
    profile = piku.APPARMOR_TEMPLATE.substitute(bwrap=piku.BWRAP_COPY, group="piku")
    assert "profile piku-bwrap /usr/local/lib/piku/bwrap flags=(unconfined) {\n  userns,\n" in profile
    assert "/usr/bin/bwrap" not in profile and profile.startswith("# written by piku.py install")
