"""PyTorch twin of the registry UNet (:func:`bonemets_tf.models.unet.unet`), for the
training-step comparison only.

Layer for layer the same network: HU window (level 500, width 2000, clip to [0, 1]) ->
pad to a multiple of 8 -> per encoder level two Conv3x3(no bias)-BN-ReLU then 2x2 max
pool (64, 128, 256) -> bridge of two Conv-BN-ReLU (512) -> per decoder level a 2x2
stride-2 transposed conv (with bias), concat [up, skip] and one Conv-BN-ReLU -> 1x1 conv
(with bias) -> sigmoid -> crop. BatchNorm uses Keras's defaults (eps 1e-3, momentum
0.99, i.e. PyTorch momentum 0.01). Layout is channels-first ``(batch, context, rows, cols)``.
:func:`keras_style_param_count` counts parameters the way ``keras.Model.count_params``
does (BN moving mean/variance included) so the benchmark can assert equal sizes.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from unet_flops import FILTERS

LEVEL, WIDTH = 500.0, 2000.0


class ConvBNReLU(nn.Sequential):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                         nn.BatchNorm2d(cout, eps=1e-3, momentum=0.01), nn.ReLU(inplace=True))


class TorchUNet(nn.Module):
    """Input ``(batch, context, rows, cols)`` HU; output ``(batch, 1, rows, cols)`` probability."""

    def __init__(self, context: int = 1, filters: tuple[int, ...] = FILTERS) -> None:
        super().__init__()
        self.stride = 2 ** (len(filters) - 1)
        self.enc = nn.ModuleList()
        cin = context
        for n in filters[:-1]:
            self.enc.append(nn.Sequential(ConvBNReLU(cin, n), ConvBNReLU(n, n)))
            cin = n
        self.bridge = nn.Sequential(ConvBNReLU(cin, filters[-1]), ConvBNReLU(filters[-1], filters[-1]))
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        cin = filters[-1]
        for n in reversed(filters[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, n, 2, stride=2))
            self.dec.append(ConvBNReLU(2 * n, n))
            cin = n
        self.logit = nn.Conv2d(cin, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = x.shape[-2:]
        x = torch.clamp((x - (LEVEL - WIDTH / 2)) / WIDTH, 0.0, 1.0)
        pr, pc = (-rows) % self.stride, (-cols) % self.stride
        if pr or pc:
            x = F.pad(x, (0, pc, 0, pr))
        skips = []
        for block in self.enc:
            x = block(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = self.bridge(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = dec(torch.cat([up(x), skip], dim=1))
        return torch.sigmoid(self.logit(x).float())[..., :rows, :cols]


def keras_style_param_count(model: nn.Module) -> int:
    """Parameters plus BN running mean/variance (what Keras's ``count_params`` counts)."""
    bn = sum(m.running_mean.numel() + m.running_var.numel() for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    return sum(p.numel() for p in model.parameters()) + bn


def dice_bce_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0, eps: float = 1e-7) -> torch.Tensor:
    """Same loss as ``bonemets_tf.losses.DiceBCELoss``: per-sample BCE + 1 - soft Dice, batch mean."""
    p = pred.float().clamp(eps, 1 - eps)
    dims = tuple(range(1, p.ndim))
    bce = -(target * p.log() + (1 - target) * (1 - p).log()).mean(dim=dims)
    inter = (target * p).sum(dim=dims)
    dice = (2 * inter + smooth) / (target.sum(dim=dims) + p.sum(dim=dims) + smooth)
    return (bce + 1 - dice).mean()
