"""LoLCATs hybrid attention: oracles of spec §7 (feature map, window/linear split, paths, masks, decoding, distill).

Kernel tests use random q, k, v with d = 16, F = 8, w = 4 in float64.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lit_longctx.nn.attention.base import AttentionContext, build_attention
from lit_longctx.nn.attention.hybrid_linear import (
    DISTILL_LOSSES,
    FeatureMap,
    HybridLinearAttention,
    causal_linear_sums,
    distill_losses,
    hybrid_attention_quadratic,
    init_feature_map,
    linear_attention,
    sliding_hybrid_prefix_sum,
    softmax_features,
    terrace_hybrid_scan,
    window_masks,
)
from lit_longctx.nn.config import ConfigError, ModelConfig
from lit_longctx.nn.generate import DecodingSession
from lit_longctx.nn.llama import Transformer
from lit_longctx.nn.rope import RotaryEmbedding

D, FD, W = 16, 8, 4
DT = torch.float64
SCALE = D**-0.5


# ------------------------------------------------------------------------------------------------------- helpers
def rand_inputs(length, b=2, h=3, requires_grad=False, seed=0):
    """q, k, v (B, H, L, D) and feature projections xW for q and k (B, H, L, F)."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, length, D)] * 3 + [(b, h, length, FD)] * 2
    xs = [torch.randn(*s, generator=g, dtype=DT) for s in shapes]
    xs[0] = xs[0] * 2  # sharper window softmax
    return [x.requires_grad_(requires_grad) for x in xs]


def factors(h=3, theta=(-2.2, 0.3, 1.5), affine=False):
    gamma = torch.sigmoid(torch.tensor(theta[:h], dtype=DT)).view(1, h, 1, 1)
    return gamma, (1 - gamma if affine else torch.ones_like(gamma))


def softmax_attention(q, k, v):
    scores = (q @ k.transpose(-1, -2)) * SCALE
    t = q.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v


def quadratic(q, k, v, xq, xk, gamma, alpha, window, w=W, offset=0, state=None):
    y, _ = hybrid_attention_quadratic(
        q, k, v, softmax_features(xq), softmax_features(xk), gamma, alpha, window=window, window_size=w,
        scale=SCALE, block_offset=offset, state=state,
    )
    return y


def fast(q, k, v, xq, xk, gamma, alpha, window, w=W, offset=0, state=None):
    fq, fk = softmax_features(xq), softmax_features(xk)
    if window == "sw":
        return sliding_hybrid_prefix_sum(q, k, v, fq, fk, gamma, alpha, window_size=w, scale=SCALE, state=state)
    if window == "tk":
        return terrace_hybrid_scan(
            q, k, v, fq, fk, gamma, alpha, window_size=w, scale=SCALE, block_offset=offset, state=state
        )
    return linear_attention(fq, fk, v, state=state)[0]


def random_state(b=2, h=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    fk = softmax_features(torch.randn(b, h, 7, FD, generator=g, dtype=DT))
    v = torch.randn(b, h, 7, D, generator=g, dtype=DT)
    return fk.transpose(-1, -2) @ v, fk.sum(dim=2)


def tiny_config(**options):
    opts = {"feature_dim": FD, "window_size": W, "feature_map_init": "normal", **options}
    return ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=D, ffn_dim=64,
                       max_seq_len=128, attention="hybrid_linear", attention_options={"hybrid_linear": opts})


def make_layer(dtype=DT, seed=0, **options):
    torch.manual_seed(seed)
    cfg = tiny_config(**options)
    layer = build_attention(cfg, 0)
    assert isinstance(layer, HybridLinearAttention)
    with torch.no_grad():
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj, layer.o_proj):
            proj.weight.normal_(0, 0.4)
        if layer.window_factors is not None:
            layer.window_factors.copy_(torch.linspace(-1.0, 1.0, 2).view(1, 2, 1, 1))
    return layer.to(dtype).requires_grad_(False), cfg


def clone_layer(layer, cfg, **options):
    """Same weights, other options."""
    other, _ = make_layer(layer.q_proj.weight.dtype, **{**cfg.attention_options["hybrid_linear"], **options})
    other.load_state_dict(layer.state_dict())
    return other


def context(cfg, start, length, b=2):
    pos = torch.arange(start, start + length).expand(b, length)
    rope = RotaryEmbedding(cfg.rope, cfg.head_dim, cfg.max_seq_len)
    cos, sin = rope(pos)
    return AttentionContext(pos, cos, sin, rope)


def run_layer(layer, cfg, x, cache=None, start=0):
    return layer(x, context(cfg, start, x.shape[1], x.shape[0]), cache)


# ---------------------------------------------------------------------------------------------------- feature map
def test_feature_map_shape_positivity_halves_and_shift_invariance():
    xw = torch.randn(2, 3, 5, FD, dtype=DT) * 30  # large values drive entries towards the 1e-12 clamp
    phi = softmax_features(xw)
    assert phi.shape == (2, 3, 5, 2 * FD)
    assert bool((phi >= 1e-12).all())
    halves = softmax_features(xw / 30)
    torch.testing.assert_close(halves[..., :FD].sum(-1), torch.ones(2, 3, 5, dtype=DT))
    torch.testing.assert_close(halves[..., FD:].sum(-1), torch.ones(2, 3, 5, dtype=DT))
    torch.testing.assert_close(softmax_features(xw / 30 + 7.5), halves)
    assert torch.autograd.gradcheck(softmax_features, (xw[0, 0].clone().requires_grad_(),))  # incl. clamped entries


def test_feature_map_hand_case():
    expected = torch.tensor([0.25, 0.75, 0.75, 0.25], dtype=DT)
    torch.testing.assert_close(softmax_features(torch.tensor([0.0, math.log(3.0)], dtype=DT)), expected)
    fmap = FeatureMap(n_heads=1, head_dim=2, feature_dim=2).double()
    init_feature_map(fmap.mlp.layer, "identity")
    x = torch.tensor([0.0, math.log(3.0)], dtype=DT).view(1, 1, 1, 2)
    torch.testing.assert_close(fmap(x).flatten(), expected)


def test_identity_init_gives_softmax_of_first_coordinates():
    fmap = FeatureMap(n_heads=3, head_dim=D, feature_dim=FD).double()
    init_feature_map(fmap.mlp.layer, "identity")
    x = torch.randn(2, 3, 5, D, dtype=DT)
    expected = torch.cat([torch.softmax(x[..., :FD], -1), torch.softmax(-x[..., :FD], -1)], -1)
    assert torch.equal(fmap(x), expected)


def test_random_inits_follow_their_distributions():
    w = torch.empty(32, D, FD, dtype=DT)
    init_feature_map(w, "kaiming_uniform")
    bound = math.sqrt(6.0 / (D * FD))  # gain √2 · √(3 / fan_in), fan_in = D·F for an (H, D, F) tensor
    assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.95 * bound
    init_feature_map(w, "normal")
    assert abs(float(w.std()) - 1.0) < 0.05 and abs(float(w.mean())) < 0.05


# --------------------------------------------------------------------------------- window covers the whole sequence
@pytest.mark.parametrize("theta", [(-2.2, 0.3, 1.5), (4.0, -4.0, 0.0)])
@pytest.mark.parametrize("path", [quadratic, fast])
def test_sliding_window_wider_than_sequence_is_softmax(theta, path):
    q, k, v, xq, xk = rand_inputs(7)
    gamma, alpha = factors(theta=theta)
    y = path(q, k, v, xq, xk, gamma, alpha, "sw", w=7)
    torch.testing.assert_close(y, softmax_attention(q, k, v), rtol=0, atol=1e-13)


@pytest.mark.parametrize("length", [W, 2 * W - 1, 2 * W])
@pytest.mark.parametrize("alignment_offset", [None, "end"])
@pytest.mark.parametrize("path", [quadratic, fast])
def test_terrace_up_to_two_blocks_is_softmax(length, alignment_offset, path):
    q, k, v, xq, xk = rand_inputs(length)
    offset = (-length) % W if alignment_offset == "end" else 0
    y = path(q, k, v, xq, xk, *factors(), "tk", offset=offset)
    torch.testing.assert_close(y, softmax_attention(q, k, v), rtol=0, atol=1e-13)


@pytest.mark.parametrize("path", [quadratic, fast])
def test_pure_linear_with_constant_psi_is_causal_mean(path):
    q, k, v, _, _ = rand_inputs(9)
    const = torch.zeros(2, 3, 9, FD, dtype=DT)  # φ = uniform for every token -> ψ constant
    y = path(q, k, v, const, const, *factors(), "none")
    mean = v.cumsum(2) / torch.arange(1, 10, dtype=DT).view(1, 1, 9, 1)
    torch.testing.assert_close(y, mean, rtol=1e-10, atol=1e-12)  # the 1e-12 in the denominator is relative 4e-12


# ------------------------------------------------------------------------------------------------ γ and α matter
@pytest.mark.parametrize("window", ["sw", "tk"])
def test_gamma_cancels_only_without_linear_keys(window):
    short, long = (W, 3 * W) if window == "sw" else (2 * W, 3 * W)
    q, k, v, xq, xk = rand_inputs(short)
    a = quadratic(q, k, v, xq, xk, *factors(theta=(-2.0, 0.0, 2.0)), window)
    b = quadratic(q, k, v, xq, xk, *factors(theta=(1.0, 3.0, -3.0)), window)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-13)
    q, k, v, xq, xk = rand_inputs(long)
    a = quadratic(q, k, v, xq, xk, *factors(theta=(-2.0, 0.0, 2.0)), window)
    b = quadratic(q, k, v, xq, xk, *factors(theta=(1.0, 3.0, -3.0)), window)
    affine = quadratic(q, k, v, xq, xk, *factors(theta=(-2.0, 0.0, 2.0), affine=True), window)
    win, lin = window_masks(long, long, window, W)
    has_linear = lin.any(dim=1)
    assert torch.equal(has_linear, torch.arange(long) >= (W if window == "sw" else 2 * W))
    diff_gamma = (a - b).abs().amax(dim=(0, 1, 3))  # per query position
    diff_affine = (a - affine).abs().amax(dim=(0, 1, 3))
    assert float(diff_gamma[~has_linear].max()) < 1e-13 and float(diff_gamma[has_linear].min()) > 1e-4
    assert float(diff_affine[~has_linear].max()) < 1e-13 and float(diff_affine[has_linear].min()) > 1e-4


def test_shared_normaliser_formula_by_hand():
    """One query, two window keys, one linear key: spec §2 written out with scalars (max over window scores only)."""
    w = 2
    q, k, v, xq, xk = rand_inputs(3, b=1, h=1)
    gamma, alpha = torch.tensor(0.3, dtype=DT), torch.tensor(0.8, dtype=DT)
    y = quadratic(q, k, v, xq, xk, gamma.view(1, 1, 1, 1), alpha.view(1, 1, 1, 1), "sw", w=w)[0, 0, 2]
    s = [float(q[0, 0, 2] @ k[0, 0, j]) * SCALE for j in range(3)]
    psi = float(softmax_features(xq)[0, 0, 2] @ softmax_features(xk)[0, 0, 0])
    c = max(s[1], s[2])
    e1, e2 = math.exp(s[1] - c), math.exp(s[2] - c)
    num = gamma * (e1 * v[0, 0, 1] + e2 * v[0, 0, 2]) + alpha * psi * v[0, 0, 0]
    den = gamma * (e1 + e2) + alpha * psi
    torch.testing.assert_close(y, num / den, rtol=0, atol=1e-14)


# ------------------------------------------------------------------------------------------ linear attention forms
def test_recurrent_equals_parallel_linear_attention():
    q, k, v, xq, xk = rand_inputs(23)
    fq, fk = softmax_features(xq), softmax_features(xk)
    s = torch.zeros(2, 3, 2 * FD, D, dtype=DT)
    z = torch.zeros(2, 3, 2 * FD, dtype=DT)
    rows = []
    for i in range(23):
        s = s + fk[:, :, i, :, None] * v[:, :, i, None, :]
        z = z + fk[:, :, i]
        rows.append((fq[:, :, i, None, :] @ s).squeeze(2) / ((fq[:, :, i] * z).sum(-1, keepdim=True) + 1e-12))
    recurrent = torch.stack(rows, dim=2)
    parallel, (s_end, z_end) = linear_attention(fq, fk, v)
    torch.testing.assert_close(parallel, recurrent, rtol=0, atol=1e-13)
    torch.testing.assert_close(quadratic(q, k, v, xq, xk, *factors(), "none"), recurrent, rtol=0, atol=1e-13)
    torch.testing.assert_close(s_end, s, rtol=0, atol=1e-12)
    torch.testing.assert_close(z_end, z, rtol=0, atol=1e-12)


def test_causal_linear_sums_chunking_does_not_matter():
    _, _, v, xq, xk = rand_inputs(50)
    fq, fk = softmax_features(xq), softmax_features(xk)
    ref = causal_linear_sums(fq, fk, v, chunk_size=50)
    for chunk in (1, 7, 64):
        got = causal_linear_sums(fq, fk, v, chunk_size=chunk)
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=1e-12)


CASES = [("sw", 0), ("tk", 0), ("tk", 1), ("tk", 3), ("none", 0)]


@pytest.mark.parametrize("window,offset", CASES)
@pytest.mark.parametrize("length", [5, 8, 13, 37])
@pytest.mark.parametrize("with_state", [False, True])
def test_paths_agree_values_and_gradients(window, offset, length, with_state):
    """(a) quadratic vs (b) shifted prefix sum / (c) terrace block scan / chunked linear, incl. an initial state."""
    leaves = rand_inputs(length, requires_grad=True, seed=length)
    theta = torch.tensor([-2.2, 0.3, 1.5], dtype=DT, requires_grad=True)
    gamma = torch.sigmoid(theta).view(1, 3, 1, 1)
    alpha = 1 - gamma
    state = random_state() if with_state else None
    ya = quadratic(*leaves, gamma, alpha, window, offset=offset, state=state)
    yb = fast(*leaves, gamma, alpha, window, offset=offset, state=state)
    torch.testing.assert_close(yb, ya, rtol=0, atol=1e-12)
    probe = torch.randn_like(ya)
    wrt = [*leaves, theta] if window != "none" else leaves
    ga = torch.autograd.grad((ya * probe).sum(), wrt, materialize_grads=True, retain_graph=True)
    gb = torch.autograd.grad((yb * probe).sum(), wrt, materialize_grads=True)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(y, x, rtol=0, atol=1e-11)


# ---------------------------------------------------------------------------------------------------- terrace masks
def test_terrace_start_window_sizes():
    win, lin = window_masks(4 * W, 4 * W, "tk", W)
    sizes = win.sum(dim=1).tolist()
    expected = list(range(1, W + 1)) + list(range(W + 1, 2 * W + 1)) * 3
    assert sizes == expected
    causal = torch.ones(4 * W, 4 * W, dtype=torch.bool).tril()
    assert torch.equal(win | lin, causal) and not bool((win & lin).any())


def reference_end_aligned_masks(w, length):
    """The reference construction: block_diag of w×w ones, plus its roll by one block, cropped, lower triangle."""
    m = math.ceil(length / w)
    mask = torch.block_diag(*[torch.ones(w, w)] * m)
    mask = mask + torch.roll(mask, -w, -1)
    mask = mask[-length:, -length:]
    return torch.tril(mask).bool(), torch.tril(1 - mask).bool()


@pytest.mark.parametrize("length", [5, 8, 13, 37, 100])
def test_terrace_end_alignment_matches_block_diag_roll(length):
    win, lin = window_masks(length, length, "tk", W, (-length) % W)
    ref_win, ref_lin = reference_end_aligned_masks(W, length)
    assert torch.equal(win, ref_win) and torch.equal(lin, ref_lin)


def test_sliding_masks_and_suffix_queries():
    win, lin = window_masks(3, 10, "sw", W)  # queries at positions 7, 8, 9
    for r, i in enumerate(range(7, 10)):
        assert win[r].nonzero().flatten().tolist() == list(range(i - W + 1, i + 1))
        assert lin[r].nonzero().flatten().tolist() == list(range(0, i - W + 1))


# ----------------------------------------------------------------------------------------------- module behaviour
@pytest.mark.parametrize("options", [{"window": "sw"}, {"window": "tk"}, {"window": "tk", "path": "quadratic"}])
def test_prefix_consistency(options):
    layer, cfg = make_layer(**options)
    x = torch.randn(2, 23, 32, dtype=DT)
    full = run_layer(layer, cfg, x)
    torch.testing.assert_close(run_layer(layer, cfg, x[:, :22]), full[:, :22], rtol=0, atol=1e-12)


def test_end_aligned_terrace_is_not_prefix_consistent():
    layer, cfg = make_layer(window="tk", block_alignment="end")
    x = torch.randn(2, 23, 32, dtype=DT)  # 23 % w != 0 and 23 > 2w
    full = run_layer(layer, cfg, x)
    assert float((run_layer(layer, cfg, x[:, :22]) - full[:, :22]).abs().max()) > 1e-3
    x8 = x[:, : 2 * W]  # but up to 2w tokens both alignments are softmax attention
    start = clone_layer(layer, cfg, block_alignment="start")
    torch.testing.assert_close(run_layer(layer, cfg, x8), run_layer(start, cfg, x8), rtol=0, atol=1e-12)


def decode_in_chunks(layer, cfg, x, chunks):
    cache = layer.new_cache(x.shape[0], x.device, x.dtype)
    outs, start, sizes = [], 0, []
    for n in chunks:
        outs.append(run_layer(layer, cfg, x[:, start : start + n], cache, start))
        start += n
        sizes.append(cache.k.shape[2])
    assert cache.length == x.shape[1]
    return torch.cat(outs, dim=1), sizes


SCHEDULES = [[9] + [1] * 14, [3, 1, 5, 1, 1, 2, 7, 1, 1, 2], [1] * 23]


@pytest.mark.parametrize("chunks", SCHEDULES)
@pytest.mark.parametrize("path", ["scan", "quadratic"])
def test_sliding_decode_equals_sliding_forward(chunks, path):
    layer, cfg = make_layer(window="tk", decode_window="sliding", prefill="decode_window", path=path)
    x = torch.randn(2, 23, 32, dtype=DT)
    reference = run_layer(clone_layer(layer, cfg, window="sw"), cfg, x)
    decoded, sizes = decode_in_chunks(layer, cfg, x, chunks)
    torch.testing.assert_close(decoded, reference, rtol=0, atol=1e-12)
    assert max(sizes) == W  # the buffer holds exactly the last w keys
    terrace = run_layer(layer, cfg, x)  # the tk forward differs from sliding decode (spec's "surprise")
    assert float((decoded - terrace)[:, 2 * W :].abs().max()) > 1e-3


@pytest.mark.parametrize("chunks", SCHEDULES)
def test_terrace_decode_equals_terrace_forward(chunks):
    layer, cfg = make_layer(window="tk", decode_window="terrace")
    x = torch.randn(2, 23, 32, dtype=DT)
    decoded, sizes = decode_in_chunks(layer, cfg, x, chunks)
    torch.testing.assert_close(decoded, run_layer(layer, cfg, x), rtol=0, atol=1e-12)
    assert max(sizes) <= 2 * W


@pytest.mark.parametrize("chunks", SCHEDULES[:2])
def test_pure_linear_decode_equals_forward(chunks):
    layer, cfg = make_layer(window="none")
    x = torch.randn(2, 23, 32, dtype=DT)
    decoded, sizes = decode_in_chunks(layer, cfg, x, chunks)
    torch.testing.assert_close(decoded, run_layer(layer, cfg, x), rtol=0, atol=1e-12)
    assert sizes == [0] * len(chunks)


@pytest.mark.parametrize("decode_window", ["sliding", "terrace"])
def test_decode_state_memory_is_bounded_by_window(decode_window):
    layer, cfg = make_layer(window="tk", decode_window=decode_window)
    b, hkv, h, elt = 2, 1, 2, 8
    fixed = b * h * 2 * FD * D * elt + b * h * 2 * FD * elt  # S and z
    keys = W if decode_window == "sliding" else 2 * W
    bound = fixed + 2 * b * hkv * keys * D * elt
    for prompt in (3, 10, 41):
        cache = layer.new_cache(b, torch.device("cpu"), DT)
        x = torch.randn(b, prompt + 6, 32, dtype=DT)
        run_layer(layer, cfg, x[:, :prompt], cache)
        for i in range(prompt, prompt + 6):
            run_layer(layer, cfg, x[:, i : i + 1], cache, i)
            assert cache.num_bytes() <= bound
        if decode_window == "sliding":
            assert cache.num_bytes() == bound  # exactly w keys once w tokens were seen


def test_session_generation_matches_full_forward_of_a_model():
    """DecodingSession over a 2-layer tk model with sliding decode == full forward of the same weights with sw."""
    opts = {"feature_dim": FD, "window_size": W, "feature_map_init": "normal"}
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=D, ffn_dim=64,
                      max_seq_len=64, attention="hybrid_linear", attention_options={"hybrid_linear": opts},
                      init_std=0.2)
    model = Transformer(cfg).double().eval()
    ref_cfg = cfg.replace(attention_options={"hybrid_linear": {**opts, "window": "sw"}})
    reference = Transformer(ref_cfg).double().eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(0, 64, (2, 19))
    with torch.no_grad():
        expected = reference(ids).logits
        session = DecodingSession(model, batch_size=2, prefill_chunk=3)
        got = [session.prefill(ids[:, :7])] + [session.step(ids[:, i : i + 1]) for i in range(7, 19)]
        terrace = model(ids).logits[:, 6:].float()
    # the session returns float32 logits; the sw/tk difference is ~1e-2, far above float32 rounding
    torch.testing.assert_close(torch.stack(got, 1), expected[:, 6:].float(), rtol=1e-6, atol=1e-6)
    assert float((torch.stack(got, 1) - terrace).abs().max()) > 1e-3


def test_affine_attention_factors_use_one_minus_gamma():
    layer, _ = make_layer(window="sw", affine_attention_factors=True)
    q, k, v = (torch.randn(2, n, 13, D, dtype=DT) for n in (2, 1, 1))
    y, _ = layer.attend(q, k, v, window="sw")
    k2, v2 = k.expand(-1, 2, -1, -1), v.expand(-1, 2, -1, -1)
    gamma = torch.sigmoid(layer.window_factors)
    ref, _ = hybrid_attention_quadratic(
        q, k2, v2, layer.feature_map_q(q), layer.feature_map_k(k2), gamma, 1 - gamma, window="sw", window_size=W,
        scale=SCALE,
    )
    torch.testing.assert_close(y, ref, rtol=0, atol=1e-12)


def test_low_precision_inputs_use_float32_arithmetic():
    layer, cfg = make_layer(dtype=torch.bfloat16)
    upcast = clone_layer(layer, cfg).float()  # the same (bf16-rounded) weights in float32
    q, k, v = (torch.randn(2, n, 21, D).bfloat16() for n in (2, 1, 1))
    y, _ = layer.attend(q, k, v, window="tk")
    y32, _ = upcast.attend(q.float(), k.float(), v.float(), window="tk")
    assert y.dtype == torch.float32 and torch.equal(y, y32)
    assert run_layer(layer, cfg, torch.randn(2, 5, 32).bfloat16()).dtype == torch.bfloat16


# --------------------------------------------------------------------------------------------------- distillation
def distill_models(dtype=torch.float32, **options):
    opts = {"feature_dim": FD, "window_size": W, "feature_map_init": "normal", **options}
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=D, ffn_dim=64,
                      max_seq_len=64, attention="hybrid_linear", layer_attention={1: "causal"},
                      attention_options={"hybrid_linear": opts}, init_std=0.2)
    student = Transformer(cfg).to(dtype)
    teacher = Transformer(cfg.replace(attention="causal", layer_attention={})).to(dtype)
    missing, unexpected = teacher.load_state_dict(student.state_dict(), strict=False)
    assert not missing and all("feature_map" in k or "window_factors" in k for k in unexpected)
    return student, teacher


def test_distill_mode_gives_the_softmax_models_logits_exactly():
    student, teacher = distill_models()
    ids = torch.randint(0, 64, (2, 21))
    out = student(ids, distill=True)
    assert torch.equal(out.logits, teacher(ids).logits)
    assert not torch.allclose(student(ids).logits, out.logits, atol=1e-3)  # the hybrid itself differs
    losses = distill_losses(out.extras)
    assert sorted(losses) == [0, 2] and all(set(v) == {"mse"} for v in losses.values())
    assert all(float(v["mse"].detach()) > 0 for v in losses.values())


def test_distill_gradients_reach_only_own_feature_maps_and_window_factors():
    student, _ = distill_models()
    ids = torch.randint(0, 64, (2, 21))
    losses = student(ids, distill=True, distill_xent=True).extras[DISTILL_LOSSES]
    trainable = {n for n, _ in student.named_parameters() if "feature_map" in n or "window_factors" in n}
    params = dict(student.named_parameters())
    per_layer = {}
    for layer, terms in losses.items():
        loss = 1000 * terms["mse"] + terms["xent"]
        grads = torch.autograd.grad(loss, list(params.values()), materialize_grads=True, retain_graph=True)
        reached = {n for (n, _), g in zip(params.items(), grads) if g is not None and bool(g.abs().sum() > 0)}
        assert reached == {n for n in trainable if n.startswith(f"model.layers.{layer}.")}
        per_layer[layer] = dict(zip(params, grads))
    total = sum(1000 * t["mse"] + t["xent"] for t in losses.values())
    total.backward()
    for name in trainable:
        layer = int(name.split(".")[2])
        torch.testing.assert_close(params[name].grad, per_layer[layer][name])


def test_distill_mse_is_zero_within_two_terrace_blocks():
    student, _ = distill_models(dtype=torch.float64)
    out = student(torch.randint(0, 64, (2, 2 * W)), distill=True)
    for terms in distill_losses(out.extras).values():
        assert float(terms["mse"].detach()) < 1e-28


def test_distill_xent_equals_teacher_entropy_within_two_blocks():
    layer, cfg = make_layer(window="tk")
    x = torch.randn(2, 2 * W, 32, dtype=DT)
    ctx = context(cfg, 0, 2 * W)
    ctx.extras.update(distill=True, distill_xent=True)
    layer(x, ctx)
    terms = ctx.extras[DISTILL_LOSSES][0]
    q = layer.rotate(layer.q_proj(x).view(2, 2 * W, 2, D), ctx.cos, ctx.sin).transpose(1, 2)
    k = layer.rotate(layer.k_proj(x).view(2, 2 * W, 1, D), ctx.cos, ctx.sin).transpose(1, 2).expand(-1, 2, -1, -1)
    scores = (q @ k.transpose(-1, -2)) * SCALE
    causal = torch.ones(2 * W, 2 * W, dtype=torch.bool).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), -1)
    entropy = -(probs * probs.clamp_min(1e-300).log()).sum(-1).mean()
    torch.testing.assert_close(terms["xent"], entropy, rtol=1e-10, atol=1e-12)
    assert float(terms["mse"].detach()) < 1e-28


def test_distill_rejects_a_cache():
    layer, cfg = make_layer()
    ctx = context(cfg, 0, 3)
    ctx.extras["distill"] = True
    with pytest.raises(ValueError, match="do not pass a cache"):
        layer(torch.randn(2, 3, 32, dtype=DT), ctx, layer.new_cache(2, torch.device("cpu"), DT))


# ----------------------------------------------------------------------------------------- sizes, init and errors
def test_llama3_8b_parameter_counts_on_meta():
    with torch.device("meta"):
        model = Transformer(ModelConfig.from_preset("llama3-8b", attention="hybrid_linear"))
    phi = sum(p.numel() for n, p in model.named_parameters() if "feature_map" in n)
    gamma = sum(p.numel() for n, p in model.named_parameters() if "window_factors" in n)
    assert phi == 32 * 32 * 2 * 128 * 64 == 16_777_216
    assert gamma == 1_024
    assert model.layers[0].self_attn.feature_map_q.mlp.layer.shape == (32, 128, 64)
    assert model.layers[0].self_attn.window_factors.shape == (1, 32, 1, 1)


def test_meta_model_materialises_with_identity_maps_and_gamma_one_tenth():
    cfg = ModelConfig.from_preset("debug", attention="hybrid_linear",
                                  attention_options={"hybrid_linear": {"feature_dim": 8, "window_size": 4}})
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    model.init_weights()
    attn = model.layers[1].self_attn
    eye = torch.eye(cfg.head_dim, 8).expand(cfg.n_heads, -1, -1)
    assert torch.equal(attn.feature_map_q.mlp.layer, eye) and torch.equal(attn.feature_map_k.mlp.layer, eye)
    torch.testing.assert_close(torch.sigmoid(attn.window_factors), torch.full((1, 4, 1, 1), 0.1))


def test_flops_per_token():
    layer, _ = make_layer(window="tk")
    h = 2
    assert layer.flops_per_token(10_000) == 12 * h * D * 2 * W + 24 * h * FD * D
    assert layer.flops_per_token(3) == 12 * h * D * 3 + 24 * h * FD * D
    assert clone_layer(layer, tiny_config(), window="sw").flops_per_token(10_000) == 12 * h * D * W + 24 * h * FD * D


@pytest.mark.parametrize(
    "options,match",
    [
        ({"window": "sliding"}, "window='sliding' is unknown"),
        ({"window_size": 0}, "window_size must be a positive integer"),
        ({"feature_dim": 32, "feature_map_init": "identity"}, "needs feature_dim <= head_dim=16"),
        ({"feature_map_init": "xavier"}, "feature_map_init='xavier' is unknown"),
        ({"block_alignment": "middle"}, "block_alignment='middle' is unknown"),
        ({"path": "flash"}, "path='flash' is unknown"),
        ({"window": "sw", "decode_window": "terrace"}, "decode_window=terrace needs window=tk"),
        ({"block_alignment": "end", "decode_window": "terrace"}, "block_alignment=start"),
        ({"decode_window": "full"}, "decode_window='full' is unknown"),
        ({"init_window_factor": float("inf")}, "finite logit"),
        ({"window_sizes": 4}, "bad attention_options for kind 'hybrid_linear'"),
    ],
)
def test_invalid_options_are_rejected(options, match):
    cfg = ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, head_dim=D, ffn_dim=64, attention="hybrid_linear",
                      attention_options={"hybrid_linear": {"feature_dim": FD, **options}})
    with pytest.raises(ConfigError, match=match):
        Transformer(cfg)


def test_packed_documents_are_rejected():
    layer, cfg = make_layer()
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    rope = RotaryEmbedding(cfg.rope, D, 64)
    cos, sin = rope(pos)
    ctx = AttentionContext(pos, cos, sin, rope, doc_ids=torch.tensor([[0, 0, 0, 1, 1]]))
    with pytest.raises(ValueError, match="contiguous position_ids"):
        layer(torch.randn(1, 5, 32, dtype=DT), ctx)


def test_fast_sliding_path_handles_padding_free_window_of_one():
    q, k, v, xq, xk = rand_inputs(6)
    gamma, alpha = factors()
    ya = quadratic(q, k, v, xq, xk, gamma, alpha, "sw", w=1)
    yb = fast(q, k, v, xq, xk, gamma, alpha, "sw", w=1)
    torch.testing.assert_close(yb, ya, rtol=0, atol=1e-13)
    assert F.mse_loss(ya, softmax_attention(q, k, v)) > 1e-4  # w = 1: one softmax key, the rest linear
