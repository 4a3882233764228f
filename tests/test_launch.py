"""The launchers, with real processes where they can run here.

- two torchrun agents on loopback, as two nodes of one process each, train one TP=2 model
  through ``launch torchrun``;
- the sbatch script for a 4-node container job runs under stand-in ``scontrol`` / ``srun``,
  and the command it hands each node is one ``launch torchrun`` accepts; ``--submit`` calls
  ``sbatch``;
- a wrong world size, a missing recipe or a bad node rank is refused in one line, before any
  process starts or any file is written;
- the Dockerfile is on NVIDIA's PyTorch container, keeps every package it ships at its version
  except those setup.py pins exactly (tools/docker_constraints.py), takes setup.py's pins, runs as
  a non-root user and passes hadolint.
"""

import argparse
import ast
import json
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import rank_environment
from packaging.requirements import Requirement

from megatron_hybrid import launch
from megatron_hybrid.cli.launch import COMMANDS

LAUNCH = COMMANDS["launch"]

ROOT = Path(__file__).resolve().parent.parent
RECIPE = str(ROOT / "recipes" / "tiny" / "pretrain.yaml")
EXAMPLE_CLUSTER = str(ROOT / "launch" / "clusters" / "example.yaml")
# The recipe's data and tokenizer with the 7-layer tiny model: the launcher is under test here,
# not the model (tests/test_train.py trains the recipe's own model across layouts).
SMALL = ["model.flavor=tiny", "model.vocab_size=1024", "train.seq_length=64",
         "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=2",
         "train.log_interval=1", "train.eval_batches=1", "scheduler.warmup_steps=0",
         "logging.progress_bar=off", "logging.tensorboard=false", "logging.plot=false"]
# A world of 4 nodes x 8 GPUs for the recipe: TP=2 leaves DP=16, micro-batch 4 -> batch 64.
FOUR_NODES = ["parallel.tp=2", "train.global_batch_size=64"]


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    LAUNCH.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.fixture
def clean_env(monkeypatch):
    """No launch settings from the environment of whoever runs the tests."""
    for variables in launch.ENVIRONMENT_FALLBACKS.values():
        for variable in variables:
            monkeypatch.delenv(variable, raising=False)
    for variable in {**launch.GPU_ENVIRONMENT, **launch.TENSOR_PARALLEL_ENVIRONMENT}:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setattr(os, "execve", _no_process)
    return monkeypatch


def _no_process(*args):
    raise AssertionError("a process was started")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_tool(directory: Path, name: str, body: str) -> None:
    tool = directory / name
    tool.write_text(f"#!/bin/bash\n{body}\n")
    tool.chmod(0o755)


# -- torchrun -------------------------------------------------------------------------------

def test_two_nodes_on_loopback_train_one_tp2_model(tmp_path):
    out, port = tmp_path / "run", free_port()
    agents = [subprocess.Popen(
        [sys.executable, "-m", "megatron_hybrid", "launch", "torchrun", "--nnodes", "2",
         "--node-rank",
         str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port",
         str(port), RECIPE, *SMALL, "parallel.tp=2", f"output_dir={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=rank_environment(2))
        for rank in (0, 1)]  # two one-process nodes share this machine's threads
    consoles = [agent.communicate(timeout=600)[0] for agent in agents]
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(c[-3000:] for c in consoles)
    assert "launch: node 1 of 2 node(s) x 1 process(es) per node = world size 2" in consoles[1]
    assert "[default0]:done: 2 steps" in consoles[0]  # rank 0's console, through torchrun
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [record["loss"] for record in records if record.get("kind", "train") == "train"]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    checkpoint = out / "checkpoints" / "step_000002"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["layout"]["tp"] == 2
    # Rank 1 is the one process of node 1: it saved its own state of the TP=2 model.
    assert sorted(p.name for p in (checkpoint / "rng").iterdir()) == ["rank_0.pt", "rank_1.pt"]
    for node in (0, 1):
        (rank_dir,) = (out / "logs" / f"node{node}").glob("tiny-pretrain_*/attempt_0/0")
        assert {p.name for p in rank_dir.iterdir()} >= {"stdout.log", "stderr.log"}
    node0_log = next((out / "logs" / "node0").glob("*/attempt_0/0/stdout.log")).read_text()
    assert "done: 2 steps" in node0_log


def test_dry_run_reads_the_slurm_environment_and_adds_the_gpu_environment(clean_env, capsys):
    clean_env.setenv("SLURM_NNODES", "4")
    clean_env.setenv("SLURM_NODEID", "3")
    clean_env.setenv("SLURM_GPUS_ON_NODE", "8")
    clean_env.setenv("MASTER_ADDR", "node007")
    clean_env.setenv("MASTER_PORT", "13456")
    clean_env.setenv("NCCL_IB_TIMEOUT", "22")  # the user's value wins
    assert LAUNCH.run(parse("torchrun", "--dry-run", RECIPE, *FOUR_NODES)) == 0
    *exports, command = capsys.readouterr().out.strip().splitlines()
    assert exports == ["export CUDA_DEVICE_MAX_CONNECTIONS=1",  # parallel.tp=2
                       "export TORCH_NCCL_AVOID_RECORD_STREAMS=1", "export NCCL_IB_TIMEOUT=22",
                       "export NCCL_IB_RETRY_CNT=7"]
    assert shlex.split(command) == [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "4", "--nproc-per-node", "8",
        "--node-rank", "3", "--master-addr", "node007", "--master-port", "13456",
        "--rdzv-id", "tiny-pretrain", "--log-dir", "runs/tiny-pretrain/logs/node3", "--tee", "3",
        "--local-ranks-filter", "0", "--max-restarts", "0",  # several nodes: requeue instead
        "-m", "megatron_hybrid", "train", RECIPE, *FOUR_NODES]


def test_flags_win_over_the_environment_and_one_node_needs_no_address(clean_env, capsys):
    clean_env.setenv("NODE_RANK", "1")
    LAUNCH.run(parse("torchrun", "--dry-run", "--nnodes", "2", "--node-rank", "0",
                     "--nproc-per-node", "1", "--master-addr", "node001", RECIPE))
    assert "--node-rank 0 --master-addr node001 --master-port 29500" in capsys.readouterr().out
    clean_env.delenv("NODE_RANK")
    LAUNCH.run(parse("torchrun", "--dry-run", "--nproc-per-node", "2", "--max-restarts", "0",
                     RECIPE))
    out = capsys.readouterr().out
    assert "--nnodes 1 --nproc-per-node 2 --standalone --log-dir" in out
    assert "--max-restarts 0 -m megatron_hybrid" in out
    LAUNCH.run(parse("torchrun", "--dry-run", "--nproc-per-node", "2", RECIPE))
    assert f"--max-restarts {launch.DEFAULT_MAX_RESTARTS} -m" in capsys.readouterr().out
    assert "CUDA_DEVICE_MAX_CONNECTIONS" not in out  # tp=1


REFUSED = [
    ({}, ["--nnodes", "3", "--nproc-per-node", "1", "--master-addr", "h", RECIPE,
          "parallel.tp=2"],
     "3 node(s) x 1 process(es) per node = world size 3: parallel: tp(2) * pp(1) * cp(1) * "
     "dp(?) does not divide world size 3"),
    ({}, ["--nnodes", "2", "--node-rank", "2", "--nproc-per-node", "1", "--master-addr", "h",
          RECIPE], "node rank 2 (--node-rank) is not below the node count 2: node ranks run "
                   "from 0 to 1"),
    ({"SLURM_NNODES": "2", "SLURM_NODEID": "5"}, ["--nproc-per-node", "1", RECIPE],
     "node rank 5 (SLURM_NODEID) is not below the node count 2"),
    ({"NNODES": "two"}, ["--nproc-per-node", "1", RECIPE],
     "NNODES='two' is not an integer: give --nnodes N"),
    ({}, ["--nnodes", "2", "--nproc-per-node", "1", RECIPE],
     "2 nodes need node 0's address: give --master-addr HOST or set MASTER_ADDR"),
    ({}, ["--nproc-per-node", "1", "recipes/nope.yaml"], "recipe file not found: recipes/nope"),
    ({}, ["--nproc-per-node", "1", "--max-restarts", "-1", RECIPE],
     "--max-restarts -1 must be at least 0 (0: none)"),
    ({}, ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "h", "--max-restarts", "2",
          RECIPE], "--max-restarts 2 restarts one node's workers, which cannot rejoin the "
                   "other 1 node(s): give --max-restarts 0 and requeue the job"),
]


@pytest.mark.parametrize("environ, argv, message", REFUSED)
def test_torchrun_refuses_bad_layouts_before_starting(clean_env, tmp_path, environ, argv,
                                                      message):
    clean_env.chdir(tmp_path)
    for name, value in environ.items():
        clean_env.setenv(name, value)
    with pytest.raises((ValueError, FileNotFoundError)) as refused:
        LAUNCH.run(parse("torchrun", *argv))
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


# -- Slurm ------------------------------------------------------------------------------------

def test_sbatch_script_for_four_nodes_runs_torchrun_in_the_container(clean_env, tmp_path, capsys):
    clean_env.chdir(tmp_path)
    argv = ["slurm", "--nodes", "4", "--gpus-per-node", "8", "--container",
            "nvcr.io#nvidia/pytorch:25.06-py3", "--mounts", "/data:/data,/ckpt:/ckpt:ro",
            "--time", "01:00:00", "--account", "acct", "--partition", "batch", RECIPE,
            *FOUR_NODES, "checkpoint.load=runs/start here"]
    assert LAUNCH.run(parse(*argv[:1], "--dry-run", *argv[1:])) == 0
    dry_run = capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
    assert LAUNCH.run(parse(*argv)) == 0
    script_path = tmp_path / "runs" / "tiny-pretrain" / "slurm.sbatch"
    script = script_path.read_text()
    assert script == dry_run
    assert f"wrote {script_path.relative_to(tmp_path)}" in capsys.readouterr().out
    directives = [line.split(None, 1)[1] for line in script.splitlines()
                  if line.startswith("#SBATCH")]
    assert directives == [
        "--job-name=tiny-pretrain", "--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8",
        "--exclusive", f"--chdir={tmp_path}", "--output=runs/tiny-pretrain/slurm-%j.out",
        "--account=acct", "--partition=batch", "--time=01:00:00"]

    srun_args, srun_env = run_under_stand_in_slurm(script_path, tmp_path)
    command = ["megatron-hybrid", "launch", "torchrun", "--nnodes", "4", "--nproc-per-node", "8",
               RECIPE, *FOUR_NODES, "checkpoint.load=runs/start here"]
    assert srun_args == [
        "--kill-on-bad-exit=1", "--cpus-per-task=112",
        "--container-image=nvcr.io#nvidia/pytorch:25.06-py3",
        f"--container-mounts={tmp_path}:{tmp_path},/data:/data,/ckpt:/ckpt:ro",
        f"--container-workdir={tmp_path}", *command]
    assert srun_env == {"MASTER_ADDR": "node007", "MASTER_PORT": str(10000 + 123456 % 20000)}

    # What node 2's task runs is a `launch torchrun` that finds its place from Slurm's variables.
    clean_env.setenv("SLURM_NODEID", "2")
    for name, value in srun_env.items():
        clean_env.setenv(name, value)
    assert LAUNCH.run(parse("torchrun", "--dry-run", *command[3:])) == 0
    torchrun = capsys.readouterr().out.splitlines()[-1]
    assert ("--nnodes 4 --nproc-per-node 8 --node-rank 2 --master-addr node007 --master-port "
            f"{srun_env['MASTER_PORT']}") in torchrun


def run_under_stand_in_slurm(script: Path, tmp_path: Path) -> tuple[list[str], dict]:
    """Run the batch script with ``scontrol`` and ``srun`` stand-ins; srun's arguments and
    the rendezvous variables it saw."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_tool(bin_dir, "scontrol", 'test "$*" = "show hostnames node[007-010]" && '
                                    "printf 'node%03d\\n' 7 8 9 10")
    write_tool(bin_dir, "srun", 'printf "%s\\n" "$@" > srun.args\n'
                                'echo "{\\"MASTER_ADDR\\": \\"$MASTER_ADDR\\", '
                                '\\"MASTER_PORT\\": \\"$MASTER_PORT\\"}" > srun.env')
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "123456",
           "SLURM_JOB_NODELIST": "node[007-010]", "SLURM_CPUS_ON_NODE": "112"}
    subprocess.run(["bash", str(script)], cwd=tmp_path, env=env, check=True, timeout=60)
    args = (tmp_path / "srun.args").read_text().splitlines()
    return args, json.loads((tmp_path / "srun.env").read_text())


def test_cluster_profile_gives_defaults_and_flags_win(clean_env, tmp_path, capsys):
    clean_env.chdir(tmp_path)
    LAUNCH.run(parse("slurm", "--cluster", EXAMPLE_CLUSTER, "--nodes", "4", "--partition",
                     "debug", "--dry-run", RECIPE, *FOUR_NODES))
    script = capsys.readouterr().out
    for line in ["#SBATCH --account=my-account", "#SBATCH --partition=debug",
                 "#SBATCH --gpus-per-node=8", "#SBATCH --time=04:00:00", "#SBATCH --qos=normal",
                 "export NCCL_SOCKET_IFNAME=ib0",
                 "--container-image=/path/to/megatron-hybrid.sqsh",
                 f"--container-mounts={tmp_path}:{tmp_path},/path/to/datasets:/datasets:ro"]:
        assert line in script


def test_without_a_container_srun_runs_on_the_nodes(clean_env, tmp_path, capsys):
    clean_env.chdir(tmp_path)
    LAUNCH.run(parse("slurm", "--nodes", "1", "--gpus-per-node", "2", "--dry-run", RECIPE))
    script = capsys.readouterr().out
    assert "--container" not in script
    assert "megatron-hybrid launch torchrun --nnodes 1 --nproc-per-node 2" in script


def test_submit_calls_sbatch_with_the_written_script(clean_env, tmp_path, capsys):
    clean_env.chdir(tmp_path)
    write_tool(tmp_path, "sbatch", 'echo "$@" > sbatch.args; echo "Submitted batch job 42"')
    clean_env.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    assert LAUNCH.run(parse("slurm", "--nodes", "1", "--gpus-per-node", "2", "--submit",
                            RECIPE)) == 0
    assert (tmp_path / "sbatch.args").read_text().split() == ["runs/tiny-pretrain/slurm.sbatch"]
    assert (tmp_path / "runs" / "tiny-pretrain" / "slurm.sbatch").is_file()


REFUSED_SLURM = [
    (["--nodes", "3", "--gpus-per-node", "1", RECIPE, "parallel.tp=2"],
     "--nodes 3 x --gpus-per-node 1: parallel: tp(2) * pp(1) * cp(1) * dp(?) does not divide "
     "world size 3"),
    (["--nodes", "2", RECIPE], "give --gpus-per-node G (or gpus_per_node in the --cluster "
                               "profile)"),
    (["--nodes", "1", "--gpus-per-node", "1", "--mounts", "/data", RECIPE],
     "container mount '/data': expected SRC:DST[:FLAGS]"),
    (["--nodes", "1", "--gpus-per-node", "1", "--cluster", "nope.yaml", RECIPE],
     "cluster profile not found: nope.yaml (start from launch/clusters/example.yaml)"),
    (["--nodes", "1", "--gpus-per-node", "1", "--submit", RECIPE],
     "sbatch not found: run on a Slurm login node, or drop --submit"),
]


@pytest.mark.parametrize("argv, message", REFUSED_SLURM)
def test_slurm_refuses_bad_settings_and_writes_nothing(clean_env, tmp_path, argv, message):
    clean_env.chdir(tmp_path)
    clean_env.setenv("PATH", str(tmp_path))  # no sbatch
    with pytest.raises(ValueError) as refused:
        LAUNCH.run(parse("slurm", *argv))
    assert message in str(refused.value) and "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == []


def test_a_mistyped_cluster_profile_key_is_named(clean_env, tmp_path):
    profile = tmp_path / "site.yaml"
    profile.write_text("acount: abc\n")
    with pytest.raises(ValueError, match=r"site.yaml: cluster.acount: unknown key; did you mean "
                                         r"cluster.account\?"):
        LAUNCH.run(parse("slurm", "--cluster", str(profile), "--nodes", "1", RECIPE))


# -- Dockerfile -----------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, ARG defaults
    substituted."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    instructions, args = [], {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        rest = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), rest)
        if keyword == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
        instructions.append((keyword, rest))
    return instructions


def setup_requirements() -> tuple[list[Requirement], dict[str, list[Requirement]]]:
    """setup.py's INSTALL_REQUIRES and EXTRAS_REQUIRE, read without running setup()."""
    values = {}
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    extras = {name: [Requirement(r) for r in reqs]
              for name, reqs in values["EXTRAS_REQUIRE"].items()}
    return [Requirement(r) for r in values["INSTALL_REQUIRES"]], extras


def pip_installs(instructions) -> list[list[str]]:
    """The arguments of every ``pip install`` in the RUN instructions."""
    commands = [command.split() for keyword, rest in instructions if keyword == "RUN"
                for command in re.split(r"&&|\|\||;|\|", rest)]
    return [[word.strip("'\"") for word in words[words.index("install") + 1:]]
            for words in commands if "pip" in words and "install" in words]


def test_dockerfile_is_nvidia_pytorch_as_a_non_root_user():
    instructions = dockerfile_instructions()
    (base,) = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", base)
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert instructions[-1][0] == "USER"  # nothing after it runs as root


def test_dockerfile_keeps_the_container_torch_and_setup_py_pins():
    instructions = dockerfile_instructions()
    install_requires, extras = setup_requirements()
    (constraint,) = [rest for keyword, rest in instructions if keyword == "ENV"]
    assert constraint.startswith("PIP_CONSTRAINT=")
    constraint_file = constraint.partition("=")[2]
    first_install = next(i for i, (k, rest) in enumerate(instructions) if "pip install" in rest)
    env_index = instructions.index(("ENV", constraint))
    # The constraint is the container's whole freeze filtered by the script on setup.py,
    # both copied in before it runs.
    (write,) = [rest for keyword, rest in instructions[:env_index]
                if keyword == "RUN" and rest.endswith(f"> {constraint_file}")]
    freeze, _, filtered = write.partition("|")
    assert freeze.strip() == "pip list --format=freeze"
    script, setup_py = filtered.split()[1:3]
    copied = [rest.split() for keyword, rest in instructions[:env_index] if keyword == "COPY"]
    assert any({"setup.py", "tools/docker_constraints.py"} <= set(words[:-1])
               and {script, setup_py} == {words[-1] + name for name in
                                          ("docker_constraints.py", "setup.py")}
               for words in copied)
    assert env_index < first_install  # every pip install keeps the container's packages

    installs = pip_installs(instructions)
    named = [Requirement(word) for words in installs for word in words
             if not word.startswith("-") and word != "."]
    assert "torch" not in {r.name for r in named} and "transformer-engine" not in {
        r.name for r in named}
    # The package itself: its pins are setup.py's, read by pip at build time.
    assert ["--no-cache-dir", "--editable", "."] in installs
    pinned = {r.name: r for r in install_requires}
    for requirement in named:
        if requirement.name in pinned:
            assert requirement.specifier == pinned[requirement.name].specifier
    # The Mamba kernels: exact versions that setup.py's gpu extra accepts, built without deps.
    gpu = {r.name: r.specifier for r in extras["gpu"]}
    kernels = {r.name: r for r in named if r.name in ("mamba-ssm", "causal-conv1d")}
    assert set(kernels) == {"mamba-ssm", "causal-conv1d"}
    for name, requirement in kernels.items():
        (version,) = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        assert gpu[name].contains(version), (name, version, gpu[name])
    (kernel_install,) = [words for words in installs if "mamba-ssm" in " ".join(words)]
    assert {"--no-deps", "--no-build-isolation"} <= set(kernel_install)


def test_docker_constraint_keeps_the_container_packages_but_not_setup_py_pins():
    freeze = "\n".join([
        "torch==2.8.0a0+5228986c39.nv25.6", "triton==3.3.0", "transformer_engine==2.4.0+3cd6870",
        "apex==0.1", "flash_attn==2.7.3", "numpy==1.26.4",
        "Transformers==4.52.0",  # setup.py pins transformers: its pin moves it
        "nvidia_modelopt==0.29.0",  # the same, spelled as pip list spells it
        "lightning-thunder @ file:///opt/pytorch/lightning-thunder",
        "-e /opt/pytorch/apex"])
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "docker_constraints.py"), str(ROOT / "setup.py")],
        input=freeze, capture_output=True, text=True, timeout=60, check=True)
    constrained = {Requirement(line).name: str(Requirement(line).specifier)
                   for line in result.stdout.splitlines()}
    assert constrained == {"torch": "==2.8.0a0+5228986c39.nv25.6", "triton": "==3.3.0",
                           "transformer_engine": "==2.4.0+3cd6870", "apex": "==0.1",
                           "flash_attn": "==2.7.3", "numpy": "==1.26.4"}
    # setup.py pins transformers and nvidia-modelopt exactly; it only bounds triton (a floor),
    # which therefore stays at the container's version.
    install_requires, _ = setup_requirements()
    operators = {r.name: {spec.operator for spec in r.specifier} for r in install_requires}
    assert operators["transformers"] == operators["nvidia-modelopt"] == {"=="}
    assert operators["triton"] == {">="}
    # pip refuses a URL or an editable line in a constraint file: left out, and said so.
    refused = [line for line in result.stderr.splitlines() if line.startswith("not constrained")]
    assert len(refused) == 2
    assert refused[0].endswith("lightning-thunder @ file:///opt/pytorch/lightning-thunder")
    assert refused[1].endswith("-e /opt/pytorch/apex")


def test_dockerignore_keeps_local_state_out_of_the_image():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "runs", "**/__pycache__", ".pytest_cache"} <= set(ignored)


def test_hadolint_passes():
    scripts = sysconfig.get_path("scripts")
    hadolint = shutil.which("hadolint", path=f"{scripts}{os.pathsep}{os.environ['PATH']}")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install -e '.[test]' installs it)")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
