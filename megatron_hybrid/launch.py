"""``megatron-hybrid launch``: start a training run on one node or many, thinly.

``launch torchrun RECIPE`` is this node's part of a run. It reads the node layout from flags or
the usual environment variables, refuses a layout the recipe cannot run on before any process
starts, adds the environment Megatron-Core wants on GPUs, and becomes torchrun running
``megatron-hybrid train RECIPE`` in every local process, with per-rank log files under the run
directory.

``launch slurm RECIPE --nodes N --gpus-per-node G`` writes an sbatch script and, with
``--submit``, submits it. Its srun starts one task per node; each task runs ``launch torchrun``
(inside a pyxis container with ``--container``), which takes its node rank from
``SLURM_NODEID`` and starts one training process per GPU. Cluster specifics come from flags or
a cluster profile (``--cluster FILE``), never from the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

GPU_ENVIRONMENT = {
    # NCCL frees communication buffers without recordStream: less allocator fragmentation.
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    # InfiniBand retry timeout long enough for congested fabrics (Megatron-LM's Mamba example),
    # and the most retries NCCL allows before a link error fails the job.
    "NCCL_IB_TIMEOUT": "19",
    "NCCL_IB_RETRY_CNT": "7",
}
"""Set for every run's training processes unless the environment already sets them."""
TENSOR_PARALLEL_ENVIRONMENT = {
    # Megatron-Core's tensor- and sequence-parallel layers rely on a single CUDA work queue to
    # run their communication before the GEMMs that consume it (tensor_parallel/layers.py);
    # Megatron-LM asks the same of context-parallel runs.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
}
"""Set besides for runs with tensor or context parallelism (sequence parallel needs TP)."""
DEFAULT_MAX_RESTARTS = 3
"""torchrun restarts a failed node's workers this often; each restart resumes from the latest
checkpoint, so a transient fault (a lost link, a killed process) costs one save interval."""

ENVIRONMENT_FALLBACKS = {
    "nnodes": ("NNODES", "SLURM_NNODES"),
    "node_rank": ("NODE_RANK", "SLURM_NODEID"),
    "nproc_per_node": ("NPROC_PER_NODE", "SLURM_GPUS_ON_NODE"),
    "master_addr": ("MASTER_ADDR",),
    "master_port": ("MASTER_PORT",),
}
"""Environment variables read, in order, for a node setting whose flag is not given."""

DEFAULT_MASTER_PORT = 29500
SBATCH_SCRIPT = "slurm.sbatch"
"""The sbatch script's file name in the run directory."""


class LaunchError(ValueError):
    """The launch settings cannot work; the message names the setting and the fix."""


# -- torchrun on this node --------------------------------------------------------------------

@dataclass(frozen=True)
class NodeLayout:
    """Where this node's torchrun agent sits in a run."""

    nnodes: int
    node_rank: int
    nproc_per_node: int
    master_addr: str | None
    """Node 0's address; None on a single node (torchrun --standalone picks a free port)."""
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nnodes * self.nproc_per_node

    def describe(self) -> str:
        return (f"{self.nnodes} node(s) x {self.nproc_per_node} process(es) per node = world "
                f"size {self.world_size}")


def node_layout(args: argparse.Namespace, environ: dict) -> NodeLayout:
    """This node's layout from the flags, else the environment (``ENVIRONMENT_FALLBACKS``)."""
    nnodes = _int_setting(args, "nnodes", environ, default=1, minimum=1)
    node_rank = _int_setting(args, "node_rank", environ, default=0, minimum=0)
    nproc = _int_setting(args, "nproc_per_node", environ, default=None, minimum=1)
    port = _int_setting(args, "master_port", environ, default=DEFAULT_MASTER_PORT, minimum=1)
    master_addr, _ = _lookup(args, "master_addr", environ)
    if node_rank >= nnodes:
        _, source = _lookup(args, "node_rank", environ)
        raise LaunchError(f"node rank {node_rank} ({source}) is not below the node count "
                          f"{nnodes}: node ranks run from 0 to {nnodes - 1}")
    if nnodes > 1 and not master_addr:
        raise LaunchError(f"{nnodes} nodes need node 0's address: give --master-addr HOST or "
                          f"set MASTER_ADDR")
    return NodeLayout(nnodes=nnodes, node_rank=node_rank,
                      nproc_per_node=nproc or _local_gpu_count(),
                      master_addr=master_addr or None, master_port=port)


def _lookup(args: argparse.Namespace, name: str, environ: dict) -> tuple[str | None, str]:
    """The setting's text and where it came from (its flag or an environment variable)."""
    value = getattr(args, name)
    if value is not None:
        return str(value), _flag(name)
    for variable in ENVIRONMENT_FALLBACKS[name]:
        if environ.get(variable):
            return environ[variable], variable
    return None, _flag(name)


def _int_setting(args, name: str, environ: dict, *, default: int | None, minimum: int):
    text, source = _lookup(args, name, environ)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise LaunchError(f"{source}={text!r} is not an integer: give {_flag(name)} N") from None
    if value < minimum:
        raise LaunchError(f"{source}={value} must be at least {minimum}")
    return value


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _local_gpu_count() -> int:
    import torch

    return torch.cuda.device_count() or 1


def torchrun_command(layout: NodeLayout, *, recipe_path: str, overrides: list[str],
                     log_dir: str, run_id: str,
                     max_restarts: int = DEFAULT_MAX_RESTARTS) -> list[str]:
    """torchrun running ``megatron-hybrid train`` in each local process; every rank's output
    goes to ``log_dir/<run_id>_*/attempt_<n>/<local rank>/``, local rank 0's also to the
    console."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(layout.nnodes),
               "--nproc-per-node", str(layout.nproc_per_node)]
    if layout.master_addr is None:
        command.append("--standalone")
    else:
        command += ["--node-rank", str(layout.node_rank), "--master-addr", layout.master_addr,
                    "--master-port", str(layout.master_port), "--rdzv-id", run_id]
    return command + ["--log-dir", log_dir, "--tee", "3", "--local-ranks-filter", "0",
                      "--max-restarts", str(max_restarts), "-m", "megatron_hybrid", "train",
                      recipe_path, *overrides]


def launcher_environment(cfg) -> dict[str, str]:
    """The environment the launcher sets for a run of ``cfg`` (before the user's own values,
    which win). Triton's kernel cache is made per rank inside each training process
    (``backends``): torchrun gives all its workers one environment."""
    if cfg.parallel.tp > 1 or cfg.parallel.cp > 1:
        return {**TENSOR_PARALLEL_ENVIRONMENT, **GPU_ENVIRONMENT}
    return dict(GPU_ENVIRONMENT)


def _max_restarts(requested: int | None, nnodes: int) -> int:
    """torchrun's restarts: :data:`DEFAULT_MAX_RESTARTS` on one node; none across nodes, where
    the static rendezvous cannot take one node's restarted workers back into the others'
    groups (they would wait in their collectives until the timeout)."""
    if requested is None:
        return DEFAULT_MAX_RESTARTS if nnodes == 1 else 0
    if requested < 0:
        raise LaunchError(f"--max-restarts {requested} must be at least 0 (0: none)")
    if requested and nnodes > 1:
        raise LaunchError(f"--max-restarts {requested} restarts one node's workers, which "
                          f"cannot rejoin the other {nnodes - 1} node(s): give --max-restarts 0 "
                          f"and requeue the job (sbatch --requeue) to resume from the latest "
                          f"checkpoint")
    return requested


def run_torchrun(args: argparse.Namespace) -> int:
    cfg = _load_recipe(args.recipe, args.overrides)
    layout = node_layout(args, os.environ)
    max_restarts = _max_restarts(args.max_restarts, layout.nnodes)
    _validate_for_world_size(cfg, layout.world_size, layout.describe())
    log_dir = args.log_dir or str(Path(cfg.resolved_output_dir) / "logs" /
                                  f"node{layout.node_rank}")
    command = torchrun_command(layout, recipe_path=args.recipe, overrides=args.overrides,
                               log_dir=log_dir, run_id=cfg.name, max_restarts=max_restarts)
    environment = {name: os.environ.get(name, value)
                   for name, value in launcher_environment(cfg).items()}
    if args.dry_run:
        print(shell_lines(environment, command))
        return 0
    print(f"launch: node {layout.node_rank} of {layout.describe()}; logs in {log_dir}",
          flush=True)
    os.execve(sys.executable, command, {**os.environ, **environment})


def shell_lines(environment: dict[str, str], command: list[str]) -> str:
    """``export`` lines and the command, ready to paste into a shell."""
    exports = [f"export {name}={shlex.quote(value)}" for name, value in environment.items()]
    return "\n".join([*exports, shlex.join(command)])


# -- Slurm --------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class ClusterProfile:
    """A cluster's defaults for ``launch slurm`` (a YAML file of these keys; flags win)."""

    account: str | None = None
    """Slurm account charged for the job (sbatch --account)."""
    partition: str | None = None
    """Slurm partition (sbatch --partition)."""
    time: str | None = None
    """Wall-clock limit, e.g. 04:00:00 (sbatch --time); None: the partition's default."""
    gpus_per_node: int | None = None
    """GPUs per node, one training process each."""
    container: str | None = None
    """Image for pyxis (srun --container-image): a registry image or a squashfs file; None:
    run on the nodes' own environment."""
    mounts: list[str] = field(default_factory=list)
    """Container mounts SRC:DST[:FLAGS]; the job directory is always mounted at its own path."""
    environment: dict[str, str] = field(default_factory=dict)
    """Variables exported in the job, e.g. the site's NCCL network settings."""
    sbatch_options: list[str] = field(default_factory=list)
    """Further sbatch options, one per item, e.g. --qos=high."""


def load_cluster_profile(path: str | os.PathLike) -> ClusterProfile:
    import yaml

    from megatron_hybrid import recipe
    from megatron_hybrid.errors import ConfigError

    path = Path(path)
    if not path.is_file():
        raise LaunchError(f"cluster profile not found: {path} (start from "
                          f"launch/clusters/example.yaml)")
    try:
        return recipe._build(ClusterProfile, yaml.safe_load(path.read_text()), "cluster")
    except (ConfigError, yaml.YAMLError) as err:
        raise LaunchError(f"{path}: {str(err).splitlines()[0]}") from None


def cluster_settings(args: argparse.Namespace) -> ClusterProfile:
    """The cluster profile (if any) with every flag the user gave applied over it."""
    profile = load_cluster_profile(args.cluster) if args.cluster else ClusterProfile()
    flags = {"account": args.account, "partition": args.partition, "time": args.time,
             "gpus_per_node": args.gpus_per_node, "container": args.container,
             "mounts": args.mounts.split(",") if args.mounts else None}
    profile = dataclasses.replace(profile, **{k: v for k, v in flags.items() if v is not None})
    if profile.gpus_per_node is None:
        raise LaunchError("give --gpus-per-node G (or gpus_per_node in the --cluster profile)")
    for mount in profile.mounts:
        if ":" not in mount:
            raise LaunchError(f"container mount {mount!r}: expected SRC:DST[:FLAGS]")
    return profile


def sbatch_script(*, name: str, nodes: int, cluster: ClusterProfile, job_dir: str,
                  run_dir: str, command: list[str]) -> str:
    """The batch script: one task per node running ``command`` (a ``launch torchrun``)."""
    directives = [f"--job-name={name}", f"--nodes={nodes}", "--ntasks-per-node=1",
                  f"--gpus-per-node={cluster.gpus_per_node}", "--exclusive",
                  f"--chdir={job_dir}", f"--output={run_dir}/slurm-%j.out"]
    directives += [f"--{key}={getattr(cluster, key)}" for key in ("account", "partition", "time")
                   if getattr(cluster, key)]
    exports = [f"export {key}={shlex.quote(str(value))}"
               for key, value in cluster.environment.items()]
    return "\n".join([
        "#!/bin/bash",
        "# Written by `megatron-hybrid launch slurm`.",
        *(f"#SBATCH {option}" for option in [*directives, *cluster.sbatch_options]),
        "set -euo pipefail",
        "",
        "# One task per node: its torchrun agent starts one training process per GPU, takes its",
        "# node rank from SLURM_NODEID and meets the others at the first node of the job.",
        'export MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"',
        "export MASTER_PORT=$((10000 + SLURM_JOB_ID % 20000))",
        *exports,
        "",
        " \\\n    ".join([*_srun_options(cluster, job_dir), shlex.join(command)]),
        "",
    ])


def _srun_options(cluster: ClusterProfile, job_dir: str) -> list[str]:
    options = ["srun", "--kill-on-bad-exit=1", '--cpus-per-task="$SLURM_CPUS_ON_NODE"']
    if cluster.container is None:
        return options
    mounts = list(cluster.mounts)
    if not any(mount.split(":")[1] == job_dir for mount in mounts):
        mounts.insert(0, f"{job_dir}:{job_dir}")
    return options + [f"--container-image={shlex.quote(cluster.container)}",
                      f"--container-mounts={shlex.quote(','.join(mounts))}",
                      f"--container-workdir={shlex.quote(job_dir)}"]


def run_slurm(args: argparse.Namespace) -> int:
    cfg = _load_recipe(args.recipe, args.overrides)
    cluster = cluster_settings(args)
    _validate_for_world_size(cfg, args.nodes * cluster.gpus_per_node,
                             f"--nodes {args.nodes} x --gpus-per-node {cluster.gpus_per_node}")
    if args.submit and shutil.which("sbatch") is None:
        raise LaunchError("sbatch not found: run on a Slurm login node, or drop --submit and "
                          "submit the written script there with sbatch")
    run_dir = Path(cfg.resolved_output_dir)
    command = ["megatron-hybrid", "launch", "torchrun", "--nnodes", str(args.nodes),
               "--nproc-per-node", str(cluster.gpus_per_node), args.recipe, *args.overrides]
    script = sbatch_script(name=cfg.name, nodes=args.nodes, cluster=cluster,
                           job_dir=str(Path.cwd()), run_dir=str(run_dir), command=command)
    print(script, end="")
    if args.dry_run:
        return 0
    path = run_dir / SBATCH_SCRIPT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    if not args.submit:
        print(f"wrote {path}; submit it with: sbatch {path}")
        return 0
    return subprocess.run(["sbatch", str(path)], check=False).returncode


# -- shared -------------------------------------------------------------------------------------

def _load_recipe(path: str, overrides: list[str]):
    from megatron_hybrid import recipe

    return recipe.load_recipe(path, overrides)


def _validate_for_world_size(cfg, world_size: int, layout: str) -> None:
    """Refuse, before any process starts, a world size the recipe's layout cannot use."""
    from megatron_hybrid.errors import ConfigError

    try:
        cfg.validate(world_size)
    except ConfigError as err:
        raise LaunchError(f"{layout}: {err}") from None


# -- command line -------------------------------------------------------------------------------


