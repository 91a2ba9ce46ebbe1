"""The docs stay true: every command they name exists, every setting piku reads is documented."""

import re
import subprocess

from conftest import PIKU_PY, PYTHON, REPO

DOCS = REPO / "docs"


def test_every_setting_piku_reads_is_in_the_env_reference():
    source = PIKU_PY.read_text()
    patterns = [r'env(?:\[|\.get\()"([A-Z][A-Z0-9_]+)"', r'setting_true\(env, "([A-Z][A-Z0-9_]+)"',
                r'setting_number\(env, \("([A-Z][A-Z0-9_]+)"', r'health_setting\(env, "([A-Z][A-Z0-9_]+)"',
                r'uwsgi_number\(env, "([A-Z][A-Z0-9_]+)"', r'host_setting\("([A-Z][A-Z0-9_]+)"',
                r"nginx_address\(env, '([A-Z][A-Z0-9_]+)'",
                r'"((?:NGINX|UV|PIKU|ACME|GUNICORN|UWSGI)_[A-Z0-9_]+)"']
    keys = {key for pattern in patterns for key in re.findall(pattern, source)}
    assert len(keys) > 50, sorted(keys)
    reference = (DOCS / "ENV.md").read_text()
    missing = sorted(key for key in keys if f"`{key}`" not in reference)
    assert not missing, f"read by piku.py but not in docs/ENV.md: {missing}"


def test_every_command_the_docs_name_exists():
    usage = (DOCS / "USAGE.md").read_text()
    named = set(re.findall(r"^\| `([a-z][a-z:-]*)[ `]", usage, re.M))
    assert {"apps", "config:set", "deploys", "doctor", "keys", "ps", "rollback"} <= named, sorted(named)
    for command in sorted(named):
        result = subprocess.run([PYTHON, str(PIKU_PY), command, "--help"], capture_output=True, text=True,
                                env={"PIKU_ROOT": "/nonexistent/piku", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0 and "Usage:" in result.stdout, (command, result.stderr)
