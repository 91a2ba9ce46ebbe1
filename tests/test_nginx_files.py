"""What nginx's root master opens: every path a vhost names comes from one table (NGINX_FILES),
none lies where an app's code can write, served folders refuse links, and a vhost or a file
that breaks the rule is refused before nginx reads it. Real nginx (master as root), real apps
in their sandboxes, real pushes."""

import hashlib
import json
import os
import re
import stat
import subprocess
from pathlib import Path

import pytest

import piku as piku_module
from conftest import EXAMPLES, TEST_APPS, wait_until
from test_nginx import front_with_nginx


def snapshot(*roots):
    """{path: (owner, group, mode, size, content digest)} of everything below roots, links not followed."""
    found = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in [*dirs, *files, ""]:
                path = os.path.join(folder, name) if name else folder
                info = os.lstat(path)
                digest = hashlib.sha256(Path(path).read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else ""
                found[path] = (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode), info.st_size, digest)
    return found


def located(piku, path):
    """A path of the module's PIKU_ROOT as it is in the test's."""
    return path.replace(piku_module.PIKU_ROOT, str(piku.root), 1)


def targets_from_table(piku, app, vhost, secret, folder):
    """What an app attacks: every path its installed vhost names, placed by NGINX_FILES (the
    table's folders moved to the test's PIKU_ROOT), plus a vhost of its own among piku's."""
    entries = [piku_module.replace_fields(entry, folder=located(piku, entry.folder)) for entry in piku_module.NGINX_FILES]
    targets, covered = [], set()
    for directive, path, _, _ in piku_module.nginx_named_paths(vhost):
        entry = next(entry for entry in entries if entry.directive == directive
                     and (path.rstrip("/") + "/").startswith(entry.folder + "/"))
        covered.add(directive)
        if entry.kind == "served" and entry.folder.endswith("/releases"):
            relative = os.path.relpath(path, next(Path(entry.folder, app).glob("*/Procfile")).parent)
            if not any(target["path"] == relative for target in targets):
                targets.append({"path": relative, "kind": "served", "file": str(secret), "folder": str(folder)})
        elif entry.kind == "served":        # the ACME answers: piku's, not the app's
            targets.append({"path": os.path.join(path, ".well-known", "acme-challenge", "planted"), "kind": "file",
                            "file": str(secret), "folder": str(folder)})
        else:
            targets.append({"path": path, "kind": entry.kind, "file": str(secret), "folder": str(folder)})
    include = next(entry for entry in entries if entry.directive == "include")
    targets.append({"path": os.path.join(include.folder, f"{app}-planted.conf"), "kind": "file",
                    "file": str(secret), "folder": str(folder)})
    return targets, covered


def reload_through(app, piku, value):
    """Another app's change that rewrites its vhost: nginx reloads and opens every vhost's files."""
    pushed = piku("config:set", app, f"NGINX_PROXY_READ_TIMEOUT={value}")
    assert f"nginx: {app} answers" in pushed.stdout, pushed.stdout + pushed.stderr
    return pushed


# the planters: a web app with NGINX_STATIC_PATHS (alias) and a cache, and a static site (root)
PLANTERS = {"planter": ("web", ("NGINX_STATIC_PATHS=/files/:public", "NGINX_CACHE_PREFIXES=/cached")),
            "siteplanter": ("static", ())}


def plant(piku, make_app, app, secret, folder):
    """Deploy the app, then push it again with its targets -> (targets, directives covered, reports)."""
    kind, settings = PLANTERS[app]
    repo = front_with_nginx(piku, make_app, TEST_APPS / "nginx-planter", app, *settings)
    if kind == "static":
        repo.write("Procfile", "static: public\nworker: python3 plant.py worker\nrelease: python3 plant.py release\n")
        repo.commit("a static site")
    repo.push()
    targets, covered = targets_from_table(piku, app, (piku.root / "nginx" / f"{app}.conf").read_text(), secret, folder)
    data = piku.root / "data" / app
    for report in data.glob("planted-*.json"):      # the first release's (it had nothing to plant)
        report.unlink()
    repo.write("targets.json", json.dumps(targets))
    repo.commit("plant")
    repo.push()
    phases = ("release", "worker", *(("web",) if kind == "web" else ()))
    wait_until(lambda: all((data / f"planted-{phase}.json").exists() for phase in phases),
               message="every phase to report what it planted")
    return targets, covered, {phase: json.loads((data / f"planted-{phase}.json").read_text()) for phase in phases}


def test_nothing_an_app_plants_makes_nginxs_root_master_open_what_is_not_its_own(piku, emperor, nginx, make_app,
                                                                                 sandbox_works, tmp_path):
    # root's files that nginx's workers may read through the group, as they read other apps' releases
    outside = tmp_path / "outside"
    outside.mkdir()
    outside.chmod(0o750)
    secret = outside / "secret"
    secret.write_text("root's own file: never-served-9931\n")
    secret.chmod(0o640)
    folder = outside / "folder"
    folder.mkdir()
    folder.chmod(0o750)
    (folder / "secret").write_text("root's own folder: never-served-9931\n")
    (folder / "secret").chmod(0o640)
    front_with_nginx(piku, make_app, EXAMPLES / "web", "bystander").push()
    watched = [outside, *(piku.root / "releases" / "bystander").iterdir()]     # and the other app's code
    before = snapshot(*watched)
    covered = set()
    for app in PLANTERS:
        targets, directives, reports = plant(piku, make_app, app, secret, folder)
        covered |= directives
        for target in targets:
            if target["kind"] == "served":      # the app's own release: it may, nginx refuses to follow
                assert reports["release"][target["path"] + "/planted"] == "done", reports["release"]
                continue
            for phase, report in reports.items():
                if phase == "release" or target["kind"] == "file":
                    assert report[target["path"]].startswith("refused"), (app, phase, target, report)
    # every directive of the table (uwsgi_cache_path: a wsgi app on uWSGI, in cache_path's folder;
    # include: the host's nginx.conf, planted as a vhost of the app's own)
    assert covered == {entry.directive for entry in piku_module.NGINX_FILES} - {"uwsgi_cache_path", "include"}
    reload_through("bystander", piku, 61)
    assert snapshot(*watched) == before
    for path in ("/files/planted", "/files/sub/secret"):
        status, _, body = nginx.get(path, host="planter.test")
        assert status in (403, 404) and "never-served" not in body, (path, status, body)
    for path in ("/planted", "/sub/secret"):
        status, _, body = nginx.get(path, host="siteplanter.test")
        assert status in (403, 404) and "never-served" not in body, (path, status, body)
    assert nginx.get("/files/own.txt", host="planter.test")[2] == "a file of the app's own\n"
    assert nginx.get("/own.txt", host="siteplanter.test")[2] == "a file of the app's own\n"
    assert nginx.get("/", host="bystander.test")[2].startswith("Hello from bystander")

    # a hand (or app code with no sandbox) puts links and a FIFO where nginx's master opens files:
    # they are removed before nginx reads the vhosts again, and named
    logs = piku.root / "nginx" / "logs"
    (logs / "planter.access.log").unlink(missing_ok=True)
    os.symlink(secret, logs / "planter.access.log")
    (logs / "planter.error.log").unlink(missing_ok=True)
    os.mkfifo(logs / "planter.error.log")
    cache = piku.root / "cache" / "planter"
    subprocess.run(["rm", "-rf", str(cache)], check=True)
    os.symlink(folder, cache)
    doctor = piku("doctor", check=False)
    assert doctor.returncode == 1
    for path in (logs / "planter.access.log", logs / "planter.error.log", cache):
        assert f"rm {path}" in doctor.stdout, doctor.stdout
    pushed = reload_through("bystander", piku, 62)
    for path in (logs / "planter.access.log", logs / "planter.error.log", cache):
        assert f"removed {path}" in pushed.stderr, pushed.stderr
        assert not os.path.islink(path) and not (os.path.exists(path) and stat.S_ISFIFO(os.lstat(path).st_mode))
    assert snapshot(*watched) == before
    assert nginx.get("/", host="planter.test")[2] == "the planter's app\n"

    # a vhost by hand that has root's nginx write where an app writes: set aside, no reload stops on it
    by_hand = piku.root / "nginx" / "planter2.conf"
    by_hand.write_text(f"server {{\n    listen 127.0.0.1:{nginx.port};\n    server_name byhand.test;\n"
                       f"    access_log {piku.root}/data/planter/by-hand.log;\n}}\n")
    pushed = reload_through("bystander", piku, 63)
    assert "the vhost of planter2 was set aside" in pushed.stderr and (piku.root / "nginx" / "planter2.conf.refused").exists()
    assert not (piku.root / "data" / "planter" / "by-hand.log").exists()

    # a vhost an earlier piku.py wrote (no disable_symlinks): doctor warns, setup writes it again
    vhost = piku.root / "nginx" / "siteplanter.conf"
    vhost.write_text("".join(line for line in vhost.read_text().splitlines(True) if "disable_symlinks" not in line))
    doctor = piku("doctor", check=False)
    assert re.search(r"WARN +siteplanter: line [0-9]+: nginx's workers would follow links", doctor.stdout), doctor.stdout
    piku("setup")
    assert "disable_symlinks on from=" in vhost.read_text()
    status, _, body = nginx.get("/planted", host="siteplanter.test")
    assert status in (403, 404) and "never-served" not in body


def test_every_path_a_vhost_names_is_placed_by_the_table_and_none_is_an_apps(tmp_path, monkeypatch):
    check = piku_module.check_nginx_files
    # the table: no folder nginx's master opens is one an app's code writes, for any app
    for entry in piku_module.NGINX_FILES:
        sample = os.path.join(entry.folder, "some-app", "x")
        assert piku_module.app_may_write(sample) == (entry.kind == "served" and entry.folder == piku_module.RELEASE_ROOT), entry
    # every directive that names a path, anywhere in a folder an app writes, is refused
    root = piku_module.PIKU_ROOT
    writable = [os.path.join(folder, "app", *(part.replace("*", "1") for part in below), "f")
                for folder, below in piku_module.APP_WRITES]
    elsewhere = [f"{root}/nginx/logs/other.access.log", f"{root}/nginx/other.key", f"{root}/cache/.probes.json",
                 f"{root}/cache/other", f"{root}/releases/other/v1", f"{root}/nginx/../../x", f"{root}/cache//x",
                 f"{root}/cache/app/$host", "/etc/shadow", f"{root}/nginx/app.conf"]
    for directive in sorted(piku_module.NGINX_PATH_DIRECTIVES):
        for path in writable + elsewhere:
            for scheme in (("unix:", "UNIX:", "Unix:") if directive in piku_module.NGINX_SOCKET_DIRECTIVES else ("",)):
                text = f"server {{\n    location / {{\n        {directive} {scheme}{path};\n    }}\n}}\n"
                assert check(text, "app"), (directive, path)
    # a served folder without disable_symlinks from its own release, or with it turned off below
    release = f"{piku_module.RELEASE_ROOT}/shop/v1"
    for extra in ("", f"disable_symlinks on from={release}/public;", "disable_symlinks off;",
                  f"disable_symlinks on from={piku_module.RELEASE_ROOT};",
                  f"disable_symlinks on from={release};\n        location /x/ {{ disable_symlinks off; }}"):
        text = f"server {{\n    location /f/ {{\n        alias {release}/public/;\n        {extra}\n    }}\n}}\n"
        assert check(text, "shop"), extra
    ok = f"server {{\n    location /f/ {{\n        alias {release}/public/;\n        disable_symlinks on from={release};\n    }}\n}}\n"
    assert not check(ok, "shop") and check(ok, "other")
    every = f"server {{ location / {{ root {piku_module.RELEASE_ROOT}; disable_symlinks on from={piku_module.RELEASE_ROOT}; }} }}\n"
    assert check(every, "shop")
    # what nginx would not read is a message, not a traceback
    for broken in ("}\n}\n", "}\naccess_log /etc/passwd;\n", "server {\n access_log /etc/shadow;\n",
                   "server { access_log; }\n", "server { listen; }\n"):
        try:
            check(broken, "app")
        except piku_module.NginxSyntaxError:
            pass
    # docs/SECURITY.md names every directive of the table
    security = (Path(__file__).resolve().parent.parent / "docs" / "SECURITY.md").read_text()
    for entry in piku_module.NGINX_FILES:
        assert f"`{entry.directive}" in security, entry.directive
