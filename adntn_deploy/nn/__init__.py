"""PyTorch layers with generated weights. Imports nothing from the deployment side (ONNX, TVM, serving)."""

from adntn_deploy.nn.generated import GeneratedWeight
from adntn_deploy.nn.layers import ADNTNConv2d, ADNTNLinear, ADNTNMultiheadAttention

__all__ = ["ADNTNConv2d", "ADNTNLinear", "ADNTNMultiheadAttention", "GeneratedWeight", "generated_layers"]


def generated_layers(model):
    """Yield ``(layer_name, generated_weight)`` for every GeneratedWeight in ``model``, named by its owning layer."""
    for name, module in model.named_modules():
        if isinstance(module, GeneratedWeight):
            # a generated layer exported on its own is the root: its generator is "weight_generator"
            yield ("" if name == "weight_generator" else name.rsplit(".weight_generator", 1)[0]), module
