"""SFT: greedy decoding, the toggle check, SFT steps on the chat data lowering the held-out
assistant-token loss, and the SFT stage end to end (report included)."""

import json
from pathlib import Path

import pytest
import torch

from megatron_hybrid import backends, sft
from megatron_hybrid.config import ConfigError, ModelConfig

backends.install("cpu")  # before Megatron-Core is imported

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "tiny" / "sft.yaml"
MODEL = ModelConfig(pattern="M*-M-", hidden_size=32, ffn_hidden_size=64, num_attention_heads=4,
                    num_query_groups=2, kv_channels=8, mamba_num_heads=4, mamba_head_dim=8,
                    mamba_state_dim=8, mamba_num_groups=2, vocab_size=1024, seq_length=256,
                    mamba_chunk_size=64)
SMALL_MODEL = [f"model.{key}={value}" for key, value in MODEL.to_dict().items()
               if value is not None]
"""MODEL as recipe overrides."""



def _loop_hooks_missing() -> bool:
    from megatron_hybrid import train

    return not all(hasattr(train, name) for name in ("session", "fit"))


needs_loop_hooks = pytest.mark.skipif(
    _loop_hooks_missing(), reason="a stage runs through train.session, train.fit and "
    "train.build_trainer(forward_step=...), which train.py does not offer yet")


@pytest.fixture
def model_engine():
    """One-process groups and a tiny model with its optimizer: (chunks, optimizer)."""
    from megatron_hybrid import engine, parallel
    from megatron_hybrid.model import ModelLayout, build_model

    parallel.init_distributed(parallel.ParallelDims(), backend="cpu")
    parallel.seed_everything(0)
    chunks = [engine.wrap_ddp(build_model(MODEL, ModelLayout(), backend="cpu"),
                              use_distributed_optimizer=False)]
    optimizer = engine.build_optimizer(chunks, engine.OptimizerSettings(lr=1e-2,
                                                                        weight_decay=0.0))
    yield chunks, optimizer
    parallel.destroy_distributed()


def test_generate_continues_with_the_argmax_of_the_full_forward(model_engine):
    from megatron_hybrid.checkpoint import unwrap
    from megatron_hybrid.generate import generate

    model = model_engine[0][0]
    prompt = list(range(5, 45))
    new = generate(model, prompt, 6)
    logits = unwrap(model)(torch.tensor([prompt + new]), None, None)
    assert len(new) == 6
    assert new == logits[0, len(prompt) - 1:-1].argmax(-1).tolist()  # no off-by-one
    assert generate(model, prompt, 6, stop={new[2]}) == new[:new.index(new[2]) + 1]
    assert unwrap(model).training  # the model's mode is restored


def test_generate_refuses_a_model_split_over_ranks():
    from megatron_hybrid.generate import check_single_rank

    class Split(torch.nn.Module):
        config = type("Config", (), {"tensor_model_parallel_size": 2,
                                     "pipeline_model_parallel_size": 1,
                                     "context_parallel_size": 1})

    with pytest.raises(ValueError, match="generate needs the whole model on one rank, got tp=2: "
                                         "decode with parallel.tp=1"):
        check_single_rank(Split())


class Scripted(torch.nn.Module):
    """A stand-in model whose greedy continuation of any prompt is ``script``."""

    config = type("Config", (), {"tensor_model_parallel_size": 1,
                                 "pipeline_model_parallel_size": 1, "context_parallel_size": 1})

    def __init__(self, script: list[int], prompt_length: int):
        super().__init__()
        self.script, self.prompt_length, self.calls = script, prompt_length, 0
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where generate finds the device

    def forward(self, tokens, position_ids, attention_mask):
        self.calls += 1
        logits = torch.zeros(1, tokens.shape[1], 16)
        logits[0, -1, self.script[tokens.shape[1] - self.prompt_length]] = 1.0
        return logits


OPEN, CLOSE = 2, 3  # <think>, </think> in the default tokenizer


@pytest.mark.parametrize("script, think, expected", [
    ([OPEN, CLOSE, 7, 8], False, [OPEN, CLOSE]),  # empty block: obeys /no_think
    ([OPEN, 7, CLOSE, 8], False, [OPEN, 7]),  # reasoning under /no_think: known at once
    ([OPEN, CLOSE, 7, 8], True, [OPEN, CLOSE]),  # empty block under /think
    ([OPEN, 7, 8, CLOSE, 9], True, [OPEN, 7, 8, CLOSE]),  # reasoning, to its end
    ([OPEN, 7, 8, 9, 10, 11, 12], True, [OPEN, 7, 8, 9, 10]),  # never closed: max_new_tokens
    ([7, OPEN, CLOSE], True, [7, OPEN]),  # no think block at all
])
def test_decoding_stops_once_the_think_block_is_known(script, think, expected):
    model = Scripted(script, prompt_length=3)
    ids = sft.think_block(model, [5, 6, 7], 5, think=think, open_id=OPEN, close_id=CLOSE)
    assert ids == expected and model.calls == len(expected)


@pytest.mark.parametrize("generated, think, obeyed", [
    ("<think>It is in json.</think>Serialize.", True, True),
    ("<think></think>Serialize.", True, False),
    ("<think></think>Serialize.", False, True),
    ("<think> x</think>Serialize.", False, False),
    ("<think>never closed", True, False),
    ("Serialize.", False, False),
])
def test_toggle_check(generated, think, obeyed):
    assert sft.obeys_toggle(generated, think) is obeyed


def test_sft_steps_lower_the_heldout_assistant_loss(model_engine):
    from megatron_hybrid import engine
    from megatron_hybrid.data import chat
    from megatron_hybrid.data.datasets import microbatch_iterator
    from megatron_hybrid.data.tokenizer import TokenizerConfig, load_tokenizer

    chunks, optimizer = model_engine
    tokenizer = load_tokenizer(TokenizerConfig())
    train = chat.pack_conversations(chat.default_conversations("train")[::10], tokenizer,
                                    seq_length=256)
    heldout = chat.pack_conversations(chat.default_conversations("valid"), tokenizer,
                                      seq_length=256)

    def batches(sequences, samples):
        dataset = chat.ChatDataset(sequences, num_samples=samples, seed=0)
        return microbatch_iterator(dataset, start_sample=0, micro_batch_size=4,
                                   num_microbatches=2, dp_rank=0, dp_size=1)

    def heldout_loss():
        return engine.eval_loss(chunks, batches(heldout, 16), num_microbatches=4,
                                micro_batch_size=4, seq_length=256)

    before = heldout_loss()
    data = batches(train, 8 * 8)
    losses = [engine.train_step(chunks, optimizer, data, num_microbatches=2, micro_batch_size=4,
                                seq_length=256).loss for _ in range(8)]
    after = heldout_loss()
    assert losses[-1] < losses[0] - 0.5 and after < before - 0.5, (before, after, losses)


@needs_loop_hooks
def test_sft_stage_reports_heldout_loss_and_toggle(tmp_path):
    from megatron_hybrid import recipe, train

    out = tmp_path / "sft"
    cfg = recipe.load_recipe(RECIPE, [
        *SMALL_MODEL, "checkpoint.load=null", f"output_dir={out}", "train.max_steps=3",
        "train.micro_batch_size=4", "train.global_batch_size=4", "train.eval_batches=1",
        "train.log_interval=1", "scheduler.warmup_steps=1", "logging.progress_bar=off",
        "logging.tensorboard=false", "logging.plot=false"])
    options = sft.SFTConfig(toggle_prompts=2, max_new_tokens=4)
    with train.session(cfg) as (backend, dims):
        report = sft.finetune(cfg, options, backend, dims)
    assert json.loads((out / "sft_report.json").read_text()) == report
    start, end = report["start"], report["end"]
    assert (start["step"], end["step"]) == (0, 3)
    assert set(end["heldout_loss"]) == {"all", "think", "no_think"}
    assert end["heldout_loss"]["all"] < start["heldout_loss"]["all"]
    assert [a["think"] for a in end["answers"]] == [True, False]
    assert all(0 <= rate <= 1 for rate in end["toggle_obeyed"].values())
    assert (out / "checkpoints" / "step_000003").is_dir()
    assert "| toggle obeyed (think) |" in (out / "sft_report.md").read_text()
    summary = json.loads((out / "summary.json").read_text())  # for the pipeline's report
    assert summary["heldout_loss"] == end["heldout_loss"]["all"]
    assert set(summary["task_metrics"]) == {"held-out loss /think", "held-out loss /no_think",
                                            "toggle obeyed /think", "toggle obeyed /no_think"}


@pytest.mark.parametrize("options, message", [
    ({"toggle_prompts": 3}, "sft.toggle_prompts=3 must be an even number >= 0"),
    ({"train_path": ""}, "sft.train_path is empty: give a JSONL file or null"),
    ({"max_new_tokens": 2}, "sft.max_new_tokens=2 must be >= 3"),
])
def test_bad_sft_options_are_refused_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        sft.SFTConfig(**options).validate()
    assert "\n" not in str(error.value)
