"""Shared helpers of the pipeline tests: a tiny generated data set and a tiny, fast configuration."""
from rlr.config import RLRConfig

# Random backbone weights (tests only), 64 px images -> 8x8 and 4x4 token grids, a narrow model.
TINY_SETTINGS = dict(backbone="tf_efficientnet_lite0", backbone_weights="random", input_size=64, heads=2, layers=1,
                     d_models=(16, 32), windows={8: 3, 4: 3}, batch_size=4, epochs=2, lr=1e-3, backend="reference")


def tiny_config(**overrides) -> RLRConfig:
    return RLRConfig(**dict(TINY_SETTINGS, **overrides))


def make_dataset(root, classes=("fabric", "washer"), n_train=5, n_test_good=2, n_test_defect=3):
    from rlr.data.synthetic import generate_dataset

    return generate_dataset(root, seed=0, size=64, n_train=n_train, n_test_good=n_test_good,
                            n_test_defect=n_test_defect, classes=list(classes))
