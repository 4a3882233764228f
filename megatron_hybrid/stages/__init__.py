"""The stages after pretraining, each a run of the training loop with its own objective: SFT,
DPO, prune, distill; the held-out task (``task``), what they share (``common``) and their
sections (``config``).
"""
