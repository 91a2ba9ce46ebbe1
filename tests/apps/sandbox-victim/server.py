"""The victim: it holds a secret (VICTIM_VALUE, secret.txt) and answers HTTP."""
import os
from http.server import BaseHTTPRequestHandler, HTTPServer

import idna


class Answer(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"victim here, idna {idna.__version__}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


HTTPServer((os.environ["BIND_ADDRESS"], int(os.environ["PORT"])), Answer).serve_forever()
