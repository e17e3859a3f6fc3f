"""The demo keeps the runtimes' own log lines out of its output, but not repq_fx's warnings (regression: they
were swallowed), shows what was captured when the block fails, and leaks no file descriptor."""
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


def test_runtime_lines_and_other_packages_warnings_are_kept_out(capfd: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("a-runtime")
    handler = logging.StreamHandler(sys.stderr)
    logger.addHandler(handler)
    try:
        with pytest.warns(RuntimeWarning) as shown:
            with _runtime_chatter_captured():
                os.write(2, b"cpuinfo chatter from C++\n")
                print("bindings' chatter through sys.stderr", file=sys.stderr)
                logger.error("a compiler's log line")
                warnings.warn_explicit("a torch.compile notice", UserWarning, "/elsewhere/torch/x.py", 1)
                warnings.warn_explicit("a repq_fx warning", RuntimeWarning, PACKAGE_FILE, 1)
    finally:
        logger.removeHandler(handler)
    err = capfd.readouterr().err
    assert "chatter" not in err and "log line" not in err
    assert [str(w.message) for w in shown] == ["a repq_fx warning"]
    assert handler.stream is sys.stderr  # given back


def test_the_captured_lines_are_shown_when_the_block_fails(capfd: pytest.CaptureFixture[str]) -> None:
    fd_count = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    with pytest.raises(ValueError, match="boom"):
        with _runtime_chatter_captured():
            os.write(2, b"what the runtime said before failing\n")
            print("and through sys.stderr", file=sys.stderr)
            raise ValueError("boom")
    err = capfd.readouterr().err
    assert "what the runtime said before failing" in err and "and through sys.stderr" in err
    if fd_count is not None:
        assert len(os.listdir("/proc/self/fd")) == fd_count  # the saved descriptor is closed
