"""adntn-deploy: tensor-network generated layers, from PyTorch to devices."""

__version__ = "0.1.0"
