"""One trial of the crash-during-save test: resume a run, then save until killed.

Usage: save_crash.py SAVES RECIPE [key=value ...]

Resumes the run from its ``latest`` checkpoint (the proof that it loads) and prints
``loaded STEP``, then saves checkpoint after checkpoint, printing ``saving`` before each, SAVES
times (``forever``: until killed). ``MEGATRON_HYBRID_FAULT=kill@save.POINT`` makes a save kill
itself at a named point, ``MEGATRON_HYBRID_SAVE_TRACE`` records the points it passes (the test
kills it from outside after a chosen number of them).

Besides the points ``Checkpointer.save`` names, this process makes every tensor written into a
dist_checkpointing shard file a point, ``shard-write``: it is passed after the tensor's bytes
reach the file and before the file is complete, inside the writer process the save forks.
"""

import functools
import sys

from megatron_hybrid import backends, recipe, reliability

SHARD_WRITE = "shard-write"


def instrument_shard_writes() -> None:
    """Pass ``reliability.save_point(SHARD_WRITE)`` after each item dist_checkpointing's
    writer puts into a shard file (flushed first, so a kill there leaves a truncated file)."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    write_item = filesystem_async._write_item

    @functools.wraps(write_item)  # the writer inspects its signature
    def write_item_then_save_point(transforms, stream, *args, **kwargs):
        result = write_item(transforms, stream, *args, **kwargs)
        stream.flush()
        reliability.save_point(SHARD_WRITE)
        return result

    filesystem_async._write_item = write_item_then_save_point


def main() -> None:
    saves, recipe_path, *overrides = sys.argv[1:]
    cfg = recipe.load_recipe(recipe_path, overrides)
    backends.install("cpu")
    instrument_shard_writes()
    from megatron_hybrid.engine import training_loop

    with training_loop.session(cfg) as (backend, dims):
        trainer = training_loop.build_trainer(cfg, backend, dims)
        print(f"loaded {trainer.state.step}", flush=True)
        remaining = None if saves == "forever" else int(saves)
        while remaining is None or remaining > 0:
            trainer.state.step += 1
            print("saving", flush=True)
            trainer.checkpointer.save(trainer.state, trainer.model_chunks, trainer.optimizer,
                                      trainer.scheduler)
            remaining = remaining and remaining - 1


if __name__ == "__main__":
    main()
