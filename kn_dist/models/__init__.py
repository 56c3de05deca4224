"""Model zoo: one file per family, every model registered by name (see `_registry`)."""

# Importing the family modules registers their entrypoints.
from kn_dist.models import conformer, convmixer, convnext, densenet, resnet, vit  # noqa: F401
from kn_dist.models._registry import (
    ModelInfo,
    check_geometry,
    create_model,
    list_models,
    model_info,
    register_model,
)

__all__ = ["ModelInfo", "check_geometry", "create_model", "list_models", "model_info", "register_model"]
