"""Every micro-batch reaches the model through ``backends.to_device``, the move to the rank's
device (a GPU on the cuda backend): language-model, packed, DPO and teacher forward steps, in
training and in evaluation.

On the CPU the device is the CPU, so a batch left behind would still run here and fail only on
GPUs. The move is therefore recorded: ``to_device`` is wrapped to return fresh copies, and a
hook on every model forward checks that the token ids it gets are one of those copies. A
forward step that reads its batch without the move is the control.
"""

from functools import partial

import pytest
import torch

from megatron_hybrid import backends
from megatron_hybrid.data.datasets import microbatch_iterator

from test_sft import MODEL, model_engine  # noqa: F401  (a fixture)

backends.install("cpu")

SEQ, MICRO, STEPS = 32, 2, 2


class RandomDocuments(torch.utils.data.Dataset):
    """Token rows as the datasets give them, two packed documents each (position ids restart),
    and DPO's per-sequence reference log-probability."""

    extra_keys = ("ref_logp",)

    def __len__(self) -> int:
        return MICRO * STEPS

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        tokens = torch.randint(0, MODEL.vocab_size, (SEQ + 1,), generator=generator)
        half = SEQ // 2
        return {"tokens": tokens[:-1], "labels": tokens[1:], "loss_mask": torch.ones(SEQ),
                "position_ids": torch.cat([torch.arange(half), torch.arange(SEQ - half)]),
                "ref_logp": torch.tensor(-3.0)}


def batches():
    return microbatch_iterator(RandomDocuments(), start_sample=0, micro_batch_size=MICRO,
                               num_microbatches=STEPS, dp_rank=0, dp_size=1)


@pytest.fixture
def inputs_moved(monkeypatch):
    """Per model forward: whether its token ids came out of ``backends.to_device``."""
    from megatron_hybrid import mcore

    moved, verdicts = [], []
    move = backends.to_device

    def recording_move(batch: dict) -> dict:
        copies = {key: value.clone() for key, value in move(batch).items()}
        moved.extend(copies.values())  # kept alive, so no other tensor reuses their memory
        return copies

    def check(module, args):
        if isinstance(module, mcore.MambaModel):
            storage = args[0].untyped_storage().data_ptr()
            verdicts.append(any(t.untyped_storage().data_ptr() == storage for t in moved))

    monkeypatch.setattr(backends, "to_device", recording_move)
    handle = torch.nn.modules.module.register_module_forward_pre_hook(check)
    yield verdicts
    handle.remove()


def lm_step_without_the_move(data_iterator, model):
    from megatron_hybrid.engine import training_step

    batch = next(data_iterator)
    output = model(batch["tokens"], None, None, labels=batch["labels"])
    return output, partial(training_step.lm_loss_func, batch["loss_mask"])


def forward_steps():
    from megatron_hybrid.engine import training_step
    from megatron_hybrid.stages import distill, dpo

    return {"lm": training_step.lm_forward_step, "packed": training_step.packed_forward_step,
            "dpo": partial(dpo.forward_step, 0.1, 0.0), "dpo logp": dpo.logp_step,
            "teacher": distill.teacher_forward_step}


@pytest.mark.parametrize("name", ["lm", "packed", "dpo", "dpo logp", "teacher"])
def test_every_forward_step_moves_its_batch_to_the_device(model_engine,  # noqa: F811
                                                          inputs_moved, name):
    from megatron_hybrid.checkpoint.dist_checkpoint import unwrap
    from megatron_hybrid.engine import training_step

    from megatron_hybrid import mcore

    chunks, optimizer = model_engine
    step = forward_steps()[name]
    settings = dict(num_microbatches=STEPS, micro_batch_size=MICRO, seq_length=SEQ)
    if name == "teacher":  # the teacher is a bare model, evaluated only
        training_step.eval_loss([unwrap(chunks[0])], batches(), forward_step=step, **settings)
    elif name == "dpo logp":  # scoring only, with its own report
        mcore.get_forward_backward_func()(forward_step_func=step, data_iterator=batches(),
                                          model=chunks, forward_only=True, **settings)
    else:
        training_step.train_step(chunks, optimizer, batches(), forward_step=step, **settings)
        training_step.eval_loss(chunks, batches(), forward_step=step, **settings)
    assert inputs_moved and all(inputs_moved), inputs_moved


def test_a_forward_step_that_skips_the_move_is_caught(model_engine, inputs_moved):  # noqa: F811
    from megatron_hybrid.engine import training_step

    chunks, optimizer = model_engine
    training_step.train_step(chunks, optimizer, batches(), forward_step=lm_step_without_the_move,
                             num_microbatches=STEPS, micro_batch_size=MICRO, seq_length=SEQ)
    assert inputs_moved and not any(inputs_moved)
