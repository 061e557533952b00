"""The root app: `main` builds only the stage of the command it runs, and that lazy path lists what the full app has."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import typer.main

from tpas.cli import app
from tpas.cli.app import STAGES

REPO = Path(__file__).resolve().parents[2]


def test_stages_name_every_top_level_command_in_help_order():
    group = typer.main.get_command(app)
    assert list(group.commands) == [name for _, _, names in STAGES for name in names]


def test_evaluate_imports_neither_pandas_nor_other_stages(tiny_gt):
    # The whole-process speed of `tpas evaluate` (benchmarks/bench_processes.py) rests on these imports staying lazy.
    t = tiny_gt()
    code = (
        "import sys; from tpas.cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "print(json.dumps(sorted(m for m in sys.modules if m == 'pandas' or m.startswith('tpas.cli.'))))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = ["evaluate", str(t.sims_path), "--gt", str(t.annotation)]
    out = subprocess.run([sys.executable, "-c", "import json\n" + code, *args], env=env, capture_output=True,
                         text=True, check=True).stdout  # fmt: skip
    assert json.loads(out.splitlines()[-1]) == ["tpas.cli.app", "tpas.cli.common", "tpas.cli.scoring"]
