"""One trial of the crash-during-save test: resume a run, then save until killed.

Usage: save_crash.py SAVES RECIPE [key=value ...]

Resumes the run from its ``latest`` checkpoint (the proof that it loads) and prints
``loaded STEP``, then saves checkpoint after checkpoint, printing ``saving`` before each, SAVES
times (``forever``: until killed). The test kills it with SIGKILL at a random moment, or
``MEGATRON_HYBRID_FAULT=kill@save.POINT`` makes it kill itself at a named point of a save.
"""

import sys

from megatron_hybrid import backends, recipe


def main() -> None:
    saves, recipe_path, *overrides = sys.argv[1:]
    cfg = recipe.load_recipe(recipe_path, overrides)
    backends.install("cpu")
    from megatron_hybrid import train

    with train.session(cfg) as (backend, dims):
        trainer = train.build_trainer(cfg, backend, dims)
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
