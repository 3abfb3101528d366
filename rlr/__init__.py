"""rlr: RLR (ECCV 2024) unified multi-class anomaly detection on fused attention kernels.

    det = rlr.load("runs/mvtec")                   # a trained run, ready to score images
    result = det.predict("image.png")              # .score .label .normalized_score .anomaly_map
    from rlr import RLRModel, RLRConfig, load_official_checkpoint

Imports are lazy so that ``import rlr`` stays cheap for the command line.
"""
__version__ = "0.1.0"

_EXPORTS = {
    "RLRModel": "rlr.model",
    "RLRConfig": "rlr.config",
    "load_official_checkpoint": "rlr.original",
    "load": "rlr.inference",
    "Detector": "rlr.inference",
    "Prediction": "rlr.inference",
}

__all__ = list(_EXPORTS) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rlr' has no attribute {name!r}")


def __dir__():
    return sorted(__all__)
