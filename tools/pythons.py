"""The CPythons 3.10+ this machine has besides the one piku runs on, found the way uv finds
them -- its managed ones and those on PATH (`uv python list`) -- and pyenv's builds (uv sees
only the one pyenv's shims point at). The test suite, the bench and `make demo` offer them to
piku's uv, copied into a folder of theirs (copy_installation).

    python3 tools/pythons.py UV               one line per minor version: MINOR VERSION PREFIX INTERPRETER
    python3 tools/pythons.py --copy PREFIX TARGET    copy an installation where it still runs
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

PROBE = ("import os, sys; print(sys.base_prefix); print(os.path.realpath(sys.executable)); "
         "print('%d.%d.%d' % sys.version_info[:3])")


def candidates(uv):
    found = []
    if uv:
        env = {key: value for key, value in os.environ.items() if not key.startswith(("PIKU_", "VIRTUAL_ENV"))}
        listed = subprocess.run([uv, "python", "list", "--only-installed", "--output-format", "json"],
                                capture_output=True, text=True, env=dict(env, UV_PYTHON_DOWNLOADS="never"))
        if listed.returncode == 0:
            found += [entry["path"] for entry in json.loads(listed.stdout) if entry.get("implementation") == "cpython"]
    pyenv = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv") / "versions"
    if pyenv.is_dir():
        found += [str(build / "bin" / "python3") for build in sorted(pyenv.glob("3.*"))]
    return found


def other_pythons(uv):
    """{minor: (version, installation folder, interpreter)}, the first found of each minor."""
    found = {}
    for path in candidates(uv):
        probe = subprocess.run([path, "-I", "-c", PROBE], capture_output=True, text=True)
        lines = probe.stdout.split()
        if probe.returncode != 0 or len(lines) != 3 or not re.fullmatch(r"3\.1[0-9]\.[0-9]+", lines[2]):
            continue
        prefix, interpreter, version = lines
        found.setdefault(".".join(version.split(".")[:2]), (version, prefix, interpreter))
    return found


def copy_installation(prefix, target):
    """Copy a Python installation to target (hard links where it can) so that it runs from there,
    also where its old place cannot be seen (an app's sandbox): pyenv builds find libpython
    through a RUNPATH naming their own prefix, which becomes '$ORIGIN/../lib' in the copy."""
    if subprocess.run(["cp", "-al", prefix, target], capture_output=True).returncode != 0:
        subprocess.run(["rm", "-rf", target])
        subprocess.run(["cp", "-a", prefix, target], check=True)
    for binary in sorted(Path(target, "bin").glob("python3*")):
        if binary.is_symlink() or not binary.is_file():
            continue
        rpath = subprocess.run(["patchelf", "--print-rpath", str(binary)], capture_output=True, text=True)
        if rpath.returncode == 0 and os.path.realpath(prefix) in rpath.stdout:
            data = binary.read_bytes()          # a file of its own, not a link to the original's
            binary.unlink()
            binary.write_bytes(data)
            binary.chmod(0o755)
            subprocess.run(["patchelf", "--set-rpath", "$ORIGIN/../lib", str(binary)], check=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--copy"]:
        copy_installation(sys.argv[2], sys.argv[3])
        sys.exit(0)
    for minor, (version, prefix, interpreter) in sorted(other_pythons(sys.argv[1] if len(sys.argv) > 1 else None).items()):
        print(minor, version, prefix, interpreter)
