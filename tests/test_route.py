"""Token routing (TREAD): in training a random share of the tokens skips the middle blocks; eval uses them all."""
import copy

import pytest
import torch

import config
from conftest import run_train
from dit import DiT

ROUTE = dict(route_ratio=0.5, route_start=1, route_end=3)  # 4 blocks: tokens skip blocks 1 and 2


def tiny_dit(**kw):
    # plain init: adaLN-Zero blocks start as the identity, which would hide whether a token passed them
    args = dict(image_size=16, patch_size=4, emb_dim=32, depth=4, num_heads=2, head_dim=16, num_labels=3,
                label_dropout=0.2, adaln_zero=False)
    return DiT(**{**args, **kw})


def inputs(n=3):
    return torch.randn(n, 3, 16, 16), torch.randint(0, 1000, (n,)), torch.randint(0, 3, (n,))


def plain_forward(model, x, t, y):
    """The forward pass before routing existed: every block on every token."""
    h = model.pos_embed + model.x_embedder(x).flatten(2).transpose(1, 2)
    c = model.t_embedder(t) + model.y_embedder(y)
    for block in model.blocks:
        h = block(h, c)
    return model.unpatchify(model.final_layer(h, c))


def test_eval_is_identical_with_and_without_routing():
    """Sampling (eval mode) runs every token through every block: routing on or off gives the same bits."""
    plain = tiny_dit()
    routed = tiny_dit(**ROUTE)
    routed.load_state_dict(plain.state_dict())
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(routed.eval()(x, t, y), plain.eval()(x, t, y))
        assert torch.equal(routed(x, t, y), plain_forward(plain, x, t, y))


def test_ratio_zero_trains_exactly_as_before():
    """route_ratio 0 in training: same loss, same gradients and same RNG state afterwards as the forward without routing."""
    model = tiny_dit(route_ratio=0.0, route_start=1, route_end=3).train()
    reference = copy.deepcopy(model)
    x, t, y = inputs()
    losses, rng = [], []
    for forward in (lambda *a: model(*a), lambda *a: plain_forward(reference, *a)):
        torch.manual_seed(1)  # label dropout draws: an extra draw anywhere would shift them and the state after
        loss = forward(x, t, y).square().mean()
        loss.backward()
        rng.append(torch.get_rng_state())
        losses.append(loss)
    grads = [[p.grad for p in m.parameters()] for m in (model, reference)]
    assert torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert torch.equal(rng[0], rng[1])


def record_blocks(model):
    """Forward hooks that keep each block's latest input and output, and every call's (block, tokens)."""
    seen = {"in": {}, "out": {}, "calls": []}

    def hook(i):
        def store(module, args, out):
            seen["in"][i], seen["out"][i] = args[0], out
            seen["calls"].append((i, args[0].shape[1]))
        return store

    for i, block in enumerate(model.blocks):
        block.register_forward_hook(hook(i))
    return seen


def kept_positions(kept, full):
    """(N, K) positions in full (N, T, D) of the rows of kept (N, K, D), each found exactly once."""
    match = (kept[:, :, None, :] == full[:, None, :, :]).all(-1)  # (N, K, T)
    assert (match.sum(-1) == 1).all()
    return match.float().argmax(-1)


def test_routed_tokens_skip_the_middle_blocks_and_kept_ones_pass_them():
    """Entering block route_end, a routed token holds its value from after block route_start - 1; a kept token
    holds what block route_end - 1 made of it. Each image draws its own subset, and each step a new one."""
    model = tiny_dit(**ROUTE).train()
    seen = record_blocks(model)
    x, t, y = inputs()
    model(x, t, y)
    before, after, rejoined = seen["out"][0], seen["out"][2], seen["in"][3]  # (N, T, D), (N, K, D), (N, T, D)
    idx = kept_positions(seen["in"][1], before)  # (N, K)
    routed = torch.ones_like(before[..., 0], dtype=torch.bool).scatter(1, idx, False)  # (N, T)
    assert torch.equal(rejoined[routed], before[routed])
    assert torch.equal(rejoined.gather(1, idx[..., None].expand_as(after)), after)
    assert not torch.equal(after, before.gather(1, idx[..., None].expand_as(after)))  # the middle blocks did work
    assert len({tuple(sorted(row.tolist())) for row in idx}) == len(idx)  # a different subset per image
    assert all(len(set(row.tolist())) == idx.shape[1] for row in idx)  # K distinct positions in each
    model(x, t, y)
    assert not torch.equal(kept_positions(seen["in"][1], seen["out"][0]).sort(1).values, idx.sort(1).values)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.7])
def test_middle_blocks_see_round_n_times_one_minus_ratio_tokens(ratio):
    """16 tokens: blocks 1 and 2 see round(16 * (1 - ratio)), blocks 0 and 3 all 16, each block once, in order;
    in eval every block sees all 16."""
    model = tiny_dit(**{**ROUTE, "route_ratio": ratio}).train()
    seen = record_blocks(model)
    model(*inputs())
    keep = round(16 * (1 - ratio))
    with torch.no_grad():
        model.eval()(*inputs())
    assert seen["calls"] == [(0, 16), (1, keep), (2, keep), (3, 16)] + [(i, 16) for i in range(4)]


@pytest.mark.parametrize("span", [(1, 3), (0, 4), (2, -1)])
def test_gradients_reach_every_parameter(span):
    """With routing every parameter, the skipped blocks' included, gets a non-zero gradient."""
    model = tiny_dit(route_ratio=0.5, route_start=span[0], route_end=span[1]).train()
    model(*inputs()).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("flags", [
    dict(route_ratio=1.0), dict(route_ratio=-0.1),
    dict(route_ratio=0.5, route_start=3, route_end=3),  # depth 4 (panda48): empty span
    dict(route_ratio=0.5, route_start=1, route_end=5),  # past the last block
    dict(route_ratio=0.5, route_start=-1),
    dict(route_ratio=0.5, preset="tiny"),  # depth 2: the default span (1, -1) is empty
    dict(route_ratio=0.99, route_start=0, route_end=2, preset="tiny"),  # round(16 * 0.01) = 0 tokens kept
])
def test_bad_routing_is_one_clear_error(flags):
    """Out-of-range routing is refused in one 'error:' line naming the flag to change."""
    with pytest.raises(SystemExit) as e:
        config.build_config({"preset": "panda48", **flags})
    message = str(e.value)
    assert message.startswith("error: route_") and "\n" not in message and message.count(". ") == 0
    assert "route" in message.split(";")[0]


def test_routing_defaults_fit_every_preset_and_resume_across_it():
    """Routing is off by default (the 2-block tiny preset included) and is no architecture field."""
    for preset in config.PRESETS:
        assert config.build_config({"preset": preset}).route_ratio == 0
    assert config.build_config({"preset": "panda48", "route_ratio": 0.5}).route_ratio == 0.5
    assert not {"route_ratio", "route_start", "route_end"} & set(config.ARCH_FIELDS)


def test_training_resumes_with_routing_turned_off(tmp_path, image_dir):
    """train.py takes --route-ratio/--route-start/--route-end, and a routed run resumes without routing."""
    span = ("--route-start", "0", "--route-end", "1")
    ckpts = run_train(tmp_path, image_dir, "--max-steps", "2", "--route-ratio", "0.5", *span, "--sample-every", "0")
    saved = torch.load(f"{ckpts}/tiny/latest.pt", weights_only=True)
    assert saved["config"]["route_ratio"] == 0.5
    run_train(tmp_path, image_dir, "--max-steps", "3", "--route-ratio", "0", "--sample-every", "0")
    saved = torch.load(f"{ckpts}/tiny/latest.pt", weights_only=True)
    assert saved["step"] == 3 and saved["config"]["route_ratio"] == 0
