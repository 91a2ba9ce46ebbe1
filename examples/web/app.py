"""A web app with no dependencies: answers on $BIND_ADDRESS:$PORT, as piku asks."""
import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Hello(BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"Hello from {os.environ.get('APP', 'piku')}! GREETING={os.environ.get('GREETING', '')}\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body.encode())))
        self.end_headers()
        self.wfile.write(body.encode())


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def server_bind(self):
        # Not needed under piku.py (each copy gets a PORT of its own behind the app's front),
        # but lets this server share a port elsewhere.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


if __name__ == "__main__":
    address = os.environ.get("BIND_ADDRESS", "127.0.0.1")
    Server.address_family = socket.AF_INET6 if ":" in address else socket.AF_INET
    Server((address, int(os.environ["PORT"])), Hello).serve_forever()
