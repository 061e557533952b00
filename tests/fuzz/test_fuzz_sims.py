"""Fuzz SimsMatrix.load (every stage reads score files) with damaged files and malformed tpas-sims dicts."""

from __future__ import annotations

import io

import pytest
import torch
from fuzzlib import fuzz_settings, json_values, mutate, valid_or_refused
from hypothesis import given
from hypothesis import strategies as st

from tpas.sims import FORMAT, SimsMatrix

# Damaged pickles announce odd protocols; torch warns about each.
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


GOOD = SimsMatrix(["q0", "q1"], ["g0", "g1", "g2"], scores=torch.rand(2, 3)).to_dict()
GOOD_BYTES = _saved(GOOD)
_tensors = st.sampled_from(
    [torch.rand(2, 3), torch.rand(3, 2), torch.rand(2), torch.tensor(1.0), torch.zeros(2, 3, dtype=torch.long),
     torch.tensor([[0, 1], [2, 5]]), torch.tensor([[0, 1], [1, 1]]), torch.full((2, 3), float("nan")),
     torch.zeros(0, 3), torch.rand(2, 2)]
)  # fmt: skip
_ids = st.lists(st.text(max_size=3), max_size=4) | json_values
FIELDS = {"format": st.just(FORMAT) | json_values, "scores": _tensors | json_values, "indices": _tensors,
          "values": _tensors, "query_ids": _ids, "gallery_ids": _ids, "source": json_values,
          "meta": json_values}  # fmt: skip
_dicts = st.fixed_dictionaries({}, optional=FIELDS).map(lambda d: {**GOOD, **d})


@fuzz_settings(200)
@given(content=mutate(GOOD_BYTES) | _dicts.map(_saved) | st.binary(max_size=64))
def test_score_files_load_or_name_the_file(content, tmp_path_factory):
    path = tmp_path_factory.getbasetemp() / "fuzz-sims.pt"
    path.write_bytes(content)
    m = valid_or_refused(SimsMatrix.load, path)
    if m is not None:
        m.validate()
