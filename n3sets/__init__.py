"""n3sets: the continuous KNN relaxation and N3 blocks over point sets (Ploetz & Roth, 2018).

Public names are resolved lazily from their modules so that importing :mod:`n3sets` stays
cheap and each module can be used on its own.
"""
import importlib

_EXPORTS = {
    # relaxation and blocks
    "continuous_knn": "n3sets.knn",
    "hard_knn": "n3sets.knn",
    "N3Block": "n3sets.n3block",
    "HardKNNBlock": "n3sets.n3block",
    "to_dense_sets": "n3sets.batching",
    # correspondence models
    "CNNet": "n3sets.models",
    "N3Net": "n3sets.models",
    "context_norm": "n3sets.layers",
    "MaskedBatchNorm1d": "n3sets.layers",
    "neighbour_volumes": "n3sets.engine",
    "GlobalCandidates": "n3sets.engine",
    "IndexedCandidates": "n3sets.engine",
    "BlockedCandidates": "n3sets.engine",
    "model_inputs": "n3sets.models",
    "logits_to_weights": "n3sets.essential",
    "balanced_bce": "n3sets.losses",
    "essential_loss": "n3sets.losses",
    "available_models": "n3sets.pretrained",
    # geometry, losses, metrics
    "symmetric_epipolar_distance": "n3sets.geometry",
    "essential_from_pose": "n3sets.geometry",
    "relative_pose": "n3sets.geometry",
    "normalize_keypoints": "n3sets.geometry",
    "skew": "n3sets.geometry",
    "weighted_eight_point": "n3sets.essential",
    "mean_average_precision": "n3sets.metrics",
    "classification_metrics": "n3sets.metrics",
    "recover_pose": "n3sets.pose",
    "pose_error": "n3sets.pose",
    "estimate_essential": "n3sets.robust",
    "evaluate_correspondences": "n3sets.evaluation",
    # weights and the user-facing API
    "load_model": "n3sets.pretrained",
    "save_model": "n3sets.pretrained",
    "MatchFilter": "n3sets.match_filter",
    "FilterResult": "n3sets.match_filter",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'n3sets' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
