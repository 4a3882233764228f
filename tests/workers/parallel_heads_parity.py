"""torchrun worker: the tiny model of a pattern with parallel-heads (``H``) layers, with meta
tokens and a sliding attention window, trained under TP=1 and the given layouts from the
same weights by ``layout_parity``'s runner.

Arguments: the results file, the pattern and the layouts (comma-separated names of
``layout_parity.LAYOUTS``). Rank 0 writes ``runs`` and ``gradients`` as ``layout_parity``
does.
"""

import os
import sys
from pathlib import Path

import layout_parity
import torch
import torch.distributed as dist

from megatron_hybrid import backends

META_TOKENS = 2
WINDOW = 8
"""Of the 32 positions, so most queries attend over a window plus the meta tokens."""


def main():
    backends.install("cpu")
    out_path, pattern, layouts = Path(sys.argv[1]), sys.argv[2], sys.argv[3].split(",")
    names = ["tp1", *layouts]
    model_cfg = layout_parity.model_config(pattern).replace(num_meta_tokens=META_TOKENS,
                                                            attention_window=WINDOW)
    world_size = int(os.environ["WORLD_SIZE"])
    runs = {name: layout_parity.run_layout(model_cfg, name, out_path.parent, world_size)
            for name in names}
    results = {"runs": runs,
               **layout_parity.read_at_tp1(model_cfg, names, out_path.parent, world_size)}
    if dist.get_rank() == 0:
        torch.save(results, out_path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
