"""The network alone: shapes, patch bookkeeping, adaLN-Zero init, attention maths, label table."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import dit
from dit import Attention, DiT, LabelEmbedder


def tiny_dit(**kw):
    args = dict(image_size=16, patch_size=4, emb_dim=32, depth=2, num_heads=2, head_dim=16, num_labels=1)
    return DiT(**{**args, **kw})


def perturbed(model):
    """Every weight made non-trivial (adaLN-Zero would hide the blocks and zero the output)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize("kw", [
    dict(),  # the tiny preset
    dict(num_heads=6, head_dim=64),  # the description's heads: 6 x 64 on a 32-wide stream
    dict(image_size=8, patch_size=2, in_channels=1, num_heads=3, head_dim=5, num_labels=3, label_dropout=0.1),
    dict(adaln_zero=False, depth=1, mlp_ratio=2.0, freq_dim=33),
    dict(adaln_zero=False, mlp_act="relu"),
])
def test_each_prediction_depends_on_its_own_image_step_and_label(kw):
    """eps = DiT(x_t, t, y) has the image's shape (N, C, H, W) for several architectures; image i's prediction
    is what it gets alone (nothing leaks across the batch) and changes with its x_t, its t and its label."""
    model = perturbed(tiny_dit(**{"num_labels": 2, **kw}))
    C, H = kw.get("in_channels", 3), kw.get("image_size", 16)
    x, t, y = torch.randn(3, C, H, H), torch.tensor([0, 5, 99]), torch.tensor([0, 1, 0])
    with torch.no_grad():
        out = model(x, t, y)
        assert out.shape == (3, C, H, H)
        for i in range(3):
            torch.testing.assert_close(out[i:i + 1], model(x[i:i + 1], t[i:i + 1], y[i:i + 1]), atol=1e-5, rtol=1e-5)
        for changed in (model(x + 0.3 * torch.randn_like(x), t, y), model(x, t + 1, y), model(x, t, 1 - y)):
            assert ((changed - out).flatten(1).abs().mean(1) > 1e-4).all()


def test_patchify_unpatchify_round_trip_is_exact():
    """unpatchify(patchify(x)) == x bit for bit, and token k holds patch (k // g, k % g)."""
    model = tiny_dit(image_size=12, patch_size=3, in_channels=2)
    x = torch.randn(2, 2, 12, 12)
    tokens = model.patchify(x)
    assert tokens.shape == (2, 16, 3 * 3 * 2)
    assert torch.equal(model.unpatchify(tokens), x)
    row, col = 2, 1  # token 2*4+1 is the patch at rows 6:9, columns 3:6
    patch = x[:, :, 6:9, 3:6].permute(0, 2, 3, 1).reshape(2, -1)  # (N, p*p*C) in (p, p, C) order
    assert torch.equal(tokens[:, row * 4 + col], patch)


def test_adaln_zero_starts_as_zero_output_and_identity_blocks():
    """adaLN-Zero init: every block is the identity and the first prediction is exactly 0."""
    model = tiny_dit(adaln_zero=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 70]), torch.zeros(2, dtype=torch.long)
    assert torch.equal(model(x, t, y), torch.zeros_like(x))
    for layer in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1]]:
        assert not layer.weight.any() and not layer.bias.any()  # every modulation starts at zero, the output's too
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)


def test_labels_condition_the_output_after_a_few_steps():
    """adaLN-Zero starts label-blind (output 0 for every label); a few Adam steps towards a target that
    depends on the label make the predictions for the two labels move apart, each towards its own target."""
    torch.manual_seed(0)
    model = tiny_dit(num_labels=2, adaln_zero=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, t = torch.randn(8, 3, 16, 16), torch.randint(0, 1000, (8,))
    y = torch.tensor([0, 1] * 4)
    target = (0.5 - y.float()).view(-1, 1, 1, 1).expand_as(x)  # +0.5 for label 0, -0.5 for label 1
    by_label = lambda: [model(x, t, torch.full_like(y, k)).mean().item() for k in (0, 1)]  # noqa: E731
    assert by_label() == [0.0, 0.0]
    for _ in range(5):
        optimizer.zero_grad()
        (model(x, t, y) - target).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        first, second = by_label()
    assert first - second > 0.05


def test_plain_init_is_not_zero():
    """adaln_zero=False (the description's model) starts with non-trivial blocks and output."""
    model = tiny_dit(adaln_zero=False)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3, 70]), torch.zeros(2, dtype=torch.long)
    assert model(x, t, y).abs().mean() > 1e-3
    h, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    assert (model.blocks[0](h, c) - h).abs().mean() > 1e-3


@pytest.mark.parametrize("short", [0, 1000], ids=["sdpa", "plain-matmuls"])
def test_attention_matches_explicit_softmax_reference(short, monkeypatch):
    """Attention is softmax(Q K^T / sqrt(head_dim)) V per head (not / sqrt(sequence length)), on both paths:
    SDPA, and the plain matmuls a CPU takes for short sequences."""
    monkeypatch.setattr(dit, "SHORT", {torch.float32: short})
    torch.manual_seed(1)
    dim, heads, head_dim, T = 24, 3, 8, 36  # T != head_dim, so the two scalings differ
    attn = Attention(dim, heads, head_dim)
    x = torch.randn(2, T, dim)
    q, k, v = attn.qkv(x).view(2, T, 3, heads, head_dim).double().unbind(2)  # each (N, T, H, d)
    q, k, v = (a.transpose(1, 2) for a in (q, k, v))  # (N, H, T, d)

    def reference(scale):
        weights = torch.softmax(q @ k.transpose(-1, -2) / scale, dim=-1)  # (N, H, T, T)
        mixed = (weights @ v).transpose(1, 2).reshape(2, T, heads * head_dim)  # (N, T, H*d)
        return F.linear(mixed, attn.proj.weight.double(), attn.proj.bias.double()).float()

    expected, wrong = reference(math.sqrt(head_dim)), reference(math.sqrt(T))
    out = attn(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - wrong).abs().max() > 1e-3  # the test can tell the reference's bug apart


@pytest.mark.parametrize("tokens, path", [(256, "plain"), (1024, "sdpa")])
def test_bf16_attention_takes_plain_matmuls_up_to_576_tokens(tokens, path, monkeypatch):
    """Under CPU bf16 autocast a 256-token sequence (panda48) takes the plain matmuls, a 1024-token one SDPA; both
    agree with the fp32 attention to bf16 precision."""
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(dit.F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    torch.manual_seed(2)
    attn, x = Attention(32, 2, 16), torch.randn(1, tokens, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x)
    assert bool(calls) == (path == "sdpa")
    torch.testing.assert_close(out.float(), attn(x), atol=0.05, rtol=0.05)


def test_label_table_has_null_row_only_with_dropout():
    """A null label (for classifier-free guidance) exists only when label_dropout > 0."""
    plain = LabelEmbedder(num_labels=3, dim=8, dropout=0.0)
    assert plain.null_label is None and plain.table.num_embeddings == 3
    cfg = LabelEmbedder(num_labels=3, dim=8, dropout=0.1)
    assert cfg.null_label == 3 and cfg.table.num_embeddings == 4
    assert tiny_dit(num_labels=3, label_dropout=0.1).null_label == 3
    assert tiny_dit(num_labels=3).null_label is None


def test_label_dropout_only_in_training_mode():
    """In training, about `dropout` of the labels become the null label; in eval none do."""
    torch.manual_seed(0)
    emb = LabelEmbedder(num_labels=2, dim=8, dropout=0.5)
    y = torch.ones(2000, dtype=torch.long)
    null_row, label_row = emb.table.weight[2], emb.table.weight[1]
    out = emb.train()(y)
    dropped = (out == null_row).all(dim=1)
    assert ((out == label_row).all(dim=1) | dropped).all()
    assert 0.4 < dropped.float().mean() < 0.6
    assert (emb.eval()(y) == label_row).all()


def test_from_config_builds_the_preset(tiny_cfg):
    """DiT.from_config honours the config's architecture (tiny: 2 blocks, width 32, 2 heads x 16, MLP 4 x 32,
    4-pixel patches, 16 tokens, one label and no null row) and its adaLN-Zero init (a zero first prediction)."""
    model = DiT.from_config(tiny_cfg)
    assert len(model.blocks) == 2 and model.pos_embed.shape == (1, 16, 32)
    assert model.blocks[0].attn.qkv.out_features == 3 * 2 * 16
    assert model.blocks[0].mlp[0].out_features == 4 * 32 and model.x_embedder.kernel_size == (4, 4)
    assert model.t_embedder.freq_dim == tiny_cfg.freq_dim and model.y_embedder.table.num_embeddings == 1
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(model(x, torch.tensor([0, 99]), torch.zeros(2, dtype=torch.long)), torch.zeros_like(x))


def test_mlp_act_relu_changes_only_the_activation(tiny_cfg):
    """--mlp-act relu swaps the MLP's GELU for a ReLU: same parameters, other outputs; gelu stays the default."""
    torch.manual_seed(0)
    gelu = DiT.from_config(dataclasses.replace(tiny_cfg, adaln_zero=False))
    relu = DiT.from_config(dataclasses.replace(tiny_cfg, adaln_zero=False, mlp_act="relu"))
    relu.load_state_dict(gelu.state_dict())  # the same weights load: only the function differs
    assert all(isinstance(b.mlp[1], torch.nn.GELU) for b in gelu.blocks)
    assert all(isinstance(b.mlp[1], torch.nn.ReLU) for b in relu.blocks)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 99]), torch.zeros(2, dtype=torch.long)
    assert not torch.allclose(gelu(x, t, y), relu(x, t, y))
    with pytest.raises(ValueError, match="mlp_act must be one of gelu, relu, got silu"):
        tiny_dit(mlp_act="silu")  # a checkpoint from elsewhere is refused, not built with another activation
