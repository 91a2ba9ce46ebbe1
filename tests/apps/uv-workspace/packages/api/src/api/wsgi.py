"""The api member: a plain WSGI app that uses the lib member and a locked dependency."""
import os
from importlib.metadata import version

from lib import greeting


def application(environ, start_response):
    body = f"{greeting()} via {os.environ.get('UV_PACKAGE')} (six {version('six')})\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
