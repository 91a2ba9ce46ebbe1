"""The intruder's web worker: it attacks the host as it starts, then answers HTTP."""
import os
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "attack.py"), "web"])


class Answer(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"intruder here\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer((os.environ["BIND_ADDRESS"], int(os.environ["PORT"])), Answer).serve_forever()
