"""Fail-safe deploys: health-gated switches under load, releases, rollback, races and kills.

Every load loop here is bounded (count and time) and talks to 127.0.0.1 only.
"""

import json
import os
import re
import signal
import subprocess
import threading
import time

import pytest

from conftest import (EXAMPLES, PIKU_PY, PYTHON, AppRepo, Emperor, LoadLoop, fetch, sandbox_problem, wait_for_body,
                      wait_until)

FLASK_UWSGI = EXAMPLES / "flask-uwsgi"
FLASK_GUNICORN = EXAMPLES / "flask-gunicorn"
REQUIREMENTS = EXAMPLES / "requirements"
WEB = EXAMPLES / "web"

# server -> (example, the file that says "Hello from", the Procfile kind, Pythons it needs)
SERVERS = {
    "uwsgi": (FLASK_UWSGI, "wsgi.py", "wsgi", ("3.11",)),
    "gunicorn": (FLASK_GUNICORN, "wsgi.py", "wsgi", ("3.11", "3.12")),
    "web-gunicorn": (REQUIREMENTS, "app.py", "web", ("3.11",)),
    "asgi": (EXAMPLES / "fastapi", "main.py", "asgi", ("3.11",)),
    "packaged-web": (EXAMPLES / "uv-package", "src/hello_pkg/greeting.py", "web", ("3.11",)),
}


def mark(app, source, main, marker):
    """Change the code so that the app answers "MARKER from ..." instead of "Hello from ..."."""
    app.write(main, (source / main).read_text().replace("Hello from", f"{marker} from").replace('"Hello"', f'"{marker}"'))
    app.commit(marker)


def no_piku_traceback(output):
    return f'File "{PIKU_PY}"' not in output and "Traceback" not in output.split("last lines of")[0]


@pytest.mark.parametrize("server", SERVERS)
def test_every_change_to_a_healthy_app_fails_no_request(server, piku, emperor, make_app, toolchain):
    source, main, kind, pythons = SERVERS[server]
    toolchain.require(*pythons)
    app = make_app(source, "live")
    app.push()
    url = piku.url("live")
    wait_for_body(url, "Hello from")
    first = app.git("rev-parse", "HEAD").stdout.strip()
    with LoadLoop(url) as load:
        mark(app, source, main, "Second")
        pushed = app.push()
        assert "Health check passed" in pushed.output
        wait_for_body(url, "Second from")

        if server == "uwsgi":       # a dependency change: a new environment, built beside the live one
            subprocess.run([f"{toolchain.root}/bin/uv", "add", "--no-sync", "six"], cwd=app.path, env=piku.env,
                           check=True, capture_output=True)
            app.commit("add six")
            assert "Running uv sync" in app.push().output
            wait_for_body(piku.url("live", "/import/six"), "yes")
        if server == "gunicorn":    # a Python version change: 3.12 on gunicorn -> 3.11 on uWSGI
            moved = piku("config:set", "live", "PYTHON_VERSION=3.11")
            assert "Serving wsgi with uwsgi" in moved.stdout
            wait_for_body(piku.url("live", "/python"), "3.11")
        changed = piku("config:set", "live", "GREETING=under load")
        assert "Health check passed" in changed.stdout
        piku("config:unset", "live", "GREETING")
        piku("ps:scale", "live", f"{kind}=2")
        assert piku.workers("live") == [f"{kind}.1", f"{kind}.2"]
        piku("ps:scale", "live", f"{kind}=1")
        assert piku.workers("live") == [f"{kind}.1"]
        piku("restart", "live")

        second = app.git("rev-parse", "HEAD").stdout.strip()       # what the rollback returns to
        mark(app, source, main, "Third")
        app.push()
        wait_for_body(url, "Third from")
        before = piku.releases("live")[-2]["version"]
        back = piku("rollback", "live")
        assert f"Rolling live back to v{before}" in back.stdout
        wait_for_body(url, "Second from")
        assert piku.branch("live") == second
    load.stop()
    assert not load.failures, load.report()
    assert load.served("Second from") and load.served("Third from"), load.report()
    assert load.count > 100, load.report()
    listing = piku("releases", "live").stdout.splitlines()
    newest = piku.releases("live")[-1]["version"]
    assert listing[0].startswith(f"v{newest} ") and "rollback to v" in listing[0] and "[live]" in listing[0]
    assert [line.split()[0] for line in listing] == [f"v{newest - n}" for n in range(5)], "five kept, newest first"
    assert piku.releases("live")[0]["rev"] != first


def test_rollback_runs_the_kept_release_without_building(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(FLASK_UWSGI, "back")
    app.push()
    url = piku.url("back")
    wait_for_body(url, "Hello from back")
    wait_for_body(piku.url("back", "/import/six"), "no")
    v1 = app.git("rev-parse", "HEAD").stdout.strip()
    subprocess.run([f"{toolchain.root}/bin/uv", "add", "--no-sync", "six"], cwd=app.path, env=piku.env,
                   check=True, capture_output=True)
    mark(app, FLASK_UWSGI, "wsgi.py", "Sixed")
    assert "Running uv sync" in app.push().output
    wait_for_body(piku.url("back", "/import/six"), "yes")
    first, second = piku.releases("back")           # each record lists the environments it runs with
    assert first["environments"] == [first["env"]["VIRTUAL_ENV"]] != second["environments"], (first, second)

    result = piku("rollback", "back")
    assert piku.releases("back")[-1]["environments"] == first["environments"]
    assert "uv" not in result.stdout and "Building" not in result.stdout, result.stdout
    wait_for_body(url, "Hello from back")
    wait_for_body(piku.url("back", "/import/six"), "no")
    assert piku.branch("back") == v1, "the branch moves back with the release"
    assert "rollback to v1" in piku("releases", "back").stdout.splitlines()[0]

    again = piku("rollback", "back", "v2")
    assert "Rolling back back to v2" in again.stdout
    wait_for_body(url, "Sixed from back")
    mark(app, FLASK_UWSGI, "wsgi.py", "Forward")
    app.git("pull", "--quiet", "--rebase=false", str(piku.root / "repos" / "back"), "main", check=False)
    app.push()      # a normal fast-forward from the rolled-back branch
    wait_for_body(url, "Forward from back")

    for bad, message in (("v99", "v99 is not a kept release"), ("latest", "is not a release"), ("v5", "already live")):
        refused = piku("rollback", "back", bad, check=False)
        assert refused.returncode == 1 and message in refused.stderr, (bad, refused.stderr)
        assert "Traceback" not in refused.stderr
    piku("config:set", "back", "PIKU_KEEP_RELEASES=1")     # prune: only what the kept record lists stays
    live = piku.releases("back")
    assert len(live) == 1 and sorted(map(str, (piku.root / "envs" / "back").glob("python-*"))) == \
        live[0]["environments"], live


def test_failed_deploys_change_nothing_a_visitor_sees(piku, emperor, make_app, toolchain):
    toolchain.require("3.11")
    app = make_app(FLASK_UWSGI, "safe")
    app.push()
    url = piku.url("safe")
    wait_for_body(url, "Hello from safe")
    good = app.git("rev-parse", "HEAD").stdout.strip()
    source = (FLASK_UWSGI / "wsgi.py").read_text()
    pyproject = (FLASK_UWSGI / "pyproject.toml").read_text()
    cases = [
        ("failing preflight", {"Procfile": "wsgi: wsgi:app\npreflight: echo preflight says no >&2; exit 4\n"},
         ["the preflight command failed (exit code 4)", "preflight says no"]),
        ("failing release", {"Procfile": "wsgi: wsgi:app\nrelease: echo migration failed >&2; exit 3\n"},
         ["the release command failed (exit code 3)", "migration failed"]),
        ("crash on import", {"wsgi.py": "raise RuntimeError('boom at import')\n"},
         ["the new release did not start: wsgi.1 exited while starting", "RuntimeError: boom at import"]),
        ("never answers", {"wsgi.py": source + "\n\n@app.before_request\ndef hang():\n    import time\n"
                                                "    time.sleep(600)\n",
                           "ENV": "PIKU_HEALTHCHECK_TIMEOUT=2\n"},
         ["wsgi.1 was not ready after 2 s (PIKU_HEALTHCHECK_TIMEOUT)", "timed out"]),
        ("500 on the health path", {"wsgi.py": source + "\n\n@app.before_request\ndef broken():\n"
                                                        "    return 'broken', 500\n",
                                    "ENV": "PIKU_HEALTHCHECK_TIMEOUT=2\n"},
         ["GET / answered 500"]),
        ("worker that exits", {"Procfile": "wsgi: wsgi:app\nworker: echo worker gave up; exit 1\n"},
         ["the command of worker.1 exited while starting", "worker gave up"]),
        ("no such package", {"pyproject.toml": pyproject.replace('"flask>=3.0"', '"flask>=3.0", "piku-no-such-pkg-zz"'),
                             "uv.lock": None},
         ["the dependencies cannot be resolved"]),
        ("stale lock", {"pyproject.toml": pyproject.replace('"flask>=3.0"', '"flask>=3.0", "six"')},
         ["uv.lock is out of date with pyproject.toml"]),
    ]
    with LoadLoop(url) as load:
        for name, files, messages in cases:
            app.git("reset", "--quiet", "--hard", good)
            for path, text in files.items():
                if text is None:
                    (app.path / path).unlink()
                else:
                    app.write(path, text)
            app.commit(name)
            result = app.push(check=False)
            assert result.returncode != 0, name
            assert "pre-receive hook declined" in result.output, name
            for message in messages:
                assert message in result.output, (name, message, result.output)
            assert no_piku_traceback(result.output), result.output
            assert piku.branch("safe") == good, name
            assert fetch(url)[1].startswith("Hello from safe"), name
    load.stop()
    assert not load.failures, load.report()
    assert load.count > 200, load.report()
    assert set(load.bodies) == {fetch(url)[1]}, "every answer came from the release that was live"
    assert piku.workers("safe") == ["wsgi.1"]
    assert len(piku.releases("safe")) == 1
    assert len(list((piku.root / "releases" / "safe").iterdir())) == 1, "failed releases leave no folder"


def test_refused_settings_leave_everything_as_it_was(piku, emperor, make_app):
    other = make_app(WEB, "other")
    other.push()
    app = make_app(WEB, "hello")
    app.push()
    url = piku.url("hello")
    wait_for_body(url, "Hello from hello")

    wait_until(lambda: piku.releases("hello")[-1]["state"] == "live", message="git to move the branch")

    def snapshot():
        envs = piku.root / "envs" / "hello"
        return ((envs / "LIVE_ENV").read_text(), (envs / "SCALING").read_text(), (envs / "ENV").read_text(),
                os.readlink(piku.root / "apps" / "hello"), piku.vassals("hello"), piku.releases("hello"))

    before = snapshot()
    refusals = [
        ("UWSGI_PROCESSES=abc", "UWSGI_PROCESSES must be a whole number"),
        ("PORT=abc", "PORT 'abc' is not a port number"),
        ("PORT=\u00b2", "is not a port number"),
        ("PORT=22", "PORT 22 is a privileged port"),
        (f"PORT={piku.live_env('other')['PORT']}", "is already used by the app 'other'"),
        ("BIND_ADDRESS=203.0.113.7", "BIND_ADDRESS 203.0.113.7 is not an address of this host"),
        ("BIND_ADDRESS=localhost", "is not an IP address"),
        ("PIKU_HEALTHCHECK_TIMEOUT=soon", "PIKU_HEALTHCHECK_TIMEOUT must be a number of seconds"),
        ("PIKU_HEALTHCHECK_PATH=health", "is not a URL path"),
    ]
    for setting, message in refusals:
        result = piku("config:set", "hello", setting, check=False)
        assert result.returncode == 1, setting
        assert message in result.stderr, (setting, result.stderr)
        assert "settings were not changed" in result.stderr
        assert "Traceback" not in result.stderr
        assert snapshot() == before, setting
    scaled = piku("ps:scale", "hello", "web=\u00b2", check=False)
    assert scaled.returncode == 1 and "malformed scaling" in scaled.stderr and "Traceback" not in scaled.stderr

    app.write("ENV", "GREETING=hello\nHUGE=" + "x" * 140000 + "\n")
    app.commit("a setting no process can start with")
    pushed = app.push(check=False)
    assert pushed.returncode != 0 and "no process can be started with a setting over" in pushed.output
    assert snapshot() == before

    piku("restart", "hello")
    wait_for_body(url, "Hello from hello")
    assert fetch(piku.url("other"))[1].startswith("Hello from other"), "the other app never noticed"


def test_two_pushes_at_once_leave_the_branch_naming_what_is_served(piku, emperor, make_app, tmp_path):
    app = make_app(WEB, "race")
    app.push()
    url = piku.url("race")
    wait_for_body(url, "Hello from race")
    copies = []
    for name in ("alpha", "beta"):
        copy = AppRepo(piku, app.path, tmp_path / "copies" / name, "race")
        copy.write("app.py", (WEB / "app.py").read_text().replace("Hello from", f"{name.title()} from"))
        copy.commit(name)
        copies.append(copy)
    results = {}
    threads = [threading.Thread(target=lambda c=c: results.update({c.path.name: c.push(check=False)}))
               for c in copies]
    with LoadLoop(url) as load:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=300)
    assert not load.failures, load.report()
    assert sorted(results) == ["alpha", "beta"], "both pushes finished"
    winners = [name for name, result in results.items() if result.returncode == 0]
    assert len(winners) == 1, {name: result.output for name, result in results.items()}
    loser = results[({"alpha", "beta"} - set(winners)).pop()]
    assert "moved while this push waited" in loser.output or "fetch first" in loser.output, loser.output
    time.sleep(0.3)     # the winner's keeper confirms once git has moved the branch
    served = fetch(url)[1]
    branch_says = app.git("--git-dir", str(piku.root / "repos" / "race"), "show", f"{piku.branch('race')}:app.py")
    assert served.split()[0] in branch_says.stdout
    assert piku.releases("race")[-1]["state"] == "live"


def generations(piku, app):
    """The generations whose workers are enabled (gN of APP@gN.KIND.I.ini)."""
    return sorted({int(name.split("@", 1)[1].split(".", 1)[0][1:]) for name in piku.vassals(app)
                   if re.fullmatch(r"[^@]+@g[0-9]+\..*", name)})


def deploy_records(piku, app):
    folder = piku.root / "envs" / app / "deploys"
    return [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"), key=lambda p: int(p.stem))]


def test_a_push_returns_before_its_old_workers_drain_and_the_next_push_waits_for_them(piku, emperor, make_app):
    """Issue 20: the old generation drains after the push returned, under the push's lock; a push
    that comes meanwhile switches once it drained, and no request fails through either."""
    app = make_app(WEB, "drain")
    app.push()
    url = piku.url("drain")
    wait_for_body(url, "Hello from drain")
    with LoadLoop(url) as load:
        for marker in ("Second", "Third"):          # Third goes as soon as Second returned
            app.write("app.py", (WEB / "app.py").read_text().replace("Hello from", f"{marker} from"))
            app.commit(marker)
            app.push(settle=False)
        wait_for_body(url, "Third from")
        wait_until(lambda: len(generations(piku, "drain")) == 1, timeout=15, message="the last drain")
    assert not load.failures, load.report()
    assert load.served("Second from") and load.count > 20, load.report()
    first, second, third = deploy_records(piku, "drain")
    for record in (second, third):
        wait_until(lambda: len(deploy_records(piku, "drain")[record["id"] - 1].get("after", [])) == 2, timeout=15)
    second, third = deploy_records(piku, "drain")[1:]
    (moved, _, moved_at), (drained, took, drained_at) = second["after"]
    assert moved == "git moved the branch" and drained == "the old workers drained and stopped"
    assert second["seconds"] <= moved_at <= drained_at, "the push returned before its drain"
    assert third["started"] >= second["started"] + drained_at + took - 0.01, "the next push waited for the drain"
    assert generations(piku, "drain") == [piku.releases("drain")[-1]["gen"]]
    assert piku.branch("drain") == app.git("rev-parse", "HEAD").stdout.strip()
    assert piku.releases("drain")[-1]["state"] == "live"


def test_a_drain_killed_after_the_push_is_finished_by_the_next_command(piku, emperor, make_app):
    """The process that drains after a push is killed: the old workers it left are stopped by the
    next command that touches the app (reconcile), and the new release stays live."""
    app = make_app(WEB, "killdrain")
    app.push()
    url = piku.url("killdrain")
    wait_for_body(url, "Hello from killdrain")
    caught = 0
    with LoadLoop(url) as load:
        for trial, delay in enumerate((0.0, 0.0, 0.05)):
            marker = f"Trial{trial}"
            app.write("app.py", (WEB / "app.py").read_text().replace("Hello from", f"{marker} from"))
            app.commit(marker)
            app.push(settle=False)
            time.sleep(delay)
            keepers = hook_processes("killdrain")
            caught += bool(keepers) and len(generations(piku, "killdrain")) > 1
            kill_tree(keepers)
            wait_for_body(url, f"{marker} from")
            assert piku("doctor", "killdrain", check=False).returncode in (0, 1)     # settles the app
            assert generations(piku, "killdrain") == [piku.releases("killdrain")[-1]["gen"]]
            assert piku.releases("killdrain")[-1]["state"] == "live"
            assert piku.branch("killdrain") == app.git("rev-parse", "HEAD").stdout.strip()
    assert not load.failures, load.report()
    assert caught, "at least one kill landed while the old workers were still running"


def hook_processes(app):
    import psutil
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "git-hook" in cmdline and "--stage=pre" in cmdline and app in cmdline:
            found.append(proc)
    return found


def kill_tree(procs):
    import psutil
    family = []
    for proc in procs:
        try:
            family += [proc, *proc.children(recursive=True)]
        except psutil.Error:
            pass
    for proc in family:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.Error:
            pass
    psutil.wait_procs(family, timeout=10)


@pytest.mark.parametrize("moment", ["release phase", "health check", "switch"])
def test_a_deploy_killed_at_any_point_leaves_the_site_serving(moment, piku, emperor, make_app):
    app = make_app(WEB, "tough")
    app.write("Procfile", "web: python3 app.py\nrelease: touch $DATA_ROOT/release-ran; sleep $RELEASE_SLEEP\n")
    app.write("ENV", "GREETING=hello\nRELEASE_SLEEP=0\n")
    app.commit("a release phase")
    app.push()
    url = piku.url("tough")
    wait_for_body(url, "Hello from tough")
    good = piku.branch("tough")
    marker = piku.root / "data" / "tough" / "release-ran"
    with LoadLoop(url) as load:
        app.write("app.py", (WEB / "app.py").read_text().replace("Hello from", "Killed from"))
        if moment == "release phase":
            app.write("ENV", "GREETING=hello\nRELEASE_SLEEP=30\n")
        elif moment == "health check":
            app.write("app.py", "import time\ntime.sleep(30)\n" + (app.path / "app.py").read_text())
        app.commit(f"killed during the {moment}")
        marker.unlink()
        push = subprocess.Popen(["git", "push", "--receive-pack", f"{PYTHON} {PIKU_PY} git-receive-pack",
                                 "tough", "HEAD:main"], cwd=app.path, env=piku.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(marker.exists, message="the release phase to start")
            if moment == "health check":
                wait_until(lambda: len(piku.workers("tough")) == 2, message="the new worker to start")
            elif moment == "switch":
                wait_until(lambda: "Killed from" in fetch(url)[1], timeout=30, message="the switch")
            kill_tree(hook_processes("tough"))
        finally:
            push.wait(timeout=60)
        attempt = piku("deploys", "tough").stdout.splitlines()[0].split()
        # what the killed deploy left in its record (after the switch the deploy may have finished first)
        assert attempt[3] == "interrupted" or moment == "switch" and attempt[3] == "ok", attempt
        assert fetch(url)[0] == 200
        if moment != "switch":
            assert piku.branch("tough") == good
            assert fetch(url)[1].startswith("Hello from tough")
        app.write("ENV", "GREETING=hello\nRELEASE_SLEEP=0\n")
        app.write("app.py", (WEB / "app.py").read_text().replace("Hello from", "Recovered from"))
        app.commit("the next push")
        app.push()
        wait_for_body(url, "Recovered from tough")
    load.stop()
    assert not load.failures, load.report()
    assert piku.workers("tough") == ["web.1"], "the killed deploy's workers are gone"
    assert piku.branch("tough") == app.git("rev-parse", "HEAD").stdout.strip()
    piku("config:set", "tough", "GREETING=after", timeout=60)       # no lock was left behind
    wait_for_body(url, "GREETING=after")


@pytest.fixture
def small_disk(tmp_path):
    """A PIKU_ROOT on its own 200 MB tmpfs, so a test can fill it (needs root, as CI is)."""
    root = tmp_path / "small"
    root.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200m", "tmpfs", str(root)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield root
    subprocess.run(["umount", "-l", str(root)])


def test_a_full_disk_rejects_the_push_and_the_live_release_keeps_serving(small_disk, toolchain, tmp_path):
    from conftest import Emperor, Piku
    toolchain.require("3.11")
    piku = Piku(small_disk / "piku", toolchain)
    piku("setup")
    emperor = Emperor(piku.root)
    try:
        app = AppRepo(piku, FLASK_UWSGI, tmp_path / "work" / "full", "full")
        app.push()
        url = piku.url("full")
        wait_for_body(url, "Hello from full")
        good = piku.branch("full")
        free = os.statvfs(small_disk)
        filler = small_disk / "filler"
        room = 3 * 2**20          # enough for git and the checkout, not for a new environment
        subprocess.run(["fallocate", "-l", str(free.f_bavail * free.f_frsize - room), str(filler)], check=True)
        subprocess.run([f"{toolchain.root}/bin/uv", "add", "--no-sync", "six"], cwd=app.path, env=piku.env,
                       check=True, capture_output=True)
        mark(app, FLASK_UWSGI, "wsgi.py", "Full")
        with LoadLoop(url) as load:
            result = app.push(check=False)
        assert result.returncode != 0
        assert "No space left on device" in result.output, result.output
        assert "nothing" in result.output and no_piku_traceback(result.output), result.output
        assert piku.branch("full") == good
        assert not load.failures and load.count, load.report()
        assert fetch(url)[1].startswith("Hello from full")
        filler.unlink()
        app.push()
        wait_for_body(url, "Full from full")
    finally:
        emperor.stop()


PICKY_APP = '''\
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Picky(BaseHTTPRequestHandler):
    def do_GET(self):
        ok = self.path == os.environ.get("WANT_PATH", "/") and self.headers["Host"] == os.environ["WANT_HOST"]
        body = f"Hello from picky {self.path} {self.headers['Host']}\\n".encode()
        self.send_response(200 if ok else 503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


ThreadingHTTPServer((os.environ["BIND_ADDRESS"], int(os.environ["PORT"])), Picky).serve_forever()
'''


def test_the_health_check_asks_for_the_first_server_name_and_the_path_set(piku, emperor, make_app):
    app = make_app(WEB, "picky")
    app.write("app.py", PICKY_APP)
    app.write("ENV", "NGINX_SERVER_NAME=shop.example.com www.example.com\nWANT_HOST=shop.example.com\n"
                     "WANT_PATH=/health\nPIKU_HEALTHCHECK_PATH=/health\nPIKU_HEALTHCHECK_TIMEOUT=3\n")
    app.commit("answers only /health for shop.example.com")
    assert "Health check passed" in app.push().output
    refused = piku("config:set", "picky", "PIKU_HEALTHCHECK_PATH=/", check=False)
    assert refused.returncode == 1 and "GET / answered 503" in refused.stderr
    refused = piku("config:set", "picky", "NGINX_SERVER_NAME=other.example.com", check=False)
    assert refused.returncode == 1 and "GET /health answered 503" in refused.stderr


def test_a_host_running_the_previous_piku_switches_to_this_one(piku, make_app, tmp_path):
    """Vassals an earlier piku.py wrote (APP_KIND.N.ini on PORT) give way on the first deploy -- on
    a host whose emperor that piku.py set up and started (without the sandbox's vassal wrapper),
    after `update` ran this one's setup."""
    old = tmp_path / "old-piku.py"
    shown = subprocess.run(["git", "show", "409ee85:piku.py"], cwd=PIKU_PY.parent, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip("the previous piku.py is not in this clone's history")
    old.write_text(shown.stdout)
    subprocess.run([PYTHON, str(old), "setup"], env=piku.env, capture_output=True, check=True)
    emperor = Emperor(piku.root)
    try:
        app = make_app(WEB, "veteran")
        legacy = subprocess.run(["git", "push", "--receive-pack", f"{PYTHON} {old} git-receive-pack", "veteran",
                                 "HEAD:main"], cwd=app.path, env=piku.env, capture_output=True, text=True)
        assert legacy.returncode == 0, legacy.stderr
        url = piku.url("veteran")
        wait_for_body(url, "Hello from veteran")
        assert (piku.root / "uwsgi-enabled" / "veteran_web.1.ini").exists()
        time.sleep(1)
        piku("setup")       # what `update` runs
        assert (piku.root / "sandbox" / "veteran_web.1.host").exists()
        mark(app, WEB, "app.py", "Upgraded")
        pushed = app.push()
        if not sandbox_problem():           # (in a chroot no sandbox starts at all)
            assert "the uWSGI emperor runs without piku's vassal wrapper" in pushed.output    # until restarted
        assert piku.url("veteran") == url, "the same PORT"
        wait_for_body(url, "Upgraded from veteran")
        assert not (piku.root / "uwsgi-enabled" / "veteran_web.1.ini").exists()
        assert piku.workers("veteran") == ["web.1"]
    finally:
        emperor.stop()


def test_with_auto_restart_off_pushes_never_remove_the_code_that_still_runs(piku, emperor, make_app):
    app = make_app(EXAMPLES / "static", "site")
    app.push()
    url = piku.url("site")
    wait_for_body(url, "Hello from a static site")
    piku("config:set", "site", "PIKU_AUTO_RESTART=false", "PIKU_KEEP_RELEASES=1")
    for number in (2, 3, 4):
        app.write("public/index.html", f"<title>t</title>version {number}\n")
        app.commit(f"version {number}")
        assert "PIKU_AUTO_RESTART is off" in app.push().output
        assert fetch(url) == (200, (EXAMPLES / "static" / "public" / "index.html").read_text())
    assert len(piku.releases("site")) == 1, "one release kept..."
    assert len(list((piku.root / "releases" / "site").iterdir())) == 2, "...and the code the workers run"
    piku("restart", "site")
    wait_for_body(url, "version 4")
    piku("config:unset", "site", "PIKU_AUTO_RESTART")
    app.write("public/index.html", "<title>t</title>version 5\n")
    app.commit("version 5")
    app.push()
    wait_for_body(url, "version 5")
    assert len(list((piku.root / "releases" / "site").iterdir())) == 1


def test_different_apps_deploy_in_parallel(piku, emperor, make_app):
    apps = [make_app(WEB, name) for name in ("north", "south")]
    for app in apps:
        app.write("Procfile", "web: python3 app.py\n"
                              "release: date +%s.%N > $DATA_ROOT/began; sleep 2; date +%s.%N > $DATA_ROOT/ended\n")
        app.commit("a release phase that takes 2 s")
    results = {}
    threads = [threading.Thread(target=lambda a=a: results.update({a.name: a.push(check=False)})) for a in apps]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(result.returncode == 0 for result in results.values()), results
    assert not any("Waiting for another change" in result.output for result in results.values())
    spans = [[float((piku.root / "data" / name / stamp).read_text()) for stamp in ("began", "ended")]
             for name in ("north", "south")]
    assert max(span[0] for span in spans) < min(span[1] for span in spans), f"the release phases overlap: {spans}"
    for app in apps:
        wait_for_body(piku.url(app.name), f"Hello from {app.name}")
    assert piku.url("north") != piku.url("south")


# --- PORT is one app's on every path -------------------------------------------------------

def test_a_rollback_into_a_port_another_app_took_is_refused(piku, emperor, make_app):
    from conftest import free_port
    first = make_app(WEB, "porta")
    first.push()
    old_port = piku.live_env("porta")["PORT"]
    new_port = str(free_port())
    piku("config:set", "porta", f"PORT={new_port}")                     # v2 on another port
    second = make_app(WEB, "portb")
    second.push()
    piku("config:set", "portb", f"PORT={old_port}")                     # which portb now takes
    wait_for_body(f"http://127.0.0.1:{old_port}/", "Hello from portb")
    releases = len(piku.releases("porta"))
    for command in (["rollback", "porta", "v1"], ["rollback", "porta"]):
        refused = piku(*command, check=False)
        assert refused.returncode == 1, refused.stdout
        assert f"PORT {old_port} is already used by the app 'portb'" in refused.stderr, refused.stderr
    assert len(piku.releases("porta")) == releases and piku.live_env("porta")["PORT"] == new_port
    assert fetch(f"http://127.0.0.1:{new_port}/")[1].startswith("Hello from porta")
    assert fetch(f"http://127.0.0.1:{old_port}/")[1].startswith("Hello from portb")
    limited = dict(piku.env, FINGERPRINT="SHA256:limited", NAME="limited", APPS="porta")
    hidden = subprocess.run([PYTHON, str(PIKU_PY), "rollback", "porta", "v1"], env=limited, capture_output=True,
                            text=True)
    assert f"PORT {old_port} is already used by another app" in hidden.stderr and "portb" not in hidden.stderr
    piku("restart", "porta")                                            # its own port, still its own
    assert fetch(f"http://127.0.0.1:{new_port}/")[1].startswith("Hello from porta")


# --- a deploy ends with its client ------------------------------------------------------------

def sleepers(marker, app):
    """The processes running `sleep MARKER` for app (a release: command of these tests)."""
    import psutil
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (proc.info["cmdline"] or [])[-2:] == ["sleep", marker] and proc.environ().get("APP") == app:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_client_that_disconnects_ends_its_deploy(piku, emperor, make_app):
    import fcntl
    app = make_app(WEB, "gone")
    app.push()
    url = piku.url("gone")
    good, workers = piku.branch("gone"), piku.vassals("gone")
    app.write("Procfile", "web: python3 app.py\nrelease: echo releasing; sleep 301\n")
    app.write("app.py", (WEB / "app.py").read_text().replace("Hello from", "Abandoned from"))
    app.commit("a push whose client goes away")
    push = subprocess.Popen(["git", "push", "--receive-pack", f"{PYTHON} {PIKU_PY} git-receive-pack", "gone",
                             "HEAD:main"], cwd=app.path, env=piku.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_until(lambda: sleepers("301", "gone"), message="the release command to run")
    push.kill()                                  # the developer's laptop goes away mid-deploy
    push.wait()
    started = time.monotonic()
    wait_until(lambda: not sleepers("301", "gone") and not hook_processes("gone"), timeout=30,
               message="the deploy to notice its client left and stop")
    print(f"deploy stopped {time.monotonic() - started:.1f} s after its client left")
    with open(piku.root / "locks" / "gone.lock", "a") as lock:       # the lock is free at once
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert piku.vassals("gone") == workers and piku.branch("gone") == good
    assert fetch(url)[1].startswith("Hello from gone")
    record = piku("deploys", "gone").stdout.splitlines()[0].split()
    assert record[3] == "interrupted", record
    shown = piku("deploys", "gone", record[0]).stdout
    assert "releasing" in shown and "the client disconnected: the deploy was stopped" in shown


def test_release_commands_and_health_checks_have_an_end(piku, emperor, make_app):
    app = make_app(WEB, "slow")
    app.write("Procfile", "web: python3 app.py\nrelease: sleep 302\n")
    app.write("ENV", "PIKU_RELEASE_TIMEOUT=2\n")
    app.commit("a release phase that never ends")
    started = time.monotonic()
    pushed = app.push(check=False)
    assert pushed.returncode != 0 and time.monotonic() - started < 30
    assert "the release command did not finish within 2 s (PIKU_RELEASE_TIMEOUT); it was stopped" in pushed.output
    assert not sleepers("302", "slow"), "the command and what it started are gone"
    app.write("Procfile", "web: python3 app.py\nrelease: echo starting; exec >/dev/null 2>&1; sleep 306\n")
    app.commit("a release phase that closes its output, then never ends")
    started = time.monotonic()
    quiet = app.push(check=False)
    assert quiet.returncode != 0 and time.monotonic() - started < 30 and "did not finish within 2 s" in quiet.output
    assert not sleepers("306", "slow")
    app.write("Procfile", "web: python3 app.py\n")
    app.commit("no release phase")
    app.push()
    refused = piku("config:set", "slow", "PIKU_HEALTHCHECK_TIMEOUT=3600", check=False)
    assert refused.returncode == 1 and "is more than a push can wait (600 s)" in refused.stderr


# --- destroy is final -------------------------------------------------------------------------

def test_commands_queued_behind_destroy_find_the_app_gone(piku, emperor, make_app):
    import fcntl
    app = make_app(WEB, "doomed")
    app.push()
    piku("config:set", "doomed", "OLD_SECRET=from-the-first-life")
    lock_path = piku.root / "locks" / "doomed.lock"
    holder = open(lock_path, "a")
    fcntl.flock(holder, fcntl.LOCK_EX)            # the app is busy: everything below queues
    try:
        destroy = subprocess.Popen([PYTHON, str(PIKU_PY), "destroy", "doomed"], env=piku.env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        queued = [subprocess.Popen([PYTHON, str(PIKU_PY), *command], env=piku.env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
                  for command in (["config:set", "doomed", "LATE=1"], ["rollback", "doomed"], ["deploy", "doomed"])]
        time.sleep(1.0)
    finally:
        fcntl.flock(holder, fcntl.LOCK_UN)
        holder.close()
    assert destroy.wait(timeout=120) == 0, destroy.stderr.read()
    for command in queued:
        code, stderr = command.wait(timeout=120), command.stderr.read()
        # one of them may have run before destroy took the lock; then destroy removed what it did
        assert code == 0 or "no longer exists: it was destroyed while this command waited" in stderr, stderr
    assert not (piku.root / "envs" / "doomed").exists() and not (piku.root / "repos" / "doomed").exists()
    app.push()                                                         # a new app of that name
    assert "OLD_SECRET" not in piku("config", "doomed").stdout and "LATE" not in piku("config", "doomed").stdout
    assert len(piku("deploys", "doomed").stdout.splitlines()) == 1, "no deploy record of the first life"


def test_release_command_output_is_masked_like_uvs(piku, emperor, make_app):
    app = make_app(WEB, "masked")
    app.write("Procfile", "web: python3 app.py\nrelease: echo token=$API_TOKEN; echo done\n")
    app.write("ENV", "API_TOKEN=tok-5511-never-shown\n")
    app.commit("a release phase that prints a secret")
    pushed = app.push()
    assert "token=****" in pushed.output and "tok-5511" not in pushed.output, pushed.output
    for record in (piku.root / "envs" / "masked" / "deploys").glob("*.json"):
        assert "tok-5511" not in record.read_text()
    assert "tok-5511" not in piku("deploys", "masked", "1").stdout


def test_lesser_promises_of_the_review(piku, emperor, make_app):
    """A warning never lands on a step's line; ps --json answers errors in JSON; repos and
    settings are no one else's."""
    import json
    import stat
    app = make_app(WEB, "tidy")
    app.push()
    for private in ("repos/tidy", "repos/tidy/config", "envs/tidy", "envs/tidy/ENV", "envs/tidy/releases.json"):
        mode = (piku.root / private).stat().st_mode
        assert not mode & (stat.S_IRWXO), (private, oct(mode))
    missing = piku("ps", "nothere", "--json", check=False)
    assert missing.returncode == 1 and json.loads(missing.stdout)["error"] == "app 'nothere' not found"
    undeployed = subprocess.run([PYTHON, str(PIKU_PY), "ps", "tidy", "--json"], env=piku.env, capture_output=True,
                                text=True)
    assert json.loads(undeployed.stdout)["app"] == "tidy"
    # stdout and stderr as two pipes (ssh without a terminal): every step line is complete before
    # a warning can be written to the other pipe
    changed = piku("config:set", "tidy", "NGINX_STATIC_PATHS=/files/:.")
    assert "NGINX_STATIC_PATHS is served by nginx" in changed.stderr
    assert re.search(r"^-----> Starting web\.1 beside the live workers$", changed.stdout, re.M), changed.stdout


def test_a_write_that_fails_at_the_commit_leaves_the_old_release_or_the_new_one(piku, emperor, make_app):
    """A full disk when the release record is written: refused, and nothing of it goes live later;
    when a file derived from the record is written: live, said so, and the next command writes it."""
    app = make_app(EXAMPLES / "web", "disk")
    app.push()
    url = piku.url("disk")
    versions = len(piku.releases("disk"))
    full = dict(piku.env)
    piku.env["PIKU_TEST_WRITE_FAILS"] = "releases.json"
    try:
        refused = piku("config:set", "disk", "GREETING=refused", check=False)
    finally:
        piku.env = full
    assert refused.returncode == 1 and "the release could not be recorded (No space left on device); nothing was " \
        "changed" in refused.stderr and "Traceback" not in refused.stderr, refused.stderr
    assert len(piku.releases("disk")) == versions and piku.live_env("disk")["GREETING"] == "hello"
    piku("restart", "disk")             # the next command does not put the refused setting live
    wait_for_body(url, "GREETING=hello\n")
    assert "GREETING=refused" not in fetch(url)[1] and len(piku.releases("disk")) == versions
    piku.env = dict(full, PIKU_TEST_WRITE_FAILS="LIVE_ENV")
    try:
        live = piku("config:set", "disk", "GREETING=live")
    finally:
        piku.env = full
    assert f"v{versions + 1} is recorded as live, but envs/disk/LIVE_ENV could not be written (No space left on device)" in live.stderr
    wait_for_body(url, "GREETING=live")
    assert piku.releases("disk")[-1]["config"]["GREETING"] == "live" and piku.live_env("disk")["GREETING"] == "hello"
    piku("config:set", "disk", "OTHER=1")       # its lock's reconcile writes LIVE_ENV from the record first
    assert piku.live_env("disk")["GREETING"] == "live" and piku.live_env("disk")["OTHER"] == "1"
    wait_for_body(url, "GREETING=live")
