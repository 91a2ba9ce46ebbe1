"""Unit tests: the Procfile parser and scaling arguments."""

import pytest

import piku
from piku import PikuError, parse_procfile


def test_kinds_are_parsed_in_order_with_their_lines():
    text = ("# a comment\n\nwsgi: app:application\nrelease: python migrate.py\n"
            "preflight: ./check.sh\ncron-nightly: 0 3 * * * ./nightly.sh --all\nworker: python worker.py\n")
    processes = parse_procfile(text)
    assert list(processes) == ["wsgi", "release", "preflight", "cron-nightly", "worker"]
    assert processes["wsgi"].command == "app:application"
    assert processes["cron-nightly"].line == 6
    assert [piku.worker_class(kind) for kind in processes] == ["wsgi", "release", "preflight", "cron", "worker"]


def test_command_keeps_colons_and_shell_syntax():
    processes = parse_procfile("web: gunicorn -b $BIND_ADDRESS:$PORT 'app:create()' | tee x\n")
    assert processes["web"].command == "gunicorn -b $BIND_ADDRESS:$PORT 'app:create()' | tee x"


@pytest.mark.parametrize("text, message", [
    ("web: ok\nnot a process line\n", "Procfile line 2 is malformed"),
    ("web python app.py\n", "Procfile line 1 is malformed"),
    (": python app.py\n", "Procfile line 1 is malformed"),
    ("w eb: x\n", "Procfile line 1 is malformed"),
    ("web:\n", "Procfile line 1: 'web' has no command"),
    ("web: a\nweb: b\n", "Procfile line 2: 'web' is defined twice (first on line 1)"),
    ("\n# only comments\n", "the Procfile defines no processes"),
    ("web: a\nwsgi: b\n", "Procfile lines 2 and 1: 'wsgi' and 'web' cannot both be used"),
    ("asgi: a:app\nwsgi: b:app\n", "'wsgi' and 'asgi' cannot both be used; they would share one PORT"),
    ("asgi: a:app\nweb: b\n", "'asgi' and 'web' cannot both be used"),
    ("static: public\nweb: a\n", "'static' next to 'web' is not supported"),
    ("static: public\nasgi: main:app\n", "'static' next to 'asgi' is not supported"),
    ("cron: * * * *\n", "Procfile line 1: a cron entry needs 5 schedule fields"),
    ("x: 1\ncron1: 1-5 * * * * cmd\n", "Procfile line 2: cron minute field '1-5' is not supported"),
    ("cron: 0 24 * * * cmd\n", "cron hour 24 is out of range 0-23"),
    ("cron: 0 0 0 * * cmd\n", "cron day of month 0 is out of range 1-31"),
])
def test_malformed_procfiles_name_the_line(text, message):
    with pytest.raises(PikuError) as error:
        parse_procfile(text)
    assert message in error.value.message


def test_cron_schedule_translates_to_uwsgi_fields():
    assert piku.parse_cron("*/5 3 * * 0 backup.sh --fast", 1) == ("-5 3 -1 -1 0", "backup.sh --fast")


def test_scale_arguments_are_checked_against_the_procfile():
    processes = parse_procfile("web: a\nworker: b\nrelease: c\ncron: * * * * * d\nstatic: s\n".replace("web: a\n", ""))
    assert piku.parse_scale_args(["worker=3"], processes) == {"worker": 3}
    for args, message in ((["web=2"], "no 'web' worker"), (["worker"], "malformed scaling"),
                          (["worker=-1"], "malformed scaling"), (["release=1"], "no 'release' worker"),
                          (["cron=2"], "at most one instance"), (["static=2"], "at most one instance")):
        with pytest.raises(PikuError) as error:
            piku.parse_scale_args(args, processes)
        assert message in error.value.message


def test_scaling_file_round_trips_and_reads_upstream_format():
    assert piku.parse_scaling("web:2\nworker=1\n# note\nbad line\n") == {"web": 2, "worker": 1}
    assert piku.parse_scaling(piku.format_scaling({"web": 3, "clock": 0})) == {"web": 3, "clock": 0}


def test_worker_counts_and_numbers_stay_in_range():
    processes = piku.parse_procfile("web: python app.py\nworker: python w.py\n")
    for arg, message in (("worker=65", "runs at most 64 instances"), ("web=17", "runs at most 16 instances"),
                         ("worker=" + "9" * 30, "malformed scaling"), ("worker=\u0663", "malformed scaling")):
        with pytest.raises(PikuError) as error:
            piku.parse_scale_args([arg], processes)
        assert message in error.value.message, arg
    assert piku.parse_scale_args(["worker=64", "web=16"], processes) == {"worker": 64, "web": 16}
    for key, value in (("UWSGI_PROCESSES", "1025"), ("UWSGI_LISTEN", "70000"), ("GUNICORN_WORKERS", "0")):
        with pytest.raises(PikuError) as error:
            piku.setting_number({key: value}, (key,), 1)
        assert f"{key} must be a whole number from 1 to" in error.value.message
