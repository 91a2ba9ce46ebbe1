"""A Flask app; Poetry locks its dependencies (poetry.lock), piku installs exactly those."""
import importlib
import os
import sys
from importlib.metadata import version

from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return (f"Hello from {os.environ.get('APP', 'poetry-flask')} on Python {'%d.%d.%d' % sys.version_info[:3]} "
            f"with Flask {version('flask')}\n")


@app.route("/import/<module>")
def can_import(module):
    try:
        importlib.import_module(module)
    except ImportError:
        return "no\n"
    return "yes\n"
