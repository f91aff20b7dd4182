"""On PYTHONPATH, makes this Python unable to import torch, diffusers, transformers, peft, accelerate and Ray:
`./start.sh --test` runs the unit and service tiers under it, so that they stay torch-free."""

import sys
from importlib.machinery import ModuleSpec

BLOCKED = {"torch", "diffusers", "transformers", "peft", "accelerate", "ray"}


class BlockTorch:
    """Refuses the packages the unit and service tiers must run without."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> ModuleSpec | None:
        """Raise for a blocked package (or a module in one); leave every other import to the next finder."""
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: the unit and service tiers run without it)", name=name)
        return None


sys.meta_path.insert(0, BlockTorch())
