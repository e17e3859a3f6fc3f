"""The demo keeps the runtimes' own log lines out of its output, and only those (regressions: it swallowed
repq_fx's warnings and the lines of a logger on stderr)."""
from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import pytest

import repq_fx
from repq_fx.app.demo import _runtime_chatter_captured

PACKAGE_FILE = str(Path(repq_fx.__file__).resolve().parent / "api.py")


def test_cxx_lines_and_other_packages_warnings_are_kept_out(capfd: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("repq-test-chatter")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        with pytest.warns(RuntimeWarning) as shown:
            with _runtime_chatter_captured():
                os.write(2, b"cpuinfo chatter from C++\n")
                warnings.warn_explicit("a torch.compile notice", UserWarning, "/elsewhere/torch/x.py", 1)
                warnings.warn_explicit("a repq_fx warning", RuntimeWarning, PACKAGE_FILE, 1)
                logger.error("a line of the user's logger")
                print("printed to stderr", file=sys.stderr)
    finally:
        logger.removeHandler(handler)
    err = capfd.readouterr().err
    assert "cpuinfo chatter" not in err
    assert "a line of the user's logger" in err and "printed to stderr" in err
    assert [str(w.message) for w in shown] == ["a repq_fx warning"]
    assert handler.stream is sys.stderr  # given back


def test_the_captured_lines_are_shown_when_the_block_fails(capfd: pytest.CaptureFixture[str]) -> None:
    fd_count = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(ValueError, match="boom"):
        with _runtime_chatter_captured():
            os.write(2, b"what the runtime said before failing\n")
            raise ValueError("boom")
    assert "what the runtime said before failing" in capfd.readouterr().err
    if fd_count is not None:
        assert len(os.listdir("/proc/self/fd")) == fd_count  # the saved descriptor is closed
