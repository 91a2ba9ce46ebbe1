"""A FastAPI app. The Procfile's `asgi: main:app` serves it with gunicorn and uvicorn's
worker, which piku adds to the environment because the app does not depend on them."""
import os
import sys
from importlib.metadata import version

from fastapi import FastAPI

app = FastAPI()


@app.get("/")
async def index():
    return {"message": f"Hello from {os.environ.get('APP', 'fastapi')}",
            "python": "%d.%d.%d" % sys.version_info[:3], "fastapi": version("fastapi")}


@app.get("/items/{item_id}")
async def item(item_id: int):
    return {"item_id": item_id, "double": item_id * 2}
