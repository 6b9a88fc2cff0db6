"""The HiGHS helpers: an instance is silent from the first one a process makes."""

from __future__ import annotations

import subprocess
import sys


def test_the_first_highs_instance_prints_no_banner() -> None:
    """HiGHS writes "Running HiGHS ..." to standard output when a process makes its first
    instance; `moirai place` prints its report there, so `new_highs` keeps it out."""
    code = (
        "from moirai.placement.lp import new_highs\n"
        "print('before', flush=True)\n"
        "new_highs(1)\n"
        "print('between')\n"
        "new_highs(1)\n"
        "print('after')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.split() == ["before", "between", "after"]
