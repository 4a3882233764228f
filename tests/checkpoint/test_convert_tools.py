"""HF <-> Megatron checkpoint conversion, tensor by tensor (``megatron-hybrid convert``).

- Every tiny flavor, with the dt clamp of NVIDIA's published configs (``time_step_min=0.001``,
  which transformers clamps at, beside ``time_step_limit=(0, inf)``): a checkpoint saved by
  transformers itself (several safetensors shards) is imported; our Megatron model loads it
  with ``checkpoint.load_weights`` (what ``checkpoint.load=OUT`` runs) and gives the HF model's
  logits; exporting it back gives the same tensors, byte for byte, in a directory
  transformers loads.
- bf16 stays bf16 both ways; the streamed checkpoint is the one ``checkpoint.save_weights``
  writes (same tensor index), so it loads in any layout.
- A pruned checkpoint written by the training code (tiny-nano-v2-9b, stage marks in its
  pattern) exports to a config whose pattern and layer count are the checkpoint's; a meta.json
  that disagrees with the saved tensors is refused.
- Memory: converting a 299 MiB, four-shard checkpoint grows the converting process by less
  than half the model each way (measured: about a fifth), where holding its tensors at once
  takes nearly all of it.
- Bad inputs: one line each, and nothing left behind.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_hybrid import backends

backends.install("cpu")

from test_hf_parity import (  # noqa: E402  (the parity test's reference and weights)
    PUBLISHED,
    PUBLISHED_DT_MIN,
    TOLERANCE,
    build_hf,
    hf_logits_and_loss,
    ids,
    load_hf_torch_reference,
    megatron_logits_and_loss,
    model_parallel,  # noqa: F401  (the one-process groups, for this module too)
    random_tensor,
)

from megatron_hybrid import mcore  # noqa: E402
from megatron_hybrid.checkpoint import dist_checkpoint, hf_checkpoint
from megatron_hybrid.errors import USER_ERRORS  # noqa: E402
from megatron_hybrid.model import hf_mapping
from megatron_hybrid.model.build import ModelLayout, build_model  # noqa: E402
from megatron_hybrid.model.config import ModelConfig  # noqa: E402
from megatron_hybrid.model.flavors import FLAVORS, get_flavor  # noqa: E402

TINY_FLAVORS = sorted(name for name in FLAVORS
                      if name.startswith("tiny-") and not get_flavor(name).num_moe_experts)
"""The tiny flavors without experts (the MoE twin's conversions: tests/model/test_hf_moe.py)."""


@pytest.fixture(scope="module")
def hf_module():
    return load_hf_torch_reference()


def save_hf_checkpoint(hf_module, directory: Path, cfg: ModelConfig, *, dtype=torch.float32,
                       shards: int = 3, **hf_fields) -> int:
    """Random weights saved by transformers' own save_pretrained in ``shards`` or more
    safetensors files (``backbone.`` names, an index), plus a tokenizer; returns their bytes.
    ``hf_fields`` set fields of the HF config last."""
    hf_config = hf_mapping.hf_config_from_model(cfg, **hf_fields)
    empty = build_hf(hf_module, hf_config, None)
    shapes = {name: tensor.shape for name, tensor in empty.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    weights = {name: random_tensor(name, shape, generator) for name, shape in shapes.items()}
    model = build_hf(hf_module, hf_config, weights).to(dtype)
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(directory, max_shard_size=size // shards)
    write_tokenizer(directory)
    return size


def write_tokenizer(directory: Path) -> None:
    import tokenizers

    vocab = {"<unk>": 0, "</s>": 1, "<pad>": 2, "hello": 3}
    tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>")).save(
        str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 256}\n')


def hf_tensors(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def raw_bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().reshape(-1).view(torch.uint8)


def megatron_logits(cfg: ModelConfig, checkpoint_dir: Path) -> torch.Tensor:
    model = build_model(cfg, ModelLayout(), backend="cpu", perform_initialization=False)
    dist_checkpoint.load_weights([model], checkpoint_dir)
    with torch.no_grad():
        return megatron_logits_and_loss(model.eval(), ids())[0]


def hf_logits(hf_module, directory: Path) -> torch.Tensor:
    model = hf_module.NemotronHForCausalLM.from_pretrained(directory).eval()
    with torch.no_grad():
        return hf_logits_and_loss(model, ids())[0]


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


# --- every tiny flavor: import, parity, export ------------------------------------------------

@pytest.fixture(scope="module", params=TINY_FLAVORS)
def converted(request, hf_module, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    cfg = get_flavor(request.param).replace(mamba_dt_clamp_min=PUBLISHED_DT_MIN)
    size = save_hf_checkpoint(hf_module, root / "hf", cfg,
                              time_step_limit=PUBLISHED["time_step_limit"])
    hf_checkpoint.import_hf(root / "hf", root / "mcore")
    hf_checkpoint.export_hf(root / "mcore", root / "back", max_shard_bytes=size // 3)
    return cfg, root


def test_input_has_several_shards(converted):
    _, root = converted
    assert len(list((root / "hf").glob("model-*-of-*.safetensors"))) >= 3
    assert len(list((root / "back").glob("model-*-of-*.safetensors"))) >= 3


def test_imported_checkpoint_gives_the_hf_logits(converted, hf_module):
    cfg, root = converted
    reference = hf_logits(hf_module, root / "hf")
    saved_cfg = ModelConfig(**dist_checkpoint.read_meta(root / "mcore")["model"])
    logits = megatron_logits(saved_cfg, root / "mcore")
    assert reference.std() > 0.5  # a meaningful signal
    assert max_diff(logits, reference) <= TOLERANCE


def test_round_trip_gives_the_same_bytes(converted):
    _, root = converted
    original, back = hf_tensors(root / "hf"), hf_tensors(root / "back")
    assert original.keys() == back.keys()
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(raw_bytes(back[name]), raw_bytes(tensor)), name


def test_exported_directory_gives_the_same_logits_in_transformers(converted, hf_module):
    _, root = converted
    assert torch.equal(hf_logits(hf_module, root / "back"), hf_logits(hf_module, root / "hf"))


def test_round_trip_keeps_the_model_config_and_tokenizer(converted):
    cfg, root = converted
    meta = dist_checkpoint.read_meta(root / "mcore")
    assert ModelConfig(**meta["model"]) == cfg.replace(pattern=cfg.layer_pattern.layers)
    assert meta["train_state"]["step"] == 0 and meta["tokenizer"]["kind"] == "hf"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        original = (root / "hf" / name).read_bytes()
        assert (root / "mcore" / name).read_bytes() == original
        assert (root / "back" / name).read_bytes() == original
    exported = json.loads((root / "back" / "config.json").read_text())
    assert json.loads((root / "hf" / "config.json").read_text())["time_step_min"] == 0.001
    assert exported["time_step_min"] == 0.001 and exported["time_step_limit"][0] == 0.001
    layers = cfg.layer_pattern.layers
    assert exported["hybrid_override_pattern"] == layers
    assert exported["num_hidden_layers"] == len(exported["layers_block_type"]) == len(layers)


# --- dtype and format ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bf16_round_trip(hf_module, tmp_path_factory):
    root = tmp_path_factory.mktemp("bf16")
    cfg = get_flavor("tiny-hybrid")
    save_hf_checkpoint(hf_module, root / "hf", cfg, dtype=torch.bfloat16)
    hf_checkpoint.import_hf(root / "hf", root / "mcore")
    hf_checkpoint.export_hf(root / "mcore", root / "back")
    return cfg, root


def test_bf16_stays_bf16(bf16_round_trip):
    _, root = bf16_round_trip
    saved = mcore.dist_checkpointing.load_tensors_metadata(str(root / "mcore"))
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    original, back = hf_tensors(root / "hf"), hf_tensors(root / "back")
    assert {t.dtype for t in back.values()} == {torch.bfloat16}
    assert all(torch.equal(raw_bytes(back[k]), raw_bytes(original[k])) for k in original)
    assert json.loads((root / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    assert (root / "back" / hf_checkpoint.SINGLE_FILE).is_file()  # under 5GB: one file


def test_bf16_checkpoint_loads_into_an_fp32_model(bf16_round_trip):
    cfg, root = bf16_round_trip
    model = build_model(cfg, ModelLayout(), backend="cpu", perform_initialization=False)
    dist_checkpoint.load_weights([model], root / "mcore")
    expected = hf_mapping.hf_to_mcore_state_dict(hf_tensors(root / "hf"), cfg)
    loaded = model.state_dict()
    assert all(loaded[k].dtype == torch.float32 and torch.equal(loaded[k], v.float())
               for k, v in expected.items())


def test_streamed_checkpoint_is_what_save_weights_writes(good_hf_dir, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    hf_checkpoint.import_hf(good_hf_dir, tmp_path / "streamed")
    model = build_model(get_flavor("tiny-hybrid"), ModelLayout(), backend="cpu",
                        perform_initialization=False)
    dist_checkpoint.load_weights([model], tmp_path / "streamed")
    dist_checkpoint.save_weights([model], tmp_path / "saved")
    streamed = FileSystemReader(str(tmp_path / "streamed")).read_metadata()
    saved = FileSystemReader(str(tmp_path / "saved")).read_metadata()
    assert streamed.state_dict_metadata == saved.state_dict_metadata
    for name in ("metadata.json", "common.pt"):
        streamed_file, saved_file = tmp_path / "streamed" / name, tmp_path / "saved" / name
        assert streamed_file.read_bytes() == saved_file.read_bytes()


# --- pruned checkpoints from the training code ------------------------------------------------

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny" / "pretrain.yaml"


@pytest.fixture(scope="module")
def pruned_checkpoint(tmp_path_factory):
    """A checkpoint of tiny-nano-v2-9b (a depth-pruned pattern with a stage mark) written by a
    real training run (weights, optimizer state, meta.json), and its model's logits."""
    out = tmp_path_factory.mktemp("run")
    command = [sys.executable, "-m", "megatron_hybrid", "train", str(RECIPE),
               "model.flavor=tiny-nano-v2-9b", "train.max_steps=1", "train.seq_length=64",
               "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_batches=1",
               "scheduler.warmup_steps=0", "logging.progress_bar=off", "logging.plot=false",
               "logging.tensorboard=false", f"output_dir={out}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    cfg = get_flavor("tiny-nano-v2-9b")
    path = out / "checkpoints" / "step_000001"
    return cfg, path, megatron_logits(cfg, path)


def test_pruned_checkpoint_exports_its_own_pattern(pruned_checkpoint, hf_module, tmp_path):
    cfg, path, logits = pruned_checkpoint
    assert "|" in dist_checkpoint.read_meta(path)["model"]["pattern"] and cfg.num_layers == 31
    saved = mcore.dist_checkpointing.load_tensors_metadata(str(path))
    assert any(key.startswith("optimizer.") for key in saved)  # ignored by the export
    hf_checkpoint.export_hf(path, tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert exported["hybrid_override_pattern"] == cfg.layer_pattern.layers
    assert exported["num_hidden_layers"] == len(exported["layers_block_type"]) == 31
    layers = {int(name.split(".")[2]) for name in hf_tensors(tmp_path / "hf")
              if name.startswith("backbone.layers.")}
    assert layers == set(range(31))
    assert max_diff(hf_logits(hf_module, tmp_path / "hf"), logits) <= TOLERANCE


def test_config_that_disagrees_with_the_tensors_is_refused(pruned_checkpoint, tmp_path):
    _, path, _ = pruned_checkpoint
    unpruned = shutil.copytree(path, tmp_path / "ckpt")
    meta = json.loads((unpruned / "meta.json").read_text())
    meta["model"]["pattern"] = get_flavor("tiny-nano-v2-12b").pattern  # weights stay pruned
    (unpruned / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(hf_mapping.ConversionError, match=r"does not hold the model its config "
                                                      r"describes \(.*35 layers\): missing \["):
        hf_checkpoint.export_hf(unpruned, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_truncated_checkpoint_file_is_one_line_and_leaves_nothing(pruned_checkpoint, tmp_path):
    _, path, _ = pruned_checkpoint
    damaged = shutil.copytree(path, tmp_path / "ckpt")
    largest = max(damaged.glob("*.distcp"), key=lambda file: file.stat().st_size)
    largest.write_bytes(largest.read_bytes()[: largest.stat().st_size // 2])
    with pytest.raises(USER_ERRORS) as error:
        hf_checkpoint.export_hf(damaged, tmp_path / "hf")
    assert "\n" not in str(error.value) and f"reading {damaged}" in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


# --- memory ----------------------------------------------------------------------------------

MEASURE = """
import json, sys
from pathlib import Path
from megatron_hybrid import backends
backends.install("cpu")
import argparse
from safetensors.torch import load_file
from megatron_hybrid.model import hf_mapping  # noqa: F401  (imports before the baseline)
from megatron_hybrid.checkpoint import hf_checkpoint
from megatron_hybrid.cli.checkpoint import COMMANDS
import transformers.models.nemotron_h.modeling_nemotron_h  # noqa: F401

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

def peak_growth(work):
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    work()
    return status("VmHWM") - before

CONVERT = COMMANDS["convert"]

def convert_run(*argv):
    parser = argparse.ArgumentParser()
    CONVERT.add_arguments(parser)
    CONVERT.run(parser.parse_args(argv))

def hold_every_tensor(directory, held):
    held += [t.clone() for f in sorted(Path(directory).glob("*.safetensors"))
             for t in load_file(f).values()]

direction, source, out = sys.argv[1:]
if direction == "hf-to-mcore":
    print(json.dumps({"import": peak_growth(lambda: convert_run(direction, source, out))}))
else:
    export = peak_growth(lambda: convert_run(direction, source, out, "--max-shard-size", "50MB"))
    held = []
    print(json.dumps({"export": export, "all_at_once": peak_growth(
        lambda: hold_every_tensor(out, held))}))
"""
MEMORY_MODEL = ModelConfig(
    pattern="M-M-M-M*-M-M-M-M-M-" * 2, hidden_size=512, ffn_hidden_size=2048,
    num_attention_heads=8, num_query_groups=2, kv_channels=64, mamba_num_heads=16,
    mamba_head_dim=64, mamba_state_dim=64, mamba_num_groups=2, vocab_size=8192, seq_length=256,
    mamba_chunk_size=64)
"""38 layers, 299 MiB in fp32; the largest tensors (embedding, output layer) are 16 MiB."""
STREAMING_BOUND = 0.5
"""Peak RSS growth a conversion may take, as a fraction of the model's bytes. Measured (six
runs over this model and its 19-layer half, each direction in a fresh process): import
34-42 MiB, export 52-62 MiB whatever the depth, i.e. at most 21% of this model (a 2.4x
margin); holding every tensor at once took 282-291 MiB, 94-97% of it."""


def peak_rss_growth(direction: str, source: Path, out: Path) -> dict[str, int]:
    """Peak RSS growth of one conversion in a fresh process (its own heap: the cpu backend
    keeps freed memory in the heap, which would hide a later step's growth)."""
    result = subprocess.run([sys.executable, "-c", MEASURE, direction, str(source), str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_conversion_memory_follows_a_layer_not_the_model(hf_module, tmp_path):
    save_hf_checkpoint(hf_module, tmp_path / "hf", MEMORY_MODEL, shards=4)
    shards = list((tmp_path / "hf").glob("model-*.safetensors"))
    model_bytes = sum(shard.stat().st_size for shard in shards)
    growth = {**peak_rss_growth("hf-to-mcore", tmp_path / "hf", tmp_path / "ckpt"),
              **peak_rss_growth("mcore-to-hf", tmp_path / "ckpt", tmp_path / "back")}
    print(f"\nmodel {model_bytes / 2**20:.0f} MiB in {len(shards)} shards; peak RSS growth: "
          + ", ".join(f"{key} {value / 2**20:.0f} MiB" for key, value in growth.items()))
    assert len(shards) >= 4 and model_bytes > 280 * 2**20
    bound = STREAMING_BOUND * model_bytes
    assert growth["import"] < bound and growth["export"] < bound
    # Control: the same measurement sees a whole model held at once, far over the bound.
    assert growth["all_at_once"] > 1.5 * bound
    assert hf_tensors(tmp_path / "back").keys() == hf_tensors(tmp_path / "hf").keys()


# --- bad inputs ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def good_hf_dir(hf_module, tmp_path_factory):
    directory = tmp_path_factory.mktemp("good") / "hf"
    save_hf_checkpoint(hf_module, directory, get_flavor("tiny-hybrid"))
    return directory


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def shards(directory: Path) -> list[Path]:
    return sorted(directory.glob("model-*-of-*.safetensors"))


# Each damages a good HF directory and returns what the one-line error must say.

def llama(directory: Path) -> str:
    (directory / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 512}))
    return "describes a 'llama' model (LlamaForCausalLM): only NemotronHForCausalLM"


def missing_shard(directory: Path) -> str:
    shard = shards(directory)[1]
    shard.unlink()
    return f"shards {shard.name} named in model.safetensors.index.json are missing"


def layer_count_disagrees(directory: Path) -> str:
    edit_config(directory, num_hidden_layers=8)
    return "num_hidden_layers is 8 but the layer pattern 'M-M*-M-' has 7 layers"


def truncated_shard(directory: Path) -> str:
    shard = shards(directory)[-1]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return f"{shard.name} is not a readable safetensors file"


def weights_of_another_shape(directory: Path) -> str:
    edit_config(directory, intermediate_size=128)
    return "the weights do not match config.json"


@pytest.mark.parametrize("damage", [llama, missing_shard, layer_count_disagrees,
                                    truncated_shard, weights_of_another_shape],
                         ids=lambda damage: damage.__name__)
def test_bad_input_is_one_line_and_leaves_nothing(good_hf_dir, tmp_path, damage):
    source = shutil.copytree(good_hf_dir, tmp_path / "hf")
    assert len(shards(source)) >= 3
    expected = damage(source)
    with pytest.raises(USER_ERRORS) as error:
        hf_checkpoint.import_hf(source, tmp_path / "out")
    message = str(error.value)
    assert "\n" not in message and expected in message, message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_existing_output_is_never_touched(good_hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(hf_mapping.ConversionError, match="already exists"):
        hf_checkpoint.import_hf(good_hf_dir, tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_failure_while_writing_removes_the_partial_output(good_hf_dir, tmp_path, monkeypatch):
    """A shard that breaks after the checks passed (here: every read fails) leaves nothing."""
    def broken(self, name):
        raise hf_mapping.ConversionError(f"{name}: read failed")

    monkeypatch.setattr(hf_checkpoint.HFCheckpoint, "read", broken)
    with pytest.raises(hf_mapping.ConversionError, match="read failed"):
        hf_checkpoint.import_hf(good_hf_dir, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_sizes_parse_like_hugging_face():
    assert hf_checkpoint.parse_size("5GB") == 5 * 10**9
    assert hf_checkpoint.parse_size("500mb") == 500 * 10**6
    assert hf_checkpoint.parse_size("1.5KB") == 1500
    for bad in ("", "-1GB", "5 parsecs", "0"):
        with pytest.raises(ValueError, match="give a positive size"):
            hf_checkpoint.parse_size(bad)
