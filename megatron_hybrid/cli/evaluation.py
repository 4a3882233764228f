"""``megatron-hybrid eval``: lm-evaluation-harness tasks on a trained model (see
``inference/evaluation.py``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from megatron_hybrid.cli import Command


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", metavar="CHECKPOINT|HF_DIR",
                        help="a checkpoint (a run's step_* folder, or one converted from Hugging "
                             "Face) or a Hugging Face NemotronH directory")
    parser.add_argument("--tasks", required=True, metavar="TASK,...",
                        help="comma-separated lm_eval task names (`lm-eval ls tasks`), task YAML "
                             "files, or folders of them")
    parser.add_argument("--include-path", action="append", default=[], metavar="DIR",
                        help="a folder of task YAML files whose names --tasks may use "
                             "(repeatable)")
    parser.add_argument("--limit", type=float,
                        help="documents per task (below 1: a fraction of them); for trial runs")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples, over the tasks' own")
    parser.add_argument("--max-requests", "--batch-size", dest="max_requests", type=int,
                        default=8, help="requests decoded together; more wait for a free slot")
    parser.add_argument("--max-length", type=int,
                        help="the most tokens a request conditions on (default: the model's "
                             "seq_length); longer texts are scored in windows")
    parser.add_argument("--backend", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0,
                        help="the sampler's seed, for tasks that sample")
    parser.add_argument("--output", metavar="FILE.json", help="write lm_eval's results here")
    parser.add_argument("--json", action="store_true",
                        help="print lm_eval's results as JSON instead of the table")


def run_eval(args: argparse.Namespace) -> int:
    from lm_eval.utils import handle_non_serializable, make_table

    from megatron_hybrid.inference.evaluation import evaluate

    tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
    results = evaluate(args.checkpoint, tasks, include_path=args.include_path or None,
                       limit=args.limit, num_fewshot=args.num_fewshot,
                       batch_size=args.max_requests, max_length=args.max_length,
                       backend=args.backend, seed=args.seed)
    text = json.dumps(results, indent=2, default=handle_non_serializable)
    if args.output:
        Path(args.output).write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    if args.json:
        print(text)
        return 0
    print(make_table(results))
    if results.get("groups"):
        print(make_table(results, "groups"))
    return 0


COMMANDS = {"eval": Command("lm-evaluation-harness tasks on a trained model (loglikelihood, "
                            "rolling perplexity, generation)", add_eval_arguments, run_eval)}
