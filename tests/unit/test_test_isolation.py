"""What tests/isolation.py checks and undoes after every test, proven on a
pytest run of its own (one subprocess for both: it costs seconds)."""

import os
import pathlib

pytest_plugins = ["pytester"]

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_no_test_leaves_a_thread_or_its_logging_set_up_behind(pytester, monkeypatch):
    """A command's main() run in one test (oslo.log binds root's handler to
    that test's capture stream) made every later log record fail with
    "--- Logging error --- ValueError: I/O operation on closed file": the
    logging is restored after each test. A thread a test leaves running
    fails that test, naming the thread."""
    pytester.makeconftest("from tests.conftest import *  # noqa: F401,F403\n")
    pytester.makepyfile(test_inner='''
        import logging
        import threading

        from router import cli

        stop = threading.Event()

        def test_a_command_in_process(capsys):
            assert cli.main(["publish"]) == 2       # sets logging up, refuses

        def test_logging_afterwards(capsys):
            logging.getLogger("compute.agent").warning("still fine")
            assert "Logging error" not in capsys.readouterr().err

        def test_leaves_a_thread_running():
            threading.Thread(target=stop.wait, args=(30,), daemon=True,
                             name="left-running").start()

        def test_the_next_test_is_not_blamed():
            stop.set()
    ''')
    # the inner run imports the suite's own `tests` package from this tree
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=4, errors=1)
    result.stdout.fnmatch_lines(["*test_leaves_a_thread_running*",
                                 "*'left-running' (daemon=True*"])
