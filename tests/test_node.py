"""Node apps (issue 18): which package manager installs an app, decided from package.json's
packageManager, upstream's NODE_PACKAGE_MANAGER setting and the lockfiles -- pure functions,
tried on every combination."""

import itertools
import json

import pytest

import piku

LOCKS = tuple(piku.NODE_LOCKFILES)
FIELDS = (None, "npm@10.9.2", "pnpm@9.15.0", "yarn@1.22.22", "yarn@4.5.3+sha512.0123abcd", "bun@1.1.0",
          "pnpm", "pnpm@latest", 42, "")
SETTINGS = ("", "npm", "yarn", "pnpm --prefer-offline", "npm --package-lock=false", "bower", "   ")


def tree(tmp_path, locks, field=None, yarnrc=False, berry_lock=False):
    tmp_path.mkdir(parents=True, exist_ok=True)
    package = {"name": "shop", "version": "1.0.0"}
    if field is not None:
        package["packageManager"] = field
    (tmp_path / "package.json").write_text(json.dumps(package))
    for lock in locks:
        text = "__metadata:\n  version: 8\n" if lock == "yarn.lock" and berry_lock else "# yarn lockfile v1\n"
        (tmp_path / lock).write_text(text if lock == "yarn.lock" else "{}")
    if yarnrc:
        (tmp_path / ".yarnrc.yml").write_text("nodeLinker: node-modules\n")
    return piku.read_package_json(str(tmp_path))


def test_every_combination_of_locks_field_and_setting_chooses_one_manager_or_says_why(tmp_path):
    tried = refused = 0
    for count in range(len(LOCKS) + 1):
        for locks in itertools.combinations(LOCKS, count):
            for field, setting in itertools.product(FIELDS, SETTINGS):
                root = tmp_path / f"t{tried}"
                package = tree(root, locks, field)
                tried += 1
                try:
                    chosen = piku.node_package_manager(str(root), {"NODE_PACKAGE_MANAGER": setting}, package)
                except piku.PikuError as error:
                    refused += 1
                    assert error.message and error.hint, (locks, field, setting)
                    continue
                managers = {piku.NODE_LOCKFILES[lock] for lock in locks}
                assert chosen.name in piku.NODE_MANAGERS
                if field is not None:
                    assert chosen.name == field.split("@")[0] and chosen.version == field.split("@")[1].split("+")[0]
                elif setting.split():
                    assert chosen.name == setting.split()[0] and chosen.ignored == " ".join(setting.split()[1:])
                else:
                    assert len(managers) <= 1, "two managers' locks and nothing to choose: refused"
                    assert chosen.name == (managers.pop() if managers else "npm")
                assert (chosen.lockfile == "" and not locks) or piku.NODE_LOCKFILES[chosen.lockfile] == chosen.name
                if "npm-shrinkwrap.json" in locks and chosen.name == "npm":
                    assert chosen.lockfile == "npm-shrinkwrap.json", "npm installs from its shrinkwrap"
    assert tried == 16 * len(FIELDS) * len(SETTINGS) and 0 < refused < tried, (tried, refused)


@pytest.mark.parametrize("locks, field, setting, message", [
    (("package-lock.json", "yarn.lock"), None, "", "lockfiles of two package managers: package-lock.json and yarn.lock"),
    (("package-lock.json",), "pnpm@9.15.0", "", "packageManager pnpm@9.15.0 chooses pnpm, but the app's lockfile "
                                               "is package-lock.json (npm's)"),
    ((), "bun@1.1.0", "", "package.json's packageManager \"bun@1.1.0\" names no version of npm, pnpm or Yarn"),
    ((), None, "bower", "NODE_PACKAGE_MANAGER=bower names no package manager piku knows"),
    (("yarn.lock",), None, "npm --package-lock=false", "NODE_PACKAGE_MANAGER chooses npm, but the app's lockfile "
                                                       "is yarn.lock (yarn's)"),
])
def test_what_cannot_be_decided_is_refused_with_the_fix(tmp_path, locks, field, setting, message):
    package = tree(tmp_path, locks, field)
    with pytest.raises(piku.PikuError) as refused:
        piku.node_package_manager(str(tmp_path), {"NODE_PACKAGE_MANAGER": setting}, package)
    assert message in refused.value.message and refused.value.hint, refused.value.message


def test_yarn_1_and_berry_are_told_apart(tmp_path):
    cases = [((), "yarn@1.22.22", False, False, False), ((), "yarn@4.5.3", False, False, True),
             (("yarn.lock",), None, False, False, False), (("yarn.lock",), None, True, False, True),
             (("yarn.lock",), None, False, True, True)]
    for index, (locks, field, yarnrc, berry_lock, berry) in enumerate(cases):
        root = tmp_path / str(index)
        package = tree(root, locks, field, yarnrc=yarnrc, berry_lock=berry_lock)
        assert piku.node_package_manager(str(root), {}, package).berry is berry, cases[index]


@pytest.mark.parametrize("text, message", [("{", "package.json is not valid JSON"), ("[]", "not a JSON object"),
                                           ('{"a": 1}\n\xff', "is not UTF-8"),
                                           ('{"scripts": {"start": "node \\ud800.js"}}', "no Unicode text"),
                                           ('{"a": ' + "[" * 900 + "]" * 900 + "}", "nests more than 64 levels")])
def test_a_malformed_package_json_is_refused_with_a_message(tmp_path, text, message):
    (tmp_path / "package.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(piku.PikuError) as refused:
        piku.read_package_json(str(tmp_path))
    assert message in refused.value.message


SEMVER = "/usr/lib/node_modules/npm/node_modules/semver"


@pytest.mark.parametrize("text, inside, outside", [
    ("20", ["20.0.0", "20.11.1"], ["19.9.9", "21.0.0"]),
    ("v20.11.1", ["20.11.1"], ["20.11.0", "20.11.2"]),
    ("^20.11", ["20.11.0", "20.99.0"], ["20.10.9", "21.0.0"]),
    ("^0.2.3", ["0.2.3", "0.2.9"], ["0.3.0", "0.2.2"]),
    ("~18.1", ["18.1.0", "18.1.7"], ["18.2.0"]),
    (">=18 <21", ["18.0.0", "20.9.9"], ["17.9.9", "21.0.0"]),
    (">18.2", ["18.3.0"], ["18.2.9"]),
    ("<=18.2", ["18.2.9"], ["18.3.0"]),
    ("18 || 22.x", ["18.5.0", "22.1.0"], ["20.0.0"]),
    ("18.1 - 20", ["18.1.0", "20.9.0"], ["18.0.9", "21.0.0"]),
    ("lts/iron", ["20.11.1"], ["22.0.0"]),
    ("lts/*", ["22.1.0", "4.0.0"], []),
    ("*", ["0.0.1", "24.0.0"], []),
])
def test_node_versions_and_npm_ranges(text, inside, outside):
    test = piku.node_range(text)
    for version in inside:
        assert test(tuple(map(int, version.split(".")))), (text, version)
    for version in outside:
        assert not test(tuple(map(int, version.split(".")))), (text, version)


def test_npm_ranges_agree_with_npms_own_semver_on_generated_ranges():
    """Random ranges (every operator, partial and x versions, hyphens, ||) against npm's semver
    package, the one npm itself uses, on a grid of versions."""
    import os
    import random
    import subprocess
    if not os.path.isdir(SEMVER):
        pytest.skip("npm's semver package is not at " + SEMVER)
    rng = random.Random(18)

    def partial():
        parts = [str(rng.randint(0, 3)) for _ in range(rng.randint(1, 3))]
        if rng.random() < 0.2:
            parts[-1] = rng.choice("xX*")
        return ".".join(parts)

    def comparator():
        return rng.choice(["", "=", "<", ">", "<=", ">=", "~", "^", "v"]) + partial()

    ranges = []
    for _ in range(400):
        shape = rng.random()
        if shape < 0.15:
            ranges.append(f"{partial()} - {partial()}")
        else:
            alternatives = [" ".join(comparator() for _ in range(rng.randint(1, 2))) for _ in range(rng.randint(1, 2))]
            ranges.append(" || ".join(alternatives))
    versions = [f"{a}.{b}.{c}" for a in range(5) for b in range(5) for c in range(5)]
    script = ("const semver = require(process.argv[1]); const input = JSON.parse(require('fs').readFileSync(0));"
              "console.log(JSON.stringify(input.ranges.map(r => input.versions.map(v => semver.satisfies(v, r)))));")
    result = subprocess.run(["node", "-e", script, SEMVER], input=json.dumps({"ranges": ranges, "versions": versions}),
                            capture_output=True, text=True, check=True)
    expected = json.loads(result.stdout)
    differ = []
    for text, answers in zip(ranges, expected):
        test = piku.node_range(text)
        ours = [test(tuple(map(int, version.split(".")))) for version in versions]
        if ours != answers:
            differ.append((text, [v for v, a, b in zip(versions, ours, answers) if a != b][:5]))
    assert not differ, f"{len(differ)} of {len(ranges)} ranges differ: {differ[:10]}"


@pytest.mark.parametrize("text", ["twenty", "lts/foo", ">=18 <", "20.1.2.3", "^", "1.2.3 - "])
def test_what_is_no_node_version_is_refused_with_a_message(text):
    with pytest.raises(piku.PikuError) as refused:
        piku.node_range(text)((20, 0, 0))
    assert refused.value.hint


def test_the_node_request_comes_from_the_first_place_that_names_one(tmp_path):
    (tmp_path / ".node-version").write_text("20.11.1\n")
    (tmp_path / ".nvmrc").write_text("lts/hydrogen\n")
    package = {"engines": {"node": ">=18"}}
    places = [({"NODE_VERSION": "22"}, {"NODE_VERSION": "21"}, "22", "config:set NODE_VERSION"),
              ({}, {"NODE_VERSION": "21"}, "21", "NODE_VERSION in the app's ENV"),
              ({}, {}, "20.11.1", ".node-version")]
    for config, repo_env, text, source in places:
        assert piku.resolve_node_request(str(tmp_path), config, repo_env, package) == (text, source)
    (tmp_path / ".node-version").unlink()
    assert piku.resolve_node_request(str(tmp_path), {}, {}, package) == ("lts/hydrogen", ".nvmrc")
    (tmp_path / ".nvmrc").unlink()
    assert piku.resolve_node_request(str(tmp_path), {}, {}, package) == (">=18", "engines.node in package.json")
    assert piku.resolve_node_request(str(tmp_path), {}, {}, {})[0] is None
    for bad, source in ((["20"], "engines.node"), ("twenty", "engines.node"), ({"x": 1}, "engines.node")):
        with pytest.raises(piku.PikuError) as refused:
            piku.resolve_node_request(str(tmp_path), {}, {}, {"engines": {"node": bad}})
        assert refused.value.message.startswith(source), refused.value.message


def test_the_newest_node_the_request_allows_is_chosen_or_what_there_is_is_named():
    available = {"18.19.0": "/a/node", "20.20.2": "/usr/bin/node", "22.3.0": "/b/node"}
    request = piku.NodeRequest
    assert piku.choose_node(request(None, "the host's"), available, "20.20.2") == ("20.20.2", "/usr/bin/node")
    assert piku.choose_node(request(">=18", "x"), available, "20.20.2") == ("20.20.2", "/usr/bin/node"), \
        "the host's, while it is allowed: never a Node another app asked for"
    assert piku.choose_node(request(">=21", "x"), available, "20.20.2") == ("22.3.0", "/b/node")
    assert piku.choose_node(request("^20", "x"), available) == ("20.20.2", "/usr/bin/node")
    assert piku.choose_node(request("lts/hydrogen", "x"), available, "20.20.2") == ("18.19.0", "/a/node")
    with pytest.raises(piku.PikuError) as refused:
        piku.choose_node(request(">=23", "engines.node in package.json"), available)
    assert refused.value.message == ("no Node on this host is >=23 (engines.node in package.json); "
                                     "found: 18.19.0, 20.20.2, 22.3.0")


def test_the_fingerprint_changes_with_what_an_install_depends_on_and_nothing_else(tmp_path):
    base = {"package.json": json.dumps({"name": "shop", "version": "1.0.0", "dependencies": {"express": "^4.21.0"},
                                        "scripts": {"start": "node index.js", "postinstall": "node setup.js"}}),
            "package-lock.json": '{"lockfileVersion": 3}', ".npmrc": "fund=false\n", "patches/a.patch": "--- a\n",
            "index.js": "console.log(1)\n"}
    settings = {"NPM_CONFIG_PRODUCTION": "true", "NPM_CONFIG__AUTHTOKEN": "s3cret", "NPM_TOKEN": "s3cret",
                "GREETING": "hi"}

    def fingerprint(files=base, node="20.20.2", manager=("npm", "", False), production=True, env=settings):
        root = tmp_path / f"t{len(list(tmp_path.iterdir()))}"
        for name, text in files.items():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(text)
        chosen = piku.NodeManager(manager[0], manager[1], "package-lock.json", "test", manager[2])
        return piku.fingerprint_digest(piku.node_fingerprint(str(root), chosen, node, production, env))

    def package(**changes):
        data = json.loads(base["package.json"])
        data.update(changes)
        return dict(base, **{"package.json": json.dumps(data)})

    first = fingerprint()
    same = {"code": fingerprint(dict(base, **{"index.js": "console.log(2)\n"})),
            "name and version": fingerprint(package(name="store", version="2.0.0")),
            "start script": fingerprint(package(scripts={"start": "node other.js", "postinstall": "node setup.js"})),
            "a secret setting": fingerprint(env=dict(settings, NPM_CONFIG__AUTHTOKEN="other", NPM_TOKEN="x")),
            "another setting": fingerprint(env=dict(settings, GREETING="hello"))}
    differ = {"dependencies": fingerprint(package(dependencies={"express": "^5.0.0"})),
              "postinstall": fingerprint(package(scripts={"start": "node index.js", "postinstall": "node x.js"})),
              "the lock": fingerprint(dict(base, **{"package-lock.json": '{"lockfileVersion": 2}'})),
              ".npmrc": fingerprint(dict(base, **{".npmrc": "fund=true\n"})),
              "a patch": fingerprint(dict(base, **{"patches/a.patch": "--- b\n"})),
              "a new patch": fingerprint(dict(base, **{"patches/b.patch": "--- b\n"})),
              "Node": fingerprint(node="22.3.0"), "the manager": fingerprint(manager=("npm", "10.9.2", False)),
              "dev dependencies": fingerprint(production=False),
              "an npm setting": fingerprint(env=dict(settings, NPM_CONFIG_PRODUCTION="false"))}
    assert {what for what, digest in same.items() if digest != first} == set()
    assert {what for what, digest in differ.items() if digest == first} == set()
    assert len(set(differ.values())) == len(differ), "each change makes its own environment"


def test_hostile_pushed_files_and_values_get_a_message_never_a_traceback(tmp_path):
    import random
    rng = random.Random(1818)
    alphabet = "0123456789xX*.^~<>=|- v\t" + "ab\u00e9\x00\ud800"
    for _ in range(3000):                   # generated ranges: a test, or a refusal with its fix
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        try:
            piku.node_range(text)((20, 1, 0))
        except piku.PikuError as error:
            assert error.hint
    for refused in ("x.1", "1.x.3", "01.2", "20.0.0-rc.1", "9" * 5000):
        with pytest.raises(piku.PikuError):
            piku.node_range(refused)
    for field in ("yarn@" + "9" * 5000 + ".0.0", ["npm@10.0.0"], {"npm": 1}, True):
        root = tmp_path / f"f{len(list(tmp_path.iterdir()))}"
        with pytest.raises(piku.PikuError):
            piku.node_package_manager(str(root), {}, tree(root, (), field))
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "package.json").write_text("[" * 200000)
    with pytest.raises(piku.PikuError):
        piku.read_package_json(str(deep))
    for name in ("package.json", "yarn.lock", ".nvmrc"):       # a folder where a file belongs
        folder = tmp_path / f"dir-{name}"
        (folder / name).mkdir(parents=True)
        with pytest.raises(piku.PikuError) as error:
            piku.read_pushed_bytes(str(folder), name, 1024, head=True)
        assert "is not a regular file" in error.value.message
    linked = tmp_path / "linked"
    (linked / "elsewhere").mkdir(parents=True)
    (linked / "patches").mkdir()
    (linked / "patches" / "more").symlink_to(linked / "elsewhere")
    (linked / "package.json").write_text("{}")
    with pytest.raises(piku.PikuError) as error:
        piku.node_fingerprint(str(linked), piku.NodeManager("npm", "", "", "test"), "20.0.0", True, {})
    assert "patches/more in the pushed code is a link to a folder" in error.value.message
    for link, folder in (("patches", "patches"), (".yarn", ".yarn/patches")):     # the folder itself a link
        top = tmp_path / f"top-{link.strip('.')}"
        (top / "elsewhere" / "patches").mkdir(parents=True)
        (top / "elsewhere" / "patches" / "secret").write_text("x")
        (top / "package.json").write_text("{}")
        (top / link).symlink_to(top / "elsewhere" / ("patches" if link == "patches" else ""))
        with pytest.raises(piku.PikuError) as error:
            piku.node_fingerprint(str(top), piku.NodeManager("npm", "", "", "test"), "20.0.0", True, {})
        assert f"{link} in the pushed code is a link" in error.value.message
    secrets = {"NPM_CONFIG_KEY": "-----BEGIN", "NPM_CONFIG_CERT": "x", "NPM_CONFIG_OTP": "123456",
               "NPM_CONFIG__AUTH": "x", "YARN_NPM_AUTH_TOKEN": "x"}
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "package.json").write_text("{}")
    taken = piku.node_fingerprint(str(plain), piku.NodeManager("npm", "", "", "t"), "20.0.0", True,
                                  dict(secrets, NPM_CONFIG_FUND="false"))["settings"]
    assert taken == {"NPM_CONFIG_FUND": "false"}, taken


def test_a_marker_the_apps_code_could_write_is_never_followed_nor_waited_for(tmp_path):
    """A build script writes its -build environment: whatever it leaves where piku's marker goes
    (a link to /dev/zero, a FIFO, a folder, bytes that are not UTF-8) means 'not finished'."""
    import os
    fingerprint = {"layout": 1}
    shapes = {"link": lambda marker: marker.symlink_to("/dev/zero"), "fifo": lambda marker: os.mkfifo(marker),
              "folder": lambda marker: marker.mkdir(), "bytes": lambda marker: marker.write_bytes(b"\xff\xfe"),
              "good": lambda marker: marker.write_text(piku.fingerprint_text(fingerprint))}
    for name, make in shapes.items():
        environment = tmp_path / name
        (environment / "node_modules").mkdir(parents=True)
        make(environment / piku.ENV_MARKER)
        assert piku.environment_intact(str(environment), fingerprint, "node_modules") is (name == "good"), name


def test_a_file_the_manifest_names_twice_is_copied_once(tmp_path):
    (tmp_path / "patches").mkdir()
    (tmp_path / "patches" / "dep-1.0.0.tgz").write_bytes(b"tarball")
    (tmp_path / "package.json").write_text(json.dumps({"dependencies": {"dep": "file:patches/dep-1.0.0.tgz"}}))
    target = tmp_path / "environment"
    target.mkdir()
    piku.copy_node_inputs(str(tmp_path), str(target), piku.NodeManager("npm", "", "", "test"))
    assert (target / "patches" / "dep-1.0.0.tgz").read_bytes() == b"tarball"
