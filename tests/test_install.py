"""Installing a host (`sh install.sh`, `piku.py install`) and updating piku.py (`update`).

The installer runs for real, as root, against this machine: its packages, a disposable
user, the systemd units and nginx include it writes, the first key. systemd does not run
here, so the units are checked with `systemd-analyze verify` and the emperor is started the
way its unit would start it; then a real `git push` through a private sshd deploys a uv app.
"""

import hashlib
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from conftest import EXAMPLES, PIKU_PY, PYTHON, REPO, Emperor, clean_env, wait_for_body
from test_ssh import SshHost, run

SYSTEMD = Path("/etc/systemd/system")
NGINX_CONF_D = Path("/etc/nginx/conf.d")
REMOVED_PACKAGE = "python3-watchdog"
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"     # what a unit runs with


class UnitEmperor(Emperor):
    """The uWSGI emperor started as its systemd unit says: User=, WorkingDirectory=, ExecStart=."""

    def __init__(self, unit_text):
        fields = dict(re.findall(r"^(\w+)=(.*)$", unit_text, re.M))
        command = ["runuser", "-u", fields["User"], "-g", fields["Group"], "--", *shlex.split(fields["ExecStart"])]
        self.process = subprocess.Popen(command, cwd=fields["WorkingDirectory"], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        start_new_session=True, env={"PATH": SYSTEMD_PATH})


class InstalledHost(SshHost):
    """A host made by the installer: the user, its home and its key come from `install.sh`."""

    def install(self, *extra):
        started = time.monotonic()
        result = run(["sh", str(REPO / "install.sh"), "--user", self.user, "--home", str(self.home),
                      "--key", str(self.key) + ".pub", "--key-name", "alice", *extra],
                     check=False, timeout=600, env=clean_env())
        result.seconds = time.monotonic() - started
        try:
            pwd.getpwnam(self.user)
            self.user_created = True
        except KeyError:
            pass
        return result

    def units(self):
        return [SYSTEMD / f"uwsgi-{self.user}.service", SYSTEMD / f"{self.user}-nginx.path",
                SYSTEMD / f"{self.user}-nginx.service"]

    def written(self):
        """Everything the installer writes outside the packages, with what it holds."""
        paths = [*self.units(), NGINX_CONF_D / f"{self.user}.conf", self.home / ".ssh" / "authorized_keys",
                 self.root / "uwsgi" / "uwsgi.ini", self.piku_py, self.home / ".local" / "bin" / "uv"]
        return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None
                for path in paths}

    def close(self):
        for path in [*self.units(), NGINX_CONF_D / f"{self.user}.conf"]:
            path.unlink(missing_ok=True)
        if self.user_created:       # userdel keeps a group that still has a member: www-data leaves first
            run(["gpasswd", "-d", "www-data", self.user], check=False)
        super().close()
        if run(["getent", "group", self.user], check=False).returncode == 0:
            run(["groupdel", self.user], check=False)


pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("apt-get"),
                                reason="the installer needs root on a Debian/Ubuntu host")


@pytest.fixture(scope="module")
def installed():
    base = Path(tempfile.mkdtemp(prefix="piku-install-test-"))
    base.chmod(0o755)
    (base / "home").mkdir(mode=0o755)
    host = InstalledHost(base)
    # One of the packages the installer installs is removed first, so its package step installs
    # it for real (python3-watchdog: nothing depends on it; the finally below puts it back anyway).
    run(["dpkg", "-r", REMOVED_PACKAGE])
    try:
        host.make_keys()
        host.first = host.install()
        host.second = host.install() if host.first.returncode == 0 else None
        yield host
    finally:
        if subprocess.run(["dpkg-query", "-W", "-f=${Status}", REMOVED_PACKAGE], capture_output=True,
                          text=True).stdout != "install ok installed":
            run(["apt-get", "install", "-y", "-qq", REMOVED_PACKAGE], timeout=600,
                env=clean_env(DEBIAN_FRONTEND="noninteractive"))
        host.close()


def test_install_sets_up_a_fresh_user_units_nginx_and_the_first_key(installed):
    host, first = installed, installed.first
    assert first.returncode == 0, first.stdout + first.stderr
    print(f"install: first run {first.seconds:.1f} s, second run {installed.second.seconds:.1f} s")
    for expected in (f"debian packages: installed {REMOVED_PACKAGE}", f"user: created the user {host.user}", "unlocked it for ssh keys",
                     f"nginx (www-data) joined the group {host.user}", f"piku file: copied piku.py to {host.piku_py}",
                     "uv: installed uv ", "setup: ran setup", f"units: wrote uwsgi-{host.user}.service",
                     "nginx include: nginx includes", "key: added the SSH key", "piku is installed for"):
        assert expected in first.stdout, (expected, first.stdout)
    shadow = next(line for line in Path("/etc/shadow").read_text().splitlines() if line.startswith(host.user + ":"))
    assert shadow.split(":")[1] == "*"
    assert host.home.stat().st_mode & 0o777 == 0o750
    assert host.user in run(["id", "-nG", "www-data"]).stdout.split()
    assert host.piku_py.read_bytes() == PIKU_PY.read_bytes() and host.piku_py.stat().st_uid == host.home.stat().st_uid
    uv = run(["runuser", "-u", host.user, "--", str(host.home / ".local" / "bin" / "uv"), "--version"])
    assert uv.stdout.startswith("uv ")
    keys = (host.home / ".ssh" / "authorized_keys").read_text()
    assert "NAME=alice" in keys and "ssh-command" in keys
    include = (NGINX_CONF_D / f"{host.user}.conf").read_text()
    assert f"include {host.root}/nginx/*.conf;" in include
    assert run(["nginx", "-t", "-q"], check=False).returncode == 0
    emperor = host.units()[0].read_text()
    assert f"User={host.user}" in emperor and f"ExecStart=/usr/bin/uwsgi --ini {host.root}/uwsgi/uwsgi.ini" in emperor
    assert f"PathChanged={host.root}/nginx" in host.units()[1].read_text()
    if shutil.which("systemd-analyze"):
        verify = run(["systemd-analyze", "verify", *map(str, host.units())], check=False)
        assert verify.returncode == 0 and not verify.stdout + verify.stderr, verify.stdout + verify.stderr


def test_install_again_changes_nothing_and_says_so(installed):
    host, second = installed, installed.second
    assert installed.first.returncode == 0, installed.first.stdout + installed.first.stderr
    before = host.written()
    again = host.install()
    assert again.returncode == 0, again.stdout + again.stderr
    assert host.written() == before
    for result in (second, again):
        steps = [line for line in result.stdout.splitlines() if line.startswith("-----> ")]
        assert all(line.endswith(": nothing to change") for line in steps[:-1]), result.stdout
        assert "Nothing changed: this host was already set up for piku" in steps[-1]


def test_the_installed_host_takes_a_push_over_ssh(installed, tmp_path):
    host = installed
    assert host.first.returncode == 0, host.first.stdout + host.first.stderr
    # This machine's package proxy has its own CA (not so on a real host): uv must trust the system's.
    config = host.home / ".config" / "uv"
    run(["runuser", "-u", host.user, "--", "mkdir", "-p", str(config)])
    run(["runuser", "-u", host.user, "--", "sh", "-c", f"echo 'system-certs = true' > {config}/uv.toml"])
    host.emperor = UnitEmperor(host.units()[0].read_text())
    host.start_sshd()
    work = tmp_path / "shop"
    shutil.copytree(EXAMPLES / "flask-uwsgi", work)
    env = host.git_env()
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "first"]):
        run(command, cwd=work, env=env)
    pushed = run(["git", "push", host.url("shop"), "HEAD:main"], check=False, timeout=300, cwd=work, env=env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr + host.diagnostics()
    assert "Found uv.lock" in pushed.stderr and "shop is live at" in pushed.stderr, pushed.stderr
    wait_for_body(f"http://127.0.0.1:{host.live_env('shop')['PORT']}/", "Hello from shop")
    doctor = host.piku("doctor", check=False)
    assert doctor.returncode == 0 and "uWSGI emperor runs" in doctor.stdout, doctor.stdout + doctor.stderr
    assert "1 SSH key(s): alice" in doctor.stdout


def test_doctor_gives_root_and_the_piku_user_fixes_they_can_run(installed, tmp_path):
    """Root, with no piku of its own, is sent to the piku user's doctor; the piku user's fix for
    a log folder it cannot write is one it can run; the installer's unit is the one doctor names."""
    host = installed
    assert host.first.returncode == 0, host.first.stdout + host.first.stderr
    as_root = run([PYTHON, str(host.piku_py), "doctor"], check=False,
                  env=clean_env(PIKU_ROOT=str(tmp_path / "no-piku-here"), HOME="/root"))
    lines = as_root.stdout.splitlines()
    assert as_root.returncode == 1 and lines[0].startswith("FAIL  piku is not set up for root"), as_root.stdout
    assert f"this host's piku user is {host.user}" in lines[0] and len(lines) == 3, as_root.stdout
    fix = lines[1].split("fix: ", 1)[1]
    assert fix == f"runuser -u {host.user} -- /usr/bin/python3 {host.piku_py} doctor", fix
    report = run(["/bin/sh", "-c", fix], check=False, cwd="/", env=clean_env(HOME="/root"))
    assert f"piku's folders under {host.root}" in report.stdout, report.stdout + report.stderr

    units = run(["runuser", "-u", host.user, "--", PYTHON, "-c", "import piku; print(piku.installed_emperors())"],
                env=clean_env(HOME=str(host.home), PYTHONPATH=str(host.home)), cwd=host.home).stdout
    assert f"'{host.root}/uwsgi/uwsgi.ini': ('uwsgi-{host.user}.service', '{host.user}')" in units, units

    logs_dir = host.root / "logs" / "shop"
    logs_dir.chmod(0o500)
    seeded = host.piku("doctor", check=False).stdout
    line = next(line for line in seeded.splitlines() if "its log folder" in line)
    fix = seeded.splitlines()[seeded.splitlines().index(line) + 1].split("fix: ", 1)[1]
    assert fix == f"chmod u+rwx {logs_dir}", seeded
    run(["runuser", "-u", host.user, "--", "/bin/sh", "-c", fix], cwd=host.home)
    assert "its log folder" not in host.piku("doctor", check=False).stdout


# --- update ------------------------------------------------------------------------------

def updatable(tmp_path):
    """A copy of piku.py, as a sysadmin keeps one, with a PIKU_ROOT of its own."""
    script = tmp_path / "srv" / "piku.py"
    script.parent.mkdir()
    shutil.copy2(PIKU_PY, script)
    env = clean_env(PIKU_ROOT=str(tmp_path / "root"), HOME=str(tmp_path))
    run([PYTHON, str(script), "setup"], env=env)

    def piku(*args, check=False):
        return run([PYTHON, str(script), *args], env=env, check=check, timeout=120)
    return script, piku


def variant(tmp_path, name, old, new):
    text = PIKU_PY.read_text()
    assert old in text
    path = tmp_path / name
    path.write_text(text.replace(old, new, 1))
    return path


def test_update_replaces_piku_py_only_after_its_self_check_and_reverts(tmp_path):
    script, piku = updatable(tmp_path)
    original = script.read_bytes()
    broken = variant(tmp_path, "broken.py", "import click\n", "import click\nthis is not python\n")
    refused = piku("update", str(broken))
    assert refused.returncode == 1 and "the new piku.py does not run" in refused.stderr, refused.stderr
    assert "Nothing was replaced" in refused.stderr and script.read_bytes() == original
    failing = variant(tmp_path, "failing.py", "UV_CACHE_ROOT,\n             TOOL_ROOT)",
                      "UV_CACHE_ROOT,\n             TOOL_ROOT, os.path.join(PIKU_ROOT, 'never-made'))")
    refused = piku("update", str(failing))
    assert refused.returncode == 1 and "doctor finds what this one does not" in refused.stderr, refused.stderr
    assert "never-made is missing" in refused.stderr and script.read_bytes() == original
    assert not list(script.parent.glob(".piku-candidate-*")), "no candidate is left behind"
    newer = variant(tmp_path, "newer.py", 'PIKU_VERSION = "', 'PIKU_VERSION = "9.')
    updated = piku("update", str(newer))
    assert updated.returncode == 0, updated.stderr
    assert "to piku 9." in updated.stdout and "update --revert" in updated.stdout
    assert piku("--version").stdout.startswith("piku, version 9.")
    assert (script.parent / "piku.py.previous").read_bytes() == original
    assert os.access(script, os.X_OK) == os.access(PIKU_PY, os.X_OK)
    reverted = piku("update", "--revert")
    assert reverted.returncode == 0 and script.read_bytes() == original
    assert piku("--version").stdout.startswith("piku, version 9.") is False
    assert piku("update").returncode == 1
