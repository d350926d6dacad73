"""Model architectures that can be rebuilt from JSON (checkpoints never pickle code)."""

from adntn_deploy.models.sequential import LAYER_TYPES, build_sequential

__all__ = ["LAYER_TYPES", "build_sequential"]
