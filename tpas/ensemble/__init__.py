"""Ensemble: normalisation, fusion (iterative, wsum, rrf), ITM re-rank fill, external run files, post-processing
(SCA, one-to-one assignment, re-scoring) and tuning. `tpas ensemble` / `tpas tune` drive it from a YAML config."""

from .config import EnsembleConfig, load_config
from .fusion import FUSIONS, FuseSpec, fuse
from .normalize import NORMALIZERS, normalize
from .pipeline import run_ensemble

__all__ = ["FUSIONS", "NORMALIZERS", "EnsembleConfig", "FuseSpec", "fuse", "load_config", "normalize", "run_ensemble"]
