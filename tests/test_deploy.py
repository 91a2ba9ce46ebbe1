"""Integration: real git pushes into a temporary PIKU_ROOT served by a real uWSGI emperor."""

import os
import re
import time

import pytest

from conftest import EXAMPLES, fetch, pid_alive, wait_for_body, wait_until

WEB = EXAMPLES / "web"
STATIC = EXAMPLES / "static"


def web_processes(app_pids):
    """The app's own processes (the web command) under each uWSGI master."""
    import psutil
    found = []
    for pid in app_pids:
        try:
            found += [child for child in psutil.Process(pid).children(recursive=True)
                      if child.cmdline()[-1:] == ["app.py"] and child.cmdline()[0] != "/bin/sh"]
        except psutil.Error:
            pass
    return found


def test_first_push_serves_the_app(piku, emperor, make_app):
    app = make_app(WEB, "hello")
    result = app.push()
    assert "-----> Deploying hello" in result.output
    assert "-----> hello is live at http://127.0.0.1:" in result.output
    wait_for_body(piku.url("hello"), "Hello from hello! GREETING=hello")
    assert piku.workers("hello") == ["web.1"]
    assert (piku.root / "logs" / "hello" / "web.1.log").exists()
    assert "* hello" in piku("apps").stdout


def test_second_push_serves_new_code_on_the_same_port(piku, emperor, make_app):
    app = make_app(WEB, "hello")
    app.push()
    url = piku.url("hello")
    wait_for_body(url, "Hello from hello")
    app.write("app.py", (WEB / "app.py").read_text().replace("Hello from", "Bonjour from"))
    app.commit("french")
    app.push()
    assert piku.url("hello") == url, "PORT must stay stable across deploys"
    wait_for_body(url, "Bonjour from hello")
    head = app.git("rev-parse", "HEAD").stdout.strip()
    server = app.git("--git-dir", str(piku.root / "repos" / "hello"), "rev-parse", "main").stdout.strip()
    assert server == head


def test_config_set_redeploys_with_the_new_value(piku, emperor, make_app):
    app = make_app(WEB, "hello")
    app.push()
    wait_for_body(piku.url("hello"), "GREETING=hello")
    result = piku("config:set", "hello", "GREETING=hi there $(not a command) 100%")
    assert "-----> Deploying hello" in result.stdout
    wait_for_body(piku.url("hello"), "GREETING=hi there $(not a command) 100%")
    assert piku("config:get", "hello", "GREETING").stdout == "hi there $(not a command) 100%\n"
    assert "GREETING=hi there $(not a command) 100%\n" in piku("config:live", "hello").stdout
    odd = "  %(asctime)s %(levelname)s 100%% $(x) @(y)"      # uWSGI must not expand any of it
    piku("config:set", "hello", f"GREETING={odd}")
    wait_for_body(piku.url("hello"), f"GREETING={odd}\n")
    refused = piku("config:set", "hello", "GREETING=%(chdir)", check=False)
    assert refused.returncode == 1 and "which uWSGI would replace" in refused.stderr
    piku("config:unset", "hello", "GREETING")
    wait_for_body(piku.url("hello"), "GREETING=hello\n")   # back to the repo's ENV


def test_ps_scale_runs_two_vassals_and_two_processes(piku, emperor, make_app):
    app = make_app(WEB, "hello")
    app.push()
    url = piku.url("hello")
    wait_for_body(url, "Hello from hello")
    piku("ps:scale", "hello", "web=2")
    assert piku.workers("hello") == ["web.1", "web.2"]
    wait_until(lambda: len(web_processes(piku.master_pids("hello"))) == 2, message="two web processes")
    listing = piku("ps", "hello").stdout
    assert re.search(r"^web\.1 .* running ", listing, re.M) and re.search(r"^web\.2 .* running ", listing, re.M)
    wait_for_body(url, "Hello from hello")
    piku("ps:scale", "hello", "web=1")
    assert piku.workers("hello") == ["web.1"]
    wait_until(lambda: len(web_processes(piku.master_pids("hello"))) == 1, message="one web process")
    # a redeploy keeps the scaling
    app.commit("again")
    app.push()
    assert (piku.root / "envs" / "hello" / "SCALING").read_text() == "web:1\n"


def test_stop_restart_destroy(piku, emperor, make_app):
    app = make_app(WEB, "hello")
    app.push()
    url = piku.url("hello")
    wait_for_body(url, "Hello from hello")
    pids = piku.master_pids("hello")
    assert pids

    piku("stop", "hello")
    assert piku.vassals("hello") == []
    assert not any(pid_alive(pid) for pid in pids)
    with pytest.raises(OSError):
        fetch(url, timeout=2)

    piku("restart", "hello")
    wait_for_body(url, "Hello from hello")
    restarted = piku.master_pids("hello")
    assert restarted and restarted != pids

    (piku.root / "data" / "hello" / "keep.txt").write_text("precious")
    piku("destroy", "hello")
    assert not any(pid_alive(pid) for pid in restarted)
    for folder in ("apps", "repos", "envs", "logs", "releases", "uwsgi"):
        assert not (piku.root / folder / "hello").exists(), folder
    assert piku.vassals("hello") == [] and piku.vassals("hello", "uwsgi-available") == []
    assert (piku.root / "data" / "hello" / "keep.txt").read_text() == "precious"
    gone = piku("config", "hello", check=False)
    assert gone.returncode == 1 and "app 'hello' not found" in gone.stderr


def test_malformed_procfile_rejects_the_push_and_keeps_serving(piku, emperor, make_app):
    app = make_app(WEB, "hello")
    app.push()
    url = piku.url("hello")
    wait_for_body(url, "Hello from hello")
    good = app.git("rev-parse", "HEAD").stdout.strip()

    app.write("Procfile", "# processes\nweb: python3 app.py\nthis line is not a process\n")
    app.write("app.py", "raise SystemExit('this code must never run')\n")
    app.commit("broken")
    result = app.push(check=False)
    assert result.returncode != 0
    assert "Procfile line 3 is malformed" in result.output
    assert "pre-receive hook declined" in result.output
    assert "Traceback" not in result.output
    server = app.git("--git-dir", str(piku.root / "repos" / "hello"), "rev-parse", "main").stdout.strip()
    assert server == good, "the branch on the server must not move"
    assert fetch(url)[1].startswith("Hello from hello")
    assert len(list((piku.root / "releases" / "hello").iterdir())) == 1


def test_release_phase_runs_and_its_failure_rejects_the_push(piku, emperor, make_app):
    app = make_app(WEB, "hello")
    app.write("Procfile", "web: python3 app.py\nrelease: echo \"migrated $APP\" > $DATA_ROOT/release.txt\n")
    app.commit("release phase")
    result = app.push()
    assert "Running release" in result.output
    assert (piku.root / "data" / "hello" / "release.txt").read_text() == "migrated hello\n"
    url = piku.url("hello")
    wait_for_body(url, "Hello from hello")

    app.write("Procfile", "web: python3 app.py\nrelease: echo migration failed >&2; exit 3\n")
    app.write("app.py", "raise SystemExit('never')\n")
    app.commit("failing release")
    result = app.push(check=False)
    assert result.returncode != 0
    assert "the release command failed (exit code 3)" in result.output
    assert "migration failed" in result.output
    time.sleep(2)   # longer than the emperor's scan: nothing may have been reloaded
    assert fetch(url)[1].startswith("Hello from hello")


def test_static_site_is_served(piku, emperor, make_app):
    app = make_app(STATIC, "site")
    result = app.push()
    assert "static buildpack" in result.output
    body = wait_for_body(piku.url("site"), "Hello from a static site on piku")
    assert "<title>" in body
    assert fetch(piku.url("site", "/missing.html"))[0] == 404


def test_background_worker_runs(piku, emperor, make_app):
    app = make_app(WEB, "jobs")
    app.write("Procfile", "clock: while true; do date +%s > \"$DATA_ROOT/tick\"; sleep 0.2; done\n")
    app.commit("a worker only")
    result = app.push()
    assert "-----> jobs is live" in result.output
    assert piku.workers("jobs") == ["clock.1"]
    tick = piku.root / "data" / "jobs" / "tick"
    wait_until(tick.exists, message="the worker to write its file")
    assert re.fullmatch(r"\d+\n", tick.read_text())
    assert "PORT" not in piku.live_env("jobs")


def test_bad_app_names_are_refused(piku, make_app):
    app = make_app(WEB, "../evil")
    result = app.push(check=False)
    assert result.returncode != 0
    assert "invalid app name '../evil'" in result.output
    assert not any((piku.root / "repos").iterdir())
    for name in ("a b", "x;rm", ".hidden", "a/b", "..", "a" * 65):
        outcome = piku("config", name, check=False)
        assert outcome.returncode == 1, name
        assert "invalid app name" in outcome.stderr
        assert "Traceback" not in outcome.stderr
    dashed = piku("config", "-rf", check=False)      # looks like an option: click's usage error
    assert dashed.returncode == 2 and "No such option" in dashed.stderr


def test_unknown_app_and_bad_settings_are_clear_errors(piku, emperor, make_app):
    result = piku("config:set", "nosuchapp", "A=1", check=False)
    assert result.returncode == 1 and "app 'nosuchapp' not found" in result.stderr
    app = make_app(WEB, "hello")
    app.push()
    for setting, message in (("1BAD=x", "invalid setting name"), ("NOEQUALS", "malformed setting"),
                             ("A=line\nbreak", "line break"), ("A-B=1", "invalid setting name")):
        outcome = piku("config:set", "hello", setting, check=False)
        assert outcome.returncode == 1, setting
        assert message in outcome.stderr
        assert "Traceback" not in outcome.stderr
    assert "A=" not in piku("config", "hello").stdout


def test_config_set_that_breaks_the_deploy_is_undone(piku, emperor, make_app):
    app = make_app(WEB, "hello")
    app.push()
    wait_for_body(piku.url("hello"), "Hello from hello")
    result = piku("config:set", "hello", "PORT=not-a-port", check=False)
    assert result.returncode == 1
    assert "PORT 'not-a-port' is not a port number" in result.stderr
    assert "settings were not changed" in result.stderr
    assert "PORT" not in piku("config", "hello").stdout
    wait_for_body(piku.url("hello"), "Hello from hello")


def test_deploy_command_redeploys_the_pushed_branch(piku, emperor, make_app):
    app = make_app(WEB, "hello")
    app.push()
    before = os.path.realpath(piku.root / "apps" / "hello")
    result = piku("deploy", "hello")
    assert "-----> Deploying hello" in result.stdout
    assert os.path.realpath(piku.root / "apps" / "hello") != before
    wait_for_body(piku.url("hello"), "Hello from hello")


def test_wsgi_app_runs_in_uwsgi_with_static_and_cron_next_to_it(piku, emperor, make_app):
    from conftest import TEST_APPS
    app = make_app(TEST_APPS / "wsgi-plain", "plain")
    app.push()
    body = wait_for_body(piku.url("plain"), "GREETING=from ENV")
    assert body.startswith("wsgi 3.")
    assert fetch(piku.url("plain", "/robots.txt")) == (200, "static file\n")   # static: next to wsgi
    assert piku.workers("plain") == ["cron-tick.1", "wsgi.1"]
    wait_until(lambda: len(piku.master_pids("plain")) == 3, message="the wsgi and cron vassals and the front")


def test_a_live_apps_own_front_is_not_another_program_on_its_port(piku, emperor, make_app):
    """A change of the front's own settings rewrites the front on the same PORT: its listener is
    the app's own, not 'another program' -- while a port another program holds stays refused."""
    import socket
    app = make_app(EXAMPLES / "web", "own")
    app.push()
    port = piku.live_env("own")["PORT"]
    for setting in ("UWSGI_LOG_MAXSIZE=2097152", "NGINX_PROXY_READ_TIMEOUT=61", "UWSGI_LOG_MAXSIZE=1048576"):
        changed = piku("config:set", "own", setting, check=False)
        assert changed.returncode == 0 and "in use by another program" not in changed.stderr, changed.stderr
        assert piku.live_env("own")["PORT"] == port
        wait_for_body(f"http://127.0.0.1:{port}/", "Hello from own")
    with socket.create_server(("127.0.0.1", 0)) as other:
        taken = other.getsockname()[1]
        refused = piku("config:set", "own", f"PORT={taken}", check=False)
        assert refused.returncode == 1 and f"PORT {taken} on 127.0.0.1 is in use by another program" in refused.stderr
    wait_for_body(f"http://127.0.0.1:{port}/", "Hello from own")
