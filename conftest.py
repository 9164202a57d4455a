"""Pytest setup shared by ``tests/`` and ``bench/``; pytest loads it first, from any working directory.

* The suites run the *installed* t2t_fast. ``python -m pytest`` puts the working directory first on
  ``sys.path``; at the repository root ``import t2t_fast`` would then find the source folder, which has
  neither the compiled ``t2t_fast._C`` of a regular install nor ``t2t_fast.kernels`` (installed from
  ``kernels/``). So the root leaves ``sys.path`` here, before anything imports t2t_fast. An editable install
  (``pip install -e .``) keeps working: its import hook maps both packages into this checkout.
* ``--per-test-timeout SECONDS`` fails a test (setup, call and teardown) that runs longer, and
  ``--run-timeout SECONDS`` ends the run that long after pytest started: the running test fails, no other
  starts, and the run still ends with its reports and benchmark JSON (a killed pytest writes neither). For
  machines without pytest-timeout (a GPU machine with no network); ``bench/gpu_check.sh`` uses both.
"""
import faulthandler
import importlib.util
import os
import signal
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.realpath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != ROOT]
if importlib.util.find_spec("t2t_fast") is None:
    # Exit before the other conftests fail to import t2t_fast with a traceback.
    sys.stderr.write(f"ERROR: t2t_fast is not installed in {sys.executable}: run `pip install {ROOT}` "
                     f"(or `pip install -e {ROOT}`) first\n")
    raise SystemExit(4)  # pytest's exit code for a usage error

STARTED = time.monotonic()  # this file is imported as pytest starts
# After the soft time-out, time for the test to unwind before the hard stop (a test stuck in native code, e.g.
# a hung CUDA call, never sees the SIGALRM exception: faulthandler then prints every thread and exits).
HARD_STOP_GRACE_S = 60


def pytest_addoption(parser):
    parser.addoption("--per-test-timeout", type=float, default=0, metavar="SECONDS",
                     help="fail a test whose setup, call and teardown take longer than SECONDS; one stuck in "
                          f"native code ends the run {HARD_STOP_GRACE_S} s later with every thread's traceback")
    parser.addoption("--run-timeout", type=float, default=0, metavar="SECONDS",
                     help="end the run SECONDS after pytest started: the running test fails as timed out, no "
                          "later test starts, reports and benchmark JSON are still written")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    per_test, run = item.config.getoption("per_test_timeout"), item.config.getoption("run_timeout")
    limits = [per_test] if per_test else []
    if run:
        limits.append(max(run - (time.monotonic() - STARTED), 0.1))  # a spent run: the test fails at once
    if not limits:
        yield
        return
    seconds = min(limits)

    def expire(signum, frame):
        # an Exception, not pytest.fail's BaseException: pytest-benchmark then drops the unfinished benchmark
        # instead of failing to write its JSON
        raise TimeoutError(f"{item.nodeid} timed out after {seconds:.0f} s ("
                           + ("--per-test-timeout" if seconds == per_test else "--run-timeout") + ")")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    faulthandler.dump_traceback_later(seconds + HARD_STOP_GRACE_S, exit=True)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        faulthandler.cancel_dump_traceback_later()
    if run and time.monotonic() - STARTED >= run:
        item.session.shouldstop = f"--run-timeout: {run:.0f} s spent"
