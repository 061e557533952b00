"""Coverage-guided fuzzing (atheris / libFuzzer) of the file readers, one process for all of them.

Run by test_atheris.py as `python atheris_harness.py WORKDIR -runs=N -seed=S ...`. The first input byte picks the
reader, the rest is the file. A TpasInputError must name the file; any other exception is a crash (libFuzzer saves
the input under -artifact_prefix and the process exits non-zero).
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["tpas"]):
    from tpas.data import pab
    from tpas.ensemble.external import read_run
    from tpas.errors import TpasInputError
    from tpas.models.checkpoint import load_checkpoint
    from tpas.pose.keypoints import load_keypoints
    from tpas.sims import SimsMatrix
    from tpas.submit.validate import validate_answer

WORK = Path(sys.argv.pop(1))
IDS = ["q1", "q2"]
READERS = [
    (".json", pab.read_queries),
    (".json", pab.read_test_annotation),
    (".json", pab.read_train_annotation),
    (".txt", pab.read_query_index),
    (".txt", lambda p: validate_answer(p, IDS, ["g1", "g2"], k=2)),
    (".zip", lambda p: validate_answer(p, IDS, ["g1", "g2"], k=2)),
    (".trec", lambda p: read_run(p, IDS, ["g1", "g2"])),
    (".csv", lambda p: read_run(p, IDS, ["g1", "g2"])),
    (".json", load_keypoints),
    (".pt", SimsMatrix.load),
    (".pt", load_checkpoint),
]


def test_one_input(data: bytes) -> None:
    if not data:
        return
    suffix, read = READERS[data[0] % len(READERS)]
    path = WORK / f"input{suffix}"
    path.write_bytes(data[1:])
    try:
        read(path)
    except TpasInputError as e:
        if str(path) not in str(e):
            raise AssertionError(f"error does not name the file: {e}") from None


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
