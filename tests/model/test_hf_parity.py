"""Parity with an implementation nobody here wrote: HF transformers ``NemotronHForCausalLM``.

A tiny random HF model (fp32; pattern with Mamba, attention and MLP layers) with the settings
of NVIDIA's published configs (dt clamp ``time_step_min=0.001``, 8 Mamba groups, 8 KV heads for
40 query heads) is converted into our Megatron-Core model; logits, loss and every gradient must
match. Its dt_bias puts about a third of the heads under 0.001, so HF's clamp binds: with our
clamp switched off the logits differ, and decode steps must clamp as the forward does.

The reference must run HF's own PyTorch code. transformers 5.23 binds its Mamba kernels when
``modeling_nemotron_h`` is imported: it takes ``mamba_ssm`` / ``causal_conv1d`` functions if
those modules import, and the cpu backend registers OUR kernels under exactly those names.
So the reference here is a private copy of HF's modeling module, imported while those names
are blocked (whatever this process imported before), and the tests prove (a) its kernel
wrappers hold HF's torch functions, (b) HF's torch scan/conv code ran and (c) none of our
kernel code ran during its forward and backward. That the ordinary import would bind our
kernels is checked in a fresh process, so no result depends on which tests ran first.
"""

import contextlib
import importlib.util
import inspect
import json
import math
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_hybrid import backends

backends.install("cpu")

from megatron_hybrid import mcore  # noqa: E402
from megatron_hybrid.backends import kernels  # noqa: E402
from megatron_hybrid.model import hf_mapping, specs
from megatron_hybrid.model.build import ModelLayout, build_model  # noqa: E402
from megatron_hybrid.model.flavors import FLAVORS, get_flavor  # noqa: E402
from megatron_hybrid.parallel import process_groups

PATTERN = "M-M*-M-"
BATCH, SEQ = 2, 40  # SEQ is not a multiple of the chunk size (16): padding paths run too
TOLERANCE = 1e-4
PUBLISHED = dict(time_step_min=0.001, time_step_max=0.1, time_step_floor=1e-4,
                 time_step_limit=(0.0, math.inf), n_groups=8, num_attention_heads=40,
                 num_key_value_heads=8, layer_norm_epsilon=1e-5, tie_word_embeddings=False)
"""Settings of NVIDIA's published NVIDIA-Nemotron-Nano-12B-v2-Base config.json that this test
keeps (widths are scaled down). transformers 5.23 clamps dt at ``time_step_min`` and ignores
``time_step_limit``."""
PUBLISHED_DT_MIN = PUBLISHED["time_step_min"]
KERNEL_DIR = str(Path(kernels.__file__).resolve().parent)
HF_KERNEL_WRAPPERS = ("causal_conv1d_fn", "causal_conv1d_update", "mamba2_chunk_scan",
                      "mamba2_selective_state_update", "mamba2_split_conv1d_scan_combined")
# A name of each parameter kind whose gradient the test names explicitly (all are compared).
GRADIENT_SAMPLES = (
    "model.layers.0.mixer.in_proj.weight", "model.layers.0.mixer.conv1d.weight",
    "model.layers.0.mixer.conv1d.bias", "model.layers.2.mixer.A_log", "model.layers.2.mixer.D",
    "model.layers.5.mixer.dt_bias", "model.layers.5.mixer.norm.weight",
    "model.layers.0.norm.weight", "model.layers.3.mixer.q_proj.weight",
    "model.layers.3.mixer.k_proj.weight", "model.layers.3.mixer.v_proj.weight",
    "model.layers.3.mixer.o_proj.weight", "model.layers.3.norm.weight",
    "model.layers.1.mixer.up_proj.weight", "model.layers.4.mixer.down_proj.weight",
    "model.embeddings.weight", "model.norm_f.weight", "lm_head.weight",
)


# --- the reference: HF's modeling code, imported without any mamba_ssm / causal_conv1d ------

def load_hf_torch_reference():
    """A private copy of ``transformers.models.nemotron_h.modeling_nemotron_h`` whose kernel
    wrappers were bound while ``mamba_ssm`` and ``causal_conv1d`` could not be imported."""
    real_name = "transformers.models.nemotron_h.modeling_nemotron_h"
    name = "transformers.models.nemotron_h._torch_reference_modeling_nemotron_h"
    if name in sys.modules:
        return sys.modules[name]
    origin = importlib.util.find_spec(real_name).origin
    hidden = {k: sys.modules.pop(k) for k in list(sys.modules)
              if k.split(".")[0] in ("mamba_ssm", "causal_conv1d")}
    sys.modules.update({"mamba_ssm": None, "causal_conv1d": None})  # import raises
    try:
        spec = importlib.util.spec_from_file_location(name, origin)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        del sys.modules["mamba_ssm"], sys.modules["causal_conv1d"]
        sys.modules.update(hidden)
    return module


@contextlib.contextmanager
def record_calls():
    """The code objects of every Python function called in this thread (and new threads)."""
    calls = []

    def profile(frame, event, arg):
        if event == "call":
            calls.append(frame.f_code)

    previous = sys.getprofile(), threading.getprofile()
    sys.setprofile(profile)
    threading.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(previous[0])
        threading.setprofile(previous[1])


def ran_our_kernels(calls) -> bool:
    return any(str(Path(code.co_filename).resolve()).startswith(KERNEL_DIR) for code in calls)


# --- fixtures --------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def model_parallel():
    started = not mcore.parallel_state.model_parallel_is_initialized()
    if started:
        process_groups.init_distributed(process_groups.ParallelDims(), backend="cpu")
    process_groups.seed_everything(0)
    yield
    if started:
        process_groups.destroy_distributed()


@pytest.fixture(scope="module")
def hf_module():
    return load_hf_torch_reference()


@pytest.fixture(scope="module")
def hf_config():
    from transformers import NemotronHConfig

    return NemotronHConfig(
        hybrid_override_pattern=PATTERN, vocab_size=256, hidden_size=64, intermediate_size=128,
        head_dim=8, mamba_num_heads=16, mamba_head_dim=8, ssm_state_size=16, chunk_size=16,
        max_position_embeddings=128, **PUBLISHED)


@pytest.fixture(scope="module")
def cfg(hf_config):
    return hf_mapping.model_config_from_hf(hf_config)


@pytest.fixture(scope="module")
def hf_weights(hf_module, hf_config):
    """Random weights with O(1) activations; every tensor distinct (norms included)."""
    shapes = {k: v.shape for k, v in build_hf(hf_module, hf_config, None).state_dict().items()}
    generator = torch.Generator().manual_seed(1234)
    return {name: random_tensor(name, shape, generator) for name, shape in shapes.items()}


def random_tensor(name, shape, generator):
    def randn(*size):
        return torch.randn(*size, generator=generator)

    if name.endswith("A_log"):
        return torch.log(1 + 15 * torch.rand(shape, generator=generator))
    if name.endswith("dt_bias"):  # dt in [1e-4, 0.1]: some heads below the published clamp
        dt = torch.exp(torch.empty(shape).uniform_(math.log(1e-4), math.log(0.1),
                                                   generator=generator))
        return dt + torch.log(-torch.expm1(-dt))
    if name.endswith(("norm.weight", "norm_f.weight", ".D")):
        return 1 + 0.3 * randn(shape)
    if name.endswith("conv1d.bias"):
        return 0.3 * randn(shape)
    if name.endswith("conv1d.weight"):
        return 0.5 * randn(shape)
    if name.endswith("embeddings.weight"):
        return randn(shape)
    return randn(shape) / math.sqrt(shape[-1])


def build_hf(hf_module, hf_config, weights):
    """The reference model built on meta (HF's random init cannot take time_step_min=0, as
    exported unclamped configs have) and given ``weights``."""
    with torch.device("meta"):
        model = hf_module.NemotronHForCausalLM(hf_config)
    model = model.to_empty(device="cpu")
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    return model.train()


def converted_model(cfg, hf_weights):
    model = build_model(cfg, ModelLayout(), backend="cpu", perform_initialization=False)
    hf_mapping.load_mcore_state_dict(model, hf_mapping.hf_to_mcore_state_dict(hf_weights, cfg))
    return model.train()


@pytest.fixture(scope="module")
def megatron_model(cfg, hf_weights):
    return converted_model(cfg, hf_weights)


def ids():
    return torch.randint(0, 256, (BATCH, SEQ), generator=torch.Generator().manual_seed(7))


def megatron_logits_and_loss(model, tokens):
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    logits = model(tokens, positions, None)
    labels = torch.roll(tokens, -1, dims=1)  # the last position's label is not used
    loss = model(tokens, positions, None, labels=labels)[:, :-1].mean()
    return logits, loss


def hf_logits_and_loss(model, tokens):
    out = model(input_ids=tokens, labels=tokens, use_cache=False)  # HF shifts the labels
    return out.logits, out.loss


@pytest.fixture(scope="module")
def runs(hf_module, hf_config, hf_weights, megatron_model):
    """Forward + backward of both models on the same tokens, HF's calls recorded."""
    reference = build_hf(hf_module, hf_config, hf_weights)
    with record_calls() as hf_calls:
        hf_logits, hf_loss = hf_logits_and_loss(reference, ids())
        hf_loss.backward()
    megatron_model.zero_grad()
    with record_calls() as our_calls:
        logits, loss = megatron_logits_and_loss(megatron_model, ids())
        loss.backward()
    return dict(hf_model=reference, hf_logits=hf_logits.detach(), hf_loss=hf_loss.detach(),
                hf_calls=hf_calls, logits=logits.detach(), loss=loss.detach(),
                our_calls=our_calls)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


# --- the reference really is HF's torch path -------------------------------------------------

def test_reference_wrappers_hold_hf_torch_functions(hf_module):
    for name in HF_KERNEL_WRAPPERS:
        wrapper = getattr(hf_module, name)
        bound = inspect.getclosurevars(wrapper).nonlocals
        assert bound["implementation"] is wrapper.__wrapped__, name
        assert bound["is_new_implementation"] is False, name


FRESH_PROCESS_CHECK = """
import inspect, json, sys
from megatron_hybrid import backends
backends.install("cpu")
from megatron_hybrid import mcore
from megatron_hybrid.model import build
from megatron_hybrid.model import specs
from megatron_hybrid.backends import kernels
from megatron_hybrid.model.flavors import get_flavor
from transformers.models.nemotron_h import modeling_nemotron_h as ordinary
import modelopt.torch.nas.plugins.megatron  # registers ModelOpt's Megatron dynamic modules
from modelopt.torch.nas.registry import DMRegistry

bound = inspect.getclosurevars(ordinary.mamba2_chunk_scan).nonlocals["implementation"]
published = get_flavor("tiny-hybrid").replace(mamba_dt_clamp_min=0.001)
mixer = specs.stack_spec("cuda", [published.num_layers], build.mixer_params(published)
                         ).submodules.mamba_layer.submodules.mixer
print(json.dumps({
    "mamba_ssm_is_ours": getattr(sys.modules["mamba_ssm"], kernels.MARKER, False),
    "hf_binds": inspect.getfile(bound),
    "cuda_mixer": mixer.module.__qualname__, "cuda_mixer_params": mixer.params,
    "cuda_mixer_keeps_nvidia_linears": mixer.submodules is mcore.te_mamba_stack_spec(
        ).submodules.mamba_layer.submodules.mixer.submodules,
    "modelopt_prunes_it": specs.DtClampedMambaMixer in DMRegistry,
}))
"""


@pytest.fixture(scope="module")
def fresh_process():
    """Facts of a new process (threads from this session's environment) that imports
    transformers after the cpu backend, Megatron-Core's cuda spec and ModelOpt's plugin."""
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS_CHECK], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_transformers_would_otherwise_bind_our_kernels(fresh_process):
    """Why the private copy: the ordinary import, after the cpu backend, wraps our kernels."""
    assert fresh_process["mamba_ssm_is_ours"]
    assert str(Path(fresh_process["hf_binds"]).resolve()).startswith(KERNEL_DIR)


def test_cuda_spec_builds_the_clamped_mixer_on_transformer_engine(fresh_process):
    """The cuda backend's resolved mixer: ours, with the clamp, on the linears of NVIDIA's TE
    spec; mamba_ssm's kernels there receive the raised dt columns, as ours do here."""
    assert fresh_process["cuda_mixer"] == specs.DtClampedMambaMixer.__qualname__
    assert fresh_process["cuda_mixer_params"]["dt_clamp_min"] == PUBLISHED_DT_MIN
    assert fresh_process["cuda_mixer_keeps_nvidia_linears"]
    assert fresh_process["modelopt_prunes_it"]


def test_reference_ran_hf_torch_code_and_none_of_ours(hf_module, cfg, runs):
    calls = runs["hf_calls"]
    mamba_layers = cfg.layer_pattern.counts["M"]
    for name in ("mamba2_chunk_scan", "causal_conv1d_fn", "mamba2_split_conv1d_scan_combined"):
        torch_code = getattr(hf_module, name).__wrapped__.__code__
        assert calls.count(torch_code) == mamba_layers, name
    limits = [layer.mixer.time_step_limit for layer in runs["hf_model"].model.layers
              if layer.block_type == "linear_attention"]  # HF's name for its Mamba blocks
    assert limits == [(PUBLISHED_DT_MIN, math.inf)] * mamba_layers
    assert not ran_our_kernels(calls), "HF's forward/backward called megatron_hybrid kernels"
    assert ran_our_kernels(runs["our_calls"]), "the call recorder does not see our kernels"


# --- parity ----------------------------------------------------------------------------------

def test_logits_and_loss_match(runs):
    diff = max_diff(runs["logits"], runs["hf_logits"])
    print(f"\nmax |logits diff| = {diff:.3g} (logits max |x| = "
          f"{runs['hf_logits'].abs().max().item():.3g}); loss diff = "
          f"{abs(runs['loss'].item() - runs['hf_loss'].item()):.3g}")
    assert runs["hf_logits"].std() > 0.5  # a meaningful signal, not near-zero logits
    assert diff <= TOLERANCE
    assert runs["loss"].item() == pytest.approx(runs["hf_loss"].item(), abs=1e-5)
    manual = F.cross_entropy(runs["hf_logits"][:, :-1].flatten(0, 1), ids()[:, 1:].flatten())
    assert runs["hf_loss"].item() == pytest.approx(manual.item(), abs=1e-6)


def test_gradients_match_for_every_parameter(cfg, megatron_model, runs):
    ours = {name: p.grad for name, p in megatron_model.named_parameters()}
    ours = hf_mapping.mcore_to_hf_state_dict(ours, cfg)
    reference = {name: p.grad for name, p in runs["hf_model"].named_parameters()}
    assert set(ours) == set(reference) and set(GRADIENT_SAMPLES) <= set(reference)
    worst = {}
    for name, expected in reference.items():
        scale = expected.abs().max().item()
        assert scale > 0, f"{name} has no gradient signal"
        worst[name] = max_diff(ours[name], expected) / scale
    print("\nlargest relative gradient differences:",
          sorted(worst.items(), key=lambda kv: -kv[1])[:3])
    assert max(worst.values()) <= TOLERANCE, {k: v for k, v in worst.items() if v > TOLERANCE}


def test_exported_config_and_weights_load_in_hf(tmp_path, hf_module, cfg, megatron_model, runs):
    """The export path: Megatron weights + hf_config_from_model -> save -> from_pretrained."""
    state = hf_mapping.mcore_to_hf_state_dict(megatron_model.state_dict(), cfg)
    exported = build_hf(hf_module, hf_mapping.hf_config_from_model(cfg), state)
    exported.save_pretrained(tmp_path)
    loaded = hf_module.NemotronHForCausalLM.from_pretrained(tmp_path).train()
    with torch.no_grad():
        logits, _ = hf_logits_and_loss(loaded, ids())
    assert max_diff(logits, runs["logits"]) <= TOLERANCE


# --- the dt clamp: it binds, it matters, and every kernel path applies it ---------------------

def heads_under_the_clamp(hf_weights) -> dict[str, int]:
    """Mamba heads per layer whose softplus(dt_bias) lies under the published clamp."""
    return {name: int((F.softplus(tensor) < PUBLISHED_DT_MIN).sum())
            for name, tensor in hf_weights.items() if name.endswith("dt_bias")}


def test_without_the_clamp_the_logits_differ_from_hf(cfg, hf_weights, runs):
    """Control: the same weights in a model that does not clamp (Megatron-Core's own mixer)
    miss HF's logits by far more than the tolerance."""
    assert cfg.mamba_dt_clamp_min == PUBLISHED_DT_MIN
    under = heads_under_the_clamp(hf_weights)
    assert len(under) == cfg.layer_pattern.counts["M"] and all(under.values()), under
    unclamped = converted_model(cfg.replace(mamba_dt_clamp_min=0.0), hf_weights)
    with torch.no_grad():
        logits, _ = megatron_logits_and_loss(unclamped, ids())
    diff = max_diff(logits, runs["hf_logits"])
    print(f"\nheads under {PUBLISHED_DT_MIN}: {under}; unclamped max |logits diff| = {diff:.3g}")
    assert diff > 100 * TOLERANCE


@contextlib.contextmanager
def kernel_arguments(function):
    """The arguments of every call of the Python function ``function`` in this thread."""
    calls = []

    def profile(frame, event, arg):
        if event == "call" and frame.f_code is function.__code__:
            calls.append(dict(frame.f_locals))

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield calls
    finally:
        sys.setprofile(previous)


def test_the_training_kernel_receives_clamped_steps(cfg, megatron_model):
    """What Megatron-Core's mixer hands the fused kernel (mamba_ssm's on GPUs, ours here):
    raw dt columns and dt_bias whose softplus never falls under the clamp."""
    with torch.no_grad(), kernel_arguments(kernels.ssd.mamba_split_conv1d_scan_combined) as calls:
        megatron_logits_and_loss(megatron_model, ids())
    assert len(calls) == 2 * cfg.layer_pattern.counts["M"]  # logits, then loss
    for call in calls:
        heads = call["dt_bias"].shape[0]
        assert_clamped(F.softplus(call["zxbcdt"][..., -heads:] + call["dt_bias"]))
        assert call["dt_limit"] == (0.0, math.inf)  # the clamp is in the inputs, not an option


def assert_clamped(dt: torch.Tensor) -> None:
    """No step under the clamp, and some exactly at it (where the clamp bound)."""
    assert dt.min().item() >= PUBLISHED_DT_MIN * (1 - 1e-5)
    assert (dt <= PUBLISHED_DT_MIN * (1 + 1e-5)).any()


def decode_after_prefill(mixer, hidden, prefill: int) -> torch.Tensor:
    """The mixer's outputs for ``hidden`` [s, 1, h]: the first ``prefill`` tokens by
    Megatron-Core's prefill (chunk scan, states kept), then one decode step per token
    (``selective_state_update``), the two paths its dynamic inference runs."""
    conv_shape, ssm_shape = mixer.mamba_state_shapes_per_request()
    conv_state, ssm_state = torch.zeros(1, *conv_shape), torch.zeros(1, *ssm_shape)
    zxBCdt, _ = mixer.in_proj(hidden[:prefill])
    outputs = [mixer.out_proj(mixer._ssm_prefill(zxBCdt, conv_state, ssm_state))[0]]
    for token in range(prefill, hidden.shape[0]):
        outputs.append(mixer._decode(hidden[token:token + 1], conv_state, ssm_state)[0])
    return torch.cat(outputs)


def test_decode_steps_clamp_as_the_forward_does(megatron_model):
    mixer = megatron_model.decoder.layers[0].mixer
    hidden = torch.randn(SEQ, 1, mixer.d_model, generator=torch.Generator().manual_seed(3))
    prefill = SEQ // 2
    with torch.no_grad(), kernel_arguments(kernels.ssd.selective_state_update) as steps:
        forward, _ = mixer(hidden)
        decoded = decode_after_prefill(mixer, hidden, prefill)
        mixer.dt_clamp_min = 0.0  # control: decode steps that do not clamp
        try:
            unclamped = decode_after_prefill(mixer, hidden, prefill)
        finally:
            mixer.dt_clamp_min = PUBLISHED_DT_MIN
    assert len(steps) == 2 * (SEQ - prefill)
    assert_clamped(torch.stack([F.softplus(step["dt"] + step["dt_bias"])
                                for step in steps[:SEQ - prefill]]))
    diff, control = max_diff(decoded, forward), max_diff(unclamped[prefill:], forward[prefill:])
    print(f"\ndecode vs forward: clamped {diff:.3g}, unclamped {control:.3g}")
    assert diff <= TOLERANCE and control > 100 * TOLERANCE


# --- the test can fail: wrong mappings change the logits -------------------------------------

def swap_rows(tensor, a, b, size):
    out = tensor.clone()
    out[a:a + size], out[b:b + size] = tensor[b:b + size], tensor[a:a + size]
    return out


def mutations(cfg):
    d, hpg = cfg.kv_channels, cfg.num_attention_heads // cfg.num_query_groups
    group_rows = (hpg + 2) * d
    d_inner, gn = cfg.mamba_d_inner, cfg.mamba_num_groups * cfg.mamba_state_dim
    qkv, in_proj = "decoder.layers.3.self_attention.linear_qkv.weight", \
        "decoder.layers.2.mixer.in_proj.weight"
    return {
        "swap two query heads of a group": (qkv, lambda w: swap_rows(w, 0, d, d)),
        "swap the key heads of two groups": (
            qkv, lambda w: swap_rows(w, hpg * d, group_rows + hpg * d, d)),
        "ungrouped [q, k, v] layout": (qkv, lambda w: torch.cat(hf_mapping._split_qkv(w, cfg))),
        "in_proj z <-> x": (in_proj, lambda w: swap_rows(w, 0, d_inner, d_inner)),
        "in_proj B <-> C": (in_proj, lambda w: swap_rows(w, 2 * d_inner, 2 * d_inner + gn, gn)),
    }


@pytest.mark.parametrize("mutation", ["swap two query heads of a group",
                                      "swap the key heads of two groups",
                                      "ungrouped [q, k, v] layout", "in_proj z <-> x",
                                      "in_proj B <-> C"])
def test_a_wrong_mapping_is_detected(mutation, cfg, hf_weights, runs):
    name, mutate = mutations(cfg)[mutation]
    state = hf_mapping.hf_to_mcore_state_dict(hf_weights, cfg)
    state[name] = mutate(state[name])
    model = build_model(cfg, ModelLayout(), backend="cpu", perform_initialization=False)
    hf_mapping.load_mcore_state_dict(model, state)
    with torch.no_grad():
        logits, _ = megatron_logits_and_loss(model, ids())
    assert max_diff(logits, runs["hf_logits"]) > 100 * TOLERANCE


# --- the mapping itself ----------------------------------------------------------------------

def test_round_trips_are_identical(cfg, hf_weights, megatron_model):
    mcore_state = hf_mapping.hf_to_mcore_state_dict(hf_weights, cfg)
    back = hf_mapping.mcore_to_hf_state_dict(mcore_state, cfg)
    assert back.keys() == hf_weights.keys()
    assert all(torch.equal(back[k], hf_weights[k]) for k in hf_weights)

    ours = {k: v for k, v in megatron_model.state_dict().items()
            if not k.endswith("._extra_state")}
    again = hf_mapping.hf_to_mcore_state_dict(hf_mapping.mcore_to_hf_state_dict(ours, cfg), cfg)
    assert again.keys() == ours.keys()
    assert all(torch.equal(again[k], ours[k]) for k in ours)


def test_published_checkpoint_prefix_is_accepted(cfg, hf_weights):
    published = hf_mapping.mcore_to_hf_state_dict(
        hf_mapping.hf_to_mcore_state_dict(hf_weights, cfg), cfg,
        prefix=hf_mapping.HF_CHECKPOINT_PREFIX)
    assert all(k.startswith(("backbone.", "lm_head.")) for k in published)
    via_published = hf_mapping.hf_to_mcore_state_dict(published, cfg)
    direct = hf_mapping.hf_to_mcore_state_dict(hf_weights, cfg)
    assert all(torch.equal(via_published[k], direct[k]) for k in direct)


def test_incomplete_or_extra_tensors_are_refused(cfg, hf_weights):
    missing = {k: v for k, v in hf_weights.items()
               if not k.endswith("layers.3.mixer.k_proj.weight")}
    with pytest.raises(hf_mapping.ConversionError, match="k_proj|linear_qkv"):
        hf_mapping.hf_to_mcore_state_dict(missing, cfg)
    with pytest.raises(hf_mapping.ConversionError, match="layers.9"):
        hf_mapping.hf_to_mcore_state_dict({**hf_weights, "model.layers.9.norm.weight": None}, cfg)


@pytest.mark.parametrize("name", sorted(FLAVORS))
def test_config_round_trip(name):
    for cfg in (get_flavor(name), get_flavor(name).replace(mamba_dt_clamp_min=0.001)):
        hf = hf_mapping.hf_config_from_model(cfg)
        assert hf.hybrid_override_pattern == cfg.layer_pattern.layers
        clamp = cfg.mamba_dt_clamp_min
        assert (hf.time_step_min, tuple(hf.time_step_limit)) == (clamp, (clamp, math.inf))
        if cfg.num_moe_experts:  # HF computes the router in fp32 (tests/model/test_hf_moe.py)
            cfg = cfg.replace(moe_router_dtype="fp32")
        assert hf_mapping.model_config_from_hf(hf) == cfg.replace(pattern=cfg.layer_pattern.layers)


def test_published_config_converts_with_its_clamp(hf_config, cfg):
    assert (cfg.mamba_dt_clamp_min, cfg.mamba_dt_min, cfg.mamba_dt_max) == (0.001, 0.001, 0.1)
    assert (cfg.mamba_num_groups, cfg.num_query_groups) == (8, 8)
    back = hf_mapping.hf_config_from_model(cfg)
    assert (back.time_step_min, back.time_step_max) == (0.001, 0.1)


def test_hf_configs_that_cannot_convert_exactly_are_refused(hf_config):
    from transformers import NemotronHConfig

    for change in ({"tie_word_embeddings": True}, {"mlp_bias": True},
                   {"mlp_hidden_act": "silu"}, {"layer_norm_epsilon": 1e-6},
                   {"num_nextn_predict_layers": 1}):
        bad = NemotronHConfig(**{**hf_config.to_dict(), **change})
        with pytest.raises(hf_mapping.ConversionError):
            hf_mapping.model_config_from_hf(bad)
    with pytest.raises(hf_mapping.ConversionError, match="MoE"):
        hf_mapping.hf_config_from_model(get_flavor("tiny-hybrid").replace(
            pattern="M-E*", num_moe_experts=4))
    with pytest.raises(hf_mapping.ConversionError, match="norm_eps"):
        hf_mapping.hf_config_from_model(get_flavor("tiny-hybrid").replace(norm_eps=1e-6))
    for inexact in ({"mamba_dt_clamp_min": 0.002}, {"mamba_dt_min": 0.002}):
        with pytest.raises(hf_mapping.ConversionError, match="time_step_min is"):
            hf_mapping.hf_config_from_model(get_flavor("tiny-hybrid").replace(**inexact))
