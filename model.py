"""The networks.

ChessEvaluator: the MLP of the reference project. Input is the packed 101-byte position (uint8); the
808 bits are unpacked inside forward, on the model's device, so the host never builds float32
features and torch.compile can fuse the unpacking with the first layer.
"""

import torch
from torch import nn

from chessdata.encoding import NUM_BITS, unpack_bits


class ChessEvaluator(nn.Module):
    """`depth` hidden Linear(width)+ReLU blocks, then Linear(width, 1): the eval in pawns, White's view."""

    block_types = (nn.Linear,)  # FSDP shards each of these as its own unit

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


# ---------------------------------------------------------------- discrete VAE over the 64 squares

NUM_SQUARE_TOKENS = 13  # empty + the 12 pieces (encoding.board_tokens)
MASK_TOKEN = NUM_SQUARE_TOKENS  # the encoder's extra input token for masked squares


class MixerBlock(nn.Module):
    """MLP-mixer block (Tolstikhin et al. 2021): an MLP across positions (per channel), then an MLP across
    channels (per position), each pre-normed and residual. On a fixed 8x8 grid the position MLP learns the
    board's geometry directly, and it costs far less than attention at these sizes."""

    def __init__(self, positions: int, width: int, expansion: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mix_positions = nn.Sequential(
            nn.Linear(positions, expansion * positions), nn.GELU(), nn.Linear(expansion * positions, positions)
        )
        self.mix_channels = nn.Sequential(
            nn.Linear(width, expansion * width), nn.GELU(), nn.Linear(expansion * width, width)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, positions, width)
        x = x + self.mix_positions(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.mix_channels(self.norm2(x))


class DiscreteVAE(nn.Module):
    """A DALL-E style discrete VAE for boards given as 64 square tokens, built from MLP-mixer blocks.

    encode: each square's token embedding plus a learned embedding of the square, `depth` mixer blocks
    over the 64 squares, then N learned latent queries pool them (each query a learned weighting of
    the 64 squares, per channel), a mixer block over the N latents, and logits over a shared codebook
    of C entries per latent.
    decode: the codes (one-hot, soft or in between) pick codebook vectors, plus a learned embedding per
    latent; a mixer block over the latents, 64 learned square queries spread them back onto the board,
    `depth` mixer blocks, and the 13-way token of every square.
    Quantisation sits between the two (losses.quantize), passed in by the training step.
    """

    tokens_per_sample = 64  # for tokens/s
    block_types = (MixerBlock,)  # FSDP shards each of these as its own unit

    def __init__(self, latents: int = 32, codebook: int = 64, width: int = 32, depth: int = 2):
        super().__init__()
        self.latents, self.codebook_size = latents, codebook
        self.token_embedding = nn.Embedding(NUM_SQUARE_TOKENS + 1, width)
        self.square_embedding = nn.Parameter(torch.randn(64, width) * 0.02)
        self.encoder = nn.Sequential(*[MixerBlock(64, width) for _ in range(depth)])
        self.latent_queries = nn.Linear(64, latents)  # pools 64 squares into N latents
        self.latent_encoder = MixerBlock(latents, width)
        self.to_code_logits = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, codebook))
        self.codebook = nn.Linear(codebook, width, bias=False)  # codes @ codebook vectors (works for soft codes)
        # Unit-scale code vectors: at the default 1/sqrt(C) scale a code barely moves the decoder and the
        # gradient reaching the logits (already divided by about C through the softmax) vanishes.
        nn.init.normal_(self.codebook.weight, std=1.0)
        self.latent_embedding = nn.Parameter(torch.randn(latents, width) * 0.02)
        self.latent_decoder = MixerBlock(latents, width)
        self.square_queries = nn.Linear(latents, 64)  # spreads N latents back onto 64 squares
        self.decoder = nn.Sequential(*[MixerBlock(64, width) for _ in range(depth)])
        self.to_token_logits = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, NUM_SQUARE_TOKENS))

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 64) tokens in 0..13 (13 = masked) -> (B, latents, codebook) logits."""
        squares = self.encoder(self.token_embedding(tokens) + self.square_embedding)
        latents = self.latent_queries(squares.transpose(1, 2)).transpose(1, 2)
        return self.to_code_logits(self.latent_encoder(latents))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(B, latents, codebook) codes -> (B, 64, 13) token logits."""
        latents = self.latent_decoder(self.codebook(codes.to(self.codebook.weight.dtype)) + self.latent_embedding)
        squares = self.square_queries(latents.transpose(1, 2)).transpose(1, 2)
        return self.to_token_logits(self.decoder(squares))

    def forward(self, tokens: torch.Tensor, quantize=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens -> (token logits, code logits, the one-hot codes sampled). `quantize(code_logits)`
        returns (codes for the decoder, one-hot sample); unset = the argmax code (evaluation). Both go
        through forward so that Fabric's wrappers (DDP, precision) see the whole step."""
        code_logits = self.encode(tokens)
        if quantize is None:
            codes = nn.functional.one_hot(code_logits.argmax(-1), self.codebook_size).to(code_logits.dtype)
            sample = codes
        else:
            codes, sample = quantize(code_logits)
        return self.decode(codes), code_logits, sample
