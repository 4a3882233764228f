"""The model: its section (``config``), named flavors, the layer specs, the Megatron-Core
``MambaModel`` build, parameter counts, and the mapping to HF NemotronH (``hf_mapping``).
"""
