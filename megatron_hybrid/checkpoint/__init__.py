"""Checkpoints: Megatron dist_checkpointing save/load/reshard (``dist_checkpoint``), the
tensor-by-tensor shard streams (``sharded_io``), HF import/export (``hf_checkpoint``), what a
checkpoint holds (``inspection``), and the ``checkpoint:`` section (``config``).
"""
