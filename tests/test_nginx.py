"""nginx in front: vhosts from upstream piku's keys, checked with nginx -t before they replace a
working one, and redeploys through nginx that fail no request. A real nginx on a loopback port."""

import os
import subprocess
import time

import pytest

from conftest import EXAMPLES, PIKU_PY, PYTHON, TEST_APPS, LoadLoop, wait_for_body, wait_until

LOOPBACK = ("NGINX_IPV4_ADDRESS=127.0.0.1", "DISABLE_IPV6=1")


def front_with_nginx(piku, make_app, source, name, *settings):
    """An app whose ENV names its server (and keeps nginx on loopback), ready to push."""
    app = make_app(source, name)
    env = (app.path / "ENV").read_text() if (app.path / "ENV").exists() else ""
    lines = [f"NGINX_SERVER_NAME={name}.test,www.{name}.test", *LOOPBACK, *settings]
    app.write("ENV", env + "\n".join(lines) + "\n")
    app.commit("served through nginx")
    return app


def test_a_wsgi_app_is_reached_through_nginx_by_its_server_name(piku, emperor, nginx, make_app, toolchain):
    toolchain.require("3.11")
    app = front_with_nginx(piku, make_app, EXAMPLES / "flask-uwsgi", "shop")
    pushed = app.push()
    assert "nginx: shop answers for shop.test www.shop.test" in pushed.output
    vhost = (piku.root / "nginx" / "shop.conf").read_text()
    assert "uwsgi_pass piku-shop-uslot;" in vhost and f"listen 127.0.0.1:{nginx.port};" in vhost
    status, _, body = nginx.get("/", host="www.shop.test")
    assert status == 200 and body.startswith("Hello from shop on Python 3.11")
    assert nginx.get("/.git/config", host="shop.test")[0] == 403
    assert nginx.get("/.piku-vhost", host="shop.test")[2].strip() in vhost, "the marker names this vhost"

    app.write("wsgi.py", (app.path / "wsgi.py").read_text().replace("Hello from", "Howdy from"))
    app.commit("code only")
    app.push()
    assert nginx.get("/", host="shop.test")[2].startswith("Howdy from shop"), "no reload needed: the slots moved"
    assert (piku.root / "nginx" / "shop.conf").read_text() == vhost


def test_static_paths_and_static_workers_are_served_by_nginx(piku, emperor, nginx, make_app, toolchain):
    toolchain.require("3.11")
    app = front_with_nginx(piku, make_app, EXAMPLES / "django", "dj", "ALLOWED_HOSTS=dj.test,www.dj.test")
    app.push()
    status, headers, css = nginx.get("/static/hello/site.css", host="dj.test")
    assert status == 200 and "font-family" in css and headers.get("X-Served-By") == "nginx-static"
    status, headers, page = nginx.get("/", host="dj.test")
    assert "Hello from Django" in page and "X-Served-By" not in headers
    assert nginx.get("/static/../manage.py", host="dj.test")[0] in (400, 404)

    plain = front_with_nginx(piku, make_app, TEST_APPS / "wsgi-plain", "plain")
    plain.push()
    status, headers, robots = nginx.get("/robots.txt", host="plain.test")
    assert status == 200 and headers.get("X-Served-By") == "nginx-static"
    assert robots == (TEST_APPS / "wsgi-plain" / "assets" / "robots.txt").read_text()
    assert nginx.get("/anything", host="plain.test")[2].startswith("wsgi 3.11")


def test_a_bad_include_file_is_refused_with_nginxs_message_and_the_old_vhost_keeps_serving(
        piku, emperor, nginx, make_app, toolchain):
    toolchain.require("3.11")
    app = front_with_nginx(piku, make_app, TEST_APPS / "wsgi-plain", "inc")
    app.write("nginx.inc", "add_header X-Extra yes;\nclient_max_body_size 5m;\n")
    app.write("ENV", (app.path / "ENV").read_text() + "NGINX_INCLUDE_FILE=nginx.inc\n")
    app.commit("an include file")
    app.push()
    status, headers, _ = nginx.get("/", host="inc.test")
    assert status == 200 and headers.get("X-Extra") == "yes"
    before = (piku.root / "nginx" / "inc.conf").read_text()

    app.write("nginx.inc", "add_header X-Extra yes\n")       # no semicolon: piku reads it as nginx would
    app.commit("an unfinished include file")
    unfinished = app.push(check=False)
    assert unfinished.returncode != 0 and "NGINX_INCLUDE_FILE nginx.inc: nginx cannot read it: the text ends " \
        "inside a statement" in unfinished.output, unfinished.output
    app.write("nginx.inc", "add_header X-Extra;\n")          # read, allowed, but refused by nginx -t
    app.commit("a broken include file")
    broken = app.push(check=False)
    assert broken.returncode != 0
    assert "nginx refused the new vhost (nginx -t above); nothing was changed" in broken.output
    assert '[emerg]' in broken.output and 'invalid number of arguments in "add_header" directive in ' \
        'nginx/inc.conf' in broken.output, broken.output
    assert (piku.root / "nginx" / "inc.conf").read_text() == before
    assert nginx.get("/", host="inc.test")[1].get("X-Extra") == "yes"

    app.write("nginx.inc", "location /x { alias /etc/; }\n")
    app.commit("an include file that reaches outside the app")
    outside = app.push(check=False)
    assert outside.returncode != 0 and "the directive 'alias' is not allowed there" in outside.output


@pytest.mark.parametrize("value, message", [
    ("NGINX_SERVER_NAME=evil.test;", "is not a host name"),
    ("NGINX_SERVER_NAME=$host", "is not a host name"),
    ("NGINX_SERVER_NAME=a.test { return 200; }", "is not a host name"),
    ("NGINX_STATIC_PATHS=/s/:../../..", "is outside the app"),
    ("NGINX_STATIC_PATHS=/s/:$document_root", "has characters piku does not write"),
    ("NGINX_STATIC_PATHS=/s;/:assets", "is not '/url/prefix/:folder'"),
    ("NGINX_IPV4_ADDRESS=0.0.0.0;", "is not an IPv4 address"),
    ("NGINX_CATCH_ALL=/index.html;", "is not a path in the site"),
])
def test_settings_that_would_change_nginxs_config_are_refused(value, message, piku, emperor, nginx, make_app,
                                                               toolchain):
    toolchain.require("3.11")
    app = front_with_nginx(piku, make_app, TEST_APPS / "wsgi-plain", "safe")
    app.push()
    before = (piku.root / "nginx" / "safe.conf").read_text()
    refused = piku("config:set", "safe", value, check=False)
    assert refused.returncode != 0 and message in refused.stderr
    assert (piku.root / "nginx" / "safe.conf").read_text() == before
    assert nginx.get("/", host="safe.test")[0] == 200


# server -> (example, its main file, Pythons it needs)
NGINX_SERVERS = {
    "wsgi-uwsgi": (EXAMPLES / "flask-uwsgi", "wsgi.py", ("3.11",)),
    "web-gunicorn": (EXAMPLES / "requirements", "app.py", ("3.11",)),
    "web-plain": (EXAMPLES / "web", "app.py", ()),
}


@pytest.mark.parametrize("server", NGINX_SERVERS)
def test_redeploys_through_nginx_fail_no_request(server, piku, emperor, nginx, make_app, toolchain):
    source, main, pythons = NGINX_SERVERS[server]
    toolchain.require(*pythons)
    app = front_with_nginx(piku, make_app, source, "live")
    app.push()
    assert wait_for_body(nginx.url(), "from").startswith("Hello from")
    with LoadLoop(nginx.url()) as load:
        for marker in ("Second", "Third"):
            text = (source / main).read_text()
            app.write(main, text.replace("Hello", marker))
            app.commit(marker)
            app.push()
            wait_until(lambda: marker in nginx.get("/", host="live.test")[2], message=f"{marker} served")
        piku("config:set", "live", "NGINX_SERVER_NAME=live.test,www.live.test,new.live.test")   # a reload
        assert nginx.get("/", host="new.live.test")[0] == 200
        piku("ps:scale", "live", f"{'wsgi' if server == 'wsgi-uwsgi' else 'web'}=2")
        piku("rollback", "live")
    load.stop()
    print(f"through nginx, {server}: {load.report()}")
    assert not load.failures, load.report()
    assert load.served("Second") and load.served("Third"), load.report()
    assert load.count > 100, load.report()


def https_get(port, name, cafile=None, path="/"):
    """GET over TLS to 127.0.0.1:port with SNI and Host name -> (status line, peer certificate, body)."""
    import socket
    import ssl
    context = ssl.create_default_context(cadata=cafile) if cafile else ssl._create_unverified_context()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=name) as tls:
            tls.sendall(f"GET {path} HTTP/1.0\r\nHost: {name}\r\n\r\n".encode())
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
            certificate = tls.getpeercert(binary_form=True)
    head, _, body = data.decode(errors="replace").partition("\r\n\r\n")
    return head.splitlines()[0], certificate, body


def test_https_certificate_from_an_acme_ca_over_http_01(piku, emperor, nginx, pebble, make_app, toolchain, tmp_path):
    import re
    toolchain.require("3.11")
    app = front_with_nginx(piku, make_app, TEST_APPS / "wsgi-plain", "tls",
                           f"ACME_ROOT_CA={pebble.directory}", "ACME_EMAIL=ops@example.com")
    pushed = app.push()
    assert "HTTPS: asking https://127.0.0.1:" in pushed.output and "for a certificate for tls.test, www.tls.test" \
        in pushed.output, pushed.output
    issued = re.search(r"HTTPS: certificate issued and installed in ([0-9.]+) s", pushed.output)
    assert issued, pushed.output
    print(f"issuance against pebble: {issued.group(1)} s")
    status, _, body = https_get(nginx.https_port, "www.tls.test", cafile=pebble.root())
    assert status.endswith(" 200 OK") and body.startswith("wsgi 3.11"), (status, body)
    again = piku("deploy", "tls")
    assert "HTTPS: asking" not in again.stdout, "a certificate held for these names is not asked for again"
    daily = (piku.root / "uwsgi-enabled" / "acme-renew.ini").read_text()
    assert "cron = 17 3 -1 -1 -1 " in daily and " daily" in daily, "renewal is scheduled daily"
    fresh = piku("acme:renew")
    assert fresh.returncode == 0 and "certificate renewed" not in fresh.stdout, "not due for 30 days: nothing to do"
    assert (piku.root / "envs" / "tls" / "acme" / "certificates" / "tls.test.crt").exists(), "lego's state is the app's"
    # renewal, forced: the account and settings of the issuance (LEGO_CA_CERTIFICATES from piku.env), a
    # new certificate served
    # a change that fails leaves the live certificate alone, though it asked for other names
    issued_crt = (piku.root / "nginx" / "tls.crt").read_bytes()
    good = piku.branch("tls")
    app.write("hello.py", "raise SystemExit('broken on purpose')\n")
    app.write("ENV", (app.path / "ENV").read_text() + "NGINX_SERVER_NAME=tls.test,www.tls.test,new.tls.test\n")
    app.commit("new names and code that cannot start")
    assert app.push(check=False).returncode != 0
    assert (piku.root / "nginx" / "tls.crt").read_bytes() == issued_crt and piku.branch("tls") == good
    app.git("reset", "--quiet", "--hard", good)
    before = https_get(nginx.https_port, "tls.test", cafile=pebble.root())[1]
    elsewhere = tmp_path / "acme.sh-install"    # a host that has acme.sh besides: lego's certificates stay lego's
    elsewhere.mkdir()
    (elsewhere / "acme.sh").write_text("#!/bin/sh\nexit 3\n")
    (elsewhere / "acme.sh").chmod(0o755)
    piku.env["ACME_ROOT"] = str(elsewhere)
    renewed = piku("acme:renew", "--days", "36500")
    del piku.env["ACME_ROOT"]
    assert "tls: certificate renewed" in renewed.stdout, renewed.stdout + renewed.stderr
    assert wait_until(lambda: https_get(nginx.https_port, "tls.test", cafile=pebble.root())[1] != before,
                      message="nginx to serve the renewed certificate")
    doctor = piku("doctor", check=False).stdout
    assert re.search(r"OK +tls: its certificate is valid for [0-9]+ more days", doctor), doctor
    assert_no_file_of_piku_is_an_app_name(piku)
    # a renewal that fails: a non-zero exit, the reason, and doctor says so
    pebble.stop()
    failed = piku("acme:renew", "--days", "36500", check=False)
    assert failed.returncode == 1 and " !     tls: renewing its certificate failed:" in failed.stderr, failed.stderr
    assert "1 certificate(s) could not be renewed: tls" in failed.stderr
    doctor = piku("doctor", check=False).stdout
    assert "WARN  tls: the last renewal of its certificate failed" in doctor, doctor
    piku("destroy", "tls")                      # nothing of its HTTPS is left for a new app of that name
    for leftover in ("nginx/tls.crt", "nginx/tls.key", "nginx/tls.acme", "nginx/tls.conf", "envs/tls"):
        assert not (piku.root / leftover).exists(), leftover


def assert_no_file_of_piku_is_an_app_name(piku):
    """Walk the folders that hold an entry per app: what belongs to no app is piku's own, and
    no app may be named so that its entry would be that file."""
    import json
    code = ("import json, piku; print(json.dumps({'entries': {folder: list(suffixes) for folder, suffixes in "
            "piku.APP_ENTRIES.items()}, 'reserved': sorted(piku.reserved_app_names())}))")
    found = json.loads(subprocess.run([PYTHON, "-c", code], env=dict(piku.env, PYTHONPATH=str(PIKU_PY.parent)),
                                      capture_output=True, text=True, check=True).stdout)
    apps = {path.name for path in (piku.root / "repos").iterdir()}
    checked = 0
    for folder, suffixes in found["entries"].items():
        for entry in os.listdir(folder):
            owners = {entry[:-len(suffix)] if suffix != "@" else entry.split("@")[0]
                      for suffix in suffixes if suffix == "" or (suffix == "@" and "@" in entry)
                      or (suffix != "@" and entry.endswith(suffix))}
            if owners & apps or entry.startswith(".tmp-"):
                continue
            checked += 1
            for owner in owners:
                refused = piku("git-receive-pack", owner, check=False)
                assert refused.returncode != 0 and ("invalid app name" in refused.stderr or "is taken by one "
                                                    "of piku's own files" in refused.stderr), (folder, entry, owner)
    assert checked >= 5, checked


def test_without_the_ca_a_self_signed_certificate_keeps_nginx_serving(piku, emperor, nginx, make_app, toolchain):
    import ssl
    toolchain.require("3.11")
    closed = f"https://127.0.0.1:{__import__('conftest').free_port()}/dir"
    app = front_with_nginx(piku, make_app, TEST_APPS / "wsgi-plain", "selfie", f"ACME_ROOT_CA={closed}",
                           "NGINX_HTTPS_ONLY=1", "ACME_EMAIL=ops@example.com")
    pushed = app.push()
    assert "no certificate was issued" in pushed.output and "self-signed certificate" in pushed.output
    assert f"port 80 reaches nginx (which listens on {nginx.port} here), then run: deploy selfie" in pushed.output
    status, certificate, body = https_get(nginx.https_port, "selfie.test")
    assert status.endswith(" 200 OK") and body.startswith("wsgi 3.11")
    subject = ssl.DER_cert_to_PEM_cert(certificate)
    assert subject.startswith("-----BEGIN CERTIFICATE-----")
    redirect = nginx.get("/some/page?x=1", host="selfie.test")
    assert redirect[0] == 301 and redirect[1]["Location"] == "https://selfie.test/some/page?x=1"
    assert nginx.get("/.well-known/acme-challenge/nothing", host="selfie.test")[0] == 404, "not redirected"


def test_responses_under_cache_prefixes_are_cached_by_nginx(piku, emperor, nginx, make_app, toolchain):
    toolchain.require("3.11")
    app = front_with_nginx(piku, make_app, EXAMPLES / "flask-uwsgi", "cached", "NGINX_CACHE_PREFIXES=/env",
                           "NGINX_CACHE_TIME=60", "NGINX_CACHE_CONTROL=30")
    app.push()
    first = nginx.get("/env/APP", host="cached.test")
    second = nginx.get("/env/APP", host="cached.test")
    assert first[0] == 200 and first[1]["X-Cache-Status"] == "MISS" and first[2] == "cached\n"
    assert second[1]["X-Cache-Status"] == "HIT" and second[1]["Cache-Control"] == "public, max-age=30"
    assert "X-Cache-Status" not in nginx.get("/", host="cached.test")[1], "only the prefixes are cached"
    assert list((piku.root / "cache" / "cached").iterdir()), "the cache lives in the app's cache folder"
    for bad in ("NGINX_CACHE_PREFIXES=/a;b", "NGINX_CACHE_SIZE=0", "NGINX_CACHE_PATH=/tmp"):
        assert piku("config:set", "cached", bad, check=False).returncode == 1, bad


def test_cloudflare_acl_lets_in_only_cloudflare_this_host_and_the_deployer(piku, emperor, nginx, make_app,
                                                                           toolchain, tmp_path):
    import http.server
    import json
    import socket
    import threading
    toolchain.require("3.11")
    ranges = json.dumps({"success": True, "result": {"ipv4_cidrs": ["127.0.0.3/32"], "ipv6_cidrs": ["2400:cb00::/32"]}})

    class Api(http.server.BaseHTTPRequestHandler):      # stands in for api.cloudflare.com/client/v4/ips
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(ranges.encode())

        def log_message(self, *args):
            pass
    api = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    piku.env["PIKU_CLOUDFLARE_IPS_URL"] = f"http://127.0.0.1:{api.server_address[1]}/client/v4/ips"
    try:
        app = front_with_nginx(piku, make_app, TEST_APPS / "wsgi-plain", "cf", "NGINX_CLOUDFLARE_ACL=1")
        app.push()
    finally:
        api.shutdown()
        api.server_close()
    vhost = (piku.root / "nginx" / "cf.conf").read_text()
    assert "allow 127.0.0.3/32;" in vhost and "allow 2400:cb00::/32;" in vhost and "deny all;" in vhost

    def status_from(source):
        with socket.create_connection(("127.0.0.1", nginx.port), timeout=5, source_address=(source, 0)) as conn:
            conn.sendall(b"GET / HTTP/1.0\r\nHost: cf.test\r\n\r\n")
            return conn.recv(64).split()[1]
    assert status_from("127.0.0.1") == b"200", "this host"
    assert status_from("127.0.0.3") == b"200", "Cloudflare"
    assert status_from("127.0.0.2") == b"403", "anyone else"


# --- NGINX_INCLUDE_FILE: read as nginx reads it -------------------------------------------

INCLUDE_TEST_CONFIG = """\
events { worker_connections 16; }
http {
    server {
        listen 127.0.0.1:1;
%s
    }
}
"""
INCLUDE_TOKENS = ["add_header", "add_header", "alias", "root", "location", "X-A", "X-B", "a", "b#c", "a#", "#", "#c",
                  '"', "'", "\\", '\\"', "\\'", "\\\\", ";", ";", "{", "}", "$host", "${host}", "always", "/l1",
                  "/l2", "/etc/", '"q q"', "'s s'", 'a"b', "a'b", '"a"b', "a\\;b", "\\n", "\\t", "a}b", "{x",
                  '")', "')", ")", '"a")', '"a")b']
INCLUDE_VALUES = ["a", "a#", "#a", 'a"b', "a'b", '"a b"', "'a b'", "a\\;b", '"a;b"', "'a}b'", "a}b", "${host}",
                  "$host", '"x\\"y"', "'x\\'y'", "a\\", '"', "'", "a{", '"a"b', "\\#x", "x#y#z", "'a\nb'",
                  '"a")', "'a')", '")"', "a)"]


def nginx_accepts(text, tmp_path):
    """nginx -t on text inside a server block."""
    config = tmp_path / "nginx.conf"
    config.write_text(INCLUDE_TEST_CONFIG % text)
    result = subprocess.run(["nginx", "-t", "-q", "-p", str(tmp_path), "-c", str(config), "-e", "stderr"],
                            capture_output=True, text=True)
    return result.returncode == 0, result.stderr


def predict_nginx(text):
    """What nginx -t will say of text, from piku's reading of it: 'ok', 'syntax' (its reader
    stops: 'unexpected ...'), 'semantic' (a directive's own rule) or 'reject' (either). The
    vocabulary's rules are simple: add_header takes 2 arguments, or 3 ending with 'always';
    location /l1 or /l2 opens a block at the server level, once each; alias takes one in a
    location; root one anywhere; each block has one of the two at most."""
    import piku
    depth, locations, paths, late = 0, set(), [set()], "ok"
    try:
        for words, end, _ in piku.NginxReader(text).statements():
            if end == "}":
                depth -= 1
                if depth < 0:
                    return "reject"         # piku's server block closed: what follows is read elsewhere
                paths.pop()
                continue
            name, args = words[0], words[1:]
            if name == "add_header":
                ok = end == ";" and (len(args) == 2 or len(args) == 3 and args[2] == "always")
            elif name == "location":        # a duplicate is found once the server block is read
                ok = end == "{" and depth == 0 and args in (["/l1"], ["/l2"])
                late = "semantic" if ok and args[0] in locations else late
                locations.update(args[:1])
            elif name in ("alias", "root"):
                ok = end == ";" and len(args) == 1 and not paths[-1] and (name == "root" or depth == 1)
                paths[-1].add(name)
            else:
                ok = False
            if not ok:
                return "semantic"
            if end == "{":
                depth += 1
                paths.append(set())
    except piku.NginxSyntaxError:
        return "syntax"
    return late if depth == 0 else "syntax"


def generated_includes(count, seed):
    import random
    rng = random.Random(seed)
    texts = []
    for _ in range(count):
        if rng.random() < 0.35:
            texts.append("".join(rng.choice(INCLUDE_TOKENS) + rng.choice([" ", " ", "\n", "\t", ""])
                                 for _ in range(rng.randint(1, 9))))
            continue
        statements = []
        for _ in range(rng.randint(1, 4)):
            form = rng.random()
            if form < 0.6:
                statements.append(f"add_header X-{rng.randint(1, 9)} {rng.choice(INCLUDE_VALUES)}"
                                  f"{rng.choice(['', ' always', ' ' + rng.choice(INCLUDE_VALUES)])};")
            elif form < 0.8:
                statements.append(f"location /l{rng.randint(1, 2)} {{ {rng.choice(['alias', 'root'])} "
                                  f"{rng.choice(['/etc/', '/l/', rng.choice(INCLUDE_VALUES)])}; }}")
            else:
                statements.append(f"{rng.choice(['alias', 'root'])} {rng.choice(['/etc/', rng.choice(INCLUDE_VALUES)])};")
        texts.append(rng.choice(["\n", " ", ""]).join(statements))
    return texts


INCLUDE_REPRODUCTIONS = ["add_header X-A a#;\nalias ~/.piku/;", "add_header X a\"b;\nalias /home/piku/.piku/nginx/;",
                         "add_header X-A a#;\nroot /;", "add_header X 'a#';\nlocation /l1 { alias /etc/; }"]


def test_piku_reads_an_include_file_exactly_as_nginx_does(tmp_path):
    """Differential: for generated include files, piku's reading predicts nginx -t's verdict."""
    import shutil
    if not shutil.which("nginx"):
        pytest.skip("nginx is not installed (make deps installs it)")
    texts = INCLUDE_REPRODUCTIONS + generated_includes(900, seed=4)
    verdicts = {"ok": 0, "syntax": 0, "semantic": 0}
    for text in texts:
        accepted, why = nginx_accepts(text, tmp_path)
        actual = "ok" if accepted else "syntax" if "unexpected" in why else "semantic"
        predicted = predict_nginx(text)
        assert predicted == actual or (predicted == "reject" and actual != "ok"), (text, predicted, why)
        verdicts[actual] += 1
    print(f"include files as nginx -t read them, each as predicted: {verdicts}")
    assert min(verdicts.values()) > 100, verdicts


def test_an_include_file_can_use_only_the_allowed_directives_however_it_is_spelled(tmp_path):
    import piku
    from piku import PikuError
    root = tmp_path / "release"
    root.mkdir()
    release = piku.Release("inc", "0" * 40, str(root), {}, {"NGINX_INCLUDE_FILE": "nginx.inc"})
    texts = INCLUDE_REPRODUCTIONS + generated_includes(700, seed=5)
    for text in texts:
        (root / "nginx.inc").write_text(text)
        try:
            lines = piku.nginx_include(release)
        except PikuError:
            continue
        rendered = "\n".join(lines[1:])
        statements = [(words, end) for words, end, _ in piku.nginx_statements(rendered)]
        assert statements == [(words, end) for words, end, _ in piku.nginx_statements(text)], (text, rendered)
        assert all(words[0] in piku.NGINX_INCLUDE_DIRECTIVES for words, end in statements if end != "}"), text
    for text in INCLUDE_REPRODUCTIONS:
        (root / "nginx.inc").write_text(text)
        with pytest.raises(PikuError, match="is not allowed there"):
            piku.nginx_include(release)
    (root / "nginx.inc").write_text('location /x {\n  if ($request_method = "POST") { return 405; }\n}\n')
    assert piku.nginx_include(release)[1:] == ["location /x {", "    if ($request_method = POST ) {",
                                               "        return 405;", "    }", "}"]


# --- server names are one app's ---------------------------------------------------------

def test_a_server_name_belongs_to_one_app_however_it_is_written(piku, emperor, nginx, make_app):
    import os
    first = front_with_nginx(piku, make_app, EXAMPLES / "web", "first")     # first.test, www.first.test
    first.push()
    second = make_app(EXAMPLES / "web", "second")
    for name, clash in (("WWW.First.Test.", "the app 'first' (as www.first.test)"),
                        ("*.first.test", "the app 'first' (as www.first.test)"),
                        ("*.test", None)):
        second.write("ENV", f"NGINX_SERVER_NAME=second.test,{name}\n" + "\n".join(LOOPBACK) + "\n")
        second.commit(name)
        refused = second.push(check=False)
        assert refused.returncode != 0, refused.output
        assert (f"NGINX_SERVER_NAME {name} is already served by {clash}" if clash else
                f"NGINX_SERVER_NAME '{name}' would claim a whole top-level domain") in refused.output, refused.output
    for leftover in ("nginx/second.conf", "nginx/second.crt", "nginx/second.acme", "envs/second/acme"):
        assert not (piku.root / leftover).exists(), leftover
    second.write("ENV", "NGINX_SERVER_NAME=second.test\n" + "\n".join(LOOPBACK) + "\n")
    second.commit("a name of its own")
    second.push()
    before = (piku.root / "nginx" / "second.conf").read_text()
    limited = dict(piku.env, FINGERPRINT="SHA256:limited", NAME="limited", APPS="second")
    for name in ("first.test", "*.first.test"):
        hidden = subprocess.run([PYTHON, str(PIKU_PY), "config:set", "second", f"NGINX_SERVER_NAME={name}"],
                                env=limited, capture_output=True, text=True)
        assert hidden.returncode == 1 and "is already served by another app" in hidden.stderr, hidden.stderr
        assert "first" not in hidden.stderr.replace(name, ""), "a key limited to second learns of no other app"
    assert (piku.root / "nginx" / "second.conf").read_text() == before
    assert nginx.get("/", host="www.first.test")[2].startswith("Hello from first")
    assert nginx.get("/", host="second.test")[2].startswith("Hello from second")
    # an app alone on another listen address would get every name there
    elsewhere = piku("config:set", "second", "NGINX_IPV4_ADDRESS=127.0.0.2", check=False)
    assert elsewhere.returncode == 1 and "nginx would listen on 127.0.0.2 for second but on 127.0.0.1 for the " \
        "app 'first'" in elsewhere.stderr, elsewhere.stderr
    # two apps asking for one new name at the same moment: one gets it
    racers = [subprocess.Popen([PYTHON, str(PIKU_PY), "config:set", app, "NGINX_SERVER_NAME=race.test"],
                               env=piku.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
              for app in ("first", "second")]
    outcomes = [(racer.wait(), racer.stderr.read()) for racer in racers]
    assert sorted(code for code, _ in outcomes) == [0, 1], outcomes
    holders = [app for app in ("first", "second") if "race.test" in (piku.root / "nginx" / f"{app}.conf").read_text()]
    assert len(holders) == 1, holders
    assert nginx.get("/", host="race.test")[2].startswith(f"Hello from {holders[0]}")
    assert os.path.isdir(piku.root / "envs" / "first"), "the loser changed nothing of its own either"


def spellings(name, count, seed):
    """count spellings of name as nginx reads them alike: letters in any case, a final dot or not."""
    import random
    chooser = random.Random(seed)
    return ["".join(ch.upper() if chooser.random() < 0.5 else ch.lower() for ch in name)
            + ("." if chooser.random() < 0.5 else "") for _ in range(count)]


def test_names_in_shared_namespaces_are_unique_as_their_consumer_compares_them(piku, emperor, nginx, make_app):
    import piku as piku_module
    for spelling in spellings("www.shop.example.com", 200, 22):
        assert piku_module.server_names_overlap(spelling, "www.shop.example.com")
        assert piku_module.server_names_overlap("*.example.COM", spelling)
    for spelling in spellings("shop", 50, 23):
        assert piku_module.app_name_key(spelling.rstrip(".")) == "shop"
    # app names: the upstream names nginx makes of them ignore case
    make_app(EXAMPLES / "web", "shop").push()
    for spelling in {name.rstrip(".") for name in spellings("shop", 20, 24)} - {"shop"}:
        refused = make_app(EXAMPLES / "web", spelling).push(check=False)
        assert refused.returncode != 0 and f"the app name '{spelling}' is taken by 'shop'" in refused.output, \
            refused.output
        assert not (piku.root / "repos" / spelling).exists()
    (piku.root / "repos" / "SHOP").mkdir()         # as an earlier piku.py let it be made
    doctor = piku("doctor", check=False)
    assert "FAIL" in doctor.stdout and "the apps SHOP, shop differ only in case" in doctor.stdout, doctor.stdout
    (piku.root / "repos" / "SHOP").rmdir()
    # two first pushes of one name, spelled two ways, at once: one app is made
    racers = [make_app(EXAMPLES / "web", name) for name in ("Dup", "dup")]
    outcomes = pushed_at_once(racers)
    assert sorted(outcome.returncode == 0 for outcome in outcomes) == [False, True], [o.output for o in outcomes]
    assert len([name for name in ("Dup", "dup") if (piku.root / "repos" / name).exists()]) == 1
    # two pushes whose ENV asks for one server name, spelled two ways, at once: one gets it
    racers = []
    for app, name in (("racea", "Race.Test."), ("raceb", "race.test")):
        racer = make_app(EXAMPLES / "web", app)
        racer.write("ENV", f"NGINX_SERVER_NAME={name}\n" + "\n".join(LOOPBACK) + "\n")
        racer.commit("a name")
        racers.append(racer)
    outcomes = pushed_at_once(racers)
    assert sorted(outcome.returncode == 0 for outcome in outcomes) == [False, True], [o.output for o in outcomes]
    winner, loser = (racers[0], racers[1]) if outcomes[0].returncode == 0 else (racers[1], racers[0])
    assert "is already served by the app" in (outcomes[0].output + outcomes[1].output)
    assert piku.branch(loser.name) != loser.git("rev-parse", "HEAD").stdout.strip(), "the loser's branch stays"
    assert nginx.get("/", host="RACE.test")[2].startswith(f"Hello from {winner.name}")


def pushed_at_once(repos):
    """Push every repo at the same moment -> their outcomes (returncode, output)."""
    import threading
    outcomes = [None] * len(repos)
    def push(index):
        outcomes[index] = repos[index].push(check=False)
    threads = [threading.Thread(target=push, args=(index,)) for index in range(len(repos))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


# --- WebSockets, event streams, static files --------------------------------------------

@pytest.mark.parametrize("kind", ["web", "asgi"])
def test_websockets_and_event_streams_pass_through_nginx(kind, piku, emperor, nginx, make_app, toolchain):
    from conftest import WebSocket, event_stream
    toolchain.require(*(("3.11",) if kind == "asgi" else ()))
    app = front_with_nginx(piku, make_app, TEST_APPS / f"realtime-{kind}", "rt", "EVENT_PAUSE=3")
    app.push()
    assert nginx.get("/", host="rt.test")[2] == f"realtime {kind} rt\n"
    for tls, port in ((False, nginx.port), (True, nginx.https_port)):
        socket = WebSocket(port, "rt.test", tls=tls)
        try:
            assert socket.status == 101, socket.head
            for text in ("hello", "x" * 300):
                socket.send(text)
                assert socket.receive() == f"echo: {text}"
        finally:
            socket.close()
    first, whole, body = event_stream(nginx.port, "rt.test")
    print(f"{kind}: first event after {first:.2f} s, the response ended after {whole:.2f} s")
    assert first is not None and first < 1.5 <= 3 <= whole, (first, whole, body)
    assert "data: second" in body
    # a WebSocket stays open while another app is deployed and nginx reloads for its new vhost
    socket = WebSocket(nginx.port, "rt.test")
    try:
        other = front_with_nginx(piku, make_app, EXAMPLES / "web", "neighbour")
        other.push()
        assert nginx.get("/", host="neighbour.test")[2].startswith("Hello from neighbour")
        socket.send("still there?")
        assert socket.receive() == "echo: still there?"
    finally:
        socket.close()


def test_static_files_are_served_by_nginx_through_the_group_and_nothing_else_is(piku, emperor, nginx, make_app,
                                                                                 toolchain):
    toolchain.require("3.11")
    plain = front_with_nginx(piku, make_app, TEST_APPS / "wsgi-plain", "plain", "SECRET_TOKEN=never-served-4471")
    plain.push()
    status, headers, robots = nginx.get("/robots.txt", host="plain.test")
    assert status == 200 and headers.get("X-Served-By") == "nginx-static", (status, headers)
    wait_until(lambda: '"GET /robots.txt HTTP/1.1" 200' in (piku.root / "nginx" / "logs" / "plain.access.log").read_text(),
               message="nginx's access log to show it served the file")
    assert not (piku.root / "logs" / "plain" / "nginx.access.log").exists(), "root never writes in an app's folder"
    # nginx's workers are in the group: they enter releases, not settings, repos or data
    def readable_by_the_group(path):
        return subprocess.run(["runuser", "-u", "nobody", "-g", "root", "--", "test", "-r", str(path)]).returncode == 0
    assert readable_by_the_group(next((piku.root / "releases" / "plain").glob("*/assets/robots.txt")))
    for private in ("envs/plain/ENV", "envs/plain/LIVE_ENV", "repos/plain/config", "envs/plain/releases.json"):
        assert not readable_by_the_group(piku.root / private), private
    web = front_with_nginx(piku, make_app, EXAMPLES / "web", "webstatic", "NGINX_STATIC_PATHS=/files/:.")
    pushed = web.push()
    assert "does not serve it" not in pushed.output, "nginx serves it: no warning"
    status, headers, body = nginx.get("/files/Procfile", host="webstatic.test")
    assert status == 200 and headers.get("X-Served-By") == "nginx-static" and body.startswith("web:")
    refused = piku("config:set", "webstatic", "NGINX_STATIC_PATHS=/etc/:/etc/", check=False)
    assert refused.returncode == 1 and "NGINX_STATIC_PATHS folder '/etc/' is an absolute path" in refused.stderr
    assert "root:" not in nginx.get("/etc/passwd", host="webstatic.test")[2]
    unserved = piku("config:set", "webstatic", "NGINX_SERVER_NAME=")
    assert "NGINX_STATIC_PATHS is served by nginx" in unserved.stderr and "here neither serves it" in unserved.stderr


def test_https_settings_of_the_host_and_the_app_reach_the_acme_client(piku, emperor, nginx, pebble, make_app,
                                                                      toolchain):
    toolchain.require("3.11")
    app = front_with_nginx(piku, make_app, TEST_APPS / "wsgi-plain", "mail", f"ACME_ROOT_CA={pebble.directory}")
    pushed = app.push()
    assert "no certificate was requested: the CA's account needs a contact address and ACME_EMAIL is not set" \
        in pushed.output and "config:set mail ACME_EMAIL=you@example.com" in pushed.output, pushed.output
    assert "resolves to this host" not in pushed.output and "HTTPS: asking" not in pushed.output
    # a private CA trusted through PIKU_LEGO='env LEGO_CA_CERTIFICATES=... lego' (split, never a shell)
    host_settings = piku.root / "piku.env"
    host_settings.write_text(f"PIKU_LEGO='env LEGO_CA_CERTIFICATES={pebble.ca} lego'\n")
    issued = piku("config:set", "mail", "ACME_EMAIL=ops@example.com")
    assert "HTTPS: certificate issued and installed" in issued.stdout, issued.stdout + issued.stderr
    status, _, body = https_get(nginx.https_port, "mail.test", cafile=pebble.root())
    assert status.endswith(" 200 OK"), status


def test_doctor_tells_of_certificates_that_expire(piku, tmp_path):
    import datetime
    import json
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    now = datetime.datetime.now(datetime.timezone.utc)
    for app, days in (("soon", 10), ("gone", -3), ("fine", 60)):
        (piku.root / "repos" / app).mkdir(parents=True)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, f"{app}.test")])
        certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                       .serial_number(x509.random_serial_number())
                       .not_valid_before(now - datetime.timedelta(days=90))
                       .not_valid_after(now + datetime.timedelta(days=days)).sign(key, hashes.SHA256()))
        (piku.root / "nginx" / f"{app}.crt").write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        (piku.root / "nginx" / f"{app}.acme").write_text(json.dumps({"names": [f"{app}.test"], "issued": True,
                                                                      "client": "lego"}))
    report = piku("doctor", check=False)
    assert report.returncode == 1
    assert "WARN  soon: its certificate expires in 10 day(s)" in report.stdout or \
        "WARN  soon: its certificate expires in 9 day(s)" in report.stdout, report.stdout
    assert "FAIL  gone: its certificate expired 3 day(s) ago: browsers refuse the site" in report.stdout, report.stdout
    assert "OK    fine: its certificate is valid for" in report.stdout


def test_the_daily_job_rotates_the_nginx_logs_of_the_apps(piku, emperor, nginx, make_app):
    app = front_with_nginx(piku, make_app, EXAMPLES / "web", "busy")
    app.push()
    log = piku.root / "nginx" / "logs" / "busy.access.log"
    for _ in range(20):
        nginx.get("/", host="busy.test")
    wait_until(lambda: log.exists() and log.stat().st_size > 1000, message="the access log to grow")
    piku.env["PIKU_NGINX_LOG_MAXSIZE"] = "1000"
    daily = piku("daily")
    assert "Rotated the nginx logs of busy" in daily.stdout, daily.stdout
    assert (log.parent / "busy.access.log.1").stat().st_size > 1000

    def reopened():         # the reload is asynchronous: ask until a request lands in the new file
        nginx.get("/after-the-rotation", host="busy.test")
        return log.exists() and "/after-the-rotation" in log.read_text()
    wait_until(reopened, message="nginx to reopen its log")
    assert "Rotated" not in piku("daily").stdout, "a small log is left as it is"
    shown = piku("logs", "busy", "nginx", "-n", "1", "--no-follow").stdout
    assert shown.startswith("nginx.access | ") and "/after-the-rotation" in shown, shown
    piku.env["PIKU_NGINX_LOG_MAXSIZE"] = "a lot"
    broken = piku("daily", check=False)         # a mistake in one part stops neither part
    assert broken.returncode == 1 and "rotating the nginx logs failed" in broken.stderr, broken.stderr
    assert "the nginx logs were not rotated" in broken.stderr


def test_a_change_refused_at_its_commit_leaves_the_live_front_as_it_was(piku, emperor, nginx, make_app):
    """A name taken by another app while this change was starting: refused under the host lock,
    after its new front (a new PORT) already listened -- which must not stay."""
    import socket
    from conftest import fetch, free_port
    slow = make_app(EXAMPLES / "web", "slowfront")
    slow.write("Procfile", "web: sleep 3 && exec python3 app.py\n")
    slow.write("ENV", "NGINX_SERVER_NAME=slowfront.test\n" + "\n".join(LOOPBACK) + "\n")
    slow.commit("a web process that takes 3 s to listen")
    slow.push()
    old_port, new_port = piku.live_env("slowfront")["PORT"], free_port()
    quick = front_with_nginx(piku, make_app, EXAMPLES / "web", "quick")
    quick.push()
    racer = subprocess.Popen([PYTHON, str(PIKU_PY), "config:set", "slowfront", f"PORT={new_port}",
                              "NGINX_SERVER_NAME=slowfront.test,contested.test"], env=piku.env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)             # planned (the name was free then); its workers are starting
    piku("config:set", "quick", "NGINX_SERVER_NAME=quick.test,contested.test")
    assert racer.wait(timeout=120) == 1
    refused = racer.stderr.read()
    assert "NGINX_SERVER_NAME contested.test is already served by the app 'quick'" in refused, refused
    assert not (piku.root / "uwsgi-enabled" / f"slowfront@front.{new_port}.ini").exists()
    def closed():
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", new_port)) != 0
    wait_until(closed, timeout=15, message="the refused change's front to let go of its port")
    assert piku.live_env("slowfront")["PORT"] == old_port
    assert fetch(f"http://127.0.0.1:{old_port}/")[1].startswith("Hello from slowfront")
    assert nginx.get("/", host="contested.test")[2].startswith("Hello from quick")


def test_a_push_whose_client_leaves_after_its_release_went_live_finishes(piku, emperor, nginx, make_app):
    """Committed is committed: the client going away while the certificate is being asked for
    (after the switch) must not leave the branch behind the release that serves."""
    import socket
    import threading
    from conftest import fetch
    stalling = socket.socket()      # a "CA" that accepts, says nothing for 2 s, and hangs up
    stalling.bind(("127.0.0.1", 0))
    stalling.listen(8)
    held = []

    def hold():
        while True:
            try:
                conn, _ = stalling.accept()
            except OSError:
                return
            held.append(conn)
            threading.Timer(2.0, conn.close).start()
    threading.Thread(target=hold, daemon=True).start()
    try:
        app = front_with_nginx(piku, make_app, EXAMPLES / "web", "late",
                               f"ACME_ROOT_CA=https://127.0.0.1:{stalling.getsockname()[1]}/dir",
                               "ACME_EMAIL=ops@example.com")
        log = piku.root.parent / "push.log"
        with open(log, "w") as output:
            push = subprocess.Popen(["git", "push", "--receive-pack", f"{PYTHON} {PIKU_PY} git-receive-pack",
                                     "late", "HEAD:main"], cwd=app.path, env=piku.env, stdout=output,
                                    stderr=subprocess.STDOUT)
            wait_until(lambda: "HTTPS: asking" in log.read_text(), timeout=120, message="the release to go live")
            push.kill()                 # while lego waits for the "CA"
            push.wait()
        rev = app.git("rev-parse", "HEAD").stdout.strip()
        wait_until(lambda: piku.branch("late") == rev, timeout=240, message="git to move the branch all the same")
        wait_until(lambda: piku.releases("late")[-1]["state"] == "live", timeout=30, message="the release confirmed")
        assert fetch(piku.url("late"))[1].startswith("Hello from late")
    finally:
        stalling.close()
        for conn in held:
            conn.close()
