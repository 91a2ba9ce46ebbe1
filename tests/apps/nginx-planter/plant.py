"""Plants what would make nginx's root master open a file outside the app: a link (from
release:, which may make links) or a FIFO (from the worker and the web process, which may
not make links) at every path of targets.json -- the paths nginx opens for this app, as
piku's table of them places them. Served folders get links inside them. What happened is
reported in the app's data folder as planted-PHASE.json. `web` then answers HTTP."""
import json
import os
import socket
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

phase = sys.argv[1]
here = os.path.dirname(os.path.abspath(__file__))
targets = json.load(open(os.path.join(here, "targets.json"))) if os.path.exists(os.path.join(here, "targets.json")) else []


def attempt(action):
    try:
        action()
        return "done"
    except OSError as error:
        return f"refused: {error.strerror}"


def replace_with_link(path, target):
    if os.path.lexists(path) and not os.path.isdir(path):
        os.unlink(path)
    elif os.path.isdir(path) and not os.path.islink(path):
        os.rename(path, path + ".moved")
    os.symlink(target, path)


def replace_with_fifo(path):
    if os.path.lexists(path):
        os.unlink(path)
    os.mkfifo(path)


report = {}
for target in targets:
    path, kind = target["path"], target["kind"]
    if kind == "served":
        if phase == "release":
            folder = os.path.join(here, path)
            report[path + "/planted"] = attempt(lambda: os.symlink(target["file"], os.path.join(folder, "planted")))
            report[path + "/sub"] = attempt(lambda: replace_with_link(os.path.join(folder, "sub"), target["folder"]))
        continue
    if phase == "release":
        report[path] = attempt(lambda: replace_with_link(path, target["folder" if kind == "folder" else "file"]))
    elif kind == "file":
        report[path] = attempt(lambda: replace_with_fifo(path))
data = os.environ["DATA_ROOT"]
with open(os.path.join(data, f"planted-{phase}.json"), "w") as out:
    json.dump(report, out)


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"the planter's app\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


if phase == "web":
    address = os.environ.get("BIND_ADDRESS", "127.0.0.1")
    ThreadingHTTPServer.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
    ThreadingHTTPServer((address, int(os.environ["PORT"])), Hello).serve_forever()
elif phase == "worker":
    import time
    while True:
        time.sleep(60)
