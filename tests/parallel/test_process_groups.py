"""Starting the process groups on GPUs: the rank's device is set before NCCL starts and handed
to it (``device_id``). No GPU here, so the CUDA and NCCL calls are recorded, not made."""

import torch
import torch.distributed as dist

from megatron_hybrid import backends

backends.install("cpu")


def test_cuda_sets_the_rank_device_before_the_nccl_group(monkeypatch):
    from megatron_hybrid import mcore
    from megatron_hybrid.parallel import process_groups

    calls = []
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set", device)))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda **kwargs: calls.append(("init", kwargs["backend"],
                                                       kwargs["device_id"])))
    monkeypatch.setattr(mcore.parallel_state, "initialize_model_parallel",
                        lambda **kwargs: calls.append(("groups",)))
    process_groups.init_distributed(process_groups.ParallelDims(), backend="cuda")
    gpu = torch.device("cuda", 3)
    assert calls == [("set", gpu), ("init", "nccl", gpu), ("groups",)]
