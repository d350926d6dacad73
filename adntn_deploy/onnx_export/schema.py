"""The ``ai.adntn`` operator domain: one op per generator family, registered with onnx.defs.

Every op takes the cores (initializers, in the IR's core order) and produces the weight. Attributes:
``program`` (the generator IR as JSON, so compilers can rebuild it without reading the function body),
``weight_shape`` (ints) and ``family``. Each node also carries a model-local function body of standard
ONNX ops (selected by the node's ``overload``, one per generated layer) that replays the program, which is
how stock ONNX Runtime and the TVM importer run it.
"""

from __future__ import annotations

DOMAIN = "ai.adntn"
DOMAIN_VERSION = 1
#: generator family -> op type in the ai.adntn domain
FAMILY_OPS = {"ttn": "TTN", "attn": "ATTN", "mera": "MERA"}
OP_FAMILIES = {op: family for family, op in FAMILY_OPS.items()}
#: metadata_props key holding {weight tensor name: generator summary} in every exported model
METADATA_KEY = "adntn.generators"
#: metadata of a file whose generated layers were rewritten to run from their factors (export --stream):
#: {"format": STREAM_FORMAT, "writer": version, "layers": [...]}; readers refuse a newer format
STREAM_METADATA_KEY = "adntn.stream"
STREAM_FORMAT = 1

_registered = False


def register_schemas() -> None:
    """Register the ai.adntn op schemas with onnx.defs (idempotent), so checkers know the ops."""
    global _registered
    if _registered:
        return
    from onnx import defs

    for op in FAMILY_OPS.values():
        if defs.has(op, DOMAIN):
            continue
        schema = defs.OpSchema(
            op,
            DOMAIN,
            DOMAIN_VERSION,
            doc=f"Generate a weight from the cores of a {op} tensor network (adntn-deploy generator IR).",
            inputs=[
                defs.OpSchema.FormalParameter(
                    "cores", "T", "cores in the program's order",
                    param_option=defs.OpSchema.FormalParameterOption.Variadic, is_homogeneous=True, min_arity=1,
                )
            ],
            outputs=[defs.OpSchema.FormalParameter("weight", "T", "the generated weight")],
            type_constraints=[("T", ["tensor(float)"], "float32 cores and weight")],
            attributes=[
                defs.OpSchema.Attribute("program", defs.OpSchema.AttrType.STRING, "generator IR (JSON)", required=True),
                defs.OpSchema.Attribute("weight_shape", defs.OpSchema.AttrType.INTS, "shape of the weight", required=True),
                defs.OpSchema.Attribute("family", defs.OpSchema.AttrType.STRING, "ttn, attn or mera", required=True),
            ],
        )
        defs.register_schema(schema)
    _registered = True
