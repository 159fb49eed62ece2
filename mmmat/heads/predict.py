"""Predict properties of crystals in CIF files with a saved :class:`~mmmat.heads.property.PropertyModel`."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mmmat.data.schema import MaterialRecord, RecordError
from mmmat.io import InputError, read_structure


def _expand(files: Iterable[str | Path] | str | Path) -> list[Path]:
    """Files as given, folders replaced by their ``*.cif`` files (sorted); missing paths are errors."""
    if isinstance(files, str | Path):
        files = [files]
    out: list[Path] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.suffix.lower() == ".cif" and q.is_file())
            if not found:
                raise FileNotFoundError(f"{p} holds no .cif file")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} not found")
    return out


def read_cif_file(path: str | Path, order: bool = False) -> MaterialRecord:
    """Read (:func:`mmmat.io.read_structure`) and validate one crystal file; a bad file raises :class:`RecordError`.

    The message names the file.  A disordered crystal (partial occupancies) is refused with
    :data:`~mmmat.data.schema.ORDER_POLICY`, or, with ``order=True``, ordered by
    :func:`~mmmat.data.schema.order_structure`.
    """
    path = Path(path)
    try:
        structure = read_structure(path)
    except InputError as exc:
        raise RecordError(str(path), str(exc).removeprefix(f"{path}: ")) from None
    if order and not structure.is_ordered:
        from mmmat.data.schema import order_structure

        structure = order_structure(structure, name=str(path))
    record = MaterialRecord.from_structure(structure, str(path))
    record.validate()
    return record


def predict_files(
    model_dir: str | Path,
    files: Iterable[str | Path] | str | Path,
    csv: str | Path | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    on_error: str = "raise",
    order: bool = False,
) -> Any:
    """Predict every target of the model at ``model_dir`` for the crystals in ``files``.

    Args:
        model_dir: Folder written by :meth:`PropertyModel.save_pretrained`.
        files: CIF files, or folders whose ``*.cif`` files are read (first structure of each file).
        csv: Also write the table to this CSV file.
        batch_size: Crystals per forward pass.
        device: Torch device (default: CUDA when available, else CPU).
        on_error: ``raise`` (the first unusable file stops the batch) or ``skip`` (it is left out and listed in
            ``df.attrs["failures"]`` as ``(file, reason)``; the good files are predicted).
        order: Order disordered crystals (partial occupancies) instead of refusing them.

    Returns:
        A pandas DataFrame with columns ``file``, ``formula`` (reduced), and per target ``<target>`` and
        ``<target>_std`` (regression, label units) or ``<target>`` (class index) and ``<target>_prob``
        (classification), one row per file in input order.  ``df.attrs["units"]`` maps each regression column
        to its unit (from the model's config, ``""`` when unknown); ``df.attrs["failures"]`` lists skipped files.

    Raises:
        RecordError: A file is not a parsable CIF or holds an unusable crystal (the message names it).
        FileNotFoundError: A path does not exist or a folder holds no CIF.

    """
    import pandas as pd

    from mmmat.heads.property import PropertyModel

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    all_paths = _expand(files)
    paths, records, failures = [], [], []
    for p in all_paths:
        try:
            records.append(read_cif_file(p, order=order))
            paths.append(p)
        except RecordError as exc:
            if on_error == "raise":
                raise
            failures.append((str(p), exc.reason))
    model = PropertyModel.from_pretrained(model_dir, map_location=device)
    pred = model.predict_records(records, batch_size=batch_size) if records else {}
    table: dict[str, Any] = {"file": [str(p) for p in paths], "formula": [r.formula for r in records]}
    for t in model.targets:
        extra = f"{t.name}_std" if t.kind == "regression" else f"{t.name}_prob"
        table[t.name] = pred[t.name] if records else []
        table[extra] = pred[extra] if records else []
    df = pd.DataFrame(table)
    df.attrs["failures"] = failures
    df.attrs["units"] = {
        col: t.unit for t in model.targets if t.kind == "regression" for col in (t.name, f"{t.name}_std")
    }
    if csv is not None:
        Path(csv).parent.mkdir(parents=True, exist_ok=True)
        df.to_csv(csv, index=False)
    return df
