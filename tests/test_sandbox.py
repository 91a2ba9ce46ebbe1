"""The sandbox: every process of an app's code -- build backend, release:, workers, cron, `run`
-- runs in the app's own view of the host (bubblewrap), and nothing it tries reaches another
app, piku's records, the keys or piku itself. Real bwrap, a real emperor, loopback only."""

import fcntl
import hashlib
import json
import os
import re
import select
import shutil
import socket
import subprocess
import termios
import threading
import time
from pathlib import Path

import pytest

from conftest import (EXAMPLES, PIKU_PY, PYTHON, TEST_APPS, AppRepo, Emperor, Piku, fetch,
                      pid_alive, wait_for_body, wait_until)


ATTACKS = ("read-ENV", "read-LIVE_ENV", "read-repo", "read-release", "read-data", "read-keys", "append-keys",
           "rewrite-piku", "write-vassal", "read-environ", "ptrace", "kill", "edit-own-env", "edit-victim-env",
           "edit-victim-cache", "new-userns", "reach-outside")
PHASES = ("build", "release", "web", "cron", "run")


class Listener:
    """A TCP server on 127.0.0.1 that greets each connection: 'outside'."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            with connection:
                connection.sendall(b"outside\n")

    def close(self):
        self.sock.close()


def tree_digest(path):
    """One hash of every file below path (names and contents; links are not followed)."""
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            full = os.path.join(folder, name)
            digest.update(full.encode())
            if os.path.isfile(full) and not os.path.islink(full):
                digest.update(Path(full).read_bytes())
    return digest.hexdigest()


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def host(tmp_path, toolchain):
    """A piku whose piku.py is a copy (the intruder may try to rewrite it) and whose user has a
    home of the test's own with a keys file, and its emperor."""
    script = tmp_path / "piku-copy" / "piku.py"
    script.parent.mkdir()
    shutil.copy(PIKU_PY, script)
    piku = Piku(tmp_path / "piku", toolchain, script=script)
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "authorized_keys").write_text("ssh-ed25519 AAAAlegit dev\n")
    piku.env["HOME"] = str(home)
    piku("setup")
    emperor = Emperor(piku.root)
    listener = Listener()
    yield piku, home, listener
    listener.close()
    emperor.stop()


def reports(piku):
    """{phase: report text} the intruder's processes wrote (the build, into its release)."""
    found = {}
    for path in [*(piku.root / "data" / "intruder").glob("report-*.txt"),
                 *(piku.root / "releases" / "intruder").glob("*/report-*.txt")]:
        phase = path.name[len("report-"):-len(".txt")]
        found[phase] = found.get(phase, "") + path.read_text()
    return found


def outcomes(text, phase):
    """{attack: 'done' | 'blocked'} of one phase's last report."""
    found = {}
    for attack, outcome in re.findall(rf"^ATTACK {phase} (\S+): (done|blocked)", text, re.M):
        found[attack] = outcome
    return found


def unit_of(piku, app, kind):
    return next(name[len(app) + 1:-4] for name in piku.vassals(app) if f".{kind}." in name)


def test_an_intruder_app_reaches_nothing_of_another_app_or_of_piku(host, sandbox_works, tmp_path):
    piku, home, listener = host
    secret = "victim-secret-" + os.urandom(8).hex()
    victim = AppRepo(piku, TEST_APPS / "sandbox-victim", tmp_path / "work" / "victim", "victim")
    victim.write("secret.txt", secret + "\n")
    victim.commit("a secret in the code")
    victim.push()
    piku("config:set", "victim", f"VICTIM_VALUE={secret}")
    (piku.root / "data" / "victim" / "secret.txt").write_text(secret + "\n")
    wait_for_body(piku.url("victim"), "victim here")
    victim_unit = unit_of(piku, "victim", "web")
    victim_pid = piku.master_pid("victim", victim_unit)
    assert victim_pid and pid_alive(victim_pid)
    keys, script = home / ".ssh" / "authorized_keys", piku.script
    victim_env = next((piku.root / "envs" / "victim").glob("python-*"))
    victim_cache = piku.root / "uv" / "victim"
    before = {"keys": file_digest(keys), "piku.py": file_digest(script), "victim env": tree_digest(victim_env),
              "victim cache": tree_digest(victim_cache)}
    assert list((victim_cache / "cache").iterdir()), "the victim's own uv cache holds what it installed"

    intruder = AppRepo(piku, TEST_APPS / "sandbox-intruder", tmp_path / "work" / "intruder", "intruder")
    victim_socket = piku.root / "uwsgi" / "victim" / victim_unit.split(".", 1)[0] / "web.1.sock"
    intruder.write("ENV", f"VICTIM_PID={victim_pid}\nPIKU_SCRIPT_PATH={script}\nPROBE_PORT={listener.port}\n"
                          f"VICTIM_SOCKET={victim_socket}\n")
    intruder.commit("aim")
    pushed = intruder.push()
    assert "NO SANDBOX" not in pushed.output, pushed.output
    ran = piku("run", "intruder", "--", "python", "attack.py", "run")
    wait_until(lambda: "cron" in reports(piku), timeout=75, message="the cron job's attack (once a minute)")
    found = reports(piku)
    outputs = [pushed.output, ran.stdout, ran.stderr, *found.values()]
    outputs += [path.read_text(errors="replace") for path in (piku.root / "logs" / "intruder").rglob("*")
                if path.is_file()]

    for phase in ("release", "web", "cron", "run"):       # the data folder is writable (the build's is not)
        assert (piku.root / "data" / "intruder" / f"report-{phase}.txt").exists(), phase
    for phase in PHASES:
        seen = outcomes(found.get(phase, ""), phase)
        expected = [*ATTACKS, *(["plant-socket-link"] if phase in ("cron", "run") else []),
                    *(["io-uring"] if phase in ("web", "cron") else [])]
        assert sorted(seen) == sorted(expected), (phase, found.get(phase))
        done = sorted(attack for attack, outcome in seen.items() if outcome == "done")
        assert done == ["reach-outside"], (phase, found[phase])    # loopback and DNS work; nothing else
        assert f"ATTACK {phase} reach-outside: done 'outside\\n'" in found[phase]
    assert all(secret not in text for text in outputs)
    after = {"keys": file_digest(keys), "piku.py": file_digest(script), "victim env": tree_digest(victim_env),
             "victim cache": tree_digest(victim_cache)}
    assert after == before
    assert piku.master_pid("victim", victim_unit) == victim_pid and pid_alive(victim_pid)
    assert fetch(piku.url("victim"))[1].startswith("victim here")
    assert fetch(piku.url("intruder"))[1] == "intruder here\n"        # its front reaches its own worker
    assert not (piku.root / "uwsgi-enabled" / "victim@g99.web.1.ini").exists()
    status = json.loads(piku("ps", "intruder", "--json").stdout)       # ps shows the real PIDs
    web = next(row for row in status["workers"] if row["worker"] == "web.1")
    assert web["pid"] == piku.master_pid("intruder", unit_of(piku, "intruder", "web")) and pid_alive(web["pid"])

    # the same intruder with PIKU_SANDBOX=off: the sandbox is what stopped it
    with open(piku.root / "piku.env", "a") as settings:
        settings.write("PIKU_SANDBOX=off\n")
    intruder.write("again.txt", "again\n")
    intruder.commit("again")
    pushed = intruder.push()
    assert "NO SANDBOX: intruder's code runs as the piku user" in pushed.output, pushed.output
    ran = piku("run", "intruder", "--", "python", "attack.py", "run")
    seen = outcomes(ran.stdout, "run")
    assert {"read-ENV", "read-data", "read-keys", "append-keys", "rewrite-piku", "write-vassal", "edit-own-env",
            "edit-victim-env", "edit-victim-cache"} <= {
                attack for attack, outcome in seen.items() if outcome == "done"}, ran.stdout
    for attack in ("read-environ", "ptrace", "kill"):    # the unsandboxed build backend's (it ran first)
        assert f"ATTACK build {attack}: done" in reports(piku)["build"], reports(piku)["build"]
    assert secret in ran.stdout
    assert file_digest(keys) != before["keys"] and file_digest(script) != before["piku.py"]
    wait_for_body(piku.url("intruder"), "victim here")     # its front now serves the victim's worker
    # ... and the vassal it wrote is not started: piku did not describe it (the wrapper fails closed)
    planted = piku.root / "uwsgi-enabled" / "victim@g99.web.1.ini"
    assert planted.exists()
    wait_until(lambda: "victim@g99.web.1 has no description" in (piku.root / "uwsgi" / "uwsgi.log").read_text(),
               message="the emperor to refuse the planted vassal")
    assert not (piku.root / "sandbox" / "victim@g99.web.1.info").exists()
    planted.unlink()


def test_run_with_a_terminal_gives_ctrl_c_to_the_command(piku, emperor, make_app, sandbox_works):
    app = make_app(EXAMPLES / "web", "termapp")
    app.push()
    program = ("import sys, time\ntry:\n    print('READY', flush=True)\n    time.sleep(30)\n"
               "except KeyboardInterrupt:\n    print('INTERRUPTED', flush=True)\nprint('AFTER', flush=True)\n")
    leader, follower = os.openpty()

    def terminal():
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    process = subprocess.Popen([PYTHON, str(PIKU_PY), "run", "termapp", "--", "python3", "-c", program],
                               stdin=follower, stdout=follower, stderr=follower, env=piku.env, preexec_fn=terminal)
    os.close(follower)
    seen = b""
    try:
        deadline = time.monotonic() + 30
        while b"READY" not in seen and time.monotonic() < deadline:
            if select.select([leader], [], [], 1)[0]:
                seen += os.read(leader, 4096)
        assert b"READY" in seen, seen
        os.write(leader, b"\x03")           # ^C typed at the terminal
        while process.poll() is None and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(leader)
    assert b"INTERRUPTED" in seen and b"AFTER" in seen, seen
    assert process.returncode == 0, seen        # piku's session went on to the end


def test_each_app_has_its_own_uv_cache_and_shares_no_installed_file(piku, emperor, make_app, sandbox_works):
    inodes = {}
    for name in ("cachea", "cacheb"):
        app = make_app(TEST_APPS / "sandbox-victim", name)
        app.push()
        wait_for_body(piku.url(name), "victim here")
        installed = next((piku.root / "envs" / name).glob("python-*/lib/python*/site-packages/idna/core.py"))
        inodes[name] = installed.stat().st_ino
        assert list((piku.root / "uv" / name / "cache").iterdir())
        assert (piku.root / "uv" / name).stat().st_mode & 0o777 == 0o700
    assert inodes["cachea"] != inodes["cacheb"]
    # a host set up by a piku.py that kept them in cache/.uv/ has them moved by setup (update runs it)
    earlier = piku.root / "cache" / ".uv"
    (piku.root / "uv").rename(earlier)
    piku("setup")
    assert not earlier.exists() and list((piku.root / "uv" / "cachea" / "cache").iterdir())


def test_where_the_sandbox_cannot_start_the_host_setting_decides(piku, emperor, make_app):
    with open(piku.root / "piku.env", "a") as settings:
        settings.write("PIKU_BWRAP=/nonexistent/bwrap\n")
    app = make_app(EXAMPLES / "web", "loud")
    pushed = app.push()                 # auto (the default): it runs, and the push says so loudly
    assert "NO SANDBOX: loud's code runs as the piku user" in pushed.output, pushed.output
    assert "PIKU_BWRAP=/nonexistent/bwrap is no program piku can run" in pushed.output
    wait_for_body(piku.url("loud"), "Hello from loud")
    assert not list((piku.root / "sandbox").glob("loud@*.view"))
    doctor = piku("doctor", check=False)
    assert re.search(r"WARN.*NO SANDBOX.*PIKU_BWRAP=/nonexistent/bwrap", doctor.stdout), doctor.stdout
    # a key limited to some apps requires it: refused, nothing changed
    limited = dict(piku.env, FINGERPRINT="SHA256:limited", NAME="limited", APPS="loud")
    app.write("v2.txt", "2\n")
    app.commit("v2")
    live = piku.branch("loud")
    saved, piku.env = piku.env, limited
    try:
        refused = app.push(check=False)
    finally:
        piku.env = saved
    assert refused.returncode != 0 and "must run in its sandbox (a key limited to some apps)" in refused.output
    assert piku.branch("loud") == live
    # PIKU_SANDBOX=required: refused for every key, with the fix
    with open(piku.root / "piku.env", "a") as settings:
        settings.write("PIKU_SANDBOX=required\n")
    refused = app.push(check=False)
    assert refused.returncode != 0 and "(PIKU_SANDBOX=required)" in refused.output, refused.output
    assert "Fix PIKU_BWRAP" in refused.output and "Traceback" not in refused.output
    assert piku.branch("loud") == live
    # a value piku does not know is an error with the fix, never a traceback
    with open(piku.root / "piku.env", "a") as settings:
        settings.write("PIKU_SANDBOX=maybe\n")
    refused = app.push(check=False)
    assert "PIKU_SANDBOX='maybe' is not one of required, auto, off" in refused.output
    assert "Traceback" not in refused.output


def test_a_vassal_piku_did_not_describe_is_not_started(piku, emperor, sandbox_works):
    marker = piku.root / "data" / "planted-ran"
    vassal = piku.root / "uwsgi-enabled" / "someone@g1.web.1.ini"
    vassal.write_text(f"[uwsgi]\nmaster = true\nattach-daemon = touch {marker}\n")
    log = piku.root / "uwsgi" / "uwsgi.log"
    wait_until(lambda: log.exists() and "someone@g1.web.1 has no description" in log.read_text(),
               message="the emperor to refuse the vassal")
    time.sleep(1)
    assert not marker.exists()
    vassal.unlink()


VIEW_PROBE = r"""
import json, os, random, sys
sys.path.insert(0, os.environ["PIKU_DIR"])
import piku
random.seed(int(sys.argv[1]))
root, home = piku.PIKU_ROOT, os.path.expanduser("~")
other_env = os.path.join(piku.ENV_ROOT, "other", "python-0123")
os.makedirs(other_env, exist_ok=True)
out = []
for case in range(int(sys.argv[2])):
    app = random.choice(["a", "app", "x-y", "u_v", "n.1", "other2"]) + random.choice(["", str(case)])
    own_env = os.path.join(piku.env_dir(app), "python-" + str(case))
    os.makedirs(own_env, exist_ok=True)
    planted = os.path.join(piku.env_dir(app), "python-link%d" % case)
    if not os.path.lexists(planted):
        os.symlink(other_env, planted)
    release = os.path.join(piku.RELEASE_ROOT, app, "v%d" % case)
    os.makedirs(release + random.choice(["", ".site"]), exist_ok=True)
    os.makedirs(release, exist_ok=True)
    venv = random.choice([own_env, other_env, planted, root, home, os.path.join(home, ".ssh"), "/", "../..",
                          os.path.join(piku.ENV_ROOT, "other"), os.path.join(own_env, "..", "..", "other")])
    env = {"APP": random.choice([app, "other"]), "VIRTUAL_ENV": venv, "PATH": venv + "/bin:/usr/bin",
           "PYTHONPATH": random.choice([other_env, root, ""])}
    kind = random.choice(["web", "wsgi", "worker", "cron"])
    rel = piku.Release(app, "0" * 40, release, env=env)
    instance = piku.Instance(app, random.randint(1, 9), kind, 1)
    views = [piku.worker_view(rel, instance, piku.worker_kind(kind)),
             piku.View(app, write=(release, piku.app_data(app)), read=tuple(piku.release_environment(app, release, env))),
             piku.BuildContext(app, release, {}, env, {}, {}, True).view(own_env, read=[venv] if venv == own_env else [])]
    for view in views:
        args = piku.view_args(view)
        binds = [(args[i], args[i + 1], args[i + 2]) for i in range(len(args) - 2) if args[i] in ("--bind", "--ro-bind", "--ro-bind-try")]
        out.append({"app": app, "binds": binds})
print(json.dumps(out))
"""


def test_a_view_shows_nothing_of_piku_or_the_keys_but_the_apps_own_folders(tmp_path):
    """Generated apps, settings and planted links: every folder a view binds is the app's own, or
    a tool's folder that holds nothing of piku's and no keys."""
    env = dict(os.environ, PIKU_ROOT=str(tmp_path / "home" / ".piku"), HOME=str(tmp_path / "home"),
               PIKU_DIR=str(PIKU_PY.parent))
    (tmp_path / "home" / ".ssh").mkdir(parents=True)
    (tmp_path / "home" / ".local" / "bin").mkdir(parents=True)
    result = subprocess.run([PYTHON, "-c", VIEW_PROBE, "7", "300"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    root, home = os.path.realpath(env["PIKU_ROOT"]), os.path.realpath(env["HOME"])

    def inside(path, folder):
        return os.path.commonpath([path, folder]) == folder
    views = json.loads(result.stdout)
    assert len(views) == 900
    for view in views:
        app = view["app"]
        own = [os.path.join(root, folder, app) for folder in ("releases", "data", "tmp", "uv")]
        own += [os.path.join(root, "envs", app, "python-"), os.path.join(root, "uwsgi", app, "g"),
                os.path.join(root, "logs", app, "g"), os.path.join(root, "sandbox", app + "@"),
                os.path.join(root, "uwsgi-enabled", app + "@")]
        for option, source, target in view["binds"]:
            assert source == target or target in ("/tmp", "/var/tmp"), (option, source, target)
            real = os.path.realpath(source)
            if inside(real, root):
                assert any(real.startswith(prefix) for prefix in own), (app, option, source, real)
                if "/envs/" in real:
                    assert inside(real, os.path.join(root, "envs", app)), (app, source)
            else:
                assert not inside(root, real) and real != home, (app, source)
                assert not inside(real, os.path.join(home, ".ssh")) and not inside(os.path.join(home, ".ssh"), real)


def test_a_host_upgraded_from_before_the_sandbox_keeps_serving_and_says_what_to_restart(piku, make_app,
                                                                                          sandbox_works):
    # a vassal an earlier piku.py wrote has no description: setup lets it go on as it ran
    earlier = piku.root / "uwsgi-enabled" / "old@g3.web.1.ini"
    earlier.write_text("[uwsgi]\n")
    shown = piku("setup")
    assert (piku.root / "sandbox" / "old@g3.web.1.host").exists()
    assert "keep running outside a sandbox until their app is restarted" in shown.stdout + shown.stderr
    earlier.unlink()
    # an emperor started before its config named the wrapper: workers start outside, loudly
    config = piku.root / "uwsgi" / "uwsgi.ini"
    new_config = config.read_text()
    config.write_text("".join(line for line in new_config.splitlines(True) if "emperor-wrapper" not in line))
    emperor = Emperor(piku.root)
    try:
        time.sleep(2)
        config.write_text(new_config)       # what `update` runs `setup` for; the emperor has not restarted
        app = make_app(EXAMPLES / "web", "upgraded")
        pushed = app.push()
        assert "NO SANDBOX: upgraded's code runs as the piku user" in pushed.output, pushed.output
        assert "the uWSGI emperor runs without piku's vassal wrapper" in pushed.output
        wait_for_body(piku.url("upgraded"), "Hello from upgraded")
        assert list((piku.root / "sandbox").glob("upgraded@g*.web.1.host"))
        doctor = piku("doctor", check=False).stdout
        assert re.search(r"WARN.*NO SANDBOX for workers: the uWSGI emperor runs without piku's vassal wrapper", doctor)
        assert re.search(r"WARN.*upgraded: web.1 run outside the app's sandbox", doctor) is None   # (said above)
    finally:
        emperor.stop()
    emperor = Emperor(piku.root)        # restarted: the next start is sandboxed
    try:
        wait_for_body(piku.url("upgraded"), "Hello from upgraded")
        doctor = piku("doctor", check=False).stdout
        assert re.search(r"WARN.*upgraded: web.1 run outside the app's sandbox", doctor), doctor
        restarted = piku("restart", "upgraded")
        assert "NO SANDBOX" not in restarted.stdout + restarted.stderr
        wait_for_body(piku.url("upgraded"), "Hello from upgraded")
        assert list((piku.root / "sandbox").glob("upgraded@g*.web.1.view"))
        doctor = piku("doctor", check=False).stdout
        assert "NO SANDBOX" not in doctor and "outside the app's sandbox" not in doctor, doctor
        assert re.search(r"OK.*apps run in their sandbox", doctor), doctor
    finally:
        emperor.stop()


def test_the_build_runs_no_program_the_app_chose_outside_its_sandbox(piku, emperor, make_app, sandbox_works,
                                                                     tmp_path):
    """piku finds uv and the Pythons, and asks their versions, outside the sandbox: a pushed
    .venv, a PATH, a uv or a Python folder of the app's must not be what it runs there."""
    markers = {name: tmp_path / f"ran-{name}" for name in ("venv", "uv", "python")}
    source = tmp_path / "chooser"
    (source / ".venv" / "bin").mkdir(parents=True)
    (source / "pyproject.toml").write_text('[project]\nname = "chooser"\nversion = "1"\ndependencies = []\n')
    (source / "Procfile").write_text(
        "web: python3 -m http.server $PORT --bind $BIND_ADDRESS\n"
        "release: mkdir -p $DATA_ROOT/bin $DATA_ROOT/pythons/cpython-3.12.99-linux-x86_64-gnu/bin && "
        f"printf '#!/bin/sh\\ntouch {markers['uv']}\\nexit 1\\n' > $DATA_ROOT/bin/uv && "
        f"printf '#!/bin/sh\\ntouch {markers['python']}\\nexit 1\\n' > "
        "$DATA_ROOT/pythons/cpython-3.12.99-linux-x86_64-gnu/bin/python3.12 && chmod -R +x $DATA_ROOT\n")
    data = piku.root / "data" / "chooser"
    # and the dynamic loader of a program piku starts with the app's settings writes here: no such
    # program may run outside the sandbox (inside, this folder is not the test's)
    (source / "ENV").write_text(f"PATH={data}/bin:/usr/local/bin:/usr/bin:/bin\n"
                                f"UV_PYTHON_INSTALL_DIR={data}/pythons\nCONDA_PREFIX={data}\n"
                                f"LD_DEBUG=files\nLD_DEBUG_OUTPUT={tmp_path}/loaded\n")
    fake = source / ".venv" / "bin" / "python"
    fake.write_text(f"#!/bin/sh\ntouch {markers['venv']}\nexit 1\n")
    fake.chmod(0o755)
    (source / ".venv" / "pyvenv.cfg").write_text("home = /run\n")
    app = make_app(source, "chooser")
    app.push()
    app.write("again.txt", "2\n")
    app.commit("again: the app's uv and Python are in place now")
    app.push()
    wait_for_body(piku.url("chooser"), "Directory listing")
    # a requires-python that is a path: uv would run it to ask its version (uv then refuses the project)
    fake_python = data / "pythons" / "cpython-3.12.99-linux-x86_64-gnu" / "bin" / "python3.12"
    app.write("pyproject.toml", '[project]\nname = "chooser"\nversion = "1"\ndependencies = []\n'
                                f'requires-python = "{fake_python}"\n')
    app.commit("a path for a version")
    assert app.push(check=False).returncode != 0
    assert not [name for name, marker in markers.items() if marker.exists()]
    assert not list(tmp_path.glob("loaded.*")), "a program piku ran outside the sandbox had the app's settings"
    view = next((piku.root / "sandbox").glob("chooser@g*.web.1.view")).read_bytes().split(b"\0")
    assert b"/run" not in [view[i + 1] for i, arg in enumerate(view[:-1]) if arg in (b"--ro-bind", b"--bind")]
