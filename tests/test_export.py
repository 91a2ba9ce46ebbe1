"""`export` (issue 19): a kept release as an OCI image. The reproducible tar writer's rules,
tried on real files with no tools: the same tree gives the same bytes, and what a layer holds
is what an image needs (parents, modes, links, .pyc fields)."""

import gzip
import hashlib
import io
import json
import os
import py_compile
import socket
import stat
import tarfile

import piku

MTIME = 1767225600      # 2026-01-01


def tree(base):
    """A small app folder with the shapes a release holds."""
    app = base / "srv" / "piku" / "app"
    (app / "pkg" / "__pycache__").mkdir(parents=True)
    (app / "pkg" / "mod.py").write_text("VALUE = 1\n")
    (app / "run.sh").write_text("#!/bin/sh\necho run\n")
    (app / "run.sh").chmod(0o750)
    (app / "secret").write_text("only the owner\n")
    (app / "secret").chmod(0o600)
    (app / "link").symlink_to("/etc/passwd")        # kept as a link, never followed
    (app / "relative").symlink_to("pkg/mod.py")
    os.link(app / "run.sh", app / "hard")          # a hard link: written as a file
    os.mkfifo(app / "fifo")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(app / "sock"))
    listener.close()
    (base / "srv").chmod(0o711)
    return app


def members(path):
    with tarfile.open(path, "r:gz") as archive:
        return {member.name: member for member in archive.getmembers()}


def test_the_same_tree_gives_the_same_bytes_and_digests_that_match_them(tmp_path):
    app = tree(tmp_path)
    first = piku.write_layer([str(app)], str(tmp_path / "one.tar.gz"), MTIME)
    os.utime(app / "pkg" / "mod.py", (1, 1))        # host mtimes, atimes and inode order do not matter
    second = piku.write_layer([str(app)], str(tmp_path / "two.tar.gz"), MTIME)
    data = (tmp_path / "one.tar.gz").read_bytes()
    assert data == (tmp_path / "two.tar.gz").read_bytes()
    assert first.digest == second.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert first.size == len(data)
    assert first.diff_id == "sha256:" + hashlib.sha256(gzip.decompress(data)).hexdigest()
    assert data[4:8] == b"\0\0\0\0" and not data[3] & 0x08, "gzip: mtime 0, no file name"
    other = piku.write_layer([str(app)], str(tmp_path / "three.tar.gz"), MTIME + 1)
    assert other.digest != first.digest, "the mtime is the commit's: another commit, other bytes"


def test_entries_are_sorted_owned_by_root_with_one_mtime_and_parents_as_on_the_host(tmp_path):
    app = tree(tmp_path)
    layer = piku.write_layer([str(app)], str(tmp_path / "layer.tar.gz"), MTIME)
    with tarfile.open(layer.path, "r:gz") as archive:
        assert archive.format == tarfile.PAX_FORMAT
        names = archive.getnames()
        found = {member.name: member for member in archive.getmembers()}
    assert names == sorted(names)
    for member in found.values():
        assert (member.uid, member.gid, member.uname, member.gname, member.mtime) == (0, 0, "", "", MTIME)
    inside = str(app).lstrip("/")
    parents = [os.path.dirname(inside)]
    while os.path.dirname(parents[-1]):
        parents.append(os.path.dirname(parents[-1]))
    for parent in parents:
        assert found[parent].isdir(), parent
        assert found[parent].mode == stat.S_IMODE(os.stat("/" + parent).st_mode), parent
    assert found[str(tmp_path / "srv").lstrip("/")].mode == 0o711
    assert found[f"{inside}/run.sh"].mode == 0o750 and found[f"{inside}/secret"].mode == 0o600


def test_links_stay_links_hard_links_become_files_and_sockets_and_fifos_are_left_out(tmp_path):
    app = tree(tmp_path)
    layer = piku.write_layer([str(app)], str(tmp_path / "layer.tar.gz"), MTIME)
    inside = str(app).lstrip("/")
    found = members(layer.path)
    assert found[f"{inside}/link"].issym() and found[f"{inside}/link"].linkname == "/etc/passwd"
    assert found[f"{inside}/relative"].issym() and found[f"{inside}/relative"].linkname == "pkg/mod.py"
    assert found[f"{inside}/hard"].isfile() and found[f"{inside}/hard"].size == found[f"{inside}/run.sh"].size
    assert f"{inside}/fifo" not in found and f"{inside}/sock" not in found
    with tarfile.open(layer.path, "r:gz") as archive:
        assert "root:" not in archive.extractfile(f"{inside}/run.sh").read().decode()
        assert not any(member.name.startswith("etc") for member in archive.getmembers())


def test_a_pyc_that_matched_its_source_matches_it_again_at_the_images_mtime(tmp_path):
    app = tree(tmp_path)
    source = app / "pkg" / "mod.py"
    fresh = py_compile.compile(str(source), invalidation_mode=py_compile.PycInvalidationMode.TIMESTAMP)
    stale = app / "pkg" / "__pycache__" / "old.cpython-311.pyc"
    (app / "pkg" / "old.py").write_text("X = 2\n")
    stale.write_bytes(open(fresh, "rb").read())           # stamped for mod.py: matches nothing
    checked = app / "pkg" / "__pycache__" / "hashed.cpython-311.pyc"
    (app / "pkg" / "hashed.py").write_text("Y = 3\n")
    py_compile.compile(str(app / "pkg" / "hashed.py"), cfile=str(checked),
                       invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
    layer = piku.write_layer([str(app)], str(tmp_path / "layer.tar.gz"), MTIME)
    inside = str(app).lstrip("/")
    with tarfile.open(layer.path, "r:gz") as archive:
        def read(path):
            return archive.extractfile(f"{inside}/{os.path.relpath(path, app)}").read()
        written = read(fresh)
        assert int.from_bytes(written[8:12], "little") == MTIME
        assert written[12:16] == open(fresh, "rb").read()[12:16] and written[16:] == open(fresh, "rb").read()[16:]
        assert read(stale) == stale.read_bytes(), "a .pyc that did not match its source stays as it was"
        assert read(checked) == checked.read_bytes(), "a hash-checked .pyc has no mtime to change"


def test_a_big_file_is_written_whole(tmp_path):
    big = tmp_path / "big"
    big.mkdir()
    (big / "blob").write_bytes(os.urandom(4 * 1024 * 1024))
    layer = piku.write_layer([str(big)], str(tmp_path / "big.tar.gz"), MTIME)
    with tarfile.open(layer.path, "r:gz") as archive:
        data = archive.extractfile(f"{str(big).lstrip('/')}/blob").read()
    assert data == (big / "blob").read_bytes()


def image_of(tmp_path, layer, name="image.tar"):
    config = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/true"]},
              "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]}}
    config_bytes = piku.canonical_json(config)
    config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
    manifest = {"schemaVersion": 2, "mediaType": piku.OCI_MANIFEST,
                "config": {"mediaType": piku.OCI_CONFIG, "digest": config_digest, "size": len(config_bytes)},
                "layers": [{"mediaType": piku.OCI_LAYER, "digest": layer.digest, "size": layer.size}]}
    target = tmp_path / name
    digest = piku.write_image_archive(str(target), {config_digest: config_bytes, layer.digest: layer.path},
                                      manifest, "shop:v1", MTIME)
    return target, digest, config


def test_an_image_archive_is_the_same_bytes_every_time_and_reads_back_as_written(tmp_path):
    app = tree(tmp_path)
    layer = piku.write_layer([str(app)], str(tmp_path / "layer.tar.gz"), MTIME)
    first, digest, config = image_of(tmp_path, layer, "one.tar")
    second, again, _ = image_of(tmp_path, layer, "two.tar")
    assert first.read_bytes() == second.read_bytes() and digest == again
    with tarfile.open(first) as archive:
        names = archive.getnames()
        assert {"oci-layout", "index.json", "manifest.json"} <= set(names)
        docker = json.loads(archive.extractfile("manifest.json").read())
    assert docker[0]["RepoTags"] == ["shop:v1"] and docker[0]["Layers"] == ["blobs/sha256/" + layer.digest[7:]]
    manifest, read_config, blobs = piku.read_image_archive(str(first))
    assert read_config == config and list(blobs) == [layer.digest]
    assert "sha256:" + hashlib.sha256(blobs[layer.digest]).hexdigest() == layer.digest


def test_what_is_no_oci_archive_is_refused_with_the_fix(tmp_path):
    for name, content in (("empty", b""), ("text", b"hello"), ("tar-without-layout", None)):
        path = tmp_path / name
        if content is None:
            with tarfile.open(path, "w") as archive:
                member = tarfile.TarInfo("index.json")
                member.size = 2
                archive.addfile(member, io.BytesIO(b"{}"))
        else:
            path.write_bytes(content)
        try:
            piku.read_image_archive(str(path))
        except piku.PikuError as error:
            assert "is not an OCI image archive" in error.message and "skopeo copy" in error.hint
        else:
            raise AssertionError(f"{name} was read as an image")


# --- real exports: skopeo, podman (with runc), docker-registry ---------------------------------

import shutil  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

from conftest import EXAMPLES, fetch, free_port, wait_for_body  # noqa: E402


def tools_or_skip(*names):
    missing = [name for name in names if not shutil.which(name)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (make deps installs them)")


class Podman:
    """podman with storage of the test's own, runc (crun refuses this machine's hybrid cgroups)
    and explicit ulimits within the machine's hard limits: facts of the test machine."""

    def __init__(self):
        import tempfile
        from pathlib import Path
        self.folder = folder = Path(tempfile.mkdtemp(prefix="pm-", dir="/tmp"))     # (runroot: 50 characters)
        conf = folder / "containers.conf"
        conf.write_text('[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n')
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf))
        self.base = ["podman", "--root", str(folder / "storage"), "--runroot", str(folder / "run"),
                     "--storage-driver", "vfs"]

    def __call__(self, *args, check=True, timeout=180):
        result = subprocess.run([*self.base, *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {result.stdout}\n{result.stderr}")
        return result

    def remove(self):
        self("system", "reset", "--force", check=False)
        shutil.rmtree(self.folder, ignore_errors=True)

    def run(self, image, port, *args):
        return self("run", "-d", "--network", "host", "--ulimit", "nofile=4096:4096", "--ulimit",
                    "nproc=4096:4096", "-e", f"PORT={port}", "-e", "BIND_ADDRESS=127.0.0.1", image,
                    *args).stdout.strip()


def export(piku, *args):
    result = subprocess.run([piku_python(), str(piku.script), "export", *args], env=piku.env,
                            capture_output=True, timeout=600)
    return result


def piku_python():
    import sys
    return sys.executable


def test_a_flask_app_on_uwsgi_exports_to_an_image_podman_runs_as_a_non_root_user(piku, emperor, make_app,
                                                                                toolchain, tmp_path):
    tools_or_skip("skopeo", "podman", "runc")
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "flask-uwsgi", "shop")
    app.write("ENV", "FROM_REPO=yes\n")
    app.commit("a setting in the repo")
    app.push()
    piku("config:set", "shop", "GREETING=hi", "API_TOKEN=s3cr3t-value")
    wait_for_body(piku.url("shop"), "Hello from shop")
    archive = tmp_path / "shop.tar"
    result = export(piku, "shop", "--output", str(archive), "--env-file", str(tmp_path / "shop.env"))
    assert result.returncode == 0, result.stderr.decode()
    assert b"shop v2 exported: sha256:" in result.stderr
    assert "settings to give the orchestrator (config:set, not in the image): API_TOKEN, GREETING" in \
        result.stderr.decode()
    assert (tmp_path / "shop.env").read_text() == "GREETING=hi\n# API_TOKEN: a secret, not written\n"
    inspected = subprocess.run(["skopeo", "inspect", "--config", f"oci-archive:{archive}"], capture_output=True,
                               text=True, check=True)
    config = json.loads(inspected.stdout)["config"]
    assert config["Entrypoint"] == ["/usr/local/bin/piku-launch"] and config["Cmd"] == ["wsgi"]
    assert config["User"] == "10001:10001" and "PORT=8000" in config["Env"]
    assert config["Labels"]["io.piku.app"] == "shop" and config["Labels"]["io.piku.release"] == "v2"
    env = config["Env"]
    assert "FROM_REPO=yes" in env and "BIND_ADDRESS=0.0.0.0" in env
    assert not [line for line in env if line.startswith(("GREETING=", "API_TOKEN=", "PIKU_ROOT=", "NGINX_"))]
    assert "s3cr3t-value" not in archive.read_bytes().decode(errors="replace")
    podman = Podman()
    try:
        image = podman("load", "-q", "-i", str(archive)).stdout.strip().split()[-1]
        port = free_port()
        container = podman.run(image, port)
        try:
            body = wait_for_body(f"http://127.0.0.1:{port}/", "Hello from shop", timeout=60)
        except AssertionError:
            logs = podman("logs", container, check=False)
            raise AssertionError(f"the container did not answer; its output:\n{logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        assert "Python 3.11" in body
        assert podman("exec", container, "/usr/bin/python3.11", "-c",
                      "import os; print(os.getuid())").stdout.strip() == "10001"
    finally:
        podman.remove()


def layer_digests(archive):
    out = subprocess.run(["skopeo", "inspect", f"oci-archive:{archive}"], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)["Layers"]


def test_exports_are_reproducible_and_a_change_moves_only_its_own_layer(piku, emperor, make_app, toolchain,
                                                                        tmp_path):
    tools_or_skip("skopeo")
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "flask-uwsgi", "shop")
    app.push()
    wait_for_body(piku.url("shop"), "Hello from shop")
    for name in ("one", "two"):
        assert export(piku, "shop", "--output", str(tmp_path / f"{name}.tar")).returncode == 0
    assert (tmp_path / "one.tar").read_bytes() == (tmp_path / "two.tar").read_bytes()
    base, environment, code = layer_digests(tmp_path / "one.tar")

    app.write("wsgi.py", (EXAMPLES / "flask-uwsgi" / "wsgi.py").read_text().replace("Hello from", "Howdy from"))
    app.commit("code only")
    app.push()
    assert export(piku, "shop", "--output", str(tmp_path / "code.tar")).returncode == 0
    after = layer_digests(tmp_path / "code.tar")
    assert after[:2] == [base, environment] and after[2] != code, "a code-only release moves only the app layer"

    assert export(piku, "shop", "v1", "--output", str(tmp_path / "v1.tar")).returncode == 0
    assert (tmp_path / "v1.tar").read_bytes() == (tmp_path / "one.tar").read_bytes(), "v1 is still v1"

    first = layer_digests(tmp_path / "code.tar")
    based = export(piku, "shop", "--base", str(tmp_path / "code.tar"), "--output", str(tmp_path / "based.tar"))
    assert based.returncode == 0, based.stderr.decode()
    assert layer_digests(tmp_path / "based.tar")[:3] == first, "the base's layers, verbatim, first"

    pyproject = (app.path / "pyproject.toml").read_text()
    app.write("pyproject.toml", pyproject.replace('"flask>=3.0"', '"flask>=3.0", "six"'))
    subprocess.run(["uv", "lock", "-q"], cwd=app.path, env=piku.env, check=True, timeout=300)
    app.commit("six")
    app.push()
    assert export(piku, "shop", "--output", str(tmp_path / "deps.tar")).returncode == 0
    after = layer_digests(tmp_path / "deps.tar")
    assert after[0] == first[0] and after[1] != first[1] and after[2] != first[2], "a dependency change"

    piku("config:set", "shop", "PIKU_KEEP_RELEASES=1")
    pruned = export(piku, "shop", "v1", "--output", str(tmp_path / "v1.tar"))
    assert pruned.returncode != 0 and b"v1 of shop is not kept" in pruned.stderr
    import pty
    parent, child = pty.openpty()
    try:
        terminal = subprocess.run([piku_python(), str(piku.script), "export", "shop"], env=piku.env, stdout=child,
                                  stderr=subprocess.PIPE, text=True, timeout=60)
    finally:
        os.close(parent)
        os.close(child)
    assert terminal.returncode != 0 and "the image would be written to a terminal" in terminal.stderr


def test_what_cannot_be_exported_is_refused_with_the_fix_and_nothing_is_left_behind(piku, emperor, make_app,
                                                                                     toolchain, tmp_path):
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "flask-uwsgi", "shop")
    app.push()
    not_oci = tmp_path / "base.tar"
    not_oci.write_bytes(b"not an archive")
    cases = {
        ("shop", "v9", "--output", str(tmp_path / "a.tar")): "v9 of shop is not kept (kept: v1)",
        ("shop", "--base", str(not_oci), "--output", str(tmp_path / "b.tar")): "is not an OCI image archive",
        ("nosuch", "--output", str(tmp_path / "c.tar")): "app 'nosuch' not found",
    }
    for args, message in cases.items():
        result = export(piku, *args)
        assert result.returncode != 0 and message in result.stderr.decode(), (args, result.stderr.decode())
        assert b"Traceback" not in result.stderr
    limited = subprocess.run([piku_python(), str(piku.script), "export", "shop", "--output", str(tmp_path / "d.tar")],
                             env=dict(piku.env, FINGERPRINT="SHA256:test", APPS="shop"), capture_output=True, text=True)
    assert limited.returncode != 0 and "--output, --base and --env-file name files on the host" in limited.stderr

    import resource
    import signal

    def small_files():          # a disk that fills: every write past 1 MiB fails
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))
    full = subprocess.run([piku_python(), str(piku.script), "export", "shop", "--output", str(tmp_path / "e.tar")],
                          env=piku.env, capture_output=True, text=True, preexec_fn=small_files)
    assert full.returncode != 0 and "the image could not be written" in full.stderr, full.stderr
    assert "Traceback" not in full.stderr
    assert sorted(os.listdir(tmp_path)) == ["base.tar", "piku", "work"], "no archive, half or whole"
    assert not [name for name in os.listdir(piku.root / "tools" / "export") if name.startswith(".")]
    assert not [name for name in os.listdir(piku.root / "tools" / "export") if name.endswith(".new")]


def test_a_fastapi_app_runs_from_its_image_and_a_registry_keeps_its_digest(piku, emperor, make_app, toolchain,
                                                                            tmp_path):
    tools_or_skip("skopeo", "podman", "runc", "docker-registry")
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "fastapi", "api")
    app.push()
    archive = tmp_path / "api.tar"
    result = export(piku, "api", "--output", str(archive))
    assert result.returncode == 0, result.stderr.decode()
    digest = result.stderr.decode().split("exported: ")[1].split()[0]
    podman = Podman()
    registry_port = free_port()
    config = tmp_path / "registry.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {tmp_path / 'registry'}\n"
                      f"http:\n  addr: 127.0.0.1:{registry_port}\n")
    registry = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    try:
        image = podman("load", "-q", "-i", str(archive)).stdout.strip().split()[-1]
        port = free_port()
        podman.run(image, port)
        assert "Hello" in wait_for_body(f"http://127.0.0.1:{port}/", "Hello", timeout=60)
        target = f"docker://127.0.0.1:{registry_port}/api:v1"
        for _ in range(50):
            copied = subprocess.run(["skopeo", "copy", "--dest-tls-verify=false", f"oci-archive:{archive}", target],
                                    capture_output=True, text=True)
            if copied.returncode == 0 or "connection refused" not in copied.stderr:
                break
            time.sleep(0.1)
        assert copied.returncode == 0, copied.stderr
        pulled = subprocess.run(["skopeo", "inspect", "--tls-verify=false", f"{target.rsplit(':', 1)[0]}@{digest}"],
                                capture_output=True, text=True)
        assert pulled.returncode == 0 and json.loads(pulled.stdout)["Digest"] == digest, pulled.stderr
    finally:
        registry.terminate()
        registry.wait(timeout=10)
        podman.remove()


def test_a_node_app_exports_with_its_node_and_its_production_modules(piku, emperor, make_app, tmp_path):
    tools_or_skip("skopeo", "podman", "runc")
    piku.env["NODE_EXTRA_CA_CERTS"] = "/etc/ssl/certs/ca-certificates.crt"     # (the test machine's proxy)
    app = make_app(EXAMPLES / "express", "shop")
    app.push()
    archive = tmp_path / "shop.tar"
    result = export(piku, "shop", "--output", str(archive))
    assert result.returncode == 0, result.stderr.decode()
    podman = Podman()
    try:
        image = podman("load", "-q", "-i", str(archive)).stdout.strip().split()[-1]
        port = free_port()
        podman.run(image, port)
        body = wait_for_body(f"http://127.0.0.1:{port}/", "Hello from", timeout=60)
        assert "(production)" in body
        assert fetch(f"http://127.0.0.1:{port}/import/express")[1] == "yes\n"
    finally:
        podman.remove()


def test_an_export_to_stdout_that_waits_for_the_lock_writes_only_the_archive_there(piku, emperor, make_app,
                                                                                   toolchain, tmp_path):
    import fcntl
    import threading
    tools_or_skip("skopeo")
    toolchain.require("3.11")
    app = make_app(EXAMPLES / "flask-uwsgi", "shop")
    app.push()
    lock = open(piku.root / "locks" / "shop.lock", "a")
    fcntl.flock(lock, fcntl.LOCK_EX)            # another change of the app is running
    threading.Timer(1.5, lambda: (fcntl.flock(lock, fcntl.LOCK_UN), lock.close())).start()
    result = export(piku, "shop")
    assert result.returncode == 0, result.stderr.decode()
    assert b"Waiting for another change" in result.stderr
    (tmp_path / "out.tar").write_bytes(result.stdout)
    assert layer_digests(tmp_path / "out.tar"), "stdout held the archive and nothing else"
    assert not [name for name in os.listdir(piku.root / "tools" / "export") if name.startswith(".")]
