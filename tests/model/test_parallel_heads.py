"""Hymba-style parallel heads (arXiv 2411.13676; ``model/parallel_heads.py``, the pattern's
``H``): the layer equals a plain-PyTorch reference written from the paper's formula with the
same weights; the sliding window hides old tokens but never the meta tokens; a tiny model with
``H`` layers trains, counts, saves and loads, and reproduces its TP=1 loss and gradients at
TP=2; where it cannot run (HF conversion, cached decode, bad shapes) it is refused."""

import math

import pytest
import torch
import torch.nn.functional as F
from test_layout_parity import WORKER, assert_reproduces_tp1, launch

from megatron_hybrid import backends

backends.install("cpu")  # before Megatron-Core is imported
from megatron_hybrid import mcore  # noqa: E402,F401
from megatron_hybrid.checkpoint import dist_checkpoint  # noqa: E402
from megatron_hybrid.errors import ConfigError  # noqa: E402
from megatron_hybrid.inference.engine import generate_cached  # noqa: E402
from megatron_hybrid.model import hf_mapping, params  # noqa: E402
from megatron_hybrid.model.build import ModelLayout, build_model  # noqa: E402
from megatron_hybrid.model.config import ModelConfig  # noqa: E402
from megatron_hybrid.model.parallel_heads import ParallelHeadsLayer  # noqa: E402
from megatron_hybrid.parallel import process_groups  # noqa: E402

MODEL = ModelConfig(
    pattern="H-MH-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
    num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_head_dim=8, mamba_state_dim=8,
    mamba_num_groups=2, vocab_size=64, seq_length=32, mamba_chunk_size=16, num_meta_tokens=2,
    attention_window=6)
"""Attention width 4 x 8 = Mamba width 4 x 8, as the average needs."""
PARITY_WORKER = WORKER.with_name("parallel_heads_parity.py")


@pytest.fixture(scope="module", autouse=True)
def one_process_groups():
    process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    yield
    process_groups.destroy_distributed()


def build(cfg: ModelConfig = MODEL, seed: int = 0):
    process_groups.seed_everything(seed)
    return build_model(cfg, ModelLayout(), backend="cpu")


def reference_attention(p: dict, x: torch.Tensor, cfg: ModelConfig, visible_prefix: int):
    """Grouped-query causal attention, no output projection; [s, b, h] -> [s, b, a*d]. Per
    query group Megatron-Core's QKV rows hold the group's query heads, then its key and value."""
    s, b, _ = x.shape
    a, g, d = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels
    qkv = (x @ p["self_attention.linear_qkv.weight"].T).view(s, b, g, a // g + 2, d)
    q = qkv[:, :, :, :-2].reshape(s, b, a, d)
    k, v = (qkv[:, :, :, i].repeat_interleave(a // g, dim=2) for i in (-2, -1))
    scores = torch.einsum("ibhd,jbhd->bhij", q, k) / math.sqrt(d)
    i, j = torch.arange(s).view(s, 1), torch.arange(s).view(1, s)
    seen = (j <= i) & ((i - j < cfg.attention_window) | (j < visible_prefix)
                       if cfg.attention_window else True)
    probs = scores.masked_fill(~seen, -math.inf).softmax(dim=-1)
    return torch.einsum("bhij,jbhd->ibhd", probs, v).reshape(s, b, a * d)


def reference_ssm(p: dict, x: torch.Tensor, cfg: ModelConfig):
    """Mamba-2 as a recurrence, gated by silu(z), no norm or projection; [s, b, h] ->
    [s, b, H*P]: h_t = exp(dt A) h_{t-1} + dt x_t B_t^T, y_t = h_t C_t + D x_t."""
    s, b, _ = x.shape
    heads, dim, groups, state = (cfg.mamba_num_heads, cfg.mamba_head_dim, cfg.mamba_num_groups,
                                 cfg.mamba_state_dim)
    inner = heads * dim
    z, xbc, dt = (x @ p["mixer.in_proj.weight"].T).split(
        [inner, inner + 2 * groups * state, heads], dim=-1)
    conv = F.conv1d(xbc.permute(1, 2, 0), p["mixer.conv1d.weight"], p["mixer.conv1d.bias"],
                    padding=3, groups=xbc.shape[-1])[..., :s]
    xs, bs, cs = F.silu(conv).permute(2, 0, 1).split([inner, groups * state, groups * state],
                                                     dim=-1)
    xs = xs.reshape(s, b, heads, dim)
    bs, cs = (t.reshape(s, b, groups, state).repeat_interleave(heads // groups, dim=2)
              for t in (bs, cs))
    dt = F.softplus(dt + p["mixer.dt_bias"])
    decay = torch.exp(dt * -torch.exp(p["mixer.A_log"]))
    h = torch.zeros(b, heads, dim, state)
    ys = []
    for t in range(s):
        inputs = (dt[t][..., None] * xs[t])[..., None] * bs[t][:, :, None]  # dt x B^T
        h = decay[t][..., None, None] * h + inputs
        ys.append((h @ cs[t][..., None]).squeeze(-1) + p["mixer.D"][:, None] * xs[t])
    return torch.stack(ys).reshape(s, b, inner) * F.silu(z)


def reference_layer(p: dict, x: torch.Tensor, cfg: ModelConfig, visible_prefix: int):
    """Hymba's hybrid-head block with the pre-norm and residual:
    x + W_out((beta1 * norm(attn(x')) + beta2 * norm(ssm(x'))) / 2), x' = norm(x)."""
    def rms_norm(t, weight):
        return t * torch.rsqrt(t.square().mean(-1, keepdim=True) + cfg.norm_eps) * weight

    normed = rms_norm(x, p["norm.weight"])
    fused = (rms_norm(reference_attention(p, normed, cfg, visible_prefix),
                      p["attention_norm.weight"])
             + rms_norm(reference_ssm(p, normed, cfg), p["ssm_norm.weight"])) / 2
    return x + fused @ p["out_proj.weight"].T


@pytest.mark.parametrize("window", [0, 6])
def test_the_layer_is_hymbas_formula_on_the_same_weights(window):
    layer = build(MODEL.replace(attention_window=window)).decoder.layers[0]
    assert isinstance(layer, ParallelHeadsLayer)
    with torch.no_grad():  # every scale away from 1, so a misplaced one shows
        for parameter in layer.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    weights = {name: p.detach() for name, p in layer.named_parameters()}
    x = torch.randn(20, 2, MODEL.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_layer(weights, x, MODEL.replace(
            attention_window=window), MODEL.num_meta_tokens), rtol=1e-5, atol=1e-5)


def test_the_window_hides_old_tokens_and_never_the_meta_tokens():
    attention = build().decoder.layers[0].self_attention  # window 6, 2 meta tokens first
    x = torch.randn(16, 1, MODEL.hidden_size)
    with torch.no_grad():
        base = attention(x, None)[0]

        def queries_moved_by(position: int) -> list[int]:
            moved = x.clone()
            moved[position] += 1.0
            change = (attention(moved, None)[0] - base).abs().amax(dim=(1, 2))
            return [query for query in range(16) if change[query] > 1e-6]

    assert queries_moved_by(5) == list(range(5, 11))  # itself and the 5 after it
    assert queries_moved_by(1) == list(range(1, 16))  # a meta token: every later query


def test_a_tiny_model_with_parallel_heads_trains():
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    tokens = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):  # measured: 4.17 -> 1.64 (and 0.11 after 30)
        loss = model(tokens[:, :-1], None, None, labels=tokens[:, 1:]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(64), abs=0.2)
    assert losses[-1] < 0.5 * losses[0], losses
    assert model.decoder.meta_tokens.weight.grad.abs().min() > 0  # every element learns


def test_params_counts_the_layer_and_the_meta_tokens_exactly():
    h, a, g, d = (MODEL.hidden_size, MODEL.num_attention_heads, MODEL.num_query_groups,
                  MODEL.kv_channels)
    inner, bc = MODEL.mamba_d_inner, 2 * MODEL.mamba_num_groups * MODEL.mamba_state_dim
    heads = MODEL.mamba_num_heads
    one_layer = (h                                # pre-norm
                 + h * (a + 2 * g) * d            # QKV
                 + h * (2 * inner + bc + heads)   # Mamba in_proj: z, x, B, C, dt
                 + (inner + bc) * (4 + 1)         # causal conv weight and bias
                 + 3 * heads                      # dt_bias, A_log, D
                 + 2 * inner                      # beta1, beta2
                 + inner * h)                     # W_out
    counts = params.count_parameters(MODEL)
    model = build()
    built = [sum(p.numel() for p in layer.parameters()) for layer in model.decoder.layers
             if isinstance(layer, ParallelHeadsLayer)]
    assert built == [one_layer, one_layer]
    assert counts["parallel_heads"] == 2 * one_layer
    assert counts["meta_tokens"] == MODEL.num_meta_tokens * h
    assert counts["total"] == sum(p.numel() for p in model.parameters())


def test_a_checkpoint_round_trip_gives_the_same_logits(tmp_path):
    tokens = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(1))
    saved = build(seed=0)
    dist_checkpoint.save_weights([saved], tmp_path / "weights")
    loaded = build(seed=1)
    with torch.no_grad():
        assert not torch.equal(loaded(tokens, None, None), saved(tokens, None, None))
        dist_checkpoint.load_weights([loaded], tmp_path / "weights")
        torch.testing.assert_close(loaded(tokens, None, None), saved(tokens, None, None),
                                   rtol=0, atol=0)


def test_tp2_reproduces_the_tp1_loss_and_every_gradient(tmp_path):
    # Meta tokens and a window of 8 over 32 positions; the TP=1 checkpoint read at TP=2 and
    # TP=2's gradients read back at TP=1 (the split beta scales and in_proj pieces reshard).
    results = launch(PARITY_WORKER, tmp_path / "results.pt", 2, 600, pattern="MH-H",
                     layouts=("tp2",))
    gradients = results["gradients"]["tp2"]
    assert {"decoder.meta_tokens.weight", "decoder.layers.1.attention_norm.weight",
            "decoder.layers.3.ssm_norm.weight"} <= gradients.keys()
    assert_reproduces_tp1(results, "tp2")


def test_where_parallel_heads_cannot_run_they_are_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"generation does not support parallel-heads \('H'\)"):
        # (Megatron-Core's dynamic context refuses a model without '*' layers before that.)
        generate_cached(build(MODEL.replace(pattern="*H-", num_meta_tokens=0)), [[1, 2, 3]], 2)
    with pytest.raises(ConfigError, match="generation does not support .* meta tokens"):
        generate_cached(build(MODEL.replace(pattern="*-", attention_window=0)), [[1, 2, 3]], 2)
    with pytest.raises(hf_mapping.ConversionError, match="HF NemotronH has no such layer"):
        hf_mapping.hf_config_from_model(MODEL)
    with pytest.raises(ConfigError, match=r"must be as wide: .* \(32\) != .* \(64\)"):
        MODEL.replace(mamba_head_dim=16).validate()
    with pytest.raises(ConfigError, match="model.attention_window applies to parallel-heads"):
        MODEL.replace(pattern="M*-").validate()
