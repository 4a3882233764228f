"""``megatron-hybrid launch torchrun | slurm``: the arguments of the cluster launcher
(``megatron_hybrid.launch``)."""

from __future__ import annotations

import argparse

from megatron_hybrid.cli import Command
from megatron_hybrid.launch import (
    DEFAULT_MASTER_PORT,
    DEFAULT_MAX_RESTARTS,
    ENVIRONMENT_FALLBACKS,
    run_slurm,
    run_torchrun,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    launchers = parser.add_subparsers(dest="launcher", required=True, metavar="{torchrun,slurm}")
    _add_torchrun_arguments(launchers.add_parser(
        "torchrun", help="this node's torchrun agent (run it on every node)",
        description="Options go before RECIPE; key=value overrides come last."))
    _add_slurm_arguments(launchers.add_parser(
        "slurm", help="write (and --submit) an sbatch script: one torchrun task per node",
        description="Options go before RECIPE; key=value overrides come last."))


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny/pretrain.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="dotted recipe overrides, applied last (e.g. parallel.tp=8)")


def _env_help(name: str, text: str, fallback: object) -> str:
    variables = ", ".join(f"${variable}" for variable in ENVIRONMENT_FALLBACKS[name])
    return f"{text} (default: {variables}, else {fallback})"


def _add_torchrun_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nnodes", type=int, help=_env_help("nnodes", "nodes in the run", 1))
    parser.add_argument("--node-rank", type=int,
                        help=_env_help("node_rank", "this node's rank, 0 to nnodes-1", 0))
    parser.add_argument("--nproc-per-node", type=int, help=_env_help(
        "nproc_per_node", "training processes on this node", "the visible GPUs, or 1"))
    parser.add_argument("--master-addr", help=_env_help(
        "master_addr", "node 0's address, needed for several nodes", "a single node"))
    parser.add_argument("--master-port", type=int, help=_env_help(
        "master_port", "node 0's rendezvous port", DEFAULT_MASTER_PORT))
    parser.add_argument("--log-dir", help="per-rank log files (default: RUN_DIR/logs/nodeR)")
    parser.add_argument("--max-restarts", type=int,
                        help="restarts of this node's workers after a failure, each resuming "
                             f"from the latest checkpoint (default: {DEFAULT_MAX_RESTARTS} on "
                             "one node; several nodes take 0: requeue the job instead)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the environment and the torchrun command; start nothing")
    _add_recipe_arguments(parser)
    parser.set_defaults(launch=run_torchrun)


def _add_slurm_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node, one process each")
    parser.add_argument("--cluster", metavar="FILE",
                        help="cluster profile YAML (e.g. launch/clusters/example.yaml)")
    parser.add_argument("--container", metavar="IMAGE", help="pyxis container image")
    parser.add_argument("--mounts", metavar="SRC:DST[,...]", help="container mounts")
    parser.add_argument("--time", help="wall-clock limit, e.g. 04:00:00")
    parser.add_argument("--account", help="Slurm account")
    parser.add_argument("--partition", help="Slurm partition")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--submit", action="store_true", help="submit the script with sbatch")
    action.add_argument("--dry-run", action="store_true", help="print the script; write nothing")
    _add_recipe_arguments(parser)
    parser.set_defaults(launch=run_slurm)


def run_launch(args: argparse.Namespace) -> int:
    return args.launch(args)


COMMANDS = {"launch": Command("start training on clusters: torchrun on this node (one of many), "
                              "or a Slurm job", add_arguments, run_launch)}
