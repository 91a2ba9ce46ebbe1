"""App names, settings and ENV files: unit tests, and settings reaching every kind of worker."""

import json
import random
import re
import string

import pytest

import piku
from piku import PikuError


@pytest.mark.parametrize("name", ["app", "my-app", "my.app", "App2", "a_b", "0day", "a" * 64])
def test_valid_app_names(name):
    assert piku.validate_app_name(name) == name


@pytest.mark.parametrize("name", ["", "../x", "..", "a/b", "/abs", ".hidden", "-flag", "a b", "a;b",
                                  "a$b", "a\nb", "ä", "a" * 65, "a..b"])
def test_invalid_app_names_are_refused_not_rewritten(name):
    with pytest.raises(PikuError) as error:
        piku.validate_app_name(name)
    assert "invalid app name" in error.value.message


def test_git_paths_from_ssh_urls_lose_one_leading_slash():
    assert piku.git_path_to_app("/app") == "app"
    assert piku.git_path_to_app("app") == "app"
    with pytest.raises(PikuError):
        piku.git_path_to_app("//app")


@pytest.mark.parametrize("arg, pair", [("A=1", ("A", "1")), ("_X=a=b", ("_X", "a=b")), ("K=", ("K", "")),
                                       ("URL=postgres://u:p%40@h/db?x=1#f", ("URL", "postgres://u:p%40@h/db?x=1#f"))])
def test_setting_arguments(arg, pair):
    assert piku.parse_setting_arg(arg) == pair


@pytest.mark.parametrize("arg, message", [("1A=x", "invalid setting name"), ("A-B=x", "invalid setting name"),
                                          ("noequals", "malformed setting"), ("A=x\ny", "line break"),
                                          ("A=x\ry", "line break"), ("A=x\0y", "NUL")])
def test_bad_setting_arguments(arg, message):
    with pytest.raises(PikuError) as error:
        piku.parse_setting_arg(arg)
    assert message in error.value.message


@pytest.mark.parametrize("value", ["plain", "with spaces", "quote ' and \" both", "back\\slash\\'",
                                   "hash # not a comment", "$HOME stays", "  padded", "", "%d $(x) @(f)", "%(asctime)s"])
def test_env_format_round_trips(value):
    text = piku.format_env({"KEY": value})
    assert piku.parse_env_text(text, "ENV") == [("KEY", value)]


def test_every_value_config_set_accepts_round_trips_through_piku_s_settings_files():
    chooser = random.Random(5)
    alphabet = ROUND_TRIP_ALPHABET + "\\'\" #"
    refused = 0
    for _ in range(3000):
        value = "".join(chooser.choice(alphabet) for _ in range(chooser.randint(0, 12)))
        try:
            piku.validate_setting("KEY", value)
        except PikuError as error:
            assert "line break" in error.message or "ends with a space" in error.message \
                or "ends with a backslash" in error.message, error.message
            refused += 1
            continue
        assert piku.parse_env_text(piku.format_env({"KEY": value}), "ENV") == [("KEY", value)], repr(value)
    assert refused < 1000


def test_a_damaged_settings_file_is_read_around_its_bad_lines_only_to_mend_it(capsys):
    text = "BROKEN LINE=1\nA=1\n1BAD=2\nB=x\n"
    with pytest.raises(PikuError):
        piku.parse_env_text(text, "settings")
    assert piku.parse_env_text(text, "settings", skip_bad=True) == [("A", "1"), ("B", "x")]
    assert "line 1 cannot be parsed" in capsys.readouterr().err


def test_env_layers_expand_earlier_values():
    base = {"HOME": "/home/piku", "APP": "x"}
    pairs = piku.parse_env_text("CACHE=${HOME}/cache\nURL=http://$APP.local\nLEFT=$UNKNOWN\n", "ENV")
    env = piku.expand_settings(pairs, base)
    assert env["CACHE"] == "/home/piku/cache"
    assert env["URL"] == "http://x.local"
    assert env["LEFT"] == "$UNKNOWN"


@pytest.mark.parametrize("text, message", [
    ("GOOD=1\nBAD-KEY=2\n", "ENV line 2: invalid"),
    ("A=1\n'unterminated\n", "ENV line 2 cannot be parsed"),
    ('A="multi\nline"\n', "ENV line 1: the value of A contains a line break"),
])
def test_bad_env_files_name_the_line(text, message):
    with pytest.raises(PikuError) as error:
        piku.parse_env_text(text, "ENV")
    assert message in error.value.message


def test_upstream_style_env_files_still_parse():
    text = "# comment\nexport A=1\nB = two words\nC='quoted # kept'\nD=x # comment\n"
    assert dict(piku.parse_env_text(text, "ENV")) == {"A": "1", "B": "two words", "C": "quoted # kept", "D": "x"}


def test_hook_stdin_picks_the_last_pushed_branch():
    updates = piku.read_ref_updates([f"{'0' * 40} {'a' * 40} refs/heads/main\n",
                                     f"{'b' * 40} {'c' * 40} refs/tags/v1\n",
                                     f"{'d' * 40} {'e' * 40} refs/heads/dev\n",
                                     f"{'f' * 40} {'0' * 40} refs/heads/old\n"])
    (old, rev, ref), skipped = piku.branch_to_deploy(updates)
    assert (old, rev, ref) == ("d" * 40, "e" * 40, "refs/heads/dev") and skipped == ["refs/heads/main"]
    assert piku.branch_to_deploy(updates[1:2]) == (None, [])


def test_forced_command_never_hands_the_client_command_to_a_shell():
    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGxG8nU9cKk0Mho0Vq5CqXKGwM3y0hZbKZ0m0o0o0o0o dev@laptop"
    line = piku.authorized_keys_line(key, "SHA256:abc+/def")
    assert line.startswith('command="env FINGERPRINT=SHA256:abc+/def NAME=default ')
    assert "ssh-command\"," in line and "$SSH_ORIGINAL_COMMAND" not in line
    assert line.endswith(" ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGxG8nU9cKk0Mho0Vq5CqXKGwM3y0hZbKZ0m0o0o0o0o")
    for bad in ("not a key", 'ssh-ed25519 AAAA" evil', "ssh-ed25519 AAAA\ncommand=x"):
        with pytest.raises(PikuError):
            piku.authorized_keys_line(bad, "SHA256:x")


def test_host_settings_come_from_the_environment_or_piku_env(tmp_path, monkeypatch):
    import piku
    monkeypatch.setattr(piku, "HOST_ENV", str(tmp_path / "piku.env"))
    monkeypatch.setattr(piku, "_HOST_SETTINGS", {})
    monkeypatch.delenv("PIKU_NGINX_HTTP_PORT", raising=False)
    (tmp_path / "piku.env").write_text("PIKU_NGINX_HTTP_PORT=8080\nPIKU_NGINX_RELOAD='sudo -n /usr/sbin/nginx -s reload'\n")
    assert piku.host_setting("PIKU_NGINX_HTTP_PORT") == "8080"
    assert piku.host_setting("PIKU_NGINX_RELOAD") == "sudo -n /usr/sbin/nginx -s reload"
    assert piku.host_setting("PIKU_NGINX", "nginx") == "nginx"
    monkeypatch.setenv("PIKU_NGINX_HTTP_PORT", "9090")
    assert piku.nginx_port("PIKU_NGINX_HTTP_PORT", "80") == "9090"


# --- settings reach every kind of worker byte for byte -------------------------------------

ROUND_TRIP_ALPHABET = (string.ascii_letters + string.digits + " \t!\"#%&'()*+,-./:;<=>?@[\\]^_`{|}~$"
                       + "éßøñ中文字🙂\u00a0")
ROUND_TRIP_FIXED = ["back\\slash\\", "\\", "\\\\", "'", '"', "\\'", "%(", "%(x)", "%d", "%%", "%(asctime)s", "$(",
                    "$(id)", "@(/etc/passwd)", "@(", "a;b#c", "# not a comment", "=", "KEY=VALUE", "  lead",
                    "$", "a$", "$(HOME)", "{{x}}", "ünïcödé 中文 🙂", "tab\tinside", "'quoted'", '"dq"', ""]


def round_trip_values(count, seed):
    """The fixed hard cases, then count random values of ROUND_TRIP_ALPHABET. Not generated: what
    config:set refuses (a trailing space or tab) and what it expands, as documented ($NAME,
    ${NAME} and $$)."""
    chooser = random.Random(seed)
    values = list(ROUND_TRIP_FIXED)
    while len(values) < len(ROUND_TRIP_FIXED) + count:
        value = "".join(chooser.choice(ROUND_TRIP_ALPHABET) for _ in range(chooser.randint(1, 40)))
        value = re.sub(r"\$(?=[A-Za-z_{$])", "(", value).rstrip(" \t")
        values.append(value)
    return {f"RT_{index}": value for index, value in enumerate(values)}


@pytest.mark.parametrize("kind", ["wsgi", "asgi", "web"])
def test_settings_reach_every_kind_of_worker_byte_for_byte(kind, request, emperor, make_app, toolchain):
    host = request.getfixturevalue("piku")      # the fixture: `piku` here is piku.py
    from conftest import TEST_APPS, fetch, wait_until
    toolchain.require("3.11")
    app = make_app(TEST_APPS / "env-echo", f"rt-{kind}")
    procfile = {"wsgi": "wsgi: echo:application\nworker: python3 echo.py worker\n", "asgi": "asgi: echo:app\n",
                "web": "web: python3 echo.py web\n"}[kind]
    app.write("Procfile", procfile)
    app.commit(kind)
    app.push()
    values = round_trip_values(60, seed={"wsgi": 1, "asgi": 2, "web": 3}[kind])
    worker_report = host.root / "data" / app.name / "worker-env.json"
    worker_report.unlink(missing_ok=True)
    host("config:set", app.name, *(f"{key}={value}" for key, value in values.items()))
    status, text = fetch(host.url(app.name))
    assert status == 200, text
    served = json.loads(text)
    for key, value in values.items():
        assert served.get(key) == value, (kind, key, value, served.get(key))
        if int(key[3:]) < len(ROUND_TRIP_FIXED):
            assert host("config:get", app.name, key).stdout == value + "\n", (key, value)
    live = dict(piku.parse_env_text(host("config:live", app.name).stdout, "config:live"))
    assert {key: live.get(key) for key in values} == values
    if kind == "wsgi":
        wait_until(worker_report.exists, message="the worker to report its settings")
        assert json.loads(worker_report.read_text()) == values
    if kind == "web":       # a damaged settings file: config:get says so; config:unset mends it
        config = host.root / "envs" / app.name / "ENV"
        config.write_text("BROKEN LINE=1\n" + config.read_text())
        refused = host("config:get", app.name, "RT_0", check=False)
        assert refused.returncode == 1 and "line 1 cannot be parsed" in refused.stderr, refused.stderr
        host("config:unset", app.name, "RT_1")         # the live release's record names the settings
        assert host("config:get", app.name, "RT_0").stdout == values["RT_0"] + "\n"
        assert "BROKEN" not in config.read_text() and "RT_1=" not in config.read_text()
