"""nginx in front: vhosts from upstream piku's keys, checked with nginx -t before they replace a
working one, and redeploys through nginx that fail no request. A real nginx on a loopback port."""

import pytest

from conftest import EXAMPLES, TEST_APPS, LoadLoop, wait_for_body, wait_until

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

    app.write("nginx.inc", "add_header X-Extra yes\n")       # no semicolon
    app.commit("a broken include file")
    broken = app.push(check=False)
    assert broken.returncode != 0
    assert "nginx refused the new vhost (nginx -t above); nothing was changed" in broken.output
    assert '[emerg]' in broken.output and 'unexpected "}" in nginx/inc.conf' in broken.output, broken.output
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


def test_https_certificate_from_an_acme_ca_over_http_01(piku, emperor, nginx, pebble, make_app, toolchain):
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
    renewal = (piku.root / "uwsgi-enabled" / "acme-renew.ini").read_text()
    assert "cron = 17 3 -1 -1 -1 " in renewal and "acme:renew" in renewal, "renewal is scheduled daily"
    renewed = piku("acme:renew")
    assert renewed.returncode == 0 and "renewed" not in renewed.stdout, "not due for 30 days: nothing to do"


def test_without_the_ca_a_self_signed_certificate_keeps_nginx_serving(piku, emperor, nginx, make_app, toolchain):
    import ssl
    toolchain.require("3.11")
    closed = f"https://127.0.0.1:{__import__('conftest').free_port()}/dir"
    app = front_with_nginx(piku, make_app, TEST_APPS / "wsgi-plain", "selfie", f"ACME_ROOT_CA={closed}",
                           "NGINX_HTTPS_ONLY=1")
    pushed = app.push()
    assert "no certificate was issued" in pushed.output and "self-signed certificate" in pushed.output
    assert "then run: deploy selfie" in pushed.output
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
