"""A web process with nothing but the standard library that speaks WebSocket (an echo at /ws)
and server-sent events (/events: one event, a pause, another), for piku's tests of what
nginx carries."""
import base64
import hashlib
import http.server
import os
import struct
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if self.path == "/ws" and self.headers.get("Upgrade", "").lower() == "websocket":
            return self.websocket()
        if self.path == "/events":
            return self.events()
        body = f"realtime web {os.environ.get('APP')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def events(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(b"data: first\n\n")
        self.wfile.flush()
        time.sleep(float(os.environ.get("EVENT_PAUSE", "3")))
        self.wfile.write(b"data: second\n\n")
        self.close_connection = True

    def websocket(self):
        key = self.headers["Sec-WebSocket-Key"].encode()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        while True:
            opcode, payload = read_frame(self.rfile)
            if opcode is None or opcode == 8:
                self.wfile.write(bytes([0x88, 0]))
                break
            self.wfile.write(frame(b"echo: " + payload))
            self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


def read_frame(stream):
    head = stream.read(2)
    if len(head) < 2:
        return None, b""
    length = head[1] & 0x7F
    if length == 126:
        length = struct.unpack(">H", stream.read(2))[0]
    elif length == 127:
        length = struct.unpack(">Q", stream.read(8))[0]
    mask = stream.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    payload = bytes(byte ^ mask[i % 4] for i, byte in enumerate(stream.read(length)))
    return head[0] & 0x0F, payload


def frame(payload):
    return bytes([0x81, len(payload)]) + payload if len(payload) < 126 else \
        bytes([0x81, 126]) + struct.pack(">H", len(payload)) + payload


http.server.ThreadingHTTPServer((os.environ.get("BIND_ADDRESS", "127.0.0.1"), int(os.environ["PORT"])),
                                Handler).serve_forever()
