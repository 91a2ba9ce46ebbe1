"""Reports the locked version of six, and whether the dev group's iniconfig was installed."""
import importlib.util
from importlib.metadata import version


def application(environ, start_response):
    dev = "with" if importlib.util.find_spec("iniconfig") else "without"
    body = f"six {version('six')} {dev} iniconfig\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
