"""TVM stage: device profiles, compilation to artifacts, and the TVM runtime predictor.

This is the only package that imports tvm, and only inside functions (``import tvm`` takes seconds and
pulls in torch): importing ``adntn_deploy.compiler`` itself is cheap.
"""
