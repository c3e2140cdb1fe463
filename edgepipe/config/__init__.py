"""What the user configures, typed and validated at load: targets, recipes and the release search space.

Everything here is data read from TOML (or built in Python) and checked on construction; errors name
the file, the field, its value and what is allowed. Nothing here imports a backend or a technique.
"""

from edgepipe.config.target import (
    Board,
    Budgets,
    Calibration,
    Runtime,
    Target,
    load_target,
    target_files,
    target_from_dict,
    targets_dirs,
)

__all__ = ["Board", "Budgets", "Calibration", "Runtime", "Target", "load_target", "target_files",
           "target_from_dict", "targets_dirs"]
