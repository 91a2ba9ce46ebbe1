"""Access control decides on what actually runs: a key limited to some apps reaches those apps
only, by any spelling of any command; names piku's own files use are no app's; authorized_keys
changes are serialised; no argument, however malformed, gets a traceback.

The property tests drive piku's real dispatcher (click, ssh-command's parse and check) with
generated command lines, in one process per batch; only the leaf commands are replaced by
recorders, so what is observed is the command and app that *would* run."""

import json
import random
import re
import shlex
import subprocess

from conftest import PIKU_PY, PYTHON, clean_env

DRIVER = r"""
import json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
import piku
ran = []

def recorder(name):
    def record(*args, **params):
        ran.append([name, params.get("app")])
    return record

for name, command in piku.cli.commands.items():
    if name != "ssh-command":
        command.callback = recorder(name)      # the work is replaced; parsing and checks are piku's own
results = []
import contextlib, io
for case in json.load(sys.stdin):
    ran.clear()
    os.environ["SSH_ORIGINAL_COMMAND"] = case
    output = io.StringIO()
    with contextlib.redirect_stdout(output), contextlib.redirect_stderr(output):
        try:
            code = piku.main(["ssh-command"])
        except SystemExit as done:
            code = done.code
    results.append({"line": case, "ran": list(ran), "code": code, "output": output.getvalue()})
print(json.dumps(results))
"""

INTERNAL = {"git-hook", "ssh-command", "daily"}
SERVER_ONLY = {"install", "update"}
HOST = {"setup", "setup:ssh", "keys", "keys:remove", "acme:renew"}
VOCABULARY = ["--", "--", "-", "-x", "--help", "-h", "--version", "\u2014", "\u2010config", "\u2212\u2212",
              "config", "config:get", "config:set", "config:live", "setup:ssh", "setup", "keys", "keys:remove",
              "update", "install", "git-hook", "ssh-command", "daily", "git-receive-pack", "git-upload-pack",
              "run", "logs", "apps", "help", "doctor", "destroy", "acme:renew", "deploy", "rollback", "ps",
              "mine", "victim", "/victim", "/mine", "victim.git", "'/victim'", "SECRET_TOKEN", "A=1", "--name",
              "evil", "--apps", "victim", "-n", "5", "--json", "--follow", "--stage=pre", "--days", "1",
              "''", "' '", "'\t'", '""']


def run_driver(tmp_path, lines, apps=None):
    """Feed command lines to ssh-command as a key limited to apps (None: a key of every app)."""
    root = tmp_path / "piku"
    for app in ("mine", "victim"):
        (root / "repos" / app).mkdir(parents=True, exist_ok=True)
    env = clean_env(PIKU_ROOT=str(root), HOME=str(tmp_path), FINGERPRINT="SHA256:test", NAME="tester")
    if apps is not None:
        env["APPS"] = ",".join(apps)
    result = subprocess.run([PYTHON, "-c", DRIVER, str(PIKU_PY)], input=json.dumps(lines), env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stderr


COMMANDS = ["config", "config:get", "config:set", "config:live", "logs", "run", "ps", "deploy", "rollback",
            "destroy", "doctor", "git-receive-pack", "git-upload-pack", "apps", "setup:ssh", "keys:remove",
            "update", "git-hook", "acme:renew", "daily", "releases", "deploys", "restart", "stop"]
PREFIXES = [[], [], ["--"], ["--", "--"], ["-x"], ["--help"], ["\u2014"], ["-h"], ["--version"]]
APPS = ["mine", "mine", "victim", "/victim", "/mine", "victim.git", "mine/../victim", "-", "--", "", " ", "\t",
        "MINE", "Victim", "victim."]
TAILS = [[], ["SECRET_TOKEN"], ["A=1"], ["--", "victim"], ["-n", "5"], ["--", "env"], ["--help"], ["victim"],
         ["--name", "evil"], ["-"], ["--json"], ["v1"], [""], [" "], ["", "victim"], ["=1"]]


def generated_lines(count, seed):
    """Half free word salad, half command lines of the shapes people and attackers type."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        if rng.random() < 0.5:
            words = [rng.choice(VOCABULARY) for _ in range(rng.randint(1, 6))]
        else:
            words = [*rng.choice(PREFIXES), rng.choice(COMMANDS), *rng.choice([[], ["--"], ["-x"]]),
                     rng.choice(APPS), *rng.choice(TAILS)]
        lines.append(" ".join(words) if rng.random() < 0.3 else shlex.join(words))
    return lines


def app_of(name, app):
    """The app a recorded call acts on, named as the command itself takes it."""
    if app is not None and name in ("git-receive-pack", "git-upload-pack"):
        return app[1:] if app.startswith("/") else app
    return app


REPRODUCTIONS = ["-- config:get victim SECRET_TOKEN", "-- setup:ssh - --name evil", "-- update /tmp/piku_evil.py",
                 "-- -- config:get victim X", "--name evil setup:ssh -", "config:get -- victim SECRET_TOKEN",
                 "git-upload-pack '/victim'", "git-receive-pack victim.git", "doctor -- victim",
                 "logs -- victim", "run victim -- env", "config:get --help victim", "-- keys", "-- keys:remove x",
                 "\u2014 config:get victim X", "-- git-hook victim", "-- daily", "-h config victim"]


def test_a_limited_key_runs_only_its_own_apps_commands_by_any_spelling(tmp_path):
    plain = [f"{command} {app}" for command in COMMANDS for app in ("mine", "/mine", "victim")]
    lines = REPRODUCTIONS + plain + generated_lines(2500, seed=15)
    results, _ = run_driver(tmp_path, lines, apps=["mine"])
    reached = {}
    for result in results:
        for name, app in result["ran"]:
            reached.setdefault(name, set()).add(app_of(name, app))
            assert name not in INTERNAL | SERVER_ONLY | HOST, result
            if name in ("apps", "help"):
                continue
            assert app_of(name, app) == "mine", result
    # the generator did reach the commands a limited key may use, for its own app
    assert {"config", "config:get", "run", "logs", "git-receive-pack", "apps"} <= set(reached), sorted(reached)
    for line in REPRODUCTIONS:
        result = next(result for result in results if result["line"] == line)
        assert result["ran"] == [] and (result["code"] != 0 or result["output"].startswith("Usage:")), result


IMPLIED = re.compile(r"-----> (\S+) mine: mine is the only app this key can see\n")
WITHOUT_APP = ["config", "config:live", "config:get SECRET_TOKEN", "config:set A=1", "config:unset A", "deploy",
               "logs", "logs -n 5", "ps", "ps --json", "ps:scale web=2", "run -- env", "run env", "restart", "stop",
               "releases", "deploys", "rollback", "doctor", "--help"]


def test_a_key_that_sees_one_app_may_leave_its_name_out(tmp_path):
    """`config:set A=1` from a key that sees one app acts on it and says so first; a key that
    sees several apps is never guessed for; a word that can be an app's name is the app."""
    lines = WITHOUT_APP + [f"{command} {tail}".strip() for command in COMMANDS
                           for tail in ["", "A=1", "-n 5", "--json", "-- env", "victim", "--", "v1"]]
    lines += generated_lines(1200, seed=18)
    one, _ = run_driver(tmp_path, lines, apps=["mine"])
    several, _ = run_driver(tmp_path, lines)
    for line, expected in zip(WITHOUT_APP, one):
        name = line.split()[0]
        if name != "--help":
            assert expected["ran"] == [[name, "mine"]], expected
            assert IMPLIED.match(expected["output"]).group(1) == name, expected
    for result in one:
        implied = IMPLIED.match(result["output"])
        if implied:
            assert result["ran"] == [[implied.group(1), "mine"]] and implied.group(1) != "destroy", result
            words = result["line"].split()
            assert not {"mine", "/mine"} & set(words[words.index(implied.group(1)) + 1:][:1]), result
        if result["line"] in ("logs victim", "run victim -- env", "rollback victim", "restart victim", "destroy"):
            assert not implied and result["ran"] == [], result      # parsed as written: refused
        for name, app in result["ran"]:
            assert name in ("apps", "help") or app_of(name, app) == "mine", result
    for result in several:
        assert "the only app" not in result["output"], result
        for name, app in result["ran"]:
            assert app is None or app_of(name, app) in result["line"], result


def test_doctor_from_a_key_that_sees_several_apps_asks_for_one(tmp_path):
    (result,), _ = run_driver(tmp_path, ["doctor"], apps=["mine", "victim"])
    assert result["ran"] == [] and result["code"] == 1, result
    assert "'doctor' without an app is the host's: name one of this key's apps" in result["output"]
    assert "Write it as 'doctor APP'; this key may use: mine, victim" in result["output"]


def test_no_key_reaches_internal_or_server_only_commands_by_any_spelling(tmp_path):
    results, _ = run_driver(tmp_path, REPRODUCTIONS + generated_lines(1500, seed=16))
    ran = {name for result in results for name, _ in result["ran"]}
    assert not ran & (INTERNAL | SERVER_ONLY), ran
    assert {"setup:ssh", "config:get", "git-upload-pack"} <= ran, "a key of every app still manages the host"


def test_an_app_a_key_may_not_see_looks_like_one_that_does_not_exist(tmp_path):
    lines = [line for line in generated_lines(600, seed=17) if "victim" in line] + REPRODUCTIONS
    as_victim, _ = run_driver(tmp_path / "a", lines, apps=["mine"])
    as_ghost, _ = run_driver(tmp_path / "b", [line.replace("victim", "ghost") for line in lines], apps=["mine"])
    for seen, ghost in zip(as_victim, as_ghost):
        assert seen["code"] == ghost["code"] and seen["ran"] == ghost["ran"], (seen, ghost)
        assert all(app_of(name, app) == "mine" for name, app in seen["ran"]), seen     # (the one app implied)
        assert seen["output"].replace("victim", "ghost") == ghost["output"], (seen, ghost)


def test_arguments_that_are_not_utf8_get_a_message_not_a_traceback(tmp_path):
    """`config:set APP V=$'\\xff'`: bytes that are not UTF-8, in every command's arguments."""
    root = tmp_path / "piku"
    env = clean_env(PIKU_ROOT=str(root), HOME=str(tmp_path))
    subprocess.run([PYTHON, str(PIKU_PY), "setup"], env=env, capture_output=True, check=True)
    (root / "repos" / "mine").mkdir()
    rng = random.Random(13)
    commands = [["config:set", "mine"], ["config:get", "mine"], ["config:unset", "mine"], ["logs", "mine"],
                ["rollback", "mine"], ["deploys", "mine"], ["ps:scale", "mine"], ["run", "mine", "--"],
                ["keys:remove"], ["setup:ssh"], ["destroy"], ["doctor"], []]
    cases = [[b"config:set", b"mine", b"V=\xff"]]
    for _ in range(40):
        junk = bytes(rng.choice([0xff, 0xfe, 0xc3, 0x80, 0xed, 0xa0, 0x41, 0x3d]) for _ in range(rng.randint(1, 6)))
        cases.append([*(word.encode() for word in rng.choice(commands)), junk])
    for case in cases:
        result = subprocess.run([PYTHON.encode(), bytes(PIKU_PY), *case], env=env, capture_output=True, timeout=60)
        stderr = result.stderr.decode(errors="replace")
        assert b"Traceback" not in result.stderr and result.returncode in (1, 2), (case, stderr)
        assert " !     " in stderr, (case, stderr)
    first = subprocess.run([PYTHON.encode(), bytes(PIKU_PY), *cases[0]], env=env, capture_output=True)
    assert b"argument 3 (V=\\xff) is not UTF-8 text (byte 0xff)" in first.stderr, first.stderr
    assert not (root / "envs" / "mine" / "ENV").exists()
    # and over ssh: the command line itself
    lines = ["config:set mine V=\udcff", "config:get mine \udcc3", "\udcff"]
    results, _ = run_driver(tmp_path / "ssh", lines)
    assert all(result["ran"] == [] and result["code"] == 1 for result in results), results
    assert all("is not UTF-8 text" in result["output"] for result in results), results


def test_names_of_piku_own_files_are_no_apps_name(piku):
    """Every file piku keeps beside the apps' own entries is reserved, whatever the file."""
    code = ("import json, piku; print(json.dumps({'reserved': sorted(piku.reserved_app_names()), "
            "'files': {folder: sorted(names) for folder, names in piku.HOST_FILES.items()}}))")
    found = json.loads(subprocess.run([PYTHON, "-c", code], env=dict(piku.env, PYTHONPATH=str(PIKU_PY.parent)),
                                      capture_output=True, text=True, check=True).stdout)
    assert {"uwsgi.ini", "uwsgi.log", "emperor.pid", "acme-renew.log"} <= set(found["reserved"]), found
    for name in ("uwsgi.ini", "uwsgi.log", "emperor.pid", "acme-renew.log", "uwsgi.old.log"):
        refused = piku("git-receive-pack", name, check=False)
        assert refused.returncode == 1 and f"the app name {name!r} is taken by one of piku's own files" \
            in refused.stderr, refused.stderr
        assert not (piku.root / "repos" / name).exists()
    assert (piku.root / "uwsgi" / "uwsgi.ini").is_file(), "the emperor's config is untouched"


def test_authorized_keys_changes_racing_each_other_lose_nothing(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=str(home), PIKU_ROOT=str(home / ".piku"))
    keys = []
    for index in range(14):
        path = tmp_path / f"key{index}"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"k{index}", "-f", str(path)],
                       check=True)
        keys.append(path)

    def piku(*args):
        return subprocess.Popen([PYTHON, str(PIKU_PY), *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    for index in range(4):                      # the keys that will be removed
        assert piku("setup:ssh", f"{keys[index]}.pub", "--name", f"old{index}").wait() == 0
    for _ in range(2):
        racers = [piku("setup:ssh", f"{path}.pub", "--name", f"new{index}") for index, path in
                  enumerate(keys[4:], 4)] + [piku("keys:remove", f"old{index}") for index in range(4)]
        outcomes = [(racer.wait(), racer.stderr.read()) for racer in racers]
        assert all(code == 0 for code, _ in outcomes), outcomes
        names = sorted(line.split()[0] for line in
                       subprocess.run([PYTHON, str(PIKU_PY), "keys"], env=env, capture_output=True,
                                      text=True).stdout.splitlines())
        assert names == sorted(f"new{index}" for index in range(4, 14)), names
        for index in range(4):                  # put them back for the second round
            subprocess.run([PYTHON, str(PIKU_PY), "setup:ssh", f"{keys[index]}.pub", "--name", f"old{index}"],
                           env=env, check=True, capture_output=True)
        for index in range(4, 14):
            subprocess.run([PYTHON, str(PIKU_PY), "keys:remove", f"new{index}"], env=env, check=True,
                           capture_output=True)


def test_a_key_file_is_read_with_a_size_limit(tmp_path):
    env = clean_env(HOME=str(tmp_path), PIKU_ROOT=str(tmp_path / ".piku"))
    for args, stdin, message in ((["/dev/zero"], None, "'/dev/zero' is not a file"),
                                 (["-"], b"ssh-ed25519 " + b"A" * (200 * 1024), "longer than 65536 bytes"),
                                 (["-"], b"\xff\xfe", "not UTF-8 text")):
        result = subprocess.run([PYTHON, str(PIKU_PY), "setup:ssh", *args], env=env, input=stdin,
                                capture_output=True, timeout=20)
        assert result.returncode == 1 and message.encode() in result.stderr, result.stderr
    assert not (tmp_path / ".ssh" / "authorized_keys").exists()
