import os
import sys


def application(environ, start_response):
    body = f"wsgi {sys.version_info.major}.{sys.version_info.minor} GREETING={os.environ.get('GREETING', '')}\n"
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [body.encode()]
