#!/usr/bin/env python
"""Alias of ``pipelines/build_corr_dataset.py`` (the program that builds correspondence h5
datasets), kept so that ``python data_prep/build_corr_dataset.py ...`` works as before; same
arguments, output and exit codes. The library it calls is :mod:`data_prep.build`."""
from __future__ import annotations

import sys
from collections.abc import Sequence

from data_prep._programs import run_program


def main(argv: Sequence[str] | None = None) -> int:
    """``main`` of ``pipelines/build_corr_dataset.py``."""
    return run_program("build_corr_dataset", argv)


if __name__ == "__main__":
    sys.exit(main())
