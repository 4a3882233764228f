"""A pipeline of stages: reading and running it (``runner``) and its report (``report``).
"""
