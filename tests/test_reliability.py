"""Crash-consistent state (issue 23): masters killed, records lost, disks full, commands killed.

Real emperors, real filesystems, loopback only; every load loop is bounded.
"""

import json
import os
import signal
import time

import pytest

from conftest import EXAMPLES, Emperor, LoadLoop, fetch, kill_and_wait, wait_for_body, wait_until

WEB = EXAMPLES / "web"
WORKER = "import os, time\nwhile True:\n    time.sleep(1)\n"


def app_processes(piku, app):
    """{pid: command line} of every process that runs the app's code: what the app's
    environment names (APP and PIKU_ROOT), whoever its parent is."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            environ = open(f"/proc/{name}/environ", "rb").read().split(b"\0")
            command = open(f"/proc/{name}/cmdline", "rb").read().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        if f"APP={app}".encode() in environ and f"PIKU_ROOT={piku.root}".encode() in environ:
            found[int(name)] = command
    return found


def copies(processes, text):
    """The PIDs running the Python program text (not the shell that started it)."""
    return sorted(pid for pid, command in processes.items() if command == f"python3 {text}")


def every_kind(make_app, name):
    app = make_app(WEB, name)
    app.write("stay.py", WORKER)
    app.write("Procfile", "web: python3 app.py\nworker: python3 stay.py\n")
    app.commit("a web and a worker")
    app.push()
    return app


@pytest.mark.parametrize("sandbox", ["sandbox", "no sandbox"])
@pytest.mark.parametrize("killed", ["emperor", "web master", "worker master"])
def test_workers_die_with_their_master(killed, sandbox, piku, make_app, tmp_path):
    if sandbox == "no sandbox":
        with open(piku.root / "piku.env", "a") as settings:
            settings.write("PIKU_SANDBOX=off\n")
    emperor = Emperor(piku.root)
    try:
        every_kind(make_app, "twice")
        url = piku.url("twice")
        wait_for_body(url, "Hello from twice")
        before = app_processes(piku, "twice")
        assert len(copies(before, "app.py")) == 1 and len(copies(before, "stay.py")) == 1, before
        with LoadLoop(url) as load:
            if killed == "emperor":
                os.kill(emperor.process.pid, signal.SIGKILL)
                emperor.process.wait()
                emperor = Emperor(piku.root)
            else:
                unit = next(v for v in piku.vassals("twice") if (".web." if killed == "web master" else ".worker.") in v)
                os.kill(piku.master_pid("twice", unit[len("twice@"):-4]), signal.SIGKILL)

            renewed = {"emperor": ("app.py", "stay.py"), "web master": ("app.py",), "worker master": ("stay.py",)}[killed]

            def settled():
                now = app_processes(piku, "twice")
                web, worker = copies(now, "app.py"), copies(now, "stay.py")
                new = all(set(copies(now, program)).isdisjoint(before) for program in renewed)
                return (web, worker) if len(web) == 1 and len(worker) == 1 and new else None
            wait_until(settled, timeout=30, message="exactly one new copy of each worker")
            time.sleep(3)       # and still one copy a while later
            assert settled(), app_processes(piku, "twice")
            wait_for_body(url, "Hello from twice")
        report = json.loads(piku("ps", "twice", "--json").stdout)
        pids = {row["worker"]: set(row["processes"]) for row in report["workers"]}
        now = app_processes(piku, "twice")
        assert copies(now, "app.py")[0] in pids["web.1"] and copies(now, "stay.py")[0] in pids["worker.1"]
        assert report["strays"] == [], report
        if killed != "emperor":
            assert not load.failures or killed == "web master", load.report()
    finally:
        leftovers = app_processes(piku, "twice")
        emperor.stop()
        import psutil
        kill_and_wait([psutil.Process(pid) for pid in leftovers if psutil.pid_exists(pid)])


def test_a_stray_is_named_by_ps_and_doctor_and_their_fix_ends_it(piku, emperor, make_app):
    """Outside a sandbox a guard ties each command to its master; a guard SIGKILLed itself is the
    one way past it: what it ran is then a stray, and ps and doctor say so and how to end it."""
    import shlex
    import subprocess
    with open(piku.root / "piku.env", "a") as settings:
        settings.write("PIKU_SANDBOX=off\n")
    every_kind(make_app, "strays")
    wait_for_body(piku.url("strays"), "Hello from strays")
    assert json.loads(piku("ps", "strays", "--json").stdout)["strays"] == []
    assert "process(es) run its code" not in piku("doctor", check=False).stdout
    guard = next(pid for pid, command in app_processes(piku, "strays").items()
                 if "process-guard" in command and command.endswith("stay.py"))
    old = copies(app_processes(piku, "strays"), "stay.py")
    os.kill(guard, signal.SIGKILL)
    wait_until(lambda: len(copies(app_processes(piku, "strays"), "stay.py")) == 2, message="uWSGI's second copy")
    report = json.loads(piku("ps", "strays", "--json").stdout)
    assert old[0] in {row["pid"] for row in report["strays"]}, report
    assert all("stay.py" in row["command"] for row in report["strays"]), report
    table = piku("ps", "strays")
    assert f"stray: PID {old[0]} (python3 stay.py) runs strays's code" in table.stderr, table.stderr
    doctor = piku("doctor", check=False).stdout
    line = next(line for line in doctor.splitlines() if "process(es) run its code" in line)
    assert line.startswith("FAIL") and str(old[0]) in line, doctor
    fix = doctor.splitlines()[doctor.splitlines().index(line) + 1].split("fix: ", 1)[1]
    assert fix.startswith("kill "), fix
    subprocess.run(shlex.split(fix), check=True)
    wait_until(lambda: len(copies(app_processes(piku, "strays"), "stay.py")) == 1, message="the stray to end")
    assert copies(app_processes(piku, "strays"), "stay.py") != old
    assert json.loads(piku("ps", "strays", "--json").stdout)["strays"] == []
    assert "process(es) run its code" not in piku("doctor", check=False).stdout


def doctor_fix(piku, app, words):
    """doctor APP's finding that contains words: (its line, the fix under it)."""
    lines = piku("doctor", app, check=False).stdout.splitlines()
    line = next((line for line in lines if words in line), None)
    assert line is not None, "\n".join(lines)
    return line, lines[lines.index(line) + 1].split("fix: ", 1)[1]


def type_fix(piku, fix):
    import subprocess
    typed = subprocess.run(["/bin/sh", "-c", fix], env=piku.env, capture_output=True, text=True, timeout=300)
    assert typed.returncode == 0, typed.stdout + typed.stderr
    return typed


def test_lost_records_and_a_removed_release_folder_never_stop_a_serving_app(piku, emperor, make_app):
    app = make_app(WEB, "lost")
    app.write("ENV", "GREETING=one\n")
    app.commit("a greeting")
    app.push()
    url = piku.url("lost")
    wait_for_body(url, "GREETING=one")
    records = piku.root / "envs" / "lost" / "releases.json"
    with LoadLoop(url, seconds=300) as load:
        # empty (a power cut before the rename reached the disk), then removed: the next command rebuilds
        records.write_text("")
        changed = piku("config:set", "lost", "GREETING=two")
        assert "the release records of lost were empty: rebuilt v1 from the running workers" in changed.stderr
        wait_for_body(url, "GREETING=two")
        records.unlink()
        scaled = piku("ps:scale", "lost", "web=2")
        assert "were missing: rebuilt" in scaled.stderr and piku.workers("lost") == ["web.1", "web.2"]
        assert [r["scaling"] for r in piku.releases("lost")][-1] == {"web": 2}
        # damaged: set aside, and doctor (which settles each app first) rebuilds it
        records.write_text('[{"version": 3, "rev": ')
        doctor = piku("doctor", "lost", check=False)
        assert "releases.json was damaged; it is kept as releases.json.damaged" in doctor.stderr, doctor.stderr
        assert "were damaged: rebuilt v1 from the running workers" in doctor.stderr
        assert "release records" not in doctor.stdout and doctor.returncode == 0, doctor.stdout
        assert (records.parent / "releases.json.damaged").read_text() == '[{"version": 3, "rev": '
        assert piku.releases("lost")[-1]["scaling"] == {"web": 2} and fetch(url)[1].endswith("GREETING=two\n")
        # nothing to rebuild from (the generation's own record gone too): commands refuse, nothing stops
        records.unlink()
        for meta in (piku.root / "sandbox").glob("lost@g*.json"):
            meta.unlink()
        refused = piku("restart", "lost", check=False)
        assert refused.returncode == 1 and "lost has no release record (its records are missing)" in refused.stderr
        assert refused.stderr.rstrip().endswith("deploy lost"), refused.stderr
        assert fetch(url)[0] == 200 and len(piku.workers("lost")) == 2
        line, fix = doctor_fix(piku, "lost", "release records are missing")
        assert line.startswith("FAIL") and fix.endswith("deploy lost"), (line, fix)
        typed = type_fix(piku, fix)
        assert "lost is live at" in typed.stdout, typed.stdout
        assert fetch(url)[1].endswith("GREETING=two\n") and len(piku.releases("lost")) == 1
        # the live release's folder removed by hand: doctor says so, restart names the fix, the fix works
        import shutil
        shutil.rmtree(piku.releases("lost")[-1]["root"])
        line, fix = doctor_fix(piku, "lost", "the folder of its live release")
        assert line.startswith("FAIL") and "Procfile" not in piku("doctor", "lost", check=False).stdout
        refused = piku("restart", "lost", check=False)
        assert refused.returncode == 1 and "is gone" in refused.stderr and "deploy lost" in refused.stderr
        type_fix(piku, fix)
        assert "the folder of its live release" not in piku("doctor", "lost", check=False).stdout
        piku("restart", "lost")
    assert load.count > 100 and not load.failures, load.report()
    assert fetch(url)[1].endswith("GREETING=two\n")


# --- every write of every command, failed in turn (a full disk at that instant) --------------

def write_sites(log):
    """The first write of each kind in a write log ('N PATH' lines): the numbers to fail. Writes
    that differ only by a number (slot.1 ... slot.16, generation 4 or 5) are one kind."""
    import re
    sites = {}
    for line in log.read_text().splitlines():
        number, path = line.split(" ", 1)
        sites.setdefault(re.sub(r"[0-9]+", "#", path), int(number))
    return sorted(sites.values())


def live_state(piku, app):
    """What the live release record says: (version, generation, scaling, GREETING)."""
    record = piku.releases(app)[-1]
    return record["version"], record["gen"], record["scaling"], record["env"].get("GREETING")


def check_agreement(piku, app, url):
    record = piku.releases(app)[-1]
    assert piku.live_env(app) == record["env"], "LIVE_ENV is the live record's"
    assert os.readlink(piku.root / "apps" / app) == record["root"]
    assert piku.branch(app) == record["rev"], "the branch names the live release"
    assert fetch(url)[1].endswith(f"GREETING={record['env'].get('GREETING', '')}\n"), "it serves the record"
    assert sorted(piku.workers(app)) == sorted(f"{kind}.{index}" for kind, count in record["scaling"].items()
                                              for index in range(1, count + 1)), "one generation runs"


FAULTED = {     # command -> (the arguments of trial i, is the state after it the new one?, what undoes it)
    "config:set": (lambda i: ["config:set", "faulty", f"GREETING=g{i}"],
                   lambda i, old, new: new[3] == f"g{i}", None),
    "ps:scale": (lambda i: ["ps:scale", "faulty", "web=2"],
                 lambda i, old, new: new[2] == {"web": 2}, ["ps:scale", "faulty", "web=1"]),
    "restart": (lambda i: ["restart", "faulty"], lambda i, old, new: new[1] > old[1], None),
    "deploy": (lambda i: ["deploy", "faulty"], lambda i, old, new: new[0] > old[0], None),
    "rollback": (lambda i: ["rollback", "faulty"], lambda i, old, new: new[0] > old[0], None),
    "push": (None, lambda i, old, new: new[3] == f"p{i}", None),      # git push of GREETING=p{i}
}


def run_faulted(piku, app, command, trial, check):
    """Run trial `trial` of command -> (exit code, stdout, stderr)."""
    if command == "push":
        app.write("ENV", f"GREETING=p{trial}\n")
        app.commit(f"push {trial}")
        pushed = app.push(check=check)
        return pushed.returncode, pushed.stdout, pushed.stderr
    ran = piku(*FAULTED[command][0](trial), check=check)
    return ran.returncode, ran.stdout, ran.stderr


@pytest.mark.parametrize("command", sorted(FAULTED))
def test_each_write_of_a_command_failing_leaves_the_old_state_or_the_new_one(command, piku, emperor, make_app,
                                                                             tmp_path):
    _, is_new, undo = FAULTED[command]
    app = make_app(WEB, "faulty")
    app.write("ENV", "GREETING=first\n")
    app.commit("first")
    app.push()
    app.write("ENV", "GREETING=second\n")
    app.commit("second")
    app.push()
    url = piku.url("faulty")
    wait_for_body(url, "GREETING=second")
    log = tmp_path / "writes.log"
    piku.env["PIKU_TEST_WRITE_LOG"] = str(log)
    run_faulted(piku, app, command, 0, check=True)
    del piku.env["PIKU_TEST_WRITE_LOG"]
    if undo:
        piku(*undo)
    sites = write_sites(log)
    assert len(sites) >= 5, log.read_text()
    outcomes = []
    with LoadLoop(url, clients=1, seconds=600, limit=10**6) as load:
        for trial, number in enumerate(sites, start=1):
            old = live_state(piku, "faulty")
            piku.env["PIKU_TEST_WRITE_FAILS"] = f"#{number}"
            code, out, err = run_faulted(piku, app, command, trial, check=False)
            del piku.env["PIKU_TEST_WRITE_FAILS"]
            said = out + err
            assert "Traceback" not in said, said
            new = live_state(piku, "faulty")
            changed = is_new(trial, old, new)
            if changed:
                assert piku.branch("faulty") == piku.releases("faulty")[-1]["rev"], "the branch names what is recorded"
            if code:
                assert " !     " in err, said
                assert ("is recorded" in err) if changed else ("nothing" in err or "not changed" in err), said
                assert changed or new == old, (old, new, said)
            else:
                assert changed, (number, said)
                assert "is recorded" in err or "could not" not in said, said
            outcomes.append((number, code, "new" if changed else "old",
                             next((line for line in err.splitlines() if " !" in line), "")))
            again = run_faulted(piku, app, command, trial, check=True)     # the next command works, and then
            assert "Traceback" not in again[1] + again[2]                   # everything agrees
            assert is_new(trial, new, live_state(piku, "faulty")) or command == "ps:scale"
            check_agreement(piku, "faulty", url)
            if undo:
                piku(*undo)
    print(f"\n{command}: {len(sites)} writes failed in turn: {load.report()}")
    for outcome in outcomes:
        print("   ", outcome)
    assert load.count > 50 and not load.failures, load.report()


@pytest.fixture
def few_inodes(tmp_path):
    """A PIKU_ROOT on its own tmpfs with 3,000 inodes, so a test can use them all (needs root, as CI is)."""
    import subprocess
    root = tmp_path / "few"
    root.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m,nr_inodes=3000", "tmpfs",
                                            str(root)]).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield root
    subprocess.run(["umount", "-l", str(root)])


def test_out_of_inodes_the_workers_keep_serving_and_doctor_and_push_say_so(few_inodes, tmp_path):
    """A minute with no free inode and logs passing their size cap: the rotation (every minute)
    copies and empties them in place, so no worker stops; doctor FAILs and a push says why."""
    from conftest import AppRepo, Piku
    piku = Piku(few_inodes / "piku")
    piku("setup")
    emperor = Emperor(piku.root)
    filler = few_inodes / "filler"
    try:
        app = AppRepo(piku, WEB, tmp_path / "work" / "inodes", "inodes")
        app.write("ENV", "UWSGI_LOG_MAXSIZE=2000\n")        # each request logs a line: it passes this in seconds
        app.commit("a small log cap")
        app.push()
        url = piku.url("inodes")
        wait_for_body(url, "Hello from inodes")
        log = next((piku.root / "logs" / "inodes").glob("g*/web.1.log"))
        filler.mkdir()
        with LoadLoop(url, clients=2, seconds=65, limit=10**6) as load:
            count = 0
            try:
                while True:
                    (filler / str(count)).touch()
                    count += 1
            except OSError as error:
                assert error.errno == 28, error     # ENOSPC: no inode left
            assert os.statvfs(few_inodes).f_favail == 0
            line = next(line for line in piku("doctor", check=False).stdout.splitlines() if "inodes free" in line)
            assert line.startswith("FAIL") and "less than one deploy needs" in line, line
            sizes = []
            while load.stopping.wait(1) is False and time.monotonic() < load.deadline:
                sizes.append(log.stat().st_size)
        assert load.count > 1000 and not load.failures, load.report()
        assert max(sizes) > 2000 and min(sizes[sizes.index(max(sizes)):]) < max(sizes), \
            f"the log passed its cap and was emptied in place: {sizes}"
        assert fetch(url)[0] == 200
        app.write("ENV", "UWSGI_LOG_MAXSIZE=4000\n")
        app.commit("pushed with no inode free")
        pushed = app.push(check=False)
        assert "inodes (files) free under" in pushed.output and "Traceback" not in pushed.output, pushed.output
        assert pushed.returncode != 0 and fetch(url)[0] == 200
    finally:
        import shutil
        shutil.rmtree(filler, ignore_errors=True)
        emperor.stop()


# --- each command SIGKILLed at random moments ---------------------------------------------------

KILLED = {      # command -> its arguments at trial i
    "config:set": lambda i: ["config:set", "killed", f"GREETING=k{i}"],
    "ps:scale": lambda i: ["ps:scale", "killed", f"web={1 + i % 2}"],
    "restart": lambda i: ["restart", "killed"],
    "deploy": lambda i: ["deploy", "killed"],
    "rollback": lambda i: ["rollback", "killed"],
}


def lock_free(piku, app):
    """Is the app's lock free -- at once, or within 2 s when a child of the killed command was
    caught between fork and exec (it shares the lock until its exec closes it)? Otherwise False,
    with who holds it open."""
    import fcntl
    path = piku.root / "locks" / f"{app}.lock"
    deadline = time.monotonic() + 2
    while True:
        with open(path, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                print("the lock is held; open by:", holders(path))
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True


def holders(path):
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(os.readlink(f"/proc/{pid}/fd/{fd}") == str(path) for fd in os.listdir(f"/proc/{pid}/fd")):
                found.append((int(pid), open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode()))
        except OSError:
            continue
    return found


@pytest.mark.parametrize("command", sorted(KILLED))
def test_a_command_killed_at_a_random_moment_leaves_old_or_new_and_the_next_touch_agrees(command, piku, emperor,
                                                                                         make_app):
    import random
    import subprocess
    from conftest import PIKU_PY, PYTHON
    rng = random.Random(23 + len(command))
    app = make_app(WEB, "killed")
    for greeting in ("first", "second"):
        app.write("ENV", f"GREETING={greeting}\n")
        app.commit(greeting)
        app.push()
    url = piku.url("killed")
    wait_for_body(url, "GREETING=second")
    started = time.monotonic()
    piku(*KILLED[command](1))       # how long one takes: the kills fall anywhere in it
    took = time.monotonic() - started
    outcomes = {"old": 0, "new": 0}
    with LoadLoop(url, clients=1, seconds=600, limit=10**6) as load:
        for trial in range(2, 32):
            before = piku.releases("killed")[-1]
            running = subprocess.Popen([PYTHON, str(PIKU_PY), *KILLED[command](trial)], env=piku.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0, took * 1.2))
            running.send_signal(signal.SIGKILL)
            running.wait()
            assert lock_free(piku, "killed"), "the kernel dropped the lock with its holder"
            doctor = piku("doctor", "killed", check=False)      # the next touch brings all into agreement
            assert "Traceback" not in doctor.stdout + doctor.stderr, doctor.stderr
            after = piku.releases("killed")[-1]
            assert after["version"] in (before["version"], before["version"] + 1) or command == "rollback"
            outcomes["old" if after == before else "new"] += 1
            check_agreement(piku, "killed", url)
            assert "process(es) run its code" not in doctor.stdout, doctor.stdout     # no stray (doctor's check)
            if command == "rollback" and after["version"] - piku.releases("killed")[0]["version"] > 3:
                piku("deploy", "killed")        # keep something to roll back to
    print(f"\n{command} SIGKILLed 30 times after 0-{took * 1.2:.2f} s: {outcomes}; {load.report()}")
    assert load.count > 100 and not load.failures, load.report()



# --- destroy: failed at each write, killed at random moments -------------------------------------

def destroy_left(piku, app):
    """What is left of app after a destroy: its entries in piku's folders, its processes."""
    root = piku.root
    left = [str(path.relative_to(root)) for path in
            (*(root / folder / app for folder in ("repos", "apps", "envs", "logs", "releases", "uwsgi", "tmp", "uv")),
             root / "nginx" / f"{app}.conf", root / "locks" / f"{app}.destroyed") if os.path.lexists(path)]
    left += [f"{folder}/{path.name}" for folder in ("uwsgi-enabled", "sandbox") for path in
             (root / folder).glob(f"{app}@*")]
    return left + [f"process {pid}: {command}" for pid, command in app_processes(piku, app).items()]


def test_a_destroy_failed_at_any_write_or_killed_at_any_moment_leaves_the_app_or_nothing(piku, emperor, make_app,
                                                                                        tmp_path):
    """Its commit point is locks/APP.destroyed: before it the app is whole and serving, after it
    the app is gone for every command and the next touch (apps, doctor, a push) removes the rest.
    A neighbour app serves throughout."""
    import random
    import subprocess
    from conftest import PIKU_PY, PYTHON
    rng = random.Random(2323)
    make_app(WEB, "neighbour").push()
    neighbour = piku.url("neighbour")
    app = make_app(WEB, "doomed")
    app.push()
    log = tmp_path / "writes.log"
    started = time.monotonic()
    piku.env["PIKU_TEST_WRITE_LOG"] = str(log)
    piku("destroy", "doomed")
    del piku.env["PIKU_TEST_WRITE_LOG"]
    took = time.monotonic() - started
    assert destroy_left(piku, "doomed") == []
    sites = write_sites(log)
    outcomes = {"old": 0, "new": 0}
    with LoadLoop(neighbour, clients=1, seconds=600, limit=10**6, pause=0.005) as load:
        for number in sites:                    # each write failed in turn: nothing changed, or destroyed
            app.push()
            url = piku.url("doomed")
            piku.env["PIKU_TEST_WRITE_FAILS"] = f"#{number}"
            failed = piku("destroy", "doomed", check=False)
            del piku.env["PIKU_TEST_WRITE_FAILS"]
            said = failed.stdout + failed.stderr
            assert "Traceback" not in said and (failed.returncode == 0 or " !     " in failed.stderr), said
            if failed.returncode and "nothing was changed" in failed.stderr:
                check_agreement(piku, "doomed", url)
                piku("destroy", "doomed")
            assert "doomed" not in piku("apps").stdout.split() and destroy_left(piku, "doomed") == [], said
        for trial in range(30):                 # killed at random moments
            if not os.path.exists(piku.root / "repos" / "doomed"):
                app.push()
                wait_until(lambda: lock_free(piku, "doomed"), timeout=10, message="the push's keeper let go")
            url = piku.url("doomed")
            running = subprocess.Popen([PYTHON, str(PIKU_PY), "destroy", "doomed"], env=piku.env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0, took * 1.2))
            running.send_signal(signal.SIGKILL)
            running.wait()
            assert lock_free(piku, "doomed")
            touch = piku(*(["apps"] if trial % 5 else ["doctor"]), check=False)     # the next touch
            assert "Traceback" not in touch.stdout + touch.stderr, touch.stderr
            if os.path.exists(piku.root / "repos" / "doomed"):
                outcomes["old"] += 1
                assert "doomed" in piku("apps").stdout.split()
                check_agreement(piku, "doomed", url)
            else:
                outcomes["new"] += 1
                assert "doomed" not in piku("apps").stdout.split() and destroy_left(piku, "doomed") == [], touch.stderr
        if not os.path.exists(piku.root / "repos" / "doomed"):
            app.push()
        mark = piku.root / "locks" / "doomed.destroyed"
        mark.write_text("")                     # a destroy stopped after its commit point, and
        piku.env["PIKU_DOCTOR_READ_ONLY"] = "1"     # update's check of a new piku.py, which only looks
        looked = piku("doctor", check=False)
        del piku.env["PIKU_DOCTOR_READ_ONLY"]
        assert os.path.exists(piku.root / "repos" / "doomed") and "Traceback" not in looked.stderr
        mark.unlink()
        (mark / "stuck").mkdir(parents=True)    # what cannot be removed: said, and nothing else stops
        listed = piku("apps")
        assert "doomed" not in listed.stdout.split() and "neighbour" in listed.stdout.split()
        assert " !     doomed is destroyed, but" in listed.stderr, listed.stderr
        doctor = piku("doctor", check=False)
        assert doctor.returncode == 1 and "FAIL  doomed: its destroy stopped half-way" in doctor.stdout, doctor.stdout
        assert "destroy doomed" in doctor.stdout and "neighbour" in doctor.stdout
        (mark / "stuck").rmdir()
        mark.rmdir()
        mark.write_text("")
        assert piku("destroy", "doomed").stdout.endswith("doomed destroyed\n")     # the fix, typed
        assert destroy_left(piku, "doomed") == []
    print(f"\ndestroy: {len(sites)} writes failed in turn; SIGKILLed 30 times after 0-{took * 1.2:.2f} s: "
          f"{outcomes}; neighbour: {load.report()}")
    assert load.count > 100 and not load.failures, load.report()
