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
