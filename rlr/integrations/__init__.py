"""Optional bridges from rlr to other libraries.

Each bridge imports its library only when it is itself imported (``import rlr`` imports none of them):

    rlr.integrations.anomalib    RLR as an anomalib model, trained and tested by anomalib's Engine
                                 (`pip install "rlr[anomalib]"`; docs/anomalib.md)
"""
