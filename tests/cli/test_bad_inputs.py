"""The bad-input catalogue: every case is refused in one line naming the fix, exit code 2, no
traceback, nothing written. Cases run in-process through ``megatron_hybrid.cli.main``.

docs/bad_inputs.md is generated from ``CASES``: ``python -m tests.test_bad_inputs --write-docs``
(a test fails when the committed table is stale).
"""

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_hybrid import backends, cli

backends.install("cpu")
# Megatron-Core's first import enables faulthandler on sys.stderr, which has no file descriptor
# inside a captured test: import it here, before any case runs, whatever the order.
from megatron_hybrid import mcore  # noqa: E402, F401

ROOT = Path(__file__).resolve().parents[2]
PRETRAIN = "recipes/tiny/pretrain.yaml"
PRUNE = "recipes/tiny/prune.yaml"
DOCS = ROOT / "docs" / "bad_inputs.md"
FAST = ["train.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4",
        "scheduler.warmup_steps=0", "logging.progress_bar=off"]


@dataclass(frozen=True)
class Case:
    area: str
    args: tuple[str, ...]
    """Command-line arguments; ``{tmp}`` is the case's scratch folder, ``{ckpt}`` a real
    one-step checkpoint. ``output_dir={tmp}/run`` is added to train and prune commands."""
    message: str
    """The part of the one error line that must appear (it names the fix)."""
    files: tuple[tuple[str, str], ...] = ()
    """Inputs to create first: (path under {tmp}, kind), kinds in ``make_file``."""


def train(*overrides, files=(), area="", message=""):
    return Case(area, ("train", PRETRAIN, *FAST, *overrides), message, tuple(files))


def prune(*overrides, message=""):
    return Case("prune targets", ("prune", PRUNE, "checkpoint.load={ckpt}", *overrides), message)


def launch(*args, message=""):
    return Case("launch arguments", ("launch", *args), message)


def stage(command, *overrides, area, message):
    """A ``grpo`` or ``reward-model`` command on its tiny recipe."""
    recipe = f"recipes/tiny/{command.replace('-', '_')}.yaml"
    return Case(area, (command, recipe, *overrides), message)


P, R, PAR, D, T, C, U = ("patterns", "recipes and overrides", "parallel sizes", "data files",
                         "tokenizer", "checkpoints", "using a model")
CASES = [
    train("model.pattern=M-x*", area=P, message="invalid symbol 'x' at position 2 of 'M-x*'"),
    train("model.pattern=''", area=P, message="empty pattern: give one symbol per layer"),
    train("model.pattern=M-E-", area=P,
          message="model.num_moe_experts must be set when the pattern has 'E' layers"),
    train("model.pattern=M-|", area=P, message="every stage needs at least one layer"),
    train("model.mtp_num_layers=1", area=R,
          message="MambaModel has no multi-token-prediction block"),
    Case(P, ("launch", "torchrun", "--nproc-per-node", "2", PRETRAIN, "model.pattern=M-M-*",
             "parallel.pp=2"), "cannot split the 5 layers of 'M-M-*' evenly into 2"),
    train("train.max_step=3", area=R, message="did you mean train.max_steps?"),
    train("train.max_steps=ten", area=R, message="train.max_steps: expected int, got 'ten'"),
    train("max_steps", area=R, message="expected key=value with a dotted key"),
    train("train.lr=[1", area=R, message="cannot parse the value"),
    train("base=other.yaml", area=R, message="only a recipe file can name bases"),
    Case(R, ("train", "{tmp}/missing.yaml"), "recipe file not found"),
    Case(R, ("train", "{tmp}/bad.yaml"), "invalid YAML at line 2, column 1",
         (("bad.yaml", "yaml:train: [1"),)),
    Case(R, ("train", "{tmp}/list.yaml"), "a recipe must be a mapping of sections",
         (("list.yaml", "yaml:- train"),)),
    Case(R, ("train", "{tmp}/loop.yaml"), "recipe inheritance cycle",
         (("loop.yaml", "yaml:base: loop.yaml"),)),
    Case(R, ("train", "{tmp}/twice.yaml"), "duplicate key 'name'",
         (("twice.yaml", "yaml:name: a\nname: b"),)),
    train("model.flavor=nano-v2-13b", area=R, message="did you mean 'nano-v2-12b'?"),
    train("model=tiny", area=R, message="for a flavor write model: {flavor: tiny}"),
    train("optimizer.lr=-1", area=R, message="optimizer.lr=-1.0 must be > 0"),
    train("optimizer.min_lr=1", area=R, message="must be between 0 and optimizer.lr"),
    train("scheduler.kind=cosin", area=R, message="did you mean 'cosine'?"),
    train("scheduler.warmup_steps=500", area=R, message="set scheduler.warmup_steps="),
    train("train.global_batch_size=5", area=R, message="e.g. train.global_batch_size=4 or 6"),
    train("train.seq_length=4096", area=R, message="lower train.seq_length or raise"),
    train("train.precision=bf16", area=R, message="set train.precision=fp32"),
    train("output_dir=runs/{nme}", area=R, message="only {name} may be substituted"),
    train("train.max_bad_steps=-1", area=R, message="train.max_bad_steps=-1 must be an integer"),
    train("train.loss_spike_factor=0.5", area=R,
          message="train.loss_spike_factor=0.5 must be > 1"),
    train("parallel.pp=4", area=PAR, message="does not divide world size 1"),
    train("parallel.sequence_parallel=true", area=PAR, message="set parallel.tp=2 or more"),
    train("parallel.backend=gpu", area=PAR, message="choose one of auto, cpu, cuda"),
    train("parallel.timeout_minutes=0", area=PAR, message="parallel.timeout_minutes=0.0 must be > 0"),
    train("parallel.cp=0", area=PAR, message="parallel.cp=0 must be a positive integer"),
    train("data.default_corpus=false", area=D, message="choose exactly one source"),
    train("data.default_corpus=false", "data.blend=[{tmp}/none]", area=D,
          message="none.idx: missing; create it with tools/preprocess_data.py"),
    train("data.default_corpus=false", "data.blend=[{tmp}/empty]", area=D,
          files=[("empty", "empty-dataset")], message="empty dataset (no tokens)"),
    train("data.default_corpus=false", "data.blend=[{tmp}/cut]", area=D,
          files=[("cut", "truncated-idx")], message="cut.idx: truncated"),
    train("data.default_corpus=false", "data.blend=[{tmp}/junk]", area=D,
          files=[("junk", "not-an-idx")], message="not a Megatron-Core index file"),
    train("data.default_corpus=false", "data.blend=[{tmp}/short]", area=D,
          files=[("short", "short-bin")], message="(truncated, or from another run)"),
    train("data.default_corpus=false", "data.blend=[{tmp}/x]", "data.split=a,b", area=D,
          message="give train,valid,test shares like '98,2,0'"),
    train("data.split=90,10,0", area=D,
          message="does not apply to data.default_corpus=true, which has its own held-out"),
    train("tokenizer.kind=hf", area=T, message="tokenizer.kind=hf needs tokenizer.path"),
    train("tokenizer.kind=hf", "tokenizer.path={tmp}/tokenizer.json", area=T,
          message="tokenizer.json not found"),
    train("tokenizer.vocab_size=4096", area=T, message="set tokenizer.vocab_size=1024"),
    train("tokenizer.vocab_size=512", "output_dir={tmp}/resumed", area=T,
          files=[("resumed", "run-with-checkpoint")],
          message="set the tokenizer section as in its config.yaml"),
    train("checkpoint.load={tmp}/nowhere", area=C, message="does not exist: check the path"),
    train("checkpoint.load=''", area=C, message="checkpoint.load is empty"),
    train("checkpoint.load={tmp}/partial", area=C, files=[("partial", "partial-checkpoint")],
          message="point to a step_* folder of a finished save"),
    train("checkpoint.load={tmp}/cut", area=C, files=[("cut", "truncated-checkpoint")],
          message="the checkpoint is damaged or incomplete; use another step_* folder"),
    train("checkpoint.load={tmp}/other", area=C, files=[("other", "other-model-checkpoint")],
          message="holds another model"),
    prune("prune.export_config=null", message="nothing to prune: set prune.export_config"),
    prune("prune.export_config.hidden_size=100",
          message="choose a multiple of prune.hidden_size_divisor (16) up to 128"),
    prune("prune.export_config.hidden_size=256", message="is not a size the model's 128"),
    prune("parallel.tp=2", message="set parallel.tp=1 parallel.cp=1"),
    Case("prune targets", ("prune", PRUNE, "checkpoint.load={tmp}/nowhere"),
         "does not exist: check the path"),
    launch("torchrun", "--nnodes", "2", PRETRAIN, message="give --master-addr HOST"),
    launch("torchrun", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h", PRETRAIN,
           message="node ranks run from 0 to 1"),
    launch("torchrun", "--nproc-per-node", "3", PRETRAIN, "parallel.tp=2",
           message="does not divide world size 3"),
    launch("torchrun", "--nproc-per-node", "4", PRETRAIN, "parallel.tp=4",
           message="does not divide model.mamba_num_groups (2): choose parallel.tp from 1, 2"),
    launch("torchrun", "--nproc-per-node", "0", PRETRAIN, message="must be at least 1"),
    launch("slurm", "--nodes", "1", PRETRAIN, message="give --gpus-per-node G"),
    launch("slurm", "--nodes", "1", "--cluster", "{tmp}/cluster.yaml", PRETRAIN,
           message="cluster profile not found"),
    launch("slurm", "--nodes", "1", "--gpus-per-node", "8", "--mounts", "nocolon", PRETRAIN,
           message="expected SRC:DST[:FLAGS]"),
    Case(U, ("generate", "{ckpt}"),
         "no prompt: give --prompt TEXT, --prompt-ids 1,2,3 or --prompts FILE.jsonl"),
    Case(U, ("generate", "{tmp}/nowhere", "--prompt", "a"),
         "does not exist: give a checkpoint (step_*) or a Hugging Face model directory"),
    Case(U, ("generate", "{ckpt}", "--prompt", "a", "--tp", "2"),
         "needs 2 processes, got 1: launch with torchrun --nproc-per-node 2"),
    Case(U, ("generate", "{ckpt}", "--prompt", "a", "--max-new-tokens", "0"),
         "max_new_tokens=0: ask for at least 1 token"),
    Case(U, ("generate", "{ckpt}", "--prompt-ids", "1,x"),
         "--prompt-ids '1,x': give comma-separated token ids, e.g. 1,2,3"),
    Case(U, ("generate", "{ckpt}", "--prompt", "a", "--greedy", "--temperature", "0.7"),
         "--greedy with --temperature, --top-k or --top-p: choose greedy or sampling"),
    Case(U, ("generate", "{ckpt}", "--prompt", "a", "--top-k", "5"),
         "top_k=5, top_p=0.0 at temperature 0: sampling needs a temperature > 0"),
    Case(U, ("serve", "{ckpt}", "--max-requests", "0"), "--max-requests 0: allow at least 1"),
    Case(U, ("eval", "{ckpt}", "--tasks", "nosuchtask"),
         "unknown task 'nosuchtask': give a task YAML file"),
    Case(U, ("quantize", "{ckpt}", "--format", "fp16"),
         "format='fp16': choose one of fp8, nvfp4, int8_sq, int4_awq"),
    Case(U, ("quantize", "{tmp}/nowhere", "--format", "fp8"),
         "config.yaml does not exist: give a checkpoint folder (step_*) with its config.yaml"),
    Case(U, ("quantize", "{ckpt}", "--format", "fp8", "--heldout-samples", "3"),
         "--heldout-samples (3) must be a multiple of train.micro_batch_size (2)"),
    Case(U, ("quantize", "{ckpt}", "--format", "int8_sq", "--export-hf", "{tmp}/hf"),
         "ModelOpt's Megatron export writes fp8 and nvfp4, not int8_sq"),
    Case(U, ("quantize", "{ckpt}", "--format", "nvfp4", "--export-hf", "{tmp}/hf",
             "--hf-target", "transformers"),
         "--hf-target transformers writes transformers' FP8 format, not nvfp4"),
    stage("grpo", "train.global_batch_size=16", area=R,
          message="must equal grpo.rollout_batch * grpo.group_size = 128 (a step trains on "
                  "its rollouts): set train.global_batch_size=128"),
    stage("grpo", "grpo.group_size=1", area=R,
          message="a group needs at least 2 completions to normalize their rewards"),
    stage("grpo", "grpo.rewards={nope: 1.0}", area=R, message="is not module:function"),
    stage("grpo", "grpo.max_new_tokens=90", area=R, message="set train.seq_length="),
    stage("grpo", "grpo.train_problems=2000", area=R,
          message="grpo.train_problems=2000 must be between 0 and 1643 (the task's training "
                  "problems; 0: all)"),
    stage("grpo", "grpo.reward_model={ckpt}", area=C,
          message="has no one-score reward head: give a checkpoint of megatron-hybrid "
                  "reward-model"),
    stage("reward-model", "train.micro_batch_size=3", "train.global_batch_size=6", area=R,
          message="must be even for reward_model.objective=bradley_terry"),
    stage("reward-model", "reward_model.objective=regression", area=R,
          message="needs rated responses: set reward_model.train_path"),
]


def case_id(case: Case) -> str:
    return " ".join(arg for arg in case.args if arg not in FAST)[:70]


def needs_checkpoint(case: Case) -> bool:
    return any("{ckpt}" in arg for arg in case.args) or any(
        kind.endswith("checkpoint") for _, kind in case.files)


def resolve(arg: str, tmp: Path, checkpoint: Path | None) -> str:
    if arg.startswith("recipes/"):
        return str(ROOT / arg)
    return arg.replace("{tmp}", str(tmp)).replace("{ckpt}", str(checkpoint))


# -- inputs -------------------------------------------------------------------------------------

def make_file(path: Path, kind: str, checkpoint: Path | None) -> None:
    """Create the bad input ``kind`` at ``path``."""
    if kind.startswith("yaml:"):
        path.write_text(kind.removeprefix("yaml:") + "\n")
    elif kind in INDEXED:
        idx, binary = INDEXED[kind]
        Path(f"{path}.idx").write_bytes(idx)
        Path(f"{path}.bin").write_bytes(binary)
    elif kind == "run-with-checkpoint":
        shutil.copytree(checkpoint.parent, path / "checkpoints")
    else:
        shutil.copytree(checkpoint, path)
        CHECKPOINT_DAMAGE[kind](path)


def _idx(sequences: list[int]) -> bytes:
    """A Megatron-Core .idx for documents of ``sequences`` int32 tokens (dtype code 4)."""
    import numpy

    header = b"MMIDIDX\x00\x00" + numpy.array([1], "<u8").tobytes() + bytes([4])
    counts = numpy.array([len(sequences), len(sequences) + 1], "<u8").tobytes()
    lengths = numpy.array(sequences, "<i4").tobytes()
    pointers = numpy.cumsum([0, *sequences[:-1]], dtype="<i8") * 4
    documents = numpy.arange(len(sequences) + 1, dtype="<i8").tobytes()
    return header + counts + lengths + pointers.astype("<i8").tobytes() + documents


INDEXED = {
    "empty-dataset": (_idx([0]), b""),
    "truncated-idx": (_idx([8, 8])[:40], bytes(64)),
    "not-an-idx": (b"not an index file at all", b""),
    "short-bin": (_idx([8, 8]), bytes(10)),
}


def _drop_metadata(path: Path) -> None:
    (path / "metadata.json").unlink()


def _truncate_shards(path: Path) -> None:
    for shard in path.glob("*.distcp"):
        with open(shard, "r+b") as handle:
            handle.truncate(shard.stat().st_size // 2)


def _other_model(path: Path) -> None:
    meta = json.loads((path / "meta.json").read_text())
    meta["model"]["hidden_size"] = 64
    (path / "meta.json").write_text(json.dumps(meta))


CHECKPOINT_DAMAGE = {"partial-checkpoint": _drop_metadata,
                     "truncated-checkpoint": _truncate_shards,
                     "other-model-checkpoint": _other_model}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A real one-step checkpoint of the tiny recipe."""
    from test_train import train as train_run

    out = tmp_path_factory.mktemp("source")
    train_run(out, "train.max_steps=1", "scheduler.warmup_steps=0")
    return out / "checkpoints" / "step_000001"


def snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_bad_input_is_refused_in_one_line_writing_nothing(case, tmp_path, request, capsys,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)  # a relative output_dir would land here
    checkpoint = request.getfixturevalue("checkpoint") if needs_checkpoint(case) else None
    for name, kind in case.files:
        make_file(tmp_path / name, kind, checkpoint)
    args = [resolve(arg, tmp_path, checkpoint) for arg in case.args]
    if args[0] in ("train", "prune") and not any(a.startswith("output_dir=") for a in args):
        args.append(f"output_dir={tmp_path}/run")
    before = snapshot(tmp_path)
    code = cli.main(args)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, (code, lines[-5:])
    assert lines[0].startswith(f"megatron-hybrid {args[0]}: error: "), lines
    assert case.message in lines[0], lines[0]
    assert "Traceback" not in out + err
    assert snapshot(tmp_path) == before, "a refused input wrote files"


def test_catalogue_size_and_generated_docs_are_current():
    assert len(CASES) >= 40 and len({case.area for case in CASES}) == 9
    assert DOCS.read_text() == docs_table(), "run: python -m tests.test_bad_inputs --write-docs"


def docs_table() -> str:
    rows = ["# Bad inputs refused", "",
            "Generated from `tests/test_bad_inputs.py` (`python -m tests.test_bad_inputs "
            "--write-docs`). Every case exits with code 2, prints one line naming the fix, no "
            "traceback, and writes nothing. `{tmp}` is a scratch folder holding the bad file; "
            "`{ckpt}` a real checkpoint.", "",
            f"{len(CASES)} cases.", "", "| area | command | the error line contains |",
            "|---|---|---|"]
    for case in CASES:
        command = " ".join(["megatron-hybrid", *case.args]).replace("|", "\\|")
        command = command.replace(" ".join(FAST), "...")
        message = case.message.replace("|", "\\|")
        rows.append(f"| {case.area} | `{command}` | {message} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__" and sys.argv[1:] == ["--write-docs"]:
    DOCS.write_text(docs_table())
