"""A small Flask app that says which Python runs it."""
import importlib
import os
import sys
from importlib.metadata import version

from flask import Flask

app = Flask(__name__)
PYTHON = "%d.%d.%d" % sys.version_info[:3]


@app.route("/")
def index():
    return f"Hello from {os.environ.get('APP', 'flask')} on Python {PYTHON} with Flask {version('flask')}\n"


@app.route("/python")
def python():
    return "%d.%d\n" % sys.version_info[:2]


@app.route("/env/<name>")
def setting(name):
    return os.environ.get(name, "") + "\n"


@app.route("/import/<module>")
def can_import(module):
    try:
        importlib.import_module(module)
    except ImportError:
        return "no\n"
    return "yes\n"
