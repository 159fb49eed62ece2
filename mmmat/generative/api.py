"""Sampling API of the crystal generator: load a model folder, build conditions, sample, write files.

The same verbs as ``mmmat generate``::

    gen = load_generator("runs/generate/model")
    structures, info = generate(gen, n=16, xrd="pattern.xy", seed=0)
    write_samples(structures, "samples/", info)

A generator folder (written at the end of ``train.py fit`` with :class:`~mmmat.tasks.generate.CrystalGeneration`)
holds the flow (``config.json`` + ``model.safetensors``) and, when it was trained with latent conditions, the
frozen :class:`~mmmat.latent.model.MultimodalModel` that embeds them (``condition_model/``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmmat.generative.flow import CrystalFlow, to_structures
from mmmat.io import InputError


class GenerationError(InputError):
    """A generation request that cannot be served; the message says why (an :class:`mmmat.io.InputError`)."""


@dataclass
class Generator:
    """A loaded generator: the flow, its conditioning model (or None) and where it came from."""

    flow: CrystalFlow
    condition_model: Any
    path: Path
    device: str
    condition_modalities: list[str] = field(default_factory=list)


def load_generator(model_dir: str | Path, device: str | None = None) -> Generator:
    """Load a generator folder for sampling (eval mode) on ``device`` (default: CUDA if available)."""
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise GenerationError(f"{d} is not a generator folder (no config.json); train one with train.py fit")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        flow = CrystalFlow.from_pretrained(d, map_location=device).eval()
    except ValueError as exc:
        raise GenerationError(str(exc)) from None
    extra = getattr(flow, "extra", {})
    cond = None
    if extra.get("condition_model"):
        from mmmat.latent.model import MultimodalModel
        from mmmat.modelio import model_fingerprint

        cdir = d / extra["condition_model"]
        want = extra.get("condition_model_fingerprint")
        if want and model_fingerprint(cdir) != want:
            raise GenerationError(f"{cdir} is not the conditioning model this generator was trained with")
        cond = MultimodalModel.from_pretrained(cdir, map_location=device).eval()
    return Generator(flow, cond, d, device, list(extra.get("condition_modalities", [])))


# ---------------------------------------------------------------------- conditions
def embed_condition(
    gen: Generator,
    *,
    xrd: Any = None,
    text: str | None = None,
    image: Any = None,
    crystal: Any = None,
    wavelength: float | None = None,
    condition: tuple[str, Any] | None = None,
) -> tuple[torch.Tensor, str] | None:
    """The shared-latent embedding (1, D) of one query, and the modality it came from (None: no query).

    ``condition``: ``(modality, value)`` for any registered modality or alias (:mod:`mmmat.modalities`), the
    value a file or what the modality's reader takes; the keywords are aliases: ``xrd``: a pattern file or a
    (1701,) profile on the mmmat grid; ``text``: a sentence (the literature or processing text the generator was
    trained with); ``image``: an image file or array; ``crystal``: a CIF file or pymatgen Structure.
    """
    given = {
        k: v
        for k, v in {"condition": condition, "xrd": xrd, "text": text, "image": image, "crystal": crystal}.items()
        if v is not None
    }
    if not given:
        return None
    if len(given) > 1:
        raise GenerationError(f"give one latent condition, not {sorted(given)}")
    if gen.condition_model is None or gen.flow.latent_dim == 0:
        raise GenerationError(
            f"{gen.path} was trained without latent conditions: it cannot take --{next(iter(given))}"
        )
    from mmmat.modalities import get_modality
    from mmmat.retrieval import api as rapi
    from mmmat.retrieval.index import RetrievalError

    kind, value = condition if condition is not None else next(iter(given.items()))
    if kind == "text":
        if not str(value).strip():
            raise GenerationError("the text condition is empty")
        kind = "literature_text" if "literature_text" in gen.condition_modalities else "processing_text"
    try:
        modality = get_modality(kind).name
    except KeyError as exc:
        raise GenerationError(str(exc.args[0])) from None
    if modality not in gen.condition_modalities:
        raise GenerationError(
            f"{gen.path} was not trained with {modality} conditions ({gen.condition_modalities})"
        )
    model = gen.condition_model
    try:
        raw = rapi.read_query(modality, value, model, wavelength)
    except RetrievalError as exc:
        raise GenerationError(str(exc)) from None
    inputs = raw[None] if isinstance(raw, np.ndarray) else [raw]
    return model.embed(modality, inputs).float(), modality


def condition_vectors(
    gen: Generator, n: int, latent: torch.Tensor | None = None, targets: Mapping[str, float] | None = None
) -> torch.Tensor | None:
    """Condition vectors (n, cond_dim) from a latent embedding ((1, D) or (n, D)) and/or property targets."""
    flow = gen.flow
    dev = flow.y_mean.device
    unknown = sorted(set(targets or {}) - set(flow.properties))
    if unknown:
        raise GenerationError(f"unknown targets {unknown}: this generator takes {flow.properties or 'none'}")
    lat = lmask = props = pmask = None
    if latent is not None:
        lat = latent.to(dev).float().expand(n, -1) if latent.shape[0] == 1 else latent.to(dev).float()
        lmask = torch.ones(n, device=dev)
    if targets:
        props = torch.zeros(n, len(flow.properties), device=dev)
        pmask = torch.zeros_like(props)
        for k, name in enumerate(flow.properties):
            if name in targets:
                props[:, k] = float(targets[name])
                pmask[:, k] = 1.0
    if lat is None and props is None:
        return None
    return flow.condition_vector(lat, lmask, props, pmask, n, dev)


def parse_composition(formula: str, max_atoms: int | None = None) -> list[int]:
    """Atomic numbers of the cell ``formula`` describes, as written (``Na4Cl4`` is 8 atoms; ``NaCl`` is 2)."""
    from pymatgen.core import Composition, Element

    try:
        amounts = Composition(formula).get_el_amt_dict()
        numbers = {el: Element(el).Z for el in amounts}
    except Exception as exc:
        raise GenerationError(f"cannot read the composition {formula!r}: {exc}") from None
    if not amounts or any(abs(v - round(v)) > 1e-6 or v <= 0 for v in amounts.values()):
        raise GenerationError(f"composition {formula!r} must have whole positive atom counts per cell")
    z = [numbers[el] for el, v in sorted(amounts.items()) for _ in range(int(round(v)))]
    if max_atoms is not None and len(z) > max_atoms:
        raise GenerationError(
            f"composition {formula!r} has {len(z)} atoms, more than this generator's {max_atoms}"
        )
    return z


# ---------------------------------------------------------------------- sampling
def sample_structures(
    flow: CrystalFlow,
    counts: Sequence[int] | torch.Tensor,
    z: Sequence[int] | torch.Tensor | None = None,
    cond: torch.Tensor | None = None,
    *,
    steps: int = 100,
    guidance: float = 1.0,
    coord_anneal: float = 0.0,
    seed: int = 0,
    batch_size: int = 1024,
    start: Sequence[Any] | None = None,
    t_start: float = 0.0,
    progress: Callable[[int], None] | None = None,
    context: Sequence[Sequence[Any]] | None = None,
) -> list[Any]:
    """Sample crystals in batches; returns pymatgen ``Structure`` objects (None where a cell degenerated).

    Args:
        flow: The generator.
        counts: Atoms per sample.
        z: Flat atomic numbers of every sample in order (crystal structure prediction); None: de novo.
        cond: (n, cond_dim) condition vectors or None.
        steps: Euler steps.
        guidance: Classifier-free guidance scale.
        coord_anneal: Coordinate velocity scaling (1 + a·t).
        seed: Seed of the noise; the same seed, device and batch size give the same samples.
        batch_size: Samples per batch.
        start: Optional structures to refine (one per sample; same atom order as ``z``), see ``t_start``.
        t_start: Flow time at which ``start`` enters (0: pure noise).
        context: Optional templates per sample (lists of structures) for a retrieval-augmented generator.
        progress: Called with the number of samples finished after each batch.
    """
    dev = flow.y_mean.device
    counts_t = torch.as_tensor(list(counts) if not torch.is_tensor(counts) else counts, dtype=torch.long)
    zt = None if z is None else torch.as_tensor(list(z) if not torch.is_tensor(z) else z, dtype=torch.long)
    if zt is not None and int(counts_t.sum()) != zt.numel():
        raise GenerationError(f"{zt.numel()} atomic numbers for {int(counts_t.sum())} atoms")
    offsets = np.concatenate([[0], np.cumsum(counts_t.numpy())])
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    out: list[Any] = []
    n = counts_t.numel()
    for lo in range(0, n, batch_size):
        hi = min(n, lo + batch_size)
        c = counts_t[lo:hi]
        zz = None if zt is None else zt[offsets[lo] : offsets[hi]]
        cc = None if cond is None else cond[lo:hi]
        st = None
        if start is not None and t_start > 0:
            lat = torch.as_tensor(np.stack([s.lattice.matrix for s in start[lo:hi]]), dtype=torch.float32)
            fr = torch.as_tensor(np.concatenate([s.frac_coords for s in start[lo:hi]]), dtype=torch.float32)
            st = (lat, fr)
        res = flow.sample(
            c,
            zz,
            cc,
            steps=steps,
            guidance=guidance,
            coord_anneal=coord_anneal,
            generator=gen,
            start=st,
            t_start=t_start,
            context=None if context is None else context[lo:hi],
        )
        out.extend(to_structures(res))
        if progress is not None:
            progress(hi)
    return out


def generate(
    gen: Generator,
    n: int,
    *,
    composition: str | None = None,
    xrd: Any = None,
    text: str | None = None,
    image: Any = None,
    crystal: Any = None,
    targets: Mapping[str, float] | None = None,
    seed: int = 0,
    steps: int = 100,
    guidance: float = 1.0,
    coord_anneal: float = 0.0,
    batch_size: int = 1024,
    wavelength: float | None = None,
    progress: Callable[[int], None] | None = None,
    condition: tuple[str, Any] | None = None,
) -> tuple[list[Any], dict[str, Any]]:
    """Generate ``n`` crystals; returns the structures and a manifest-ready description of the run.

    ``composition`` (a cell formula) selects crystal structure prediction; without it the atom counts and
    species are sampled too (de novo).  At most one latent condition (``condition=(modality, value)`` for any
    registered modality, or its aliases ``xrd``, ``text``, ``image``, ``crystal``) and any property ``targets``
    steer the samples.
    """
    if n < 1:
        raise GenerationError("n must be at least 1")
    flow = gen.flow
    max_atoms = int(flow.config["max_atoms"])
    emb = embed_condition(gen, xrd=xrd, text=text, image=image, crystal=crystal, wavelength=wavelength,
                          condition=condition)
    condition_value = None if condition is None else condition[1]
    cond = condition_vectors(gen, n, None if emb is None else emb[0], targets)
    g = torch.Generator().manual_seed(int(seed))
    if composition is not None:
        zc = parse_composition(composition, max_atoms)
        counts = [len(zc)] * n
        z: list[int] | None = zc * n
    else:
        counts = flow.sample_atom_counts(n, generator=g).tolist()
        z = None
    dev_is_cuda = str(flow.y_mean.device).startswith("cuda")
    if dev_is_cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    structures = sample_structures(
        flow,
        counts,
        z,
        cond,
        steps=steps,
        guidance=guidance,
        coord_anneal=coord_anneal,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    if dev_is_cuda:
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    condition: dict[str, Any] = {}
    if emb is not None:
        aliases = {"xrd": xrd, "image": image, "crystal": crystal}
        src = condition_value if condition_value is not None else (
            text if emb[1].endswith("_text") else aliases.get(emb[1])
        )
        condition["latent"] = {
            "modality": emb[1],
            "source": str(src) if isinstance(src, str | Path) else "array",
        }
    if targets:
        condition["targets"] = {k: float(v) for k, v in targets.items()}
    info = {
        "mode": "csp" if composition is not None else "de_novo",
        "n": n,
        "model": str(gen.path),
        "seed": int(seed),
        "steps": steps,
        "guidance": guidance,
        "coord_anneal": coord_anneal,
        "composition": composition,
        "condition": condition,
        "generation": {
            "wall_s": wall,
            "gpu_s": wall if dev_is_cuda else 0.0,
            "device": torch.cuda.get_device_name() if dev_is_cuda else "cpu",
            "structures_per_s": n / wall if wall > 0 else None,
        },
    }
    return structures, info


def write_samples(
    structures: Sequence[Any],
    out_dir: str | Path,
    info: Mapping[str, Any] | None = None,
    target_ids: Sequence[str | None] | None = None,
) -> Path:
    """Write one CIF per sample (``sample_00000.cif``...), all of them in ``samples.extxyz``, and ``manifest.json``.

    A sample that could not be built (None) gets no files and ``"file": null`` in the manifest.
    """
    from ase.io import write as ase_write
    from pymatgen.io.ase import AseAtomsAdaptor
    from pymatgen.io.cif import CifWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = dict(info or {})
    samples, atoms = [], []
    for i, s in enumerate(structures):
        name = f"sample_{i:05d}.cif"
        entry: dict[str, Any] = {
            "index": i,
            "file": None,
            "composition": None,
            "target_id": None if target_ids is None else target_ids[i],
            "condition": info.get("condition", {}),
        }
        if s is not None:
            CifWriter(s).write_file(str(out / name))
            a = AseAtomsAdaptor.get_atoms(s)
            a.info["sample"] = i
            atoms.append(a)
            entry["file"] = name
            entry["composition"] = s.composition.formula.replace(" ", "")
        samples.append(entry)
    if atoms:
        ase_write(str(out / "samples.extxyz"), atoms, format="extxyz")
    info.update(n=len(structures), samples=samples)
    (out / "manifest.json").write_text(json.dumps(info, indent=1))
    return out
