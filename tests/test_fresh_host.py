"""The first hour on a fresh host: `make demo` and the suite find the Pythons uv finds (not
only this machine image's pyenv builds), and say how to get one when there is none."""

import os
import subprocess
import sys

import pytest

from conftest import REPO, SYSTEM_PATH, clean_env

DEMO = REPO / "tools" / "demo.sh"
PYTHONS = REPO / "tools" / "pythons.py"


@pytest.fixture
def fresh_home(tmp_path, toolchain):
    """A HOME like a fresh host's root: no pyenv, and uv's own Pythons only where uv puts them."""
    home = tmp_path / "home"
    home.mkdir()
    env = clean_env(HOME=str(home), PATH=SYSTEM_PATH, PYENV_ROOT=str(tmp_path / "no-pyenv"))
    for key in ("UV_PYTHON_INSTALL_DIR", "XDG_DATA_HOME", "VIRTUAL_ENV"):
        env.pop(key, None)
    return home, env


def uv_managed(toolchain, home, minor):
    """What `uv python install MINOR` leaves: a managed Python in ~/.local/share/uv/python."""
    toolchain.require("3.11", minor)
    source = toolchain.versions[minor]
    if not os.path.isdir(source):
        pytest.skip(f"Python {minor} here is a system one ({source}), not an installation folder to place")
    managed = home / ".local" / "share" / "uv" / "python"
    managed.mkdir(parents=True)
    target = managed / os.path.basename(source)
    subprocess.run(["cp", "-al", source, str(target)], check=True)
    return target


def uv():
    return str(REPO / ".venv" / "bin" / "uv")


def test_the_suite_finds_a_python_uv_installed_not_only_pyenv_builds(fresh_home, toolchain):
    home, env = fresh_home
    installed = uv_managed(toolchain, home, "3.12")
    listed = subprocess.run([sys.executable, str(PYTHONS), uv()], env=env, capture_output=True, text=True, check=True)
    minors = {line.split()[0]: line.split() for line in listed.stdout.splitlines()}
    assert minors["3.12"][2] == str(installed), listed.stdout
    assert not any("pyenv" in line for line in listed.stdout.splitlines()), listed.stdout


def test_make_demo_switches_python_with_a_python_uv_finds(fresh_home, toolchain):
    home, env = fresh_home
    uv_managed(toolchain, home, "3.12")
    demo = subprocess.run(["sh", str(DEMO)], env=dict(env, UV_CACHE_DIR=toolchain.env["UV_CACHE_DIR"],
                                                      UV_SYSTEM_CERTS="1"),
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "== config:set shop PYTHON_VERSION=3.12" in demo.stdout, demo.stdout
    assert "answers: Howdy from shop on Python 3.12" in demo.stdout, demo.stdout


def test_make_demo_without_a_second_python_says_how_to_get_one(fresh_home, toolchain):
    home, env = fresh_home
    toolchain.require("3.11")
    demo = subprocess.run(["sh", str(DEMO)], env=dict(env, UV_CACHE_DIR=toolchain.env["UV_CACHE_DIR"],
                                                      UV_SYSTEM_CERTS="1"),
                          capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "answers: Howdy from shop on Python 3.11" in demo.stdout and "PYTHON_VERSION=" not in demo.stdout
    assert f"to see it: {REPO}/.venv/bin/uv python install 3.12  (where uv may download), then make demo" \
        in demo.stdout, demo.stdout


def test_the_readme_fresh_machine_block_is_what_the_fresh_debian_check_runs():
    """tools/fresh-debian.sh runs the README's block as written: the block gets the checkout on a
    minimal Debian (git, ca-certificates) before the two commands."""
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- fresh-machine steps", 1)[1].split("```sh\n", 1)[1].split("\n```\n", 1)[0]
    extracted = subprocess.run(["sh", "-c", "sed -n '/<!-- fresh-machine steps/,/^```$/p' README.md | sed '1,2d;$d'"],
                               cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert extracted == block + "\n"
    script = (REPO / "tools" / "fresh-debian.sh").read_text()
    assert "sed -n '/<!-- fresh-machine steps/,/^```$/p' \"$HERE/README.md\" | sed '1,2d;$d'" in script
    commands = [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]
    assert commands[0].startswith("apt-get update && apt-get install") and \
        {"git", "ca-certificates", "make"} <= set(commands[0].split())
    assert commands[1].startswith("git clone") and commands[2:] == ["make demo", "make test"], commands
