"""The naive reference DiT: the same network, weights and FLOPs as dit.DiT, written as the reference
implementation wrote it (explicit softmax(QK^T/sqrt(d))V with the full T x T matrix, separate q/k/v
and modulation layers). bench.py measures dit.DiT against it; tests check that both compute the same.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from dit import DiT


def naive_modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class NaiveAttention(nn.Module):
    """Separate q/k/v maps and an explicit (N, H, T, T) softmax(QK^T / sqrt(d)) in memory."""

    def __init__(self, dim, num_heads, head_dim):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q, self.k, self.v = (nn.Linear(dim, num_heads * head_dim) for _ in range(3))
        self.proj = nn.Linear(num_heads * head_dim, dim)

    def forward(self, x):
        N, T, _ = x.shape
        q, k, v = (f(x).view(N, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for f in (self.q, self.k, self.v))  # (N, H, T, d) each
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.head_dim), dim=-1)  # (N, H, T, T)
        return self.proj((attn @ v).transpose(1, 2).reshape(N, T, -1))  # (N, T, D)


class NaiveDiTBlock(nn.Module):
    """A DiT block with one Linear per modulation parameter (alpha/beta/gamma) instead of one fused map."""

    def __init__(self, dim, num_heads, head_dim, hidden, act):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = NaiveAttention(dim, num_heads, head_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), act, nn.Linear(hidden, dim))
        self.modulation = nn.ModuleList([nn.Linear(dim, dim) for _ in range(6)])

    def forward(self, x, c):
        c = F.silu(c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (m(c) for m in self.modulation)
        x = x + gate_msa.unsqueeze(1) * self.attn(naive_modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(naive_modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class NaiveFinalLayer(nn.Module):
    """Final layer with separate shift and scale maps."""

    def __init__(self, dim, out_features):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, out_features)
        self.modulation = nn.ModuleList([nn.Linear(dim, dim) for _ in range(2)])

    def forward(self, x, c):
        shift, scale = (m(F.silu(c)) for m in self.modulation)
        return self.linear(naive_modulate(self.norm(x), shift, scale))


class NaiveDiT(DiT):
    """DiT as first written: naive blocks and final layer, and the token stream left in the conv's
    (N, D, T) memory order by `embedding + pos_embed` (as in the original DiT code and this repo
    before its speed work). Load a DiT's weights with naive_state_dict()."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        dim, attn, mlp = self.pos_embed.shape[-1], self.blocks[0].attn, self.blocks[0].mlp
        self.blocks = nn.ModuleList([NaiveDiTBlock(dim, attn.num_heads, attn.head_dim, mlp[0].out_features, type(mlp[1])())
                                     for _ in self.blocks])
        self.final_layer = NaiveFinalLayer(dim, self.final_layer.linear.out_features)

    def forward(self, x, t, y):
        x = self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # (N, T, D), strided as (N, D, T)
        c = self.t_embedder(t) + self.y_embedder(y)  # (N, D)
        for block in self.blocks:
            x = block(x, c)  # (N, T, D)
        return self.unpatchify(self.final_layer(x, c))  # (N, C, H, W)


def naive_state_dict(fast_state):
    """Split a DiT state dict's fused qkv and adaLN weights into NaiveDiT's separate layers."""
    out = {}
    for key, value in fast_state.items():
        prefix, _, leaf = key.rpartition(".")  # leaf: weight or bias
        if prefix.endswith("attn.qkv"):
            names = [prefix[:-3] + n for n in "qkv"]
        elif prefix.endswith("adaLN_modulation.1"):
            base = prefix[:-len("adaLN_modulation.1")]
            names = [f"{base}modulation.{j}" for j in range(6 if key.startswith("blocks.") else 2)]
        else:
            out[key] = value
            continue
        out.update({f"{name}.{leaf}": part for name, part in zip(names, value.chunk(len(names)))})
    return out


def naive_from(cfg, fast):
    """A NaiveDiT built from the same config, computing exactly what `fast` computes."""
    naive = NaiveDiT.from_config(cfg)
    naive.load_state_dict(naive_state_dict(fast.state_dict()))
    return naive.to(next(fast.parameters()).device)
