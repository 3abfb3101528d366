"""``python tests/_ddp_worker.py ARGS`` = ``rlr ARGS``, with one rank failing on purpose.

RLR_TEST_FAIL="RANK:STEPS:exit" ends rank RANK abruptly (os._exit) at its training step STEPS + 1;
"RANK:STEPS:hang" makes it stall there instead. The tests of rlr/distributed.py use it to stand
for a GPU or machine that dies mid-epoch.
"""
import os
import sys
import time

import rlr.train
from rlr.cli import main

rank, steps, how = os.environ["RLR_TEST_FAIL"].split(":")
if int(os.environ.get("RANK", "0")) == int(rank):
    real_loss = rlr.train.reconstruction_loss
    calls = [0]
    levels = int(os.environ.get("RLR_TEST_LEVELS", "2"))   # reconstruction_loss runs once per level per step

    def failing_loss(*args):
        calls[0] += 1
        if calls[0] > int(steps) * levels:
            if how == "exit":
                os._exit(17)
            time.sleep(3600)
        return real_loss(*args)

    rlr.train.reconstruction_loss = failing_loss
sys.exit(main(sys.argv[1:]))
