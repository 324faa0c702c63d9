"""The networks.

ChessEvaluator: the MLP of the reference project. Input is the packed 101-byte position (uint8); the
808 bits are unpacked inside forward, on the model's device, so the host never builds float32
features and torch.compile can fuse the unpacking with the first layer.
"""

import torch
from torch import nn

from encoding import NUM_BITS, unpack_bits


class ChessEvaluator(nn.Module):
    """`depth` hidden Linear(width)+ReLU blocks, then Linear(width, 1): the eval in pawns, White's view."""

    def __init__(self, width: int = NUM_BITS, depth: int = 4):
        super().__init__()
        layers, size = [], NUM_BITS
        for _ in range(depth):
            layers += [nn.Linear(size, width), nn.ReLU()]
            size = width
        layers.append(nn.Linear(size, 1))
        self.layers = nn.Sequential(*layers)

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        features = unpack_bits(packed, dtype=self.layers[0].weight.dtype)
        return self.layers(features).squeeze(-1)
