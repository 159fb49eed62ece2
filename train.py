"""One LightningCLI entry for every training task.

    python train.py fit --config configs/<task>/<name>.yaml [--run_dir runs/mine]

The data side is :class:`mmmat.tasks.datamodule.MultimodalDataModule` (shards written by
``mmmat data build``); the model is any LightningModule named by ``model.class_path`` in the config that
consumes :class:`mmmat.data.batch.MultimodalBatch`. Unknown config keys are errors, and the resolved
config is saved beside the run's outputs.

``--run_dir DIR`` moves every output of a run (``trainer.default_root_dir``, the logger's ``save_dir``, the
model's ``save_dir``, checkpoint and profiler folders, and a tokenizer the run builds) from the config's root
folder to ``DIR``. The progress bar is on when the output is a terminal (``--trainer.enable_progress_bar``
decides otherwise), and the run ends with a table of its final metrics.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import LightningCLI

from mmmat.cli import quiet_warnings
from mmmat.tasks.datamodule import MultimodalDataModule

#: Config entries that name an output folder, moved under ``--run_dir``.
OUTPUT_KEYS = ("save_dir", "dirpath", "out_dir")


def _move(value: Any, old_root: str, new_root: str) -> Any:
    """``value`` with the prefix ``old_root`` replaced by ``new_root`` (other values unchanged)."""
    if not isinstance(value, str) or not old_root:
        return value
    old = Path(old_root)
    p = Path(value)
    if p == old:
        return new_root
    try:
        return str(Path(new_root) / p.relative_to(old))
    except ValueError:  # an output folder outside the config's root: keep its last name under the new root
        return str(Path(new_root) / p.name)


def _walk_outputs(node: Any, old_root: str, new_root: str) -> None:
    """Move every output-folder entry (``save_dir``, ``dirpath``, ``out_dir``) found in a config tree."""
    items = node.items() if hasattr(node, "items") else enumerate(node) if isinstance(node, list) else []
    for key, value in list(items):  # a jsonargparse Namespace yields nested keys as "init_args.save_dir"
        if str(key).split(".")[-1] in OUTPUT_KEYS and isinstance(value, str):
            node[key] = _move(value, old_root, new_root)
        elif hasattr(value, "items") or isinstance(value, list):
            _walk_outputs(value, old_root, new_root)


class MMMatCLI(LightningCLI):
    """LightningCLI with ``--run_dir``, a progress bar in terminals and a final metrics table."""

    def add_arguments_to_parser(self, parser: Any) -> None:
        """Add ``--run_dir``."""
        parser.add_argument("--run_dir", type=str | None, default=None,
                            help="Write every output of the run under this folder.")

    def before_instantiate_classes(self) -> None:
        """Apply ``--run_dir`` and the progress-bar default to the parsed config."""
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        run_dir = cfg.get("run_dir")
        trainer = cfg["trainer"]
        if run_dir:
            old_root = trainer.get("default_root_dir") or ""
            trainer["default_root_dir"] = run_dir
            _walk_outputs(trainer, old_root, run_dir)
            _walk_outputs(cfg["model"], old_root, run_dir)
            data = cfg.get("data")
            if data is not None and data.get("build_tokenizer") and data.get("tokenizer"):
                data["tokenizer"] = _move(data["tokenizer"], old_root, run_dir)
        if not any(a.startswith("--trainer.enable_progress_bar") for a in sys.argv[1:] + list(self._args or [])):
            trainer["enable_progress_bar"] = sys.stdout.isatty() or bool(trainer.get("enable_progress_bar"))

    def after_fit(self) -> None:
        """Print the final metrics and where the run's outputs are."""
        self._summary("fit")

    def after_test(self) -> None:
        """Print the test metrics."""
        self._summary("test")

    def after_validate(self) -> None:
        """Print the validation metrics."""
        self._summary("validate")

    def _summary(self, stage: str) -> None:
        trainer = self.trainer
        if trainer.global_rank != 0:
            return
        from mmmat.cli import _console

        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items()
            if getattr(v, "numel", lambda: 1)() == 1 and not k.endswith(("_n_gallery", "_n_queries"))
            and ("_to_" not in k or k.endswith(("R@1", "_mrr")))
        }
        from rich.table import Table

        t = Table(title=f"{stage}: epoch {trainer.current_epoch}, step {trainer.global_step} -> "
                        f"{trainer.default_root_dir}")
        t.add_column("metric")
        t.add_column("value", justify="right")
        for k in sorted(metrics):
            t.add_row(k, f"{metrics[k]:.5g}")
        c = _console()
        c.print(t)
        save_dir = getattr(self.model, "save_dir", None) or getattr(getattr(self.model, "hparams", {}), "get",
                                                                    lambda *_: None)("save_dir")
        if save_dir:
            c.print(f"model -> {save_dir}")
        if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
            c.print(f"logs -> {trainer.logger.log_dir}")

    _args: list[str] | None = None


def check_encoder_configs(args: list[str]) -> None:
    """Stop with the typed replacement when a ``--config`` file holds an encoder in the old ``{name: ...}`` form."""
    import yaml

    from mmmat.encoders.registry import list_encoder_configs

    configs = list_encoder_configs()
    paths = [a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    paths += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--config"]
    problems = []
    for path in paths:
        try:
            doc = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError):
            continue  # the parser reports it
        init = ((doc.get("model") or {}).get("init_args") or {}) if isinstance(doc, dict) else {}
        entries = {f"encoders.{k}": v for k, v in (init.get("encoders") or {}).items()}
        if init.get("encoder") is not None:
            entries["encoder"] = init["encoder"]
        for key, cfg in entries.items():
            if isinstance(cfg, dict) and "name" in cfg and "class_path" not in cfg:
                kwargs = {k: v for k, v in cfg.items() if k != "name"}
                cls = configs.get(cfg["name"])
                where = f"{cls.__module__}.{cls.__qualname__}" if cls else f"<no encoder {cfg['name']!r}>"
                problems.append(f"{path}: model.init_args.{key} is in the old form {{name: {cfg['name']}, ...}}; "
                                f"write it as\n  class_path: {where}\n  init_args: "
                                f"{yaml.safe_dump(kwargs, default_flow_style=True).strip()}")
    if problems:
        sys.exit("typed encoder configs are needed:\n" + "\n".join(problems))


def main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Run the CLI (``args`` replaces ``sys.argv[1:]`` when given).

    ``run=False`` builds the trainer, model and data module without a subcommand (to check a launch).
    """
    quiet_warnings()
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning.pytorch.utilities.rank_zero",
                 "lightning_fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    check_encoder_configs(list(sys.argv[1:] if args is None else args))
    MMMatCLI._args = args
    return MMMatCLI(
        pl.LightningModule,
        MultimodalDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
