"""Before and beside a run: the memory and step-time planner (``planner``) and the side-by-side
training benchmark (``bench``).
"""
