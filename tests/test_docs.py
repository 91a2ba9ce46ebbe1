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


def commands_named_in(text):
    """Commands after `piku.py` or `ssh piku@HOST` in a doc's code (spans and blocks, comments left out)."""
    blocks = re.findall(r"```.*?```", text, re.S)
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    code = [re.sub(r"(^|\s)#[^\n]*", r"\1", block) for block in blocks] + spans
    return {match for snippet in code
            for match in re.findall(r"(?:piku\.py|ssh piku@[\w.-]+)[ \t]+([a-z][a-z:-]*)", snippet)}


def test_every_command_named_anywhere_in_the_docs_exists():
    named = {}
    for doc in [*DOCS.glob("*.md"), REPO / "README.md"]:
        for command in commands_named_in(doc.read_text()):
            named.setdefault(command, set()).add(doc.name)
    assert {"install", "update", "doctor", "setup:ssh", "rollback"} <= set(named), sorted(named)
    for command, where in sorted(named.items()):
        result = subprocess.run([PYTHON, str(PIKU_PY), command, "--help"], capture_output=True, text=True,
                                env={"PIKU_ROOT": "/nonexistent/piku", "PATH": "/usr/bin:/bin"})
        assert result.returncode == 0 and "Usage:" in result.stdout, (command, sorted(where), result.stderr)


def test_the_docs_tour_links_every_doc():
    tour = (DOCS / "README.md").read_text()
    missing = sorted(doc.name for doc in DOCS.glob("*.md") if doc.name != "README.md" and f"({doc.name})" not in tour)
    assert not missing, f"docs/README.md does not lead to: {missing}"
