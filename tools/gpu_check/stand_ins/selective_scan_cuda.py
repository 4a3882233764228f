"""Stand-in for mamba_ssm's compiled Mamba-1 scan, which ``import mamba_ssm`` needs and nothing
of Mamba-2 calls; run.sh installs mamba-ssm without its CUDA build (its Mamba-2 kernels are
Triton) and puts this folder on PYTHONPATH."""
