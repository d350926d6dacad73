"""ONNX export with ai.adntn generator nodes (of a model, or of a checkpoint file), and reading such files back."""

from adntn_deploy.onnx_export.exporter import DEFAULT_OPSET, ExportError, ExportResult, export_onnx, to_standard_ops
from adntn_deploy.onnx_export.from_checkpoint import export_checkpoint
from adntn_deploy.onnx_export.schema import DOMAIN, DOMAIN_VERSION, FAMILY_OPS, register_schemas

__all__ = [
    "DEFAULT_OPSET", "DOMAIN", "DOMAIN_VERSION", "ExportError", "ExportResult", "FAMILY_OPS", "export_checkpoint", "export_onnx",
    "register_schemas", "to_standard_ops",
]
