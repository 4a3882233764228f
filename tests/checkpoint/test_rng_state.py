"""What a checkpoint keeps of each rank's random generators, so a resumed run draws what the
uninterrupted one would: the CPU generator and Megatron-Core's tracker always, the GPU's on
cuda. A state saved by the other backend restores the CPU generator only (its tracker holds
the other device's generator states). No GPU here: the CUDA generator calls are recorded."""

import torch

from megatron_hybrid import backends

backends.install("cpu")


def test_cpu_state_round_trips_the_cpu_generator_and_the_tracker(monkeypatch):
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint

    tracker = mcore.tensor_parallel.get_cuda_rng_tracker()
    tracker.add("probe-states", 7)
    try:
        state = dist_checkpoint._rng_state()
        assert state["backend"] == "cpu" and "cuda" not in state
        expected = torch.rand(4)
        with tracker.fork("probe-states"):
            expected_forked = torch.rand(4)
        dist_checkpoint._set_rng_state(state)
        assert torch.equal(torch.rand(4), expected)
        with tracker.fork("probe-states"):
            assert torch.equal(torch.rand(4), expected_forked)
    finally:
        tracker.reset()


def test_cuda_state_keeps_the_gpu_generator_and_a_cpu_state_skips_the_tracker(monkeypatch):
    from megatron_hybrid import mcore
    from megatron_hybrid.checkpoint import dist_checkpoint

    gpu, gpu_state, restored = torch.device("cuda", 1), torch.arange(16, dtype=torch.uint8), []
    tracker = mcore.tensor_parallel.get_cuda_rng_tracker()
    monkeypatch.setattr(backends, "require_active", lambda: "cuda")
    monkeypatch.setattr(backends, "device", lambda: gpu)
    monkeypatch.setattr(torch.cuda, "get_rng_state",
                        lambda device: gpu_state if device == gpu else None)
    monkeypatch.setattr(torch.cuda, "set_rng_state",
                        lambda state, device: restored.append((state, device)))
    monkeypatch.setattr(tracker, "set_states", lambda states: restored.append(("tracker",)))
    state = dist_checkpoint._rng_state()
    assert state["backend"] == "cuda" and torch.equal(state["cuda"], gpu_state)
    dist_checkpoint._set_rng_state(state)
    assert restored == [("tracker",), (gpu_state, gpu)]
    restored.clear()
    dist_checkpoint._set_rng_state({**state, "backend": "cpu"})  # a cpu run's checkpoint
    assert restored == []
