"""lm-evaluation-harness on a trained model: the ``megatron-hybrid`` lm_eval model and
:func:`evaluate`, which ``megatron-hybrid eval`` runs.

:class:`MegatronHybridLM` answers lm_eval's three request types on one
:class:`~megatron_hybrid.inference.session.Session` (Megatron-Core's dynamic engine, continuous
batching):

- ``loglikelihood``: context and continuation go in as one prompt, whose per-token log probs
  the engine returns (``return_log_probs`` with the prompt's; its context materializes every
  token's logits). The continuation's log probs are summed; it is greedy when each of its
  tokens has the top log prob (``top_n_logprobs=1``).
- ``loglikelihood_rolling``: the text in windows of ``max_length`` predicted tokens, as lm_eval's
  ``get_rolling_token_windows`` cuts it (each token predicted once, with as much context as
  fits), scored as above and summed.
- ``generate_until``: the session's generation, every request with the same generation
  settings decoding together; lm_eval's ``until`` strings stop it, and so does end of document.

The whole model sits on one rank (tp = pp = 1), as the engine needs.
"""

from __future__ import annotations

import contextlib
import difflib
import os
from collections import defaultdict
from pathlib import Path

from lm_eval import utils as lm_eval_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from megatron_hybrid.errors import ConfigError, check_positive_int
from megatron_hybrid.inference.loading import DEFAULT_MAX_REQUESTS, loaded_model

DEFAULT_MAX_GEN_TOKENS = 256
"""lm_eval's default for a generation task that sets no ``max_gen_toks``."""


@register_model("megatron-hybrid")
class MegatronHybridLM(TemplateLM):
    """The checkpoint or Hugging Face directory ``pretrained`` as an lm_eval model, loaded with
    ``backend``; ``max_length``: the most tokens a request conditions on (default: the model's
    ``seq_length``); ``batch_size``: the requests that decode together; ``seed``: the sampler's,
    for generation tasks that sample. It holds a process group until :meth:`close` (or the
    ``with`` block's end); lm_eval's ``simple_evaluate(model="megatron-hybrid",
    model_args={"pretrained": ...})`` builds it too, and leaves it open."""

    def __init__(self, pretrained: str | os.PathLike, *, backend: str = "auto",
                 max_length: int | None = None, batch_size: int = DEFAULT_MAX_REQUESTS,
                 seed: int = 0):
        super().__init__()
        if max_length is not None:
            check_positive_int("max_length", max_length)
        with contextlib.ExitStack() as resources:
            self.model, self.text_tokenizer, model_config = resources.enter_context(
                loaded_model(pretrained, backend=backend, seed=seed))
            self.max_length = max_length or model_config.seq_length
            from megatron_hybrid.inference.session import Session  # after the backend install

            # A scored sequence is max_length inputs and the last target (lm_eval's windows),
            # and the engine generates one token after any prompt.
            self.session = Session(self.model, self.text_tokenizer, max_requests=batch_size,
                                   max_sequence_length=self.max_length + 2, seed=seed)
            self._resources = resources.pop_all()

    def close(self) -> None:
        self._resources.close()

    def __enter__(self) -> MegatronHybridLM:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # -- tokens ---------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.text_tokenizer.eod

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        return self.text_tokenizer.encode(string)  # the tokenizers add no special tokens

    # -- loglikelihood --------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False
                              ) -> list[tuple[float, bool]]:
        """``(log p(continuation | context), greedy)`` of each ``(cache key, context ids,
        continuation ids)``; the context is cut from the left to ``max_length`` inputs."""
        sequences = []
        for _, context, continuation in requests:
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens is longer than "
                                 f"max_length={self.max_length}: raise max_length")
            sequences.append((context + continuation)[-(self.max_length + 1):])
        records = self._score(sequences, desc="loglikelihood", disable=disable_tqdm)
        results = []
        for (cache_key, _, continuation), record in zip(requests, records):
            start = len(record.prompt_tokens) - 1 - len(continuation)
            log_probs = record.prompt_log_probs[start:]
            best = [max(top.values()) for top in record.prompt_top_n_logprobs[start:]]
            answer = (sum(log_probs), all(lp >= top for lp, top in zip(log_probs, best)))
            if cache_key is not None:
                self.cache_hook.add_partial("loglikelihood", cache_key, answer)
            results.append(answer)
        return results

    def _score(self, sequences: list[list[int]], *, desc: str, disable: bool) -> list:
        """The engine's finished request for each sequence, prompt log probs and each
        position's top log prob included; all are queued at once, the engine batches them."""
        from megatron_hybrid.inference import engine as engines

        engine = self.session.engine
        params = engines.greedy(1)  # the engine generates at least one token after a prompt
        params.add_attributes({"return_log_probs": True, "skip_prompt_log_probs": False,
                               "top_n_logprobs": 1})
        # Ids from the engine's own counter, which the session draws from too.
        ids = [int(next(engine.request_counter)) for _ in sequences]
        for request_id, sequence in zip(ids, sequences):
            engine.add_request(request_id, sequence, params)
        finished = {}
        with tqdm(total=len(ids), desc=desc, disable=disable) as progress:
            while engine.has_unfinished_requests():
                for record in engine.step_modern()["finished_request_records"]:
                    finished[record.request_id] = record.merge()
                    progress.update()
        return [finished[request_id] for request_id in ids]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for owner, (text,) in enumerate(request.args for request in requests):
            for context, continuation in map(lm_eval_utils.make_disjoint_window,
                                             lm_eval_utils.get_rolling_token_windows(
                                                 token_list=self.tok_encode(text),
                                                 prefix_token=self.prefix_token_id,
                                                 max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(owner)
        totals = [0.0] * len(requests)
        for owner, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows,
                                                                           disable_tqdm)):
            totals[owner] += log_prob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # -- generation -----------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = defaultdict(list)  # one generate call per setting: its requests decode together
        for index, (_, gen_kwargs) in enumerate(request.args for request in requests):
            groups[self._sampling(gen_kwargs)].append(index)
        texts = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as progress:
            def count_finished(update) -> None:
                if update.finish_reason is not None:
                    progress.update()

            for sampling, indices in groups.items():
                prompts = [self._generation_prompt(requests[index].args[0], sampling)
                           for index in indices]
                completions = self.session.generate(prompts, sampling,
                                                    on_update=count_finished)
                for index, completion in zip(indices, completions):
                    texts[index] = completion.text
                    self.cache_hook.add_partial("generate_until", requests[index].args,
                                                completion.text)
        return texts

    def _sampling(self, gen_kwargs: dict):
        """lm_eval's generation settings as the session's ``Sampling``."""
        from lm_eval.models.utils import normalize_gen_kwargs

        from megatron_hybrid.inference.session import Sampling

        settings = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKENS)
        sampled = settings["do_sample"]
        return Sampling(
            max_new_tokens=settings["max_gen_toks"],
            temperature=float(settings["temperature"]) if sampled else 0.0,
            top_k=int(settings.get("top_k") or 0) if sampled else 0,
            top_p=float(settings.get("top_p") or 0.0) if sampled else 0.0,
            stop=tuple(stop for stop in settings["until"] if stop),
            stop_token_ids=(self.eot_token_id,))

    def _generation_prompt(self, context: str, sampling) -> list[int]:
        """``context``'s ids, cut from the left so that the answer fits in ``max_length``; an
        empty context is the end-of-document token, as in loglikelihood requests."""
        room = self.max_length - sampling.max_new_tokens
        if room < 1:
            raise ValueError(f"max_gen_toks={sampling.max_new_tokens} leaves no room for the "
                             f"prompt in max_length={self.max_length}: raise max_length or "
                             f"lower the task's max_gen_toks")
        return self.tok_encode(context)[-room:] or [self.eot_token_id]


# -- tasks and the run ---------------------------------------------------------------------


def resolve_tasks(tasks: list[str], include_path: list[str] | None = None):
    """lm_eval's ``TaskManager`` and the task specs to load for ``tasks``: names (lm_eval's
    or those of ``include_path``'s YAML files), YAML files, and directories (every task
    defined in them). lm_eval's own task index (seconds to build) is read only when a name
    is not found in the given files."""
    from lm_eval.tasks import TaskManager

    directories = [task for task in tasks if Path(task).is_dir()]
    paths = [*(include_path or ()), *directories] or None
    manager = TaskManager(include_path=paths, include_defaults=False)
    names = [task for task in tasks if not _is_path(task)]
    if any(name not in manager.all_tasks for name in names):
        manager = TaskManager(include_path=paths)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(f"unknown task {name!r}: {hint}give a task YAML file, its folder "
                              f"with --include-path, or a name from `lm-eval ls tasks`")
    specs = []
    for task in tasks:
        if task in directories:
            specs += _tasks_in(manager, Path(task))
        elif _is_path(task):
            if not Path(task).is_file():
                raise ConfigError(f"task file {task} does not exist: give a task YAML file, a "
                                  f"folder of them, or a task name")
            specs.append(str(Path(task).resolve()))
        else:
            specs.append(task)
    return manager, specs


def _is_path(task: str) -> bool:
    return task.endswith((".yaml", ".yml")) or Path(task).is_dir()


def _tasks_in(manager, directory: Path) -> list[str]:
    from lm_eval.tasks._index import Kind

    directory = directory.resolve()
    found = sorted(name for name, entry in manager.task_index.items()
                   if entry.kind in (Kind.TASK, Kind.PY_TASK) and entry.yaml_path is not None
                   and directory in Path(entry.yaml_path).resolve().parents)
    if not found:
        raise ConfigError(f"{directory} defines no lm_eval task: give a folder of task YAML "
                          f"files")
    return found


def evaluate(path: str | os.PathLike, tasks: list[str], *,
             include_path: list[str] | None = None, limit: float | None = None,
             num_fewshot: int | None = None, batch_size: int = DEFAULT_MAX_REQUESTS,
             max_length: int | None = None, backend: str = "auto", seed: int = 0) -> dict:
    """lm_eval's results (``simple_evaluate``'s dict, samples left out) of the model at
    ``path`` on ``tasks`` (see :func:`resolve_tasks`). ``limit``: documents per task (a
    fraction below 1); ``num_fewshot``: overrides the tasks' own; the few-shot draws keep
    lm_eval's seeds, so they match its command line's."""
    from lm_eval import evaluator

    manager, specs = resolve_tasks(tasks, include_path)
    with MegatronHybridLM(path, backend=backend, max_length=max_length, batch_size=batch_size,
                          seed=seed) as model:
        return evaluator.simple_evaluate(model=model, tasks=specs, task_manager=manager,
                                         limit=limit, num_fewshot=num_fewshot,
                                         log_samples=False)
