"""Run by tests/test_training.py under torchrun: train a recipe, then write this rank's trainable weights.

torchrun --nproc_per_node 2 tests/ddp_train_worker.py RECIPE.yaml [section.key=value ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors.torch import save_file

from slowfast_adapter.training.recipe import Recipe
from slowfast_adapter.training.sharded_weights import trainable_state
from slowfast_adapter.training.train import train


def main() -> None:
    recipe = Recipe.from_yaml(sys.argv[1], sys.argv[2:])
    summary = train(recipe)
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    out = Path(recipe.train.output_dir) / f"rank{rank}.safetensors"
    save_file(trainable_state(summary["model"]), str(out))


if __name__ == "__main__":
    main()
