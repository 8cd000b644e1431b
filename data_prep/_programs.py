"""The aliases ``python data_prep/build_corr_dataset.py`` and ``python data_prep/colmap_export.py``:
they run the programs of ``pipelines/`` (where every command-line program lives) from a checkout."""
from __future__ import annotations

import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def run_program(name: str, argv: Sequence[str] | None = None) -> int:
    """``main(argv)`` of ``pipelines/NAME.py``, loaded by file path (``pipelines`` is not a package)."""
    path = PIPELINES / f"{name}.py"
    if not path.is_file():
        raise SystemExit(f"{name}.py: error: the program is pipelines/{name}.py of the repository checkout, "
                         f"not found at {path}")
    spec = importlib.util.spec_from_file_location(f"pipelines_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # so that its functions pickle by reference (worker processes)
    spec.loader.exec_module(module)
    return module.main(None if argv is None else list(argv))
