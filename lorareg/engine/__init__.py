"""lorareg.engine: pure-torch math for porting LoRA adapters between base models.

Top-k singular bases (:mod:`.bases`), their subspace similarity (:mod:`.similarity`), low-rank
factor arithmetic (:mod:`.lowrank`), a content-addressed basis cache (:mod:`.cache`) and the
projection methods (:mod:`.methods`). Nothing here imports the rest of lorareg.
"""

from .bases import BASES_VERSION, Basis, default_k, top_k, top_k_batched
from .cache import BasisCache, BasisKey, default_cache_root, weight_digest
from .lowrank import diff_energy, energy, recompress, relative_error
from .methods import (
    DEFAULT_METHOD,
    DEFAULT_MISMATCH_METHOD,
    DEFAULT_PROJECTION,
    METHODS,
    MissingBasisError,
    PortError,
    Projection,
    ShapeMismatchError,
    get_method,
)
from .similarity import subspace_similarity

__all__ = [
    "BASES_VERSION",
    "Basis",
    "BasisCache",
    "BasisKey",
    "DEFAULT_METHOD",
    "DEFAULT_MISMATCH_METHOD",
    "DEFAULT_PROJECTION",
    "METHODS",
    "MissingBasisError",
    "PortError",
    "Projection",
    "ShapeMismatchError",
    "default_cache_root",
    "default_k",
    "diff_energy",
    "energy",
    "get_method",
    "recompress",
    "relative_error",
    "subspace_similarity",
    "top_k",
    "top_k_batched",
    "weight_digest",
]
