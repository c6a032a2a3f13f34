"""timm-optdnn: OptDNN (optimization-inspired) vision backbones for timm.

`import timm_optdnn` registers the `optdnn_*` models, so `timm.create_model` finds them. The library is `models`,
`pretrained` (checked weight loading), `flops` and `data` (FFCV, the `[data]` extra); the trainer and its tools live
in `timm_optdnn.training` (the `[train]` extra), which the library never imports.
"""
from .models import SCHEMES, OptDNNConvNeXtIsotropic, OptDNNVisionTransformer, SchemeBlocks

__version__ = "0.1.0"
