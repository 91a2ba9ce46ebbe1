"""Shows the settings whose names start with RT_ exactly as this process got them (JSON): over
WSGI (`application`), ASGI (`app`), as a plain HTTP server (`python3 echo.py web`), or -- as a
`worker:` -- into the app's data folder (worker-env.json)."""
import json
import os
import sys


def settings():
    return json.dumps({key: value for key, value in os.environ.items() if key.startswith("RT_")}).encode()


def application(environ, start_response):
    body = settings()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = settings()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


if __name__ == "__main__" and sys.argv[1:] == ["web"]:
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Echo(BaseHTTPRequestHandler):
        def do_GET(self):
            body = settings()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    ThreadingHTTPServer((os.environ["BIND_ADDRESS"], int(os.environ["PORT"])), Echo).serve_forever()
elif __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    import time
    path = os.path.join(os.environ["DATA_ROOT"], "worker-env.json")
    with open(path + ".tmp", "wb") as out:
        out.write(settings())
    os.replace(path + ".tmp", path)
    while True:
        time.sleep(60)
