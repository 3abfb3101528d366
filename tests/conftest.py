import os

import torch

# The Triton kernels run on CPU tensors only through Triton's interpreter, which must be
# switched on before triton is imported. On a GPU machine the real compiler is used.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long tests, excluded from the default run (-m 'not slow')")
    config.addinivalue_line("markers", "gpu: needs a CUDA device")
    config.addinivalue_line("markers", "timm: needs timm (and so torchvision): deselected by tools/old_versions.sh")
