"""A Flask app installed from requirements.txt and run by a hand-written gunicorn line."""
import sys

from flask import Flask

app = Flask(__name__)


@app.route("/")
def index():
    return "Hello from requirements.txt on Python %d.%d\n" % sys.version_info[:2]
