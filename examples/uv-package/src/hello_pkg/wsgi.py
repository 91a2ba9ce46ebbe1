"""The Flask app, importable as hello_pkg.wsgi:app."""
import os
import sys
from importlib.metadata import version

from flask import Flask

from hello_pkg.greeting import GREETING

app = Flask(__name__)


@app.route("/")
def index():
    return (f"{GREETING} from {os.environ.get('APP', 'hello-pkg')} (hello-pkg {version('hello-pkg')}) "
            f"on Python {'%d.%d.%d' % sys.version_info[:3]}\n")


@app.route("/env/<name>")
def setting(name):
    return os.environ.get(name, "") + "\n"
