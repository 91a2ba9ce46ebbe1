"""Start-up: piku's entry points run piku.py from cached bytecode, and importing it does no
work a command does not need (issue 20). Timings are in bench/ and docs/PERFORMANCE.md; these
tests check what makes them, never a duration."""

import dataclasses
import importlib.util
import itertools
import os
import random
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PIKU_PY, PYTHON, clean_env

import piku

# What no command pays for at start-up (issue 20 names most of them): imported where used.
NOT_AT_START = {"json", "subprocess", "hashlib", "shutil", "socket", "tempfile", "difflib", "http.client",
                "tarfile", "psutil", "watchdog", "dotenv", "tomllib", "ssl", "urllib.request", "ipaddress",
                "dataclasses", "py_compile", "gzip"}


def imported_by(args, env):
    """The modules a piku process imported (python -X importtime), and its result."""
    result = subprocess.run([PYTHON, "-X", "importtime", *args], env=env, capture_output=True, text=True, timeout=60)
    names = set(re.findall(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)$", result.stderr, re.M))
    return names, result


@pytest.fixture
def host(tmp_path):
    """A copy of piku.py set up for a root and a home of the test's own."""
    script = tmp_path / "bin" / "piku.py"
    script.parent.mkdir()
    shutil.copy(PIKU_PY, script)
    env = clean_env(PIKU_ROOT=str(tmp_path / "root"), HOME=str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    subprocess.run([PYTHON, str(script), "setup"], env=env, check=True, capture_output=True)
    return script, env


def forced_command(env, key_line):
    match = re.match(r'command="((?:[^"\\]|\\.)*)"', key_line)
    return re.sub(r"\\(.)", r"\1", match.group(1))


def add_key(tmp_path, script, env, *extra):
    key = tmp_path / f"key{len(list(tmp_path.glob('key*')))}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    subprocess.run([PYTHON, str(script), "setup:ssh", f"{key}.pub", *extra], env=env, check=True, capture_output=True)
    return (Path(env["HOME"]) / ".ssh" / "authorized_keys").read_text().splitlines()[-1]


def over_ssh(command, env, original):
    """Run a forced command as sshd does: the user's shell, SSH_ORIGINAL_COMMAND."""
    return subprocess.run(["/bin/sh", "-c", command], env=dict(env, SSH_ORIGINAL_COMMAND=original),
                          capture_output=True, text=True, timeout=60)


def test_entry_points_import_piku_from_bytecode_checked_against_the_source(tmp_path, host):
    script, env = host
    cached = Path(importlib.util.cache_from_source(str(script)))
    data = cached.read_bytes()
    assert int.from_bytes(data[4:8], "little") == 0b11, "setup caches a checked hash-based .pyc"
    assert data[8:16] == importlib.util.source_hash(script.read_bytes())

    command = forced_command(env, add_key(tmp_path, script, env, "--name", "alice"))
    assert f"-I -c {shlex.quote(piku.PIKU_LAUNCHER)} __main__ {script} ssh-command" in command
    answer = over_ssh(command, env, "--version")
    assert answer.returncode == 0 and answer.stdout == f"piku, version {piku.PIKU_VERSION}\n", answer
    assert cached.read_bytes() == data, "an unchanged piku.py runs from the cached bytecode as it is"

    # a piku.py replaced by hand, with the same size and the same mtime: never run stale
    stat = script.stat()
    script.write_text(script.read_text().replace(f'PIKU_VERSION = "{piku.PIKU_VERSION}"', 'PIKU_VERSION = "9.9.9"'))
    os.utime(script, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert script.stat().st_size == stat.st_size
    assert over_ssh(command, env, "--version").stdout == "piku, version 9.9.9\n"
    assert cached.read_bytes()[8:16] == importlib.util.source_hash(script.read_bytes()), "and cached again"

    # every entry point piku writes runs it the same way; `python3 piku.py` still works
    entry = shlex.join(piku_entry_for(script))
    daily = next((Path(env["PIKU_ROOT"]) / "uwsgi-enabled").glob("*daily*.ini"), None)
    hooks = subprocess.run([PYTHON, "-c", f"import sys; sys.path.insert(0, {str(script.parent)!r}); import piku; "
                            "piku.ensure_repo('hooked'); print(open(piku.repo_path('hooked') + '/hooks/pre-receive').read())"],
                           env=env, capture_output=True, text=True, check=True).stdout
    assert f"{entry} git-hook --stage=pre hooked" in hooks
    if daily is not None:
        assert f"{entry} daily" in daily.read_text()
    bare = subprocess.run([PYTHON, str(script), "--version"], env=env, capture_output=True, text=True)
    assert bare.stdout == "piku, version 9.9.9\n"


def piku_entry_for(script):
    return [PYTHON, "-I", "-c", piku.PIKU_LAUNCHER, "__main__", str(script)]


def test_a_command_imports_only_what_it_uses(tmp_path, host):
    script, env = host
    names, result = imported_by(["-I", "-c", "import sys; sys.path.insert(0, sys.argv[1]); import piku",
                                 str(script.parent)], env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "click" in names and not names & NOT_AT_START, sorted(names & NOT_AT_START)
    command = forced_command(env, add_key(tmp_path, script, env))
    for original in ("--version", "apps"):       # (help: click's formatter asks shutil for the terminal's width)
        names, result = imported_by(["-I", "-c", piku.PIKU_LAUNCHER, "__main__", str(script), "ssh-command"],
                                    dict(env, SSH_ORIGINAL_COMMAND=original))
        assert result.returncode == 0, result.stderr[-2000:]
        assert not names & NOT_AT_START, (original, sorted(names & NOT_AT_START))
        assert over_ssh(command, env, original).returncode == 0


def test_setup_moves_the_keys_of_this_piku_to_the_launcher_and_leaves_others_alone(tmp_path, host):
    script, env = host
    alice = add_key(tmp_path, script, env, "--name", "alice", "--apps", "shop,blog")
    keys = Path(env["HOME"]) / ".ssh" / "authorized_keys"
    # the line an earlier piku.py wrote: python3 piku.py ssh-command
    earlier = re.sub(r"/\S*python3?\S* -I -c '[^']*' __main__ ", f"{PYTHON} ", alice)
    assert earlier != alice and "-I -c" not in earlier, earlier
    other = earlier.replace(str(script), "/opt/other/piku.py").replace("NAME=alice", "NAME=other")
    foreign = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPlain someone@else"
    # options the administrator added after piku's (one with a space in it) stay as they are
    extra = ',from="10.0.0.1",no-pty,environment="GREETING=a b"'
    restricted = earlier.replace('",no-agent-forwarding', '"' + extra + ",no-agent-forwarding", 1)
    assert restricted != earlier
    keys.write_text("\n".join([foreign, restricted, other]) + "\n")
    setup = subprocess.run([PYTHON, str(script), "setup"], env=env, capture_output=True, text=True, check=True)
    assert "Rewrote the forced command of 1 key(s)" in setup.stdout, setup.stdout
    kept = alice.replace('",no-agent-forwarding', '"' + extra + ",no-agent-forwarding", 1)
    assert keys.read_text().splitlines() == [foreign, kept, other]
    alice = kept
    assert "key(s)" not in subprocess.run([PYTHON, str(script), "setup"], env=env, capture_output=True,
                                          text=True, check=True).stdout, "a second setup changes nothing"
    listed = over_ssh(forced_command(env, alice), env, "apps")
    assert listed.returncode == 0 and "shop" not in listed.stderr, listed


# --- records: what dataclasses made, without compiling code at import ---------------------

def shapes(count):
    """Generated record shapes: fields with and without defaults (plain and made per instance)."""
    generator = random.Random(20)
    for _ in range(count):
        required = generator.randint(0, 3)
        optional = generator.randint(0, 3)
        fields = [(f"r{i}", None) for i in range(required)]
        fields += [(f"o{i}", generator.choice([0, "x", (), None, "factory"])) for i in range(optional)]
        yield fields, generator.random() < 0.5


def build(decorate, field_factory, fields, frozen):
    namespace = {"__annotations__": {name: object for name, _ in fields}}
    for name, default in fields:
        if default == "factory":
            namespace[name] = field_factory(default_factory=list)
        elif default is not None or name.startswith("o"):
            namespace[name] = default
    return decorate(frozen=frozen)(type("Shape", (), namespace))


def test_records_behave_as_dataclasses_on_generated_shapes():
    for fields, frozen in shapes(300):
        ours = build(piku.record, lambda default_factory: piku.field(default_factory), fields, frozen)
        theirs = build(dataclasses.dataclass, dataclasses.field, fields, frozen)
        required = [name for name, default in fields if name.startswith("r")]
        values = {name: [1, "a", (2,)][index % 3] for index, (name, _) in enumerate(fields)}
        for count in range(len(fields) + 1):
            positional = [values[name] for name, _ in fields[:count]]
            rest = [name for name, _ in fields[count:]]
            for extra in [(), *itertools.islice(itertools.combinations([n for n in rest if n not in required], 1), 2)]:
                kwargs = {name: values[name] for name in [*(n for n in rest if n in required), *extra]}
                a, b = ours(*positional, **kwargs), theirs(*positional, **kwargs)
                assert [getattr(a, n) for n, _ in fields] == [getattr(b, n) for n, _ in fields]
                assert (a == ours(*positional, **kwargs)) and repr(a).split("(", 1)[1] == repr(b).split("(", 1)[1]
                if frozen and not any(default == "factory" for _, default in fields):     # (a list: neither hashes)
                    assert hash(a) == hash(ours(*positional, **kwargs))
                if frozen:
                    with pytest.raises(AttributeError):
                        a.x = 1
                else:
                    with pytest.raises(TypeError):
                        hash(a)
        if required:
            for maker in (ours, theirs):
                with pytest.raises(TypeError):
                    maker()
        for maker in (ours, theirs):
            with pytest.raises(TypeError):
                maker(*range(len(fields) + 1))
            with pytest.raises(TypeError):
                maker(nonexistent=1, **{name: 0 for name in required})
        made = [ours(**{name: 0 for name in required}) for _ in range(2)]
        for name, default in fields:
            if default == "factory":
                assert getattr(made[0], name) == [] and getattr(made[0], name) is not getattr(made[1], name)


def test_a_record_compares_only_with_its_own_class_and_replace_fields_copies():
    view = piku.View("app")
    assert view == piku.View("app") and view != piku.View("other") and view != ("app",)
    assert piku.replace_fields(view, cwd="/x") == piku.View("app", cwd="/x")
    with pytest.raises(ValueError):
        piku.View("app", write=("/etc",))      # __post_init__ still decides


def test_an_earlier_piku_py_brought_back_runs_through_the_same_entry_points(tmp_path, host):
    """`update --revert` swaps piku.py back and leaves the keys, hooks and jobs as they are: the
    launcher runs any piku.py, as `python3 piku.py` does (it runs the file as __main__)."""
    script, env = host
    command = forced_command(env, add_key(tmp_path, script, env))
    shown = subprocess.run(["git", "show", "61133d8:piku.py"], cwd=PIKU_PY.parent, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip("the earlier piku.py is not in this clone's history")
    script.write_text(shown.stdout.replace('PIKU_VERSION = "0.1.0"', 'PIKU_VERSION = "0.0.9"'))
    answer = over_ssh(command, env, "--version")
    assert answer.returncode == 0 and answer.stdout == "piku, version 0.0.9\n", answer
    assert over_ssh(command, env, "apps").returncode == 0


def test_a_process_that_skips_pythons_tidying_still_says_everything_and_its_status(tmp_path, host, capsys):
    """end_process: what a command printed reaches a pipe whole, and its exit status is kept
    (a usage error 2, a refusal 1, a command's own SystemExit)."""
    script, env = host
    entry = piku_entry_for(script)
    shown = subprocess.run([*entry, "help"], env=env, capture_output=True, text=True)
    assert shown.returncode == 0
    assert piku.main(["help"]) == 0
    assert shown.stdout == capsys.readouterr().out and len(shown.stdout) > 2000
    assert subprocess.run([*entry, "config:set"], env=env, capture_output=True).returncode == 2
    refused = subprocess.run([*entry, "config", "nosuchapp"], env=env, capture_output=True, text=True)
    assert refused.returncode == 1 and refused.stderr.startswith(" !     "), refused
    doctor = subprocess.run([*entry, "doctor"], env=env, capture_output=True, text=True)     # no emperor here
    assert doctor.returncode == 1 and "FAIL" in doctor.stdout and doctor.stdout.endswith("\n"), doctor
