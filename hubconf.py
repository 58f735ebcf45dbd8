"""torch.hub entry points of this repository.

    torch.hub.load("<this repo>", "dinov2_vits14", source="local", weights="path/or/url.pth")  # released sizes
    torch.hub.load("<this repo>", "dinov2_export", source="local", model_json="data/pretrain/export/model.json")

The released-size constructors take the official hub's names and arguments (``pretrained``, ``weights``: Meta's
LVD-142M checkpoint by default, or any official-format state dict); ``dinov2_export`` rebuilds a backbone this
pipeline exported, whatever its size, from the ``model.json`` written beside its weights.
"""

from dinov2_core.hub import (
    dinov2_vitb14,
    dinov2_vitb14_reg,
    dinov2_vitg14,
    dinov2_vitg14_reg,
    dinov2_vitl14,
    dinov2_vitl14_reg,
    dinov2_vits14,
    dinov2_vits14_reg,
    load_export,
)

dependencies = ["torch"]


def dinov2_export(model_json: str, name: str = "teacher_backbone.pth"):
    """A backbone exported by the pretrain/adapt/distill stages (``name``: e.g. ``student_backbone.pth``)."""
    return load_export(model_json, name)


__all__ = ["dinov2_export", "dinov2_vitb14", "dinov2_vitb14_reg", "dinov2_vitg14", "dinov2_vitg14_reg",
           "dinov2_vitl14", "dinov2_vitl14_reg", "dinov2_vits14", "dinov2_vits14_reg"]
