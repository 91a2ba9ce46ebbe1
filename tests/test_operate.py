"""Operating a host: `logs --follow` and `ps`, on real workers."""

import os
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PIKU_PY, PYTHON, TEST_APPS, stop_process_tree, wait_until


def test_logs_follow_shows_new_lines_at_once_and_keeps_following_across_rotation(piku, emperor, make_app):
    app = make_app(TEST_APPS / "ticker", "ticker")
    app.push()
    log = piku.root / "logs" / "ticker" / "worker.1.log"
    wait_until(lambda: log.exists() and "tick" in log.read_text(errors="replace"), message="ticks in the log")
    # piku's rotation, as the worker's vassal runs it once a minute, run now whatever the size
    vassal = next((piku.root / "uwsgi-enabled").glob("ticker@*.worker.1.ini")).read_text()
    rotation = next(line for line in vassal.splitlines() if "piku-rotate-log" in line and line.startswith("cron"))
    rotation = re.sub(r"-size \+[0-9]+c", "-size +0c", rotation.split(" ", 7)[7])
    follower = subprocess.Popen([PYTHON, str(PIKU_PY), "logs", "ticker", "worker", "-n", "0"], env=piku.env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latencies, counts, rotated = [], [], None
    try:
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            line = follower.stdout.readline()
            match = re.search(r"tick ([0-9]+) ([0-9]+\.[0-9]{3})", line)
            if match:
                counts.append(int(match.group(1)))
                latencies.append(time.time() - float(match.group(2)))
            if rotated is None and time.monotonic() > deadline - 3:
                rotated = subprocess.run(["/bin/sh", "-c", rotation], capture_output=True, text=True)
    finally:
        follower.terminate()
        follower.wait(timeout=10)
    assert rotated and rotated.returncode == 0, rotated
    assert log.resolve().with_name("worker.1.log.old").stat().st_size > 0, "the log was copied, then emptied"
    assert len(counts) > 100, counts[:5]
    missing = sorted(set(range(counts[0], counts[-1] + 1)) - set(counts))
    # at most what the worker wrote between the copy and the emptying (a few ms): one gap
    assert len(missing) <= 3 and (not missing or missing[-1] - missing[0] < 3), f"lines lost: {missing[:10]}"
    latencies.sort()
    median, worst = latencies[len(latencies) // 2], latencies[-1]
    print(f"logs --follow: {len(counts)} lines, median latency {median * 1000:.0f} ms, worst {worst * 1000:.0f} ms, "
          f"{len(missing)} lost at the rotation")
    assert median < 0.5, (median, worst)


def test_ps_shows_each_workers_real_processes_cpu_memory_and_restarts(piku, emperor, make_app, toolchain):
    import contextlib
    import json
    import os
    import signal

    import psutil
    from conftest import EXAMPLES
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "requirements", "psapp")     # web: gunicorn, under a uWSGI vassal
    app.push()
    piku("ps:scale", "psapp", "web=2")
    report = json.loads(piku("ps", "psapp", "--json").stdout)
    workers = {row["worker"]: row for row in report["workers"]}
    assert sorted(workers) == ["web.1", "web.2"] and report["release"] == f"v{piku.releases('psapp')[-1]['version']}"
    masters = sorted(piku.master_pid("psapp", vassal[len("psapp@"):-4]) for vassal in piku.vassals("psapp")
                     if ".web." in vassal)
    assert sorted(row["pid"] for row in workers.values()) == masters and all(map(psutil.pid_exists, masters))
    for row in workers.values():
        assert row["state"] == "running" and row["rss_bytes"] > 10 * 2**20 and row["restarts"] == 0
        gunicorn = [pid for pid in row["processes"] if "gunicorn" in " ".join(psutil.Process(pid).cmdline())]
        assert len(gunicorn) >= 2, "gunicorn's master and its workers are counted with the instance"

    def gunicorn_masters():
        return [process for process in psutil.Process(workers["web.1"]["pid"]).children(recursive=True)
                if process.cmdline()[1:2] and process.cmdline()[1].endswith("bin/gunicorn")
                and not process.parent().cmdline()[1:2] == process.cmdline()[1:2]]
    master = gunicorn_masters()[0]
    orphans = master.children()             # its workers outlive a SIGKILLed master: this test ends them
    try:
        os.kill(master.pid, signal.SIGKILL)     # the server crashes; the uWSGI vassal respawns its daemon
        wait_until(lambda: json.loads(piku("ps", "psapp", "--json").stdout)["workers"][0]["restarts"] == 1,
                   message="the restart to be counted")
        wait_until(lambda: any(len(new.children()) >= 2 for new in gunicorn_masters() if new.pid != master.pid),
                   message="the new gunicorn to boot its workers (the emperor then stops them all)")
    finally:
        for orphan in orphans:
            with contextlib.suppress(psutil.Error):
                orphan.kill()
        psutil.wait_procs(orphans, timeout=5)
    table = piku("ps", "psapp").stdout.splitlines()
    assert table[1].split() == ["WORKER", "PID", "STATE", "CPU%", "RSS", "UPTIME", "RESTARTS", "RELEASE"]
    assert table[2].split()[0] == "web.1" and table[2].split()[-2:] == ["1", report["release"]]


def test_deploys_keeps_what_each_attempt_showed_with_its_steps_and_outcome(piku, emperor, make_app, toolchain):
    from conftest import EXAMPLES
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "flask-uwsgi", "rec")
    app.push()
    app.write("Procfile", "wsgi: wsgi:app\nrelease: echo migrating now && exit 3\n")
    app.commit("a release phase that fails")
    failed = app.push(check=False)
    assert failed.returncode != 0
    piku("config:set", "rec", "UV_INDEX_CORP_PASSWORD=pa55-never-shown-3321")
    listing = piku("deploys", "rec").stdout.splitlines()
    assert [line.split()[3] for line in listing] == ["ok", "failed", "ok"], listing      # newest first
    assert "config: UV_INDEX_CORP_PASSWORD" in listing[0] and listing[1].rstrip().endswith("push (by root)")
    shown = piku("deploys", "rec", listing[1].split()[0]).stdout
    assert "failed in" in shown.splitlines()[0]
    assert "migrating now" in shown, "the release command's own output is kept"
    assert " !     the release command failed (exit code 3); nothing was changed" in shown
    assert "Running release: echo migrating now" in shown and " s  Building with" not in shown
    timings = [line for line in shown.splitlines() if re.match(r"  +[0-9]+\.[0-9]{3} +([0-9]+\.[0-9]{3})? +\S", line)]
    assert any("Running release" in line for line in timings), shown
    first = piku("deploys", "rec", listing[2].split()[0]).stdout
    assert "Running uv sync" in first and "is live at http://" in first
    # each step's line shows its duration; a step with output under it says it after that output
    # (where no sandbox starts, the push's warning about that is output under this step: its time follows it)
    assert re.search(r"^-----> Deploying rec at [0-9a-f]{12}( \([0-9]+\.[0-9] s\))?$", first, re.M), first
    assert re.search(r"^-----> Starting wsgi\.1 \([0-9]+\.[0-9] s\)$", first, re.M), first
    assert re.search(r"Running uv sync[^\n]*\n(       [^\n]*\n)+       done in [0-9]+\.[0-9] s\n-----> Starting", first)
    for record in (piku.root / "envs" / "rec" / "deploys").glob("*.json"):
        assert "pa55-never-shown-3321" not in record.read_text()
    assert piku("deploys", "rec", "99", check=False).returncode == 1

    # the waterfall of a push: the processes that led to it, each step's start, and the drain
    # of the old workers after the push returned (issue 20)
    app.write("Procfile", "wsgi: wsgi:app\n")
    app.commit("no release phase")
    app.push()
    newest = piku("deploys", "rec").stdout.split()[0]
    path = piku.root / "envs" / "rec" / "deploys" / f"{newest}.json"
    wait_until(lambda: len(json.loads(path.read_text()).get("after", [])) == 2, timeout=15,
               message="the old workers to drain after the push returned")
    record = json.loads(path.read_text())
    assert [what for what, _ in record["before"]] == ["git-receive-pack", "piku git-hook"]     # (piku execs git)
    starts = [at for _, at in record["before"]] + [at for _, _, at in record["steps"]]
    assert starts == sorted(starts) and starts[0] < 0 <= starts[-1] <= record["seconds"] + 0.01, record
    assert [message for message, _, _ in record["after"]] == ["git moved the branch",
                                                                "the old workers drained and stopped"]
    assert all(at >= record["seconds"] - 0.01 for _, _, at in record["after"]), "after the hook returned"
    shown = piku("deploys", "rec", newest).stdout.splitlines()
    waterfall = shown[1:shown.index(next(line for line in shown if line.startswith("-----> ")))]
    assert waterfall[0].strip() == "start    took  (seconds from the push's first process)", shown
    assert waterfall[1].split() == ["0.000", "git-receive-pack"], shown
    assert "after the push returned: the old workers drained and stopped" in waterfall[-1], shown
    starts = [float(line.split()[0]) for line in waterfall[1:]]
    assert starts == sorted(starts), waterfall


def doctor(piku, *args):
    result = piku("doctor", *args, check=False)
    return result.returncode, result.stdout


def test_doctor_passes_a_healthy_host_and_finds_each_seeded_fault(piku, emperor, nginx, pebble, make_app, toolchain,
                                                                 tmp_path):
    """A healthy host reports no problem; each seeded fault is found, and the fix lines doctor
    prints, run as printed by the piku user (top to bottom), leave it clean again."""
    import json
    import shutil
    from conftest import EXAMPLES, SYSTEM_PATH
    toolchain.require("3.11", "3.12")
    home = tmp_path / "home"        # the piku user's own: the uv fix installs into ~/.local
    home.mkdir()
    piku.env["HOME"] = str(home)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "dev@laptop", "-f", str(tmp_path / "dev")],
                   check=True)
    piku("setup:ssh", str(tmp_path / "dev.pub"))
    app = make_app(EXAMPLES / "flask-uwsgi", "doc")
    app.write("ENV", f"NGINX_SERVER_NAME=doc.test\nACME_ROOT_CA={pebble.directory}\nACME_EMAIL=ops@example.com\n")
    app.commit("served by nginx")
    app.push()
    code, report = doctor(piku)
    assert code == 0 and report.endswith(" checks: 0 FAIL, 0 WARN\n"), report
    assert "uWSGI emperor runs" in report and "doc: v1's 1 worker(s) run" in report and "1 SSH key(s): dev" in report
    assert "doc: nginx accepts its vhost" in report and "nginx is reloaded by" in report
    assert re.search(r"^OK    doc: its certificate is valid for [0-9]+ more days$", report, re.M), report
    assert_every_line_says_something(report)
    code, report = doctor(piku, "doc")
    assert code == 0 and "doc: / answers on 127.0.0.1:" in report, report

    # a release whose environment was deleted (an older one: WARN; then a FAIL for the live one below)
    piku("config:set", "doc", "PYTHON_VERSION=3.12", "WSGI_SERVER=gunicorn")
    old_env = piku.releases("doc")[0]["env"]["VIRTUAL_ENV"]
    shutil.rmtree(old_env)
    code, report = doctor(piku)
    assert code == 0 and f"doc: the environment of v1 is gone ({old_env})" in report, report

    # an app served by uWSGI whose environment has another Python than uWSGI embeds
    records = piku.releases("doc")
    records[-1]["env"]["WSGI_SERVER"] = "uwsgi"
    (piku.root / "envs" / "doc" / "releases.json").write_text(json.dumps(records))
    code, report = doctor(piku, "doc")
    assert code == 1 and "doc: its environment runs Python 3.12" in report and "uWSGI now embeds 3.11" in report, report

    # a broken vhost, an unwritable log folder, uv missing from PATH, the emperor not running
    (piku.root / "nginx" / "doc.conf").write_text("server { listen 127.0.0.1:1; bogus_directive on; }\n")
    logs = piku.root / "logs" / "doc"
    shutil.rmtree(logs)
    logs.write_text("not a folder\n")
    piku.env["PATH"] = SYSTEM_PATH       # uv was on PATH only through the toolchain's folder
    emperor.stop()
    code, report = doctor(piku)
    assert code == 1
    for expected in ("FAIL  doc: nginx refuses its vhost", "FAIL  doc: its log folder",
                     "FAIL  uv is not installed for this user: doc cannot be deployed or changed",
                     "FAIL  the uWSGI emperor is not running", "FAIL  doc: not running: wsgi.1"):
        assert expected in report, (expected, report)
    assert_every_line_says_something(report)
    lines = report.splitlines()
    findings = [line for line in lines if re.match(r"(OK|WARN|FAIL) ", line)]
    assert all(lines[lines.index(line) + 1].startswith("      fix: ") for line in findings if not line.startswith("OK"))
    assert lines[-1] == f"{len(findings)} checks: {report.count(chr(10) + 'FAIL')} FAIL, " \
                        f"{report.count(chr(10) + 'WARN') + report.startswith('WARN')} WARN"
    assert os.path.isfile(logs)

    fixes = [line.split("fix: ", 1)[1] for line in lines if line.startswith("      fix: ")]
    try:
        for fix in fixes:           # as printed, in order, by the piku user, in its environment
            ran = subprocess.run(["/bin/sh", "-c", fix], env=piku.env, cwd=home, capture_output=True, text=True,
                                 timeout=600)
            assert ran.returncode == 0, (fix, ran.stdout, ran.stderr)
        code, report = doctor(piku)
        assert code == 0 and report.endswith(" checks: 0 FAIL, 0 WARN\n"), (fixes, report)
        assert os.path.isdir(logs) and (home / ".local" / "bin" / "uv").exists()
        assert nginx.get("/", host="doc.test")[0] == 200
        assert [record["version"] for record in piku.releases("doc")][0] > 1, "v1 cannot run: it is kept no more"
    finally:
        stop_started_emperor(piku)


def stop_started_emperor(piku):
    """The emperor a fix line started runs in a session of its own (setsid): stop all of it."""
    import psutil
    started = piku.root / "uwsgi" / "emperor.pid"
    if started.exists() and started.read_text().strip().isdigit():
        try:
            emperor = psutil.Process(int(started.read_text().strip()))
            if str(piku.root / "uwsgi" / "uwsgi.ini") in emperor.cmdline():
                stop_process_tree(os.getsid(emperor.pid))
        except (psutil.Error, ProcessLookupError):
            pass

def test_doctor_before_setup_says_to_run_setup(toolchain, tmp_path):
    from conftest import Piku
    bare = Piku(tmp_path / "not-yet", toolchain)
    code, report = doctor(bare)
    assert code == 1 and report.splitlines()[0] == f"FAIL  piku is not set up here (no PIKU_ROOT at {bare.root})"
    fix = report.splitlines()[1].split("fix: ", 1)[1]
    assert fix.endswith("piku.py setup") and len(report.splitlines()) == 3, report
    assert subprocess.run(["/bin/sh", "-c", fix], env=bare.env).returncode == 0
    code, report = doctor(bare)
    assert "piku is not set up" not in report and "piku's folders under" in report, report
    # no uv, and no app that needs it: a warning, not a failure
    from conftest import SYSTEM_PATH
    bare.env.update(PATH=SYSTEM_PATH, HOME=str(tmp_path))
    code, report = doctor(bare)
    assert "WARN  uv is not installed for this user: apps with a pyproject.toml cannot build" in report, report
    assert "FAIL  uv" not in report

    # over ssh (a key of every app): piku's own commands come as ssh lines, the server's shell
    # commands say where they run, and as whom
    remote = subprocess.run([PYTHON, str(PIKU_PY), "ssh-command"], capture_output=True, text=True,
                            env=dict(bare.env, SSH_ORIGINAL_COMMAND="doctor", FINGERPRINT="SHA256:x", NAME="ops"))
    assert re.search(r"^      fix, on the server as root: setsid -f \S*uwsgi --ini ", remote.stdout, re.M), remote.stdout
    assert re.search(r"^      fix: ssh root@\S+ setup:ssh - --name NAME < KEY.pub$", remote.stdout, re.M), remote.stdout


def test_doctor_as_root_on_a_host_without_piku_says_install(tmp_path):
    from conftest import clean_env
    if os.geteuid() != 0:
        pytest.skip("root's view of a host that has no piku yet")
    result = subprocess.run([PYTHON, str(PIKU_PY), "doctor"], capture_output=True, text=True,
                            env=clean_env(HOME=str(tmp_path)))
    lines = result.stdout.splitlines()
    assert result.returncode == 1 and lines[0] == "FAIL  piku is not installed on this host", result.stdout
    assert lines[1] == f"      fix: /usr/bin/python3 {PIKU_PY} install", result.stdout


def test_a_kept_release_is_dropped_only_when_its_piku_built_environment_is_gone(tmp_path):
    import piku as piku_module
    gone = piku_module.environments_gone
    built = os.path.join(piku_module.env_dir("shop"), "python-0123456789abcdef")
    assert gone("shop", {"env": {"VIRTUAL_ENV": built}}) == [built]            # a record of an earlier piku.py
    assert gone("shop", {"env": {"VIRTUAL_ENV": str(tmp_path)}}) == []         # the app's own setting
    assert gone("shop", {"env": {}}) == []
    node = os.path.join(piku_module.env_dir("shop"), "node-fedcba9876543210")             # the record lists them all
    assert gone("shop", {"env": {"VIRTUAL_ENV": built}, "environments": [built, node]}) == [built, node]
    assert gone("shop", {"env": {}, "environments": [str(tmp_path), "/etc"]}) == []   # none of piku's
    listed = piku_module.record_environments
    for odd in ("", built, [None], [built + "/"], [built + "/."], 5, True, [[built]], ["\x00"], ["\ud800"], {},
                [piku_module.env_dir("shop")], [os.path.join(piku_module.env_dir("shop"), "ENV")]):
        # what a damaged or hand-edited record lists: never a traceback, never a path spelled otherwise,
        # and the VIRTUAL_ENV the workers run with always counted (prune keeps it)
        assert listed("shop", {"env": {"VIRTUAL_ENV": built}, "environments": odd}) == [built], odd


def test_doctors_python_check_runs_nothing_an_app_could_have_written(tmp_path, monkeypatch):
    """doctor's check of the Python a uWSGI app's environment runs reads piku's marker of piku's
    own environments: a VIRTUAL_ENV the app set, or a bin/python its build rewrote, is never run
    (doctor runs outside every sandbox, perhaps as root)."""
    import piku as piku_module
    monkeypatch.setattr(piku_module, "probe_uwsgi_python", lambda: "3.11.2")
    ran = tmp_path / "ran"
    (tmp_path / "own" / "bin").mkdir(parents=True)
    (tmp_path / "own" / "bin" / "python").write_text(f"#!/bin/sh\ntouch {ran}\necho 3.11.2\n")
    (tmp_path / "own" / "bin" / "python").chmod(0o755)
    for venv in (tmp_path / "own", Path(piku_module.env_dir("shop")) / "python-0123456789abcdef"):
        record = {"env": {"VIRTUAL_ENV": str(venv)}, "scaling": {"wsgi": 1}}
        monkeypatch.setattr(piku_module, "read_nofollow", lambda path, limit, venv=venv: json.dumps(
            {"python": ["/usr/bin/python3.12", "3.12.1"]}) if path == str(venv / piku_module.ENV_MARKER) else "")
        findings = list(piku_module.check_app_python("shop", record))
        if venv.name == "own":          # the app's own setting: not looked at
            assert findings == []
        else:
            assert [finding.level for finding in findings] == ["FAIL"] and "3.12.1" in findings[0].message
    assert not ran.exists()


def assert_every_line_says_something(report):
    for line in report.splitlines():
        assert not re.search(r"[:,(]\s*$", line) and not re.fullmatch(r"(OK|WARN|FAIL)\s*\S{0,3}", line), line


def test_doctor_reads_only_piku_emperor_units_and_survives_any_unit_file(tmp_path, monkeypatch):
    import piku as piku_module
    units, root = tmp_path / "units", tmp_path / "piku"
    units.mkdir()
    (root / "uwsgi").mkdir(parents=True)
    ours = root / "uwsgi" / "uwsgi.ini"
    ours.write_text(piku_module.EMPEROR_MARK + ": run it with  uwsgi --ini ...\n")
    other = tmp_path / "other.ini"
    other.write_text("[uwsgi]\nemperor = /srv/vassals\n")
    (units / "uwsgi-piku.service").write_text(f"[Service]\nUser=piku\nExecStart=/usr/bin/uwsgi --ini {ours}\n")
    (units / "aaa-emperor.service").write_text(f"[Service]\nExecStart=/usr/bin/uwsgi --ini {other}\n")
    (units / "latin1.service").write_bytes(b"[Service]\nDescription=caf\xe9\nExecStart=/usr/bin/uwsgi --ini /x\n")
    (units / "folder.service").mkdir()          # not a file: unreadable, like a unit of root's to the piku user
    monkeypatch.setattr(piku_module, "SYSTEMD_UNITS", str(units))
    assert piku_module.installed_emperors() == {str(ours): ("uwsgi-piku.service", "piku")}


def test_the_pinned_tool_refused_by_a_uv_setting_says_so_in_uv_words(toolchain, tmp_path, capsys):
    import piku as piku_module
    toolchain.require("3.11")
    env = dict(toolchain.env, HOME=str(tmp_path), UV_PYTHON="3.99")
    with pytest.raises(piku_module.PikuError) as refused:
        context = piku_module.BuildContext("pinned", str(tmp_path), {}, {}, {}, {})     # not sandboxed
        piku_module.PipenvBuildpack().tool_command(context, str(toolchain.root / "bin" / "uv"), env)
    assert refused.value.message.startswith("uv could not run pipenv==2026.10.3, which this app's lock file needs")
    assert "UV_* settings" in refused.value.hint and "Python 3.99" in capsys.readouterr().out
