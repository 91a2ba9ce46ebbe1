"""The command line: help, version, and errors without tracebacks."""


def test_help_lists_the_upstream_commands(piku):
    text = piku("help").stdout
    for command in ("apps", "config", "config:get", "config:set", "config:unset", "config:live", "deploy",
                    "destroy", "logs", "ps", "ps:scale", "run", "restart", "stop", "setup", "setup:ssh"):
        assert f"\n  {command} " in text, command
    assert "git-hook" not in text            # internal commands stay out of the help
    assert piku("--help").stdout == text


def test_version(piku):
    assert piku("--version").stdout.startswith("piku, version ")


def test_mistakes_give_messages_not_tracebacks(piku, tmp_path):
    for args in (["nosuch"], ["config"], ["logs", "ghost"], ["ps", "ghost"], ["run", "ghost", "ls"],
                 ["setup:ssh", str(tmp_path / "missing.pub")], ["deploy", "../x"], ["ps:scale", "ghost", "web=1"],
                 ["update"], ["update", str(tmp_path / "missing.py")], ["install", "--user", "bad name"]):
        result = piku(*args, check=False)
        assert result.returncode in (1, 2), args
        assert "Traceback" not in result.stderr, args
        assert result.stderr.strip(), args


def test_a_host_without_click_gets_the_command_that_installs_it(piku):
    import subprocess
    from conftest import PIKU_PY, PYTHON
    # python -S leaves out site-packages, where Debian's click lives: a host without python3-click
    result = subprocess.run([PYTHON, "-S", str(PIKU_PY), "apps"], capture_output=True, text=True, env=piku.env)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "piku.py needs click" in result.stderr and "python3 piku.py install" in result.stderr


def test_setup_ssh_refuses_a_non_key(piku, tmp_path):
    bogus = tmp_path / "bogus.pub"
    bogus.write_text("ssh-ed25519 not-base64!! x\n")
    result = piku("setup:ssh", str(bogus), check=False)
    assert result.returncode == 1 and "not a valid SSH public key" in result.stderr


def test_setup_creates_the_upstream_layout(piku):
    for folder in ("apps", "repos", "envs", "data", "logs", "uwsgi", "uwsgi-available", "uwsgi-enabled",
                   "nginx", "cache"):
        assert (piku.root / folder).is_dir(), folder
    assert "emperor = " in (piku.root / "uwsgi" / "uwsgi.ini").read_text()


def test_logs_and_run_on_a_deployed_app(piku, emperor, make_app):
    from conftest import EXAMPLES, wait_for_body
    app = make_app(EXAMPLES / "web", "hello")
    app.push()
    wait_for_body(piku.url("hello"), "Hello from hello")
    run = piku("run", "hello", "--", "sh", "-c", "echo $APP $GREETING $PWD; exit 7", check=False)
    assert run.returncode == 7
    assert run.stdout == f"hello hello {piku.root}/apps/hello\n"
    logs = piku("logs", "hello", "web", "--no-follow")
    assert "web.1 | " in logs.stdout
    assert "GET / HTTP/1.1" in logs.stdout


def test_common_mistakes_say_the_form_with_an_example_not_a_usage_dump(piku, tmp_path):
    for args, first, second in (
            (["config:set", "PYTHON_VERSION=3.10"], "config:set needs the app's name first",
             "Write it as 'config:set APP KEY=VALUE...', for example: config:set myapp PYTHON_VERSION=3.12."),
            (["config:set", "shop"], "config:set: Missing argument 'KEY=VALUE...'", "Write it as 'config:set APP"),
            (["ps:scale", "shop"], "ps:scale: Missing argument 'KIND=N...'", "for example: ps:scale myapp web=2"),
            (["confg", "shop"], "'confg' is not a piku command; did you mean 'config'?", "See the commands with: help"),
            (["releasez", "shop"], "did you mean 'releases'?", "for example: releases myapp"),
            (["frobnicate"], "'frobnicate' is not a piku command", "See the commands with: help")):
        result = piku(*args, check=False)
        lines = result.stderr.splitlines()
        assert result.returncode in (1, 2) and len(lines) == 2, (args, result.stderr)
        assert lines[0].startswith(" !     ") and first in lines[0], (args, lines)
        assert second in lines[1], (args, lines)
