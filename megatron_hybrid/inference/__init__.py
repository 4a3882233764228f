"""Using a trained model: generation, uncached (``generate``, the reference) and cached on
Megatron-Core's inference engine (``engine``).
"""
