"""Hardening: apps cannot reach each other, pushed files cannot reach outside their release,
and no input -- typed, pushed or malformed -- gets a traceback."""

import json
import os
import random
import re
import shlex
import shutil
import subprocess
import time

import pytest

import piku
from conftest import EXAMPLES, PIKU_PY, PYTHON, fetch, pid_alive, wait_for_body
from piku import PikuError

WEB = EXAMPLES / "web"
STATIC = EXAMPLES / "static"


def rejected(result, *messages):
    assert result.returncode != 0, result.output
    assert "pre-receive hook declined" in result.output
    for message in messages:
        assert message in result.output, (message, result.output)
    assert f'File "{PIKU_PY}"' not in result.output and "Traceback" not in result.output, result.output


def test_apps_whose_names_share_a_prefix_never_touch_each_other(piku, emperor, make_app):
    victim = make_app(WEB, "cross_web")
    victim.push()
    wait_for_body(piku.url("cross_web"), "Hello from cross_web")
    neighbour = make_app(WEB, "cross.piku-new")
    neighbour.push()
    app = make_app(WEB, "cross")
    app.write("Procfile", "web: python3 app.py\nweb_web: sleep 1000\n")
    app.commit("a kind whose name ends like the other app's")
    app.push()
    wait_for_body(piku.url("cross"), "Hello from cross")
    assert piku.workers("cross_web") == ["web.1"]
    assert piku.workers("cross") == ["web.1", "web_web.1"]
    assert os.path.islink(piku.root / "apps" / "cross.piku-new"), "the other app's apps/ link survives"
    piku("destroy", "cross")
    assert fetch(piku.url("cross_web"))[1].startswith("Hello from cross_web")
    assert piku.workers("cross_web") == ["web.1"] and piku.workers("cross.piku-new") == ["web.1"]


def test_static_folders_and_pushed_files_cannot_lead_out_of_the_release(piku, emperor, make_app):
    other = make_app(WEB, "victim")
    other.push()
    piku("config:set", "victim", "SECRET=hunter2")
    app = make_app(STATIC, "escape")
    app.push()
    url = piku.url("escape")
    wait_for_body(url, "Hello from a static site")
    cases = [
        ({"Procfile": "static: lnk/..\n"}, {"lnk": "/etc/ssl"}, "static folder 'lnk/..' is outside the app"),
        ({"Procfile": "static: lnk\n"}, {"lnk": str(piku.root)}, "static folder 'lnk' is outside the app"),
        ({}, {"ENV": str(piku.root / "envs" / "victim" / "ENV")}, "ENV in the pushed code is a link to a file outside"),
        ({}, {"Procfile": "/etc/passwd"}, "Procfile in the pushed code is a link to a file outside"),
        ({}, {"ENV": "/dev/zero"}, "ENV in the pushed code is a link to a file outside"),
    ]
    good = piku.branch("escape")
    for files, links, message in cases:
        app.git("reset", "--quiet", "--hard", good)
        for path, text in files.items():
            app.write(path, text)
        for path, target in links.items():
            (app.path / path).unlink(missing_ok=True)
            os.symlink(target, app.path / path)
        app.commit(message)
        rejected(app.push(check=False), message)
        assert "hunter2" not in piku("config:live", "escape").stdout
        assert piku.branch("escape") == good
    assert "root:" not in fetch(url.rstrip("/") + "/passwd")[1]
    assert fetch(url)[1].startswith("<!DOCTYPE") or "Hello from a static site" in fetch(url)[1]


def test_bytes_piku_cannot_read_are_errors_not_tracebacks(piku, emperor, make_app):
    app = make_app(WEB, "junk")
    app.push()
    good = piku.branch("junk")
    cases = [
        ("Procfile", b"web: python3 app.py \xff\xfe\n", "Procfile line 1 is not UTF-8 text"),
        ("ENV", b"GREETING=hello\nBAD=\xc3\x28\n", "ENV line 2 is not UTF-8 text"),
        ("Procfile", bytes(range(256)) * 4, "Procfile line 2 is not UTF-8 text (byte 0x80)"),
        ("Procfile", b"web: " + b"x" * 300000 + b"\n", "Procfile in the pushed code is 300006 bytes"),
        ("Procfile", b"web: python3 app.py\nworker: " + b"y" * 40000 + b"\n", "Procfile line 2 is longer than"),
    ]
    for name, data, message in cases:
        app.git("reset", "--quiet", "--hard", good)
        (app.path / name).write_bytes(data)
        app.commit(message)
        rejected(app.push(check=False), message)
        assert piku.branch("junk") == good


def test_cron_steps_must_be_in_range():
    for spec in ("*/0 * * * * x", "*/100 * * * * x", "*/" + "9" * 20 + " * * * * x", "* */25 * * * x"):
        with pytest.raises(PikuError):
            piku.parse_cron(spec, 1)
    assert piku.parse_cron("*/15 */2 * * * ./job", 1) == ("-15 -2 -1 -1 -1", "./job")


ALPHABET = [b"\x00", b"\xff", b"\xc3\x28", b"\n", b"\r", b"=", b":", b"#", b"'", b'"', b"\\", b"$", b"{", b"}",
            b" ", b"\t", b"web", b"cron", b"*/", b"KEY", b"9" * 30, "\u00b2".encode(), "\u0663".encode(),
            "\U0001f600".encode(), b"\xe2\x80\xae", b"A" * 5000]


def junk(rng):
    return b"".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40)))


def test_generated_junk_parses_or_is_refused_by_piku(tmp_path):
    """Property-style: thousands of generated inputs through every parser that takes pushed or
    typed text; each parses, or raises PikuError -- never anything else."""
    rng = random.Random(20261121)
    processes = {"web": piku.Process("web", "python3 app.py", 1), "worker": piku.Process("worker", "x", 2)}
    for _ in range(3000):
        data = junk(rng)
        for name in ("Procfile", "ENV", "SCALING"):
            (tmp_path / name).write_bytes(data)
        calls = [
            lambda: piku.parse_procfile(piku.read_pushed_text(tmp_path, "Procfile")),
            lambda: piku.parse_env_text(piku.read_pushed_text(tmp_path, "ENV"), "ENV"),
            lambda: piku.parse_scaling(data.decode("utf-8", "replace")),
            lambda: piku.parse_setting_arg(data.decode("utf-8", "replace")),
            lambda: piku.parse_scale_args(data.decode("utf-8", "replace").split(), processes),
            lambda: piku.validate_app_name(data.decode("utf-8", "replace")),
            lambda: piku.read_ref_updates(data.decode("utf-8", "replace").splitlines()),
        ]
        for call in calls:
            try:
                call()
            except PikuError:
                pass


def test_an_app_named_like_a_piku_file_is_just_an_app(piku, emperor, make_app):
    """`destroy probes.json` once half-removed piku's probe cache; piku's own files now have
    names no app can have."""
    cache = piku.root / "cache" / ".probes.json"
    cache.write_text('{"kept": "yes"}')
    missing = piku("destroy", "probes.json", check=False)
    assert missing.returncode == 1 and "app 'probes.json' not found" in missing.stderr
    app = make_app(WEB, "probes.json")
    app.push()
    wait_for_body(piku.url("probes.json"), "Hello from probes.json")
    piku("destroy", "probes.json")
    assert json.loads(cache.read_text())["kept"] == "yes"        # (the push remembered more in it)
    assert not (piku.root / "apps" / "probes.json").exists()


# --- Procfile commands reach their process byte for byte -----------------------------------

COMMAND_PIECES = ["echo", " ", " ", "%", "%%", "(", ")", "%(chdir)", "%(nonexistent)", "%(piku_dollar)", "%(env)",
                  "%(procname-prefix)", "%(procname_prefix)", "%(log-maxsize)", "$(HOME)", "$HOME", "@(/etc/passwd)",
                  "@", "$", "%d", "%n", "%k", "%(", "%)", "'", '"', "\\", ";", "#", "=", "\u00e9", "%%(x)", "{", "}",
                  "%(asctime)s", "100%", "$(", "@(", "x"]


def uwsgi_reads(text, option, tmp_path):
    """What uWSGI itself reads as option's value from a vassal (uwsgi --get, which parses the
    config with every substitution and exits)."""
    path = tmp_path / "vassal.ini"
    path.write_text(text)
    return subprocess.run(["uwsgi", "--ini", str(path), "--get", option], capture_output=True, text=True,
                          timeout=10).stdout.removesuffix("\n")


@pytest.mark.skipif(not shutil.which("uwsgi"), reason="uwsgi is not installed (make deps installs it)")
def test_procfile_commands_reach_uwsgi_byte_for_byte_or_are_refused(tmp_path):
    """Differential: generated worker, cron and web commands rendered into vassals and read back
    by uWSGI: each arrives exactly as written, or piku refuses it."""
    rng = random.Random(17)
    env = {"APP": "shop", "PORT": "8123", "BIND_ADDRESS": "127.0.0.1", "PATH": "/usr/bin:/bin"}
    commands = ["echo %(chdir)", "run --log %(procname-prefix)x", "printf '%d %s' 1 $(HOME) @(x)"]
    commands += ["".join(rng.choice(COMMAND_PIECES) for _ in range(rng.randint(1, 12))).strip() for _ in range(300)]
    verdicts = {"exact": 0, "refused": 0}
    for number, command in enumerate(filter(None, commands)):
        sandboxed = number % 2 == 0     # outside a sandbox the command is the guard's argument
        for kind, option, prefix in (("worker", "attach-daemon", ""), ("web", "attach-daemon", ""),
                                     ("cron", "cron", "-1 -1 -1 -1 -1 ")):
            procfile_command = f"* * * * * {command}" if kind == "cron" else command
            instance = piku.Instance("shop", 3, kind, 1)
            try:
                text = piku.render_vassal(instance, procfile_command, env, "/srv/release", sandboxed=sandboxed)
            except PikuError as error:
                assert "which uWSGI would replace" in error.message, (command, error.message)
                verdicts["refused"] += 1
                continue
            text = text.replace(piku.SANDBOX_GUARD, "")          # (no sandbox here), and piku's log rotation is
            text = re.sub(r"^cron = .*piku-rotate-log.*\n", "", text, flags=re.M)     # a cron job of its own
            read = uwsgi_reads(text, option, tmp_path)
            assert read.startswith(prefix), (kind, command, read)
            if sandboxed:
                assert read == prefix + command, (kind, command)
            else:
                guard = shlex.split(read.removeprefix(prefix))
                assert guard[:5] == ["exec", piku.SYSTEM_PYTHON, "-I", "-S", piku.PROCESS_GUARD], guard
                assert guard[6:] == [command], (kind, command, guard)
            verdicts["exact"] += 1
    print(f"Procfile commands: {verdicts}")
    assert verdicts["exact"] > 300 and verdicts["refused"] > 30, verdicts
    with pytest.raises(PikuError, match=r"the worker command contains '%\(chdir\)'"):
        piku.render_vassal(piku.Instance("shop", 3, "worker", 1), "echo %(chdir)", env, "/srv/release")


# --- a worker that dies while piku talks to it ------------------------------------------------

PROBE_DRIVER = r"""
import json, os, socket, sys, threading, time
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import piku
piku.prepare_process()          # the signal dispositions of piku's own entry point
path = os.path.join(piku.UWSGI_ROOT, "shop", "g1", "web.1.sock")
os.makedirs(os.path.dirname(path))
results = []
for delay, mode, size in json.loads(sys.argv[2]):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(path):
        os.unlink(path)
    server.bind(path)
    server.listen(4)
    def die():                  # accepts, never answers, and goes away while the probe writes
        conn, _ = server.accept()
        if mode == "read":
            conn.recv(100)
        time.sleep(delay)
        if mode == "shutdown":
            conn.shutdown(socket.SHUT_RDWR)
        conn.close()
        server.close()
    worker = threading.Thread(target=die)
    worker.start()
    answer = piku.probe_http(path, "/" + "x" * size, "shop.test", 5.0)
    worker.join()
    results.append(answer)
print(json.dumps(results))
"""


def test_a_worker_that_dies_while_the_health_probe_writes_cannot_kill_piku(tmp_path):
    """A crash-on-import worker that goes away between the probe's connect() and send(): EPIPE,
    in every window generated here, is "the worker died" -- piku lives on to say so."""
    rng = random.Random(19)
    windows = [[0.3, "close", 4 * 1024 * 1024]]         # the probe is blocked in send() when it goes
    windows += [[rng.choice([0, 0.001, 0.01, 0.05, 0.2]), rng.choice(["close", "shutdown", "read"]),
                 rng.choice([10, 70000, 1024 * 1024])] for _ in range(40)]
    result = subprocess.run([PYTHON, "-c", PROBE_DRIVER, str(PIKU_PY), json.dumps(windows)], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, PIKU_ROOT=str(tmp_path / "piku")))
    assert result.returncode == 0, f"piku died (exit {result.returncode}): {result.stderr[-2000:]}"
    answers = json.loads(result.stdout)
    assert len(answers) == len(windows) and all(isinstance(answer, (int, str)) for answer in answers), answers
    assert "Broken pipe" in answers[0], answers[0]


# --- piku never follows a link app code can plant --------------------------------------------

def test_links_planted_where_workers_write_lead_piku_nowhere(piku, emperor, make_app):
    victim = make_app(WEB, "victim21")
    victim.push()
    piku("config:set", "victim21", "SECRET=hunter2-never-leaked")
    wait_for_body(piku.url("victim21"), "Hello from victim21")
    leaky = make_app(WEB, "leaky")
    leaky.push()
    logs, runtime = piku.root / "logs" / "leaky", piku.root / "uwsgi" / "leaky"
    gen = piku.releases("leaky")[-1]["gen"]
    victim_gen = piku.releases("victim21")[-1]["gen"]
    secrets = piku.root / "envs" / "victim21" / "ENV"
    # the live log replaced by a link to another app's secrets
    (logs / f"g{gen}" / "web.1.log").unlink()
    os.symlink(secrets, logs / f"g{gen}" / "web.1.log")
    shown = piku("logs", "leaky", "--no-follow", check=False)
    assert "hunter2" not in shown.stdout + shown.stderr and "web.1.log is not shown" in shown.stderr, shown
    # ... or by a second name of that file (a hard link is a link too)
    (logs / f"g{gen}" / "web.1.log").unlink()
    os.link(secrets, logs / f"g{gen}" / "web.1.log")
    shown = piku("logs", "leaky", "--no-follow", check=False)
    assert "hunter2" not in shown.stdout + shown.stderr and "web.1.log is not shown" in shown.stderr, shown
    # piku's own link to the live log, replaced by one of the app's
    (logs / "web.1.log").unlink()
    os.symlink("../../envs/victim21/ENV", logs / "web.1.log")
    shown = piku("logs", "leaky", "--no-follow", check=False)
    assert "hunter2" not in shown.stdout + shown.stderr, shown
    assert "hunter2" not in piku("ps", "leaky", check=False).stdout
    # a pidfile that names another app's master, a FIFO that leads to another app's
    victim_master = piku.master_pid("victim21", f"g{victim_gen}.web.1")
    (runtime / f"g{gen}" / "web.1.pid").unlink()
    os.symlink(piku.root / "uwsgi" / "victim21" / f"g{victim_gen}" / "web.1.pid", runtime / f"g{gen}" / "web.1.pid")
    status = json.loads(piku("ps", "leaky", "--json").stdout)
    assert all(worker["pid"] != victim_master for worker in status["workers"]), status
    (runtime / f"g{gen}" / "web.1.fifo").unlink()
    os.symlink(piku.root / "uwsgi" / "victim21" / f"g{victim_gen}" / "web.1.fifo", runtime / f"g{gen}" / "web.1.fifo")
    piku("stop", "leaky")
    time.sleep(2)
    assert pid_alive(victim_master), "stopping leaky reloaded or stopped victim21"
    assert piku.master_pid("victim21", f"g{victim_gen}.web.1") == victim_master
    assert fetch(piku.url("victim21"))[1].startswith("Hello from victim21")
    # a socket planted as a link to another app's: the health probe does not reach through it
    victim_socket = piku.root / "uwsgi" / "victim21" / f"g{victim_gen}" / "web.1.sock"
    planted = runtime / f"g{gen}" / "web.1.sock"
    planted.unlink(missing_ok=True)
    os.symlink(victim_socket, planted)
    probe = ("import os, sys, piku; print(piku.probe_http(sys.argv[1], '/', 'x', 2.0)); "
             "print(piku.probe_http(sys.argv[2], '/', 'x', 2.0))")
    answers = subprocess.run([PYTHON, "-c", probe, str(planted), str(victim_socket)], capture_output=True, text=True,
                             env=dict(piku.env, PYTHONPATH=str(PIKU_PY.parent))).stdout.splitlines()
    assert answers[1] == "200" and answers[0] != "200", answers     # the real one answers; the link is not followed


def test_logs_read_only_the_tail_of_a_huge_log(piku, tmp_path):
    """A 1 GiB nginx.access.log: `logs` reads the lines it prints from the end, within a 300 MiB
    address space a whole-file read could never fit in."""
    import resource
    (piku.root / "repos" / "big").mkdir(parents=True)
    log = piku.root / "nginx" / "logs" / "big.access.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as handle:
        handle.write(b"the first line\n")
        handle.truncate(2**30)
        handle.seek(2**30)
        handle.write(b"".join(b"request %d\n" % index for index in range(50)))

    def limited():
        resource.setrlimit(resource.RLIMIT_AS, (300 * 2**20, 300 * 2**20))
    started = time.monotonic()
    shown = subprocess.run([PYTHON, str(PIKU_PY), "logs", "big", "nginx", "-n", "5", "--no-follow"], env=piku.env,
                           capture_output=True, text=True, preexec_fn=limited, timeout=60)
    print(f"logs on a 1 GiB log: {time.monotonic() - started:.2f} s")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [f"nginx.access | request {index}" for index in range(45, 50)], shown.stdout


FOLDER_DRIVER = r"""
import os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import piku
outside = sys.argv[2]
os.makedirs(os.path.join(piku.UWSGI_ROOT, "shop"), exist_ok=True)
os.symlink(outside, os.path.join(piku.UWSGI_ROOT, "shop", "g9"))            # planted by the app's code
made = piku.make_folder(os.path.join(piku.generation_dir("shop", 9), "deeper"))
print(os.path.islink(os.path.join(piku.UWSGI_ROOT, "shop", "g9")), os.listdir(outside), oct(os.stat(made).st_mode & 0o777))
"""


def test_piku_makes_its_folders_where_it_means_to(tmp_path):
    """A link planted where one of piku's folders goes -- at any depth below the app's own
    folder -- is removed, not followed; each folder gets the mode its place gives it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    result = subprocess.run([PYTHON, "-c", FOLDER_DRIVER, str(PIKU_PY), str(outside)], capture_output=True, text=True,
                            env=dict(os.environ, PIKU_ROOT=str(tmp_path / "piku")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "[]", "0o750"], result.stdout


def test_option_references_are_found_in_linear_time():
    started = time.monotonic()
    with pytest.raises(PikuError):
        piku.render_vassal(piku.Instance("shop", 1, "worker", 1), "%(" * 60000 + "%(chdir)",
                           {"APP": "shop", "PATH": "/bin"}, "/srv/release")
    assert time.monotonic() - started < 2.0


def test_a_data_folder_on_another_disk_stays_where_the_sysadmin_put_it(piku, emperor, make_app, tmp_path):
    app = make_app(WEB, "bigdata")
    app.push()
    disk = tmp_path / "bigdisk"
    disk.mkdir()
    (disk / "db.txt").write_text("kept\n")
    data = piku.root / "data" / "bigdata"
    shutil.rmtree(data)
    os.symlink(disk, data)
    piku("deploy", "bigdata")
    assert data.is_symlink() and (data / "db.txt").read_text() == "kept\n"


HANGUP_DRIVER = r"""
import os, signal, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import piku
seen = []
piku.ClientWatch.start()
try:
    os.kill(os.getpid(), signal.SIGHUP)
    seen.append("went on")
except piku.ClientGone:
    seen.append("stopped")
piku.ClientWatch.gone = False
piku.ClientWatch.hold()                     # what activate() does once the release committed
os.kill(os.getpid(), signal.SIGHUP)
seen.append("went on")
open(sys.argv[2], "w").write(" ".join(seen))
"""


def test_a_hang_up_stops_a_command_until_its_release_commits(tmp_path):
    """Before the commit a hang-up ends the command; after it, the command always finishes (the
    branch must come to name what now serves)."""
    result = subprocess.run([PYTHON, "-c", HANGUP_DRIVER, str(PIKU_PY), str(tmp_path / "seen")],
                            env=dict(os.environ, PIKU_ROOT=str(tmp_path / "piku")), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "seen").read_text() == "stopped went on"
