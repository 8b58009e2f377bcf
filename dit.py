"""The Diffusion Transformer (Peebles & Xie, 2023): patches in, the prediction (noise, v or x_0) out."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x, shift, scale):
    return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1))  # x * (1 + scale) + shift in one pass


class TimestepEmbedder(nn.Module):
    """Sinusoidal embedding of the diffusion step followed by an MLP."""

    def __init__(self, dim, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def sinusoid(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]  # (N, half)
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, dim % 2))  # (N, dim)

    def forward(self, t):
        return self.mlp(self.sinusoid(t, self.freq_dim))


class LabelEmbedder(nn.Module):
    """Label table; with dropout > 0 it has one extra 'null' row for classifier-free guidance."""

    def __init__(self, num_labels, dim, dropout):
        super().__init__()
        self.dropout = dropout
        self.null_label = num_labels if dropout > 0 else None
        self.table = nn.Embedding(num_labels + (dropout > 0), dim)

    def forward(self, y):
        if self.training and self.dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < self.dropout
            y = torch.where(drop, torch.full_like(y, self.null_label), y)
        return self.table(y)


# Sequences up to this many tokens take the plain-matmul attention on a CPU (Attention.forward): in fp32,
# and longer ones in bf16, where SDPA's CPU kernel (its backward above all) is the slower (docs/experiments.md).
SHORT = {torch.float32: 128, torch.bfloat16: 576}


class Attention(nn.Module):
    """Multi-head self-attention: fused qkv, then SDPA (plain matmuls for a short sequence on a CPU)."""

    def __init__(self, dim, num_heads, head_dim):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim)
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x):
        N, T, _ = x.shape
        # unbind(2) then transpose, not permute + qkv[0..2]: backward then stacks the three gradients
        # (which SDPA returns stored as (N, T, H, d)) straight into the (N, T, 3, H, d) layout in one
        # copy, where indexing zero-fills and adds three full-size buffers and reshapes once more
        qkv = self.qkv(x).view(N, T, 3, self.num_heads, self.head_dim)  # (N, T, 3, H, d)
        q, k, v = (a.transpose(1, 2) for a in qkv.unbind(2))  # (N, H, T, d) each
        if x.device.type == "cpu" and T <= SHORT.get(q.dtype, 0):
            # two plain matmuls and a softmax (the T x T scores are small at these lengths)
            x = ((q * self.head_dim ** -0.5) @ k.transpose(-2, -1)).softmax(-1) @ v  # (N, H, T, d)
        else:
            x = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, d), scale 1/sqrt(d), stored as (N, T, H, d)
        return self.proj(x.transpose(1, 2).reshape(N, T, -1))  # (N, T, D)


ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}  # the MLP's, by config.CHOICES["mlp_act"] name


class DiTBlock(nn.Module):
    """Attention + MLP, each pre-normed, shifted/scaled (beta/gamma) and gated (alpha) by the condition."""

    def __init__(self, dim, num_heads, head_dim, mlp_ratio, mlp_act="gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        # exact (erf) GELU: as good as DiT's tanh form and cheaper on a CPU; ReLU cheaper still (docs/experiments.md)
        if mlp_act not in ACTIVATIONS:  # config.check_config refuses it for training; this guards a checkpoint
            raise ValueError(f"mlp_act must be one of {', '.join(ACTIVATIONS)}, got {mlp_act}")
        act = ACTIVATIONS[mlp_act]()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), act, nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))  # one fused projection

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        # x + gate * f(x) in one pass
        x = torch.addcmul(x, gate_msa.unsqueeze(1), self.attn(modulate(self.norm1(x), shift_msa, scale_msa)))
        x = torch.addcmul(x, gate_mlp.unsqueeze(1), self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm and a linear map from each token to its patch of the prediction."""

    def __init__(self, dim, patch_size, out_channels):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """Diffusion model with a Transformer backbone: DiT(x_t, t, y) predicts eps (as described), v or x_0."""

    def __init__(self, image_size=64, patch_size=4, in_channels=3, emb_dim=64, depth=3, num_heads=6,
                 head_dim=64, mlp_ratio=4.0, freq_dim=256, num_labels=1, label_dropout=0.0, adaln_zero=True,
                 mlp_act="gelu", route_ratio=0.0, route_start=1, route_end=-1):
        super().__init__()
        self.in_channels, self.patch_size = in_channels, patch_size
        self.grid = image_size // patch_size
        # token routing (TREAD): no weights of its own, so a run may resume with it on or off
        self.route_ratio, self.route_start = route_ratio, route_start
        self.route_end = route_end if route_end >= 0 else depth + route_end  # negative counts from the end
        if route_ratio > 0 and not 0 <= route_start < self.route_end <= depth:  # check_config refuses it for training
            raise ValueError(f"routing needs 0 <= route_start < route_end <= depth={depth}, got {route_start}, {route_end}")
        self.x_embedder = nn.Conv2d(in_channels, emb_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid * self.grid, emb_dim))  # learnable
        self.t_embedder = TimestepEmbedder(emb_dim, freq_dim)
        self.y_embedder = LabelEmbedder(num_labels, emb_dim, label_dropout)
        self.blocks = nn.ModuleList([DiTBlock(emb_dim, num_heads, head_dim, mlp_ratio, mlp_act) for _ in range(depth)])
        self.final_layer = FinalLayer(emb_dim, patch_size, in_channels)
        self.initialize_weights(adaln_zero)

    @classmethod
    def from_config(cls, cfg):
        return cls(cfg.image_size, cfg.patch_size, cfg.in_channels, cfg.emb_dim, cfg.depth, cfg.num_heads,
                   cfg.head_dim, cfg.mlp_ratio, cfg.freq_dim, cfg.num_labels, cfg.label_dropout, cfg.adaln_zero,
                   cfg.mlp_act, cfg.route_ratio, cfg.route_start, cfg.route_end)

    @property
    def null_label(self):
        return self.y_embedder.null_label

    def initialize_weights(self, adaln_zero):
        # Start the learnable position embedding at 2-D sin-cos values: the model knows where
        # each patch is from step 0 instead of having to discover it.
        self.pos_embed.data.copy_(sincos_2d(self.pos_embed.shape[-1], self.grid).unsqueeze(0))
        nn.init.normal_(self.y_embedder.table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if not adaln_zero:
            return  # the description's model: PyTorch's default init everywhere else
        for module in self.modules():  # Xavier for every linear, as in ViT
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight.data  # the patch embedding is a linear map over a flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)  # again: the Xavier loop overwrote them
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Zero-out adaLN modulation so every block starts as the identity (adaLN-Zero) and
        # zero-out the output layer so the first prediction is 0: stable from step 0 at high lr.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def patchify(self, x):
        """(N, C, H, W) -> (N, T, p*p*C), the inverse of unpatchify."""
        N, C, H, W = x.shape
        p, g = self.patch_size, H // self.patch_size
        x = x.reshape(N, C, g, p, g, p).permute(0, 2, 4, 3, 5, 1)  # (N, g, g, p, p, C)
        return x.reshape(N, g * g, p * p * C)

    def unpatchify(self, x):
        """(N, T, p*p*C) -> (N, C, H, W)."""
        N, C, p, g = x.shape[0], self.in_channels, self.patch_size, self.grid
        x = x.reshape(N, g, g, p, p, C).permute(0, 5, 1, 3, 2, 4)  # (N, C, g, p, g, p)
        return x.reshape(N, C, g * p, g * p)

    def forward(self, x, t, y):
        # pos_embed first: the sum then takes its (N, T, D) memory order; `conv + pos_embed` would keep
        # the conv's (N, D, T) order, and every LayerNorm and Linear after it would copy or stride
        x = self.pos_embed + self.x_embedder(x).flatten(2).transpose(1, 2)  # (N, T, D), contiguous
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        start, end = self.route_span()  # the blocks routed tokens skip; (0, 0): none
        for block in self.blocks[:start]:
            x = block(x, c)  # (N, T, D)
        x = self.routed(self.blocks[start:end], x, c)  # (N, T, D)
        for block in self.blocks[end:]:
            x = block(x, c)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C)
        return self.unpatchify(x)  # (N, C, H, W)

    def route_span(self):
        """Blocks [start, end) that routed tokens skip: in training with route_ratio > 0, else none."""
        return (self.route_start, self.route_end) if self.training and self.route_ratio > 0 else (0, 0)

    def routed(self, blocks, x, c):
        """Run blocks on a random round(T * (1 - route_ratio)) tokens per image; the rest skip them unchanged."""
        if not blocks:  # no draw from the RNG: without routing a run is bit-identical to one without the feature
            return x
        N, T, D = x.shape
        keep = round(T * (1 - self.route_ratio))
        idx = torch.rand(N, T, device=x.device).argsort(dim=1)[:, :keep, None].expand(N, keep, D)  # (N, K, D)
        kept = x.gather(1, idx)  # (N, K, D), position embedding included: each token still knows its place
        for block in blocks:
            kept = block(kept, c)  # (N, K, D)
        return x.scatter(1, idx, kept)  # (N, T, D): kept tokens processed, routed ones as they left


def sincos_2d(dim, grid):
    """(grid*grid, dim) fixed 2-D sin-cos position codes: half the channels for rows, half for columns."""
    coords = torch.arange(grid, dtype=torch.float32)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32) / max(quarter, 1))
    parts = [f(pos.reshape(-1, 1) * omega) for pos in (rows, cols) for f in (torch.sin, torch.cos)]
    return F.pad(torch.cat(parts, dim=1), (0, dim - 4 * quarter))
