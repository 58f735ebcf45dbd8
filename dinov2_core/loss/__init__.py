"""DINOv2 losses: DINO (image level), iBOT (patch level), KoLeo (regulariser). torch.distributed is optional."""

from ._dist import sinkhorn_knopp
from .dino_clstoken_loss import DINOLoss
from .ibot_patch_loss import iBOTPatchLoss
from .koleo_loss import KoLeoLoss

__all__ = ["DINOLoss", "KoLeoLoss", "iBOTPatchLoss", "sinkhorn_knopp"]
