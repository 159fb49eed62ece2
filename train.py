"""One LightningCLI entry for every training task.

    python train.py fit --config configs/<task>/<name>.yaml

The data side is :class:`mmmat.tasks.datamodule.MultimodalDataModule` (shards written by
``mmmat data build``); the model is any LightningModule named by ``model.class_path`` in the config that
consumes :class:`mmmat.data.batch.MultimodalBatch`. Unknown config keys are errors, and the resolved
config is saved beside the run's outputs.
"""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from mmmat.tasks.datamodule import MultimodalDataModule


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI (``args`` replaces ``sys.argv[1:]`` when given).

    ``run=False`` builds the trainer, model and data module without a subcommand (to check a launch).
    """
    return LightningCLI(
        pl.LightningModule,
        MultimodalDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
