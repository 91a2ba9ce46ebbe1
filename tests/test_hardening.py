"""Hardening: apps cannot reach each other, pushed files cannot reach outside their release,
and no input -- typed, pushed or malformed -- gets a traceback."""

import os
import random

import pytest

import piku
from conftest import EXAMPLES, PIKU_PY, fetch, wait_for_body
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
    assert cache.read_text() == '{"kept": "yes"}'
    assert not (piku.root / "apps" / "probes.json").exists()
