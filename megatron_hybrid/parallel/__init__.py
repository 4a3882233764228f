"""The parallel layout: process groups and seeds (``process_groups``), context-parallel sharding
and attention (``context_parallel``), and the ``parallel:`` section (``config``).
"""
