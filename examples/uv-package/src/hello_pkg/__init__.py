"""A packaged app (`uv init --package`): its code lives in src/ and is installed into the
release, so `web: hello-pkg` (the console script) and `wsgi: hello_pkg.wsgi:app` both work."""
import os
import sys


def main():
    """The `hello-pkg` console script: gunicorn serving the app on $PORT (Procfile `web:`)."""
    from gunicorn.app.wsgiapp import run
    sys.argv = ["hello-pkg", "--bind", f"127.0.0.1:{os.environ.get('PORT', '8000')}",
                "--workers", os.environ.get("WEB_CONCURRENCY", "2"), "hello_pkg.wsgi:app"]
    run()
