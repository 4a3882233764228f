"""A checkpoint of the local spec loads into a model whose modules keep extra state it lacks:
Transformer Engine's modules keep FP8 metadata (``_extra_state``) where the local spec's torch
norm and attention keep none. Here the local final norm is given such state (no Transformer
Engine on the CPU), which is what the Transformer Engine spec adds to the checkpoint keys."""

import torch

from megatron_hybrid import backends

backends.install("cpu")

from test_sft import MODEL  # noqa: E402
from test_specs import one_process_groups  # noqa: E402,F401  (a fixture)

from megatron_hybrid.checkpoint import dist_checkpoint  # noqa: E402
from megatron_hybrid.model import specs  # noqa: E402
from megatron_hybrid.model.build import ModelLayout, build_model  # noqa: E402
from megatron_hybrid.parallel import process_groups  # noqa: E402

NORM_EXTRA_STATE = "decoder.final_norm._extra_state"


def test_modules_with_extra_state_load_a_checkpoint_without_it(one_process_groups, tmp_path,
                                                               monkeypatch):
    saved = build_model(MODEL, ModelLayout(), backend="cpu")
    dist_checkpoint.save_weights([saved], tmp_path / "local")
    assert NORM_EXTRA_STATE not in dist_checkpoint._saved_keys(tmp_path / "local")

    restored = []
    monkeypatch.setattr(specs.TorchRMSNorm, "get_extra_state",
                        lambda self: torch.tensor([1.0]), raising=False)
    monkeypatch.setattr(specs.TorchRMSNorm, "set_extra_state",
                        lambda self, state: restored.append(state), raising=False)
    process_groups.seed_everything(1)
    loading = build_model(MODEL, ModelLayout(), backend="cpu")
    assert NORM_EXTRA_STATE in dist_checkpoint._model_state([loading])
    dist_checkpoint.load_weights([loading], tmp_path / "local")
    assert restored == []  # nothing saved for it: its own state stays
    for (name, expected), actual in zip(saved.state_dict().items(),
                                        loading.state_dict().values()):
        if torch.is_tensor(expected) and not name.endswith("_extra_state"):
            assert torch.equal(actual, expected), name
