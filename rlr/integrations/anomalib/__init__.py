"""RLR inside anomalib: an ``AnomalibModule`` trained, tested and exported by anomalib's Engine (docs/anomalib.md).

    from anomalib.data import Folder, MVTecAD
    from anomalib.engine import Engine
    from rlr.integrations.anomalib import RLR, UnifiedDataModule

    model = RLR(backbone="tf_efficientnet_lite0", recipe="fast")       # any rlr setting as a keyword
    datamodule = UnifiedDataModule([MVTecAD(category="bottle"), MVTecAD(category="cable")])   # one model, two classes
    engine = Engine(max_epochs=64)
    engine.fit(model=model, datamodule=datamodule)
    engine.test(model=model, datamodule=datamodule)    # anomalib's metrics per category and their mean
    model.save_run("runs/anomalib")                     # an rlr run folder: rlr.load, rlr test, rlr export

anomalib is an optional dependency (the extra ``anomalib``); without it this import fails with one line that
names the missing package and the command that installs it.
"""
try:
    import anomalib  # noqa: F401 - the check: the rest of the package imports it freely
    import lightning  # noqa: F401
except ImportError as err:
    raise ImportError(f"rlr.integrations.anomalib needs the package {err.name or 'anomalib'!r}, which is not installed: "
                      f"pip install \"rlr[anomalib]\" (anomalib 2.7 or later)") from None

from .components import RLRPostProcessor, RLRPreProcessor, RLRResize, UnifiedEvaluator
from .data import ClassBalancedSampler, UnifiedDataModule
from .model import RLR, RLRInferenceModel

__all__ = ["RLR", "ClassBalancedSampler", "RLRInferenceModel", "RLRPostProcessor", "RLRPreProcessor", "RLRResize",
           "UnifiedDataModule", "UnifiedEvaluator"]
