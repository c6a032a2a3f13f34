"""Isotropic ConvNeXt as published by facebookresearch/ConvNeXt (models/convnext_isotropic.py),
written independently from its paper and key layout, as the ground truth for the gd twin."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class ChannelsLastLayerNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class Block(nn.Module):
    def __init__(self, dim, layer_scale_init_value=0.0):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = ChannelsLastLayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim)) if layer_scale_init_value > 0 else None

    def forward(self, x):
        inp = x
        x = self.dwconv(x).permute(0, 2, 3, 1)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        return inp + x.permute(0, 3, 1, 2)


class ConvNeXtIsotropic(nn.Module):
    def __init__(self, in_chans=3, num_classes=1000, depth=18, dim=384, layer_scale_init_value=0.0):
        super().__init__()
        self.stem = nn.Conv2d(in_chans, dim, kernel_size=16, stride=16)
        self.blocks = nn.Sequential(*[Block(dim, layer_scale_init_value) for _ in range(depth)])
        self.norm = ChannelsLastLayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.normal_(m.bias, std=0.02)  # non-zero, so a wrong bias mapping shows
        for n, p in self.named_parameters():
            if n.endswith("norm.weight") or n.endswith("gamma"):
                nn.init.normal_(p, mean=1.0, std=0.1)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.head(self.norm(x.mean([-2, -1])))
