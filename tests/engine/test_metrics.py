"""Metrics: FLOPs counted from the pattern (and cross-checked against torch's FlopCounterMode
on plain torch layers), device peaks, the tracker's outputs and the plots."""

import io
import json
import re
import struct
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from megatron_hybrid.engine import metrics
from megatron_hybrid.model.config import ModelConfig
from megatron_hybrid.model.hf_mapping import MEGATRON_CONV_KERNEL


def small_config(pattern: str = "M*-E", **changes) -> ModelConfig:
    shape = dict(
        hidden_size=64, ffn_hidden_size=256, num_attention_heads=4, num_query_groups=2,
        kv_channels=16, mamba_num_heads=8, mamba_head_dim=16, mamba_state_dim=16,
        mamba_num_groups=2, mamba_chunk_size=32, vocab_size=1000, num_moe_experts=4,
        moe_router_topk=2, moe_ffn_hidden_size=128,
    )
    return ModelConfig(pattern=pattern, **{**shape, **changes})


def counted_flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


# --- FLOPs from the pattern -------------------------------------------------------------------

def test_mlp_only_pattern_is_twelve_h_f_per_layer_plus_logits():
    cfg = small_config("---")
    flops = metrics.flops_per_token(cfg, 128)
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    assert flops["mlp"] == 3 * (2 * 3 * (2 * h * f))
    assert flops["total"] == 3 * (2 * 3 * (2 * h * f)) + 3 * 2 * h * v
    assert flops["mamba"] == flops["attention"] == flops["moe"] == 0


def test_hand_computed_hybrid_case_exactly():
    # h=64 f=256 | attn a=4 g=2 d=16 | Mamba H=8 P=16 N=16 G=2 Q=32 | V=1000 | E=4 k=2 fe=128
    flops = metrics.flops_per_token(small_config("M*-E"), 64, training=False)
    expected = {
        # in_proj 2*64*(256+64+8) + conv 2*4*192 + out_proj 2*128*64 + SSD at L=64 (2 chunks):
        # ((2*16 + 128) * 2*32^2 + 4*128*16*64 + 2*128*16*2) / 64 = 13440
        "mamba": 41984 + 1536 + 16384 + 13440,
        "attention": 2 * 64 * 16 * 8 + 2 * 64 * 64 + 2 * 64 * 64,  # QKV, out, causal core
        "mlp": 4 * 64 * 256,
        "moe": 2 * 64 * 4 + 2 * 4 * 64 * 128,  # router + 2 of 4 experts
        "parallel_heads": 0,
        "logits": 2 * 64 * 1000,
    }
    assert flops == {**expected, "total": 365696}
    assert metrics.flops_per_token(small_config("M*-E"), 64)["total"] == 3 * 365696


def test_total_is_the_sum_of_kinds_weighted_by_the_pattern():
    cfg = small_config("MM-M*|-M-E")
    flops = metrics.flops_per_token(cfg, 256)
    assert flops["total"] == sum(v for k, v in flops.items() if k != "total")
    assert flops["mamba"] == 3 * 4 * metrics.mamba_layer_flops(cfg, 256)
    assert flops["mlp"] == 3 * 3 * metrics.mlp_layer_flops(cfg)


def test_attention_flops_per_token_grow_linearly_in_seq_length():
    cfg = small_config("*")
    per_token = [metrics.flops_per_token(cfg, L)["attention"] for L in (256, 512, 768)]
    assert per_token[1] - per_token[0] == per_token[2] - per_token[1] > 0
    # Causal half of QK^T and AV, training: 3 * 2*a*d per extra token of context.
    assert per_token[1] - per_token[0] == 3 * 2 * 4 * 16 * 256


def test_mamba_flops_per_token_depend_on_seq_length_only_through_chunking():
    cfg = small_config("M")
    per_token = {L: metrics.flops_per_token(cfg, L)["mamba"] for L in (64, 1000, 8192)}
    assert per_token[64] == per_token[8192]  # the chunk (32) divides both
    assert per_token[1000] == pytest.approx(per_token[64], rel=1e-3)
    assert metrics.flops_per_token(cfg, 16)["mamba"] < per_token[64]  # shorter than a chunk


def test_moe_flops_count_the_shared_expert_as_active():
    plain = metrics.moe_layer_flops(small_config("E"))
    shared = metrics.moe_layer_flops(small_config("E", moe_shared_expert_intermediate_size=96))
    assert shared - plain == 2 * 2 * 64 * 96  # fc1 and fc2 of width 96, for every token


def test_moe_pattern_needs_experts():
    with pytest.raises(ValueError, match="num_moe_experts"):
        metrics.flops_per_token(small_config("E", num_moe_experts=None), 64)


# --- The formulas against torch's own count of plain torch layers ----------------------------

def test_mlp_formula_matches_flop_counter_forward_and_backward():
    cfg = small_config("-")
    fc1 = torch.nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size, bias=False)
    fc2 = torch.nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)
    x = torch.randn(2, 8, cfg.hidden_size, requires_grad=True)  # dgrad of fc1 too

    def train_step():
        fc2(F.relu(fc1(x)).square()).sum().backward()

    tokens = x.shape[0] * x.shape[1]
    assert counted_flops(lambda: fc2(F.relu(fc1(x)).square())) == (
        tokens * metrics.mlp_layer_flops(cfg))
    assert counted_flops(train_step) == tokens * metrics.flops_per_token(cfg, 8)["mlp"]


def causal_attention_core(q, k, v):
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def test_attention_formula_matches_flop_counter():
    cfg = small_config("*")
    a, g, d, h = cfg.num_attention_heads, cfg.num_query_groups, cfg.kv_channels, cfg.hidden_size
    qkv = torch.nn.Linear(h, (a + 2 * g) * d, bias=False)
    out = torch.nn.Linear(a * d, h, bias=False)
    batch, seq = 2, 48
    x = torch.randn(batch, seq, h)

    def heads(t, n):
        return t.view(batch, seq, n, d).transpose(1, 2)

    def attention():
        q, k, v = qkv(x).split([a * d, g * d, g * d], dim=-1)
        k, v = (heads(t, g).repeat_interleave(a // g, dim=1) for t in (k, v))
        core = causal_attention_core(heads(q, a), k, v)
        return out(core.transpose(1, 2).reshape(batch, seq, a * d))

    shape = (batch, a, seq, d)
    core = counted_flops(causal_attention_core, *(torch.randn(shape) for _ in range(3)))
    assert core == 2 * (2 * batch * a * seq * seq * d)  # torch counts the full square
    # Our formula counts the causal half of the core, all of the projections.
    assert counted_flops(attention) - core // 2 == (
        batch * seq * metrics.attention_layer_flops(cfg, seq))


def ssd_chunked(x, dt, A, B, C, chunk, intra_counter):
    """Mamba-2's SSD scan by chunks (arXiv 2405.21060 sec. 6), plain torch.
    x (b, L, H, P), dt (b, L, H), A (H), B and C (b, L, G, N); L a multiple of ``chunk``.
    The masked intra-chunk matmuls run under ``intra_counter`` so their count can be halved."""
    b, length, heads, _ = x.shape
    per_group = heads // B.shape[2]

    def chunks(t):
        return t.reshape(b, length // chunk, chunk, *t.shape[2:])

    x, dt, B, C = chunks(x * dt[..., None]), chunks(dt), chunks(B), chunks(C)
    log_decay = (dt * A).cumsum(dim=2)  # (b, c, l, H)
    with intra_counter:
        scores = torch.einsum("bclgn,bcsgn->bcgls", C, B).repeat_interleave(per_group, dim=2)
        segment = log_decay.transpose(2, 3)[..., :, None] - log_decay.transpose(2, 3)[..., None, :]
        mask = torch.ones(chunk, chunk, dtype=torch.bool).tril()
        scores = scores * torch.exp(segment.masked_fill(~mask, float("-inf")))
        y = torch.einsum("bchls,bcshp->bclhp", scores, x)
    B, C = (t.repeat_interleave(per_group, dim=3) for t in (B, C))
    to_end = torch.exp(log_decay[:, :, -1:] - log_decay)
    states = torch.einsum("bclhn,bclhp->bchpn", B * to_end[..., None], x)
    state, entering = torch.zeros_like(states[:, 0]), []
    for c in range(states.shape[1]):  # state passing: elementwise, torch counts none of it
        entering.append(state)
        state = state * torch.exp(log_decay[:, c, -1])[..., None, None] + states[:, c]
    from_start = torch.exp(log_decay)[..., None]
    y = y + torch.einsum("bclhn,bchpn->bclhp", C, torch.stack(entering, dim=1)) * from_start
    return y.reshape(b, length, heads, -1)


def ssd_sequential(x, dt, A, B, C):
    """The same scan one token at a time: h = exp(dt*A) h + dt B x^T, y = C h."""
    per_group = x.shape[2] // B.shape[2]
    B, C = (t.repeat_interleave(per_group, dim=2) for t in (B, C))
    state = torch.zeros(x.shape[0], x.shape[2], x.shape[3], B.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[..., None, None]
        update = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        state = decay * state + update
        ys.append(torch.einsum("bhpn,bhn->bhp", state, C[:, t]))
    return torch.stack(ys, dim=1)


def test_plain_ssd_scan_is_the_recurrence():
    torch.manual_seed(0)
    b, length, heads, p, groups, n = 2, 24, 4, 8, 2, 6
    x, B, C = torch.randn(b, length, heads, p), *torch.randn(2, b, length, groups, n)
    dt, A = torch.rand(b, length, heads) * 0.5, -torch.rand(heads) * 2
    expected = ssd_sequential(x, dt, A, B, C)
    got = ssd_chunked(x, dt, A, B, C, chunk=8, intra_counter=FlopCounterMode(display=False))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_mamba_formula_matches_flop_counter():
    cfg = small_config("M")
    h, di, heads, p = cfg.hidden_size, cfg.mamba_d_inner, cfg.mamba_num_heads, cfg.mamba_head_dim
    groups, n, kernel = cfg.mamba_num_groups, cfg.mamba_state_dim, MEGATRON_CONV_KERNEL
    conv_dim = di + 2 * groups * n
    in_proj = torch.nn.Linear(h, 2 * di + 2 * groups * n + heads, bias=False)
    conv_weight = torch.randn(conv_dim, 1, kernel)
    out_proj = torch.nn.Linear(di, h, bias=False)
    batch, seq = 2, 3 * cfg.mamba_chunk_size
    hidden = torch.randn(batch, seq, h)
    intra = FlopCounterMode(display=False)

    def mamba():
        z, xbc, dt = in_proj(hidden).split([di, conv_dim, heads], dim=-1)
        xbc = F.conv1d(F.pad(xbc.transpose(1, 2), (kernel - 1, 0)), conv_weight, groups=conv_dim)
        x, B, C = F.silu(xbc.transpose(1, 2)).split([di, groups * n, groups * n], dim=-1)
        y = ssd_chunked(x.view(batch, seq, heads, p), F.softplus(dt), -torch.ones(heads),
                        B.view(batch, seq, groups, n), C.view(batch, seq, groups, n),
                        cfg.mamba_chunk_size, intra)
        y = F.rms_norm(y.reshape(batch, seq, di) * F.silu(z), (di,))  # gated norm: elementwise
        return out_proj(y)

    counted = counted_flops(mamba)
    state_passing = batch * 2 * heads * p * n * (seq // cfg.mamba_chunk_size)
    assert counted - intra.get_total_flops() // 2 + state_passing == (
        batch * seq * metrics.mamba_layer_flops(cfg, seq))


# --- Device peak -----------------------------------------------------------------------------

def test_cpu_peak_is_probed_afresh_and_nothing_is_stored(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("MEGATRON_HYBRID_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (name, first), (_, second) = (metrics.device_peak_flops("fp32") for _ in range(2))
    assert first > 1e8 and second > 1e8 and first != second  # two timings, not one stored
    assert metrics.cpu_model_name() in name and f"({torch.get_num_threads()} threads)" in name
    assert list(tmp_path.rglob("*")) == []


def test_peak_is_the_best_of_the_probes_taken():
    peaks = metrics.PeakProbes(seconds=0.05)
    with pytest.raises(RuntimeError, match="call probe"):
        peaks.best()
    for step in range(3):
        peaks.probe(after_step=step)
    assert [probe["after_step"] for probe in peaks.probes] == [0, 1, 2]
    assert [probe["time"] for probe in peaks.probes] == sorted(p["time"] for p in peaks.probes)
    assert peaks.best()["flops"] == max(probe["flops"] for probe in peaks.probes) > 1e8


def test_gpu_peaks_by_device_name_and_unknown_gpu_gives_none(monkeypatch):
    assert metrics.gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert metrics.gpu_peak_flops("NVIDIA H100 80GB HBM3", "fp8") == 1979e12
    assert metrics.gpu_peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert metrics.gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.float16) == 312e12
    assert metrics.gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp8") is None  # no fp8 units
    assert metrics.gpu_peak_flops("NVIDIA A10G", "bf16") == 125e12
    assert metrics.gpu_peak_flops("NVIDIA L4", "bf16") == 121e12
    assert metrics.gpu_peak_flops("NVIDIA L40S", "bf16") == 362e12
    assert metrics.gpu_peak_flops("NVIDIA GH200 480GB", "bf16") == 989e12
    assert metrics.gpu_peak_flops("NVIDIA B200", "fp8") == 4500e12
    from megatron_hybrid import backends

    monkeypatch.setattr(backends, "active", lambda: "cuda")  # a run on the cuda backend
    monkeypatch.setattr(backends, "device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "NVIDIA Quantum Z9")
    assert metrics.device_peak_flops(torch.bfloat16) == ("NVIDIA Quantum Z9", None)


# --- MetricsTracker ----------------------------------------------------------------------------

def run_four_steps(tracker):
    """Steps of 1000 tokens: 0.5 s each, then 0.25 s each (2000 then 4000 tokens/s)."""
    for step, seconds in zip(range(1, 5), (0.5, 0.5, 0.25, 0.25)):
        tracker.step(step, loss=torch.tensor(4.0 - step), grad_norm=float(step), lr=1e-3,
                     tokens=1000, seconds=seconds)
    tracker.log_eval(4, 0.75)


def read_history(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tracker_writes_history_and_log_lines(tmp_path):
    stream = io.StringIO()
    with metrics.MetricsTracker(tmp_path, is_logging_rank=True, flops_per_token=1e6,
                                peak_flops=1e12, world_size=2, total_steps=4, log_interval=2,
                                stream=stream) as tracker:
        run_four_steps(tracker)
    first, second, evaluation = read_history(tmp_path / "metrics.jsonl")
    assert first["kind"] == "train" and first["step"] == 2 and first["tokens"] == 2000
    assert first["loss"] == 2.5 and first["grad_norm"] == 1.5 and first["lr"] == 1e-3
    assert first["tokens_per_s"] == 2000 and first["tokens_per_s_per_device"] == 1000
    assert first["tflops_per_device"] == pytest.approx(2000 * 1e6 / 2 / 1e12)
    assert first["mfu"] == pytest.approx(1e-3)
    assert first["peak_memory_bytes"] > 0 and first["memory_source"] == "peak RSS"
    assert second["tokens_per_s"] == 4000 and second["tokens"] == 4000
    assert evaluation == {"kind": "eval", "step": 4, "loss": 0.75, "tokens": 4000,
                          "time": evaluation["time"]}
    lines = stream.getvalue().splitlines()
    assert re.fullmatch(r"step 2/4 \| loss 2\.5000 \| grad 1\.5 \| lr 1\.0e-03 \| "
                        r"2k tok/s \(1k/dev\) \| 0\.001 TFLOP/s/dev \| MFU 0\.1% \| "
                        r"mem \d+\.\d GiB \(peak RSS\)", lines[0])
    assert lines[2] == "eval step 4 | loss 0.7500"


def test_tracker_without_a_peak_reports_mfu_as_na(tmp_path):
    stream = io.StringIO()
    with metrics.MetricsTracker(tmp_path, is_logging_rank=True, flops_per_token=1e6,
                                log_interval=4, stream=stream) as tracker:
        run_four_steps(tracker)
    line = stream.getvalue().splitlines()[0]
    assert line.startswith("step 4 | loss 1.5000 | grad 2.5 | lr 1.0e-03 | 2.67k tok/s | ")
    assert "0.00267 TFLOP/s | MFU n/a | mem" in line


def test_only_the_logging_rank_writes(tmp_path):
    stream = io.StringIO()
    with metrics.MetricsTracker(tmp_path / "run", is_logging_rank=False, tensorboard=True,
                                log_interval=1, stream=stream) as tracker:
        run_four_steps(tracker)
    assert not (tmp_path / "run").exists() and stream.getvalue() == ""


def test_progress_bar_when_forced_on(tmp_path):
    stream = io.StringIO()
    with metrics.MetricsTracker(tmp_path, is_logging_rank=True, total_steps=4, log_interval=2,
                                progress="on", stream=stream) as tracker:
        run_four_steps(tracker)
    output = stream.getvalue()
    assert "4/4" in output and "loss 0.5000" in output and "eval step 4 | loss 0.7500" in output
    assert "step 2/4 |" not in output  # the bar replaces the plain lines
    with pytest.raises(ValueError, match="'auto', 'on' or 'off'"):
        metrics.MetricsTracker(tmp_path, is_logging_rank=True, progress="yes")


def test_tensorboard_event_file_holds_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with metrics.MetricsTracker(tmp_path, is_logging_rank=True, flops_per_token=1e6,
                                peak_flops=1e12, log_interval=2, tensorboard=True,
                                stream=io.StringIO()) as tracker:
        run_four_steps(tracker)
    (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    events = EventAccumulator(str(event_file))
    events.Reload()
    assert [s.value for s in events.Scalars("train/loss")] == [2.5, 0.5]
    assert [s.step for s in events.Scalars("eval/loss")] == [4]
    assert {"perf/tokens_per_s", "perf/mfu", "memory/peak_bytes"} <= set(events.Tags()["scalars"])


# --- Plots --------------------------------------------------------------------------------------

def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_plot_loss_curve_from_the_history(tmp_path):
    with metrics.MetricsTracker(tmp_path, is_logging_rank=True, log_interval=1,
                                stream=io.StringIO()) as tracker:
        run_four_steps(tracker)
    out = metrics.plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png",
                                  title="tiny run")
    assert png_size(out) == (960, 540)


def test_plot_curves_of_several_runs(tmp_path):
    curves = {"pretrain": [(0, 5.0), (100, 3.0)], "distill": [(100, 3.2), (200, 2.9)]}
    out = metrics.plot_curves(curves, tmp_path / "stages.png", title="stages", log_y=True)
    assert png_size(out) == (960, 540)


def test_importing_metrics_loads_neither_megatron_core_nor_the_heavy_writers():
    code = ("import sys, megatron_hybrid.engine.metrics; "
            "print(sorted({m.split('.')[0] + '.' + m.split('.')[1] if m.startswith('megatron.') "
            "else m.split('.')[0] for m in sys.modules}))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout
    assert "megatron.core" not in loaded
    assert "'matplotlib'" not in loaded and "'tensorboard'" not in loaded
