"""Using a trained model: generation (``generate``).
"""
