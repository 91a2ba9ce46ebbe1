"""Starlette over gunicorn and uvicorn's worker (piku's asgi:): a WebSocket echo at /ws and
server-sent events at /events (one event, a pause, another)."""
import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute


async def index(request):
    return PlainTextResponse(f"realtime asgi {os.environ.get('APP')}\n")


async def events(request):
    async def stream():
        yield "data: first\n\n"
        await asyncio.sleep(float(os.environ.get("EVENT_PAUSE", "3")))
        yield "data: second\n\n"
    return StreamingResponse(stream(), media_type="text/event-stream")


async def echo(websocket):
    await websocket.accept()
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return
        await websocket.send_text("echo: " + (message.get("text") or message.get("bytes", b"").decode()))


app = Starlette(routes=[Route("/", index), Route("/events", events), WebSocketRoute("/ws", echo)])
