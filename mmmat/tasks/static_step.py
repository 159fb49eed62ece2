"""The pretraining step with static shapes: one function from a padded batch to the total loss.

Launch overhead, not arithmetic, bounds the contrastive step at the batch sizes of pretraining (thousands of
small kernels, each launched from Python). :class:`StaticStep` pads every batch to fixed capacities and runs
the whole step (XRD augmentation, every encoder, the contrastive and mixture losses) as one function, which
``torch.compile`` turns into one graph (``fullgraph=True``: no graph breaks) and, with
``mode="reduce-overhead"`` on CUDA, replays as CUDA graphs, forward and backward, instead of launching every
kernel from Python. Random numbers are drawn with torch's device generator inside the graph (philox state
advances on every replay), so augmentations and dropout stay random.

Padding (masked, never truncating):

- atoms to ``atoms`` rows: padding atoms (``z = 0``) form one extra crystal with a 10 Å cubic cell, placed
  after the real ones; its row is dropped before the projections, so it reaches no loss and no gradient;
- edges to ``edges``: padding edges join a padding atom to an image of itself 10⁴ Å away (beyond any cutoff:
  envelope 0, so the message is exactly 0); a batch already padded by the data (``data.edge_capacity``) is
  taken as it is;
- present text rows of each text modality to ``rows[modality]``: the text encoders run on the present rows
  (as the plain step does) plus padding rows whose output lands in a dropped row;
- tokens and XRD peaks to the widest seen (resident data are already uniform: no padding there).

A batch larger than a capacity grows it (by 10 % headroom, rounded) and is counted in :attr:`StaticStep.grown`:
each growth is one new shape, i.e. one re-compilation and re-capture. The XRD augmentation draws its random
numbers per (sample, peak), so padded peaks change which numbers are drawn, not their distribution.

What the step computes is unchanged: on the same batch and random state the padded step gives the plain
step's loss and gradients (``tests/test_static_step.py``; float32 on the CPU, dropout off in the text
encoders because padding rows change the shape of dropout's random draws).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from mmmat.modalities import get_modality

#: Cell (Å) of the padding crystal and the cell offset of padding edges: 1000 cells = 10⁴ Å away.
_PAD_CELL = 10.0
_PAD_OFFSET = 1000


def _round_up(n: float, unit: int) -> int:
    return int(math.ceil(n / unit) * unit)


class _Crystal:
    """The padded crystal graph as plain tensors (what the crystal encoders read)."""

    def __init__(self, **tensors: Tensor):
        for name, value in tensors.items():  # one by one: dynamo traces setattr, not __dict__.update
            setattr(self, name, value)


class _Batch:
    """The padded batch as the encoders and the mixture loss see it.

    ``inputs``, ``present`` and each input as an attribute, as a :class:`~mmmat.data.batch.MultimodalBatch`
    reads.
    """

    def __init__(self, inputs: dict[str, Any], present: dict[str, Tensor]):
        self.inputs, self.present = inputs, present

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["inputs"][name]
        except KeyError:
            raise AttributeError(name) from None


class StaticStep:
    """Pad batches to fixed capacities and compute the total pretraining loss in one (compiled) function.

    Args:
        module: The :class:`~mmmat.tasks.pretrain.ContrastivePretraining` module whose step this is.
        compile: ``torch.compile`` the step function (``fullgraph=True``, static shapes).
        mode: ``torch.compile`` mode; ``"reduce-overhead"`` captures CUDA graphs on CUDA (on the CPU it only
            compiles).
        backend: ``torch.compile`` backend (default inductor; ``"eager"`` traces without generating code).
        fullgraph: Fail on a graph break (True), or let the step run in several graphs (False) and report the
            number of graph breaks after the first step.
        headroom: Factor a capacity is set to above an overflowing batch's size (1.25 above the first batch's
            where :meth:`plan` set none).
        eager_pattern_cnn: Run every powder-pattern CNN (:class:`~mmmat.encoders.spectrum.XRDCNNEncoder`)
            outside the compiled graphs (needs ``fullgraph=False``): the step is then several graphs with the
            CNN launched eagerly between them.

    Attributes:
        capacity: ``atoms``, ``edges``, ``peaks``, ``tokens/<text modality>`` and ``rows/<text modality>`` of
            the padded batches (0 until :meth:`plan` or the first batch).
        grown: How often a capacity grew after the first batch (each growth is one re-compilation).

    """

    def __init__(
        self,
        module: Any,
        compile: bool = True,
        mode: str | None = "reduce-overhead",
        backend: str = "inductor",
        headroom: float = 1.1,
        fullgraph: bool = True,
        eager_pattern_cnn: bool = False,
    ):
        h = module.hparams
        if len(module.objectives):
            raise ValueError("engine.cuda_graphs does not support objectives yet (their corruption draws per atom)")
        if h.get("feature_spread") is not None:
            raise ValueError("engine.cuda_graphs does not support feature_spread yet")
        if "crystal" in module.augmenters:
            raise ValueError("engine.cuda_graphs does not support crystal_augment yet")
        if "crystal" not in module.model.encoders:
            raise ValueError("engine.cuda_graphs needs a crystal encoder")
        self.module = module
        self.mixture_weight = float(h.get("mixture_loss_weight") or 0.0)
        self.headroom = float(headroom)
        self.capacity: dict[str, int] = {"atoms": 0, "edges": 0, "peaks": 0}
        self.grown = 0
        self.compiled = bool(compile)
        if compile and eager_pattern_cnn:
            if fullgraph:
                raise ValueError("eager_pattern_cnn needs fullgraph=False (the CNN is a graph break)")
            from mmmat.encoders.spectrum import XRDCNNEncoder

            for enc in module.model.encoders.modules():
                if isinstance(enc, XRDCNNEncoder):
                    enc.embed_profile = torch.compiler.disable(enc.embed_profile, recursive=True)
        self._fn = self.loss
        if compile:
            self._fn = torch.compile(self.loss, mode=mode, backend=backend, fullgraph=fullgraph, dynamic=False)
        self._reported = False

    # ------------------------------------------------------------------ capacities
    def _fit(self, key: str, n: int, unit: int, exact_ok: bool = False) -> int:
        """The capacity ``key`` for ``n`` items: grown (and counted) when ``n`` exceeds it."""
        cap = self.capacity.get(key, 0)
        if n <= cap:
            return cap
        first = cap == 0
        cap = n if exact_ok and first else _round_up(n * (1.25 if first else self.headroom), unit)
        self.capacity[key] = cap
        if not first:
            self.grown += 1
        return cap

    def plan(self, data: Any, batch_size: int, sigmas: float = 6.0) -> None:
        """Initial capacities from a resident split's per-crystal sizes, so that batches almost never outgrow them.

        A batch of ``batch_size`` random crystals holds about ``B·mean ± √B·std`` atoms (edges, text rows);
        the capacity is that mean plus ``sigmas`` standard deviations, rounded up (a growth, i.e. a
        re-compilation, then has a chance of about 1e-9 per batch).

        Args:
            data: A :class:`~mmmat.data.resident.ResidentData` (its host copies of the sizes are read).
            batch_size: Crystals per batch.
            sigmas: Standard deviations of headroom.

        """
        def bound(per: Tensor) -> float:
            per = per.double()
            std = float(per.std()) if per.numel() > 1 else 0.0
            return batch_size * float(per.mean()) + sigmas * math.sqrt(batch_size) * std

        rows_max = _round_up(batch_size, 16)
        self.capacity["atoms"] = max(self.capacity["atoms"], _round_up(bound(data._counts_cpu) + 1, 256))
        e_counts = getattr(data, "_e_counts_cpu", None)
        if e_counts is not None and getattr(data, "edge_capacity", None) is None:
            self.capacity["edges"] = max(self.capacity["edges"], _round_up(bound(e_counts), 4096))
        for mod in self.module.model.modalities:
            if get_modality(mod).present_rows_only:
                has = data.present_host[mod].double()
                key = f"rows/{mod}"
                self.capacity[key] = max(self.capacity.get(key, 0), min(_round_up(bound(has) + 1, 16), rows_max))

    # ------------------------------------------------------------------ padding
    def pad(self, batch: Any) -> dict[str, Tensor]:
        """The tensors of ``batch`` padded to the capacities (grown when the batch needs more; no host sync).

        Sizes come from tensor shapes (known on the host); text rows from ``batch.rows`` when the data knew
        them on the host, else from the presence mask (one read-back).
        """
        m = self.module
        c = batch.crystal
        b = c.lattice.shape[0]
        n = c.batch.shape[0]
        dev = c.lattice.device
        enc = m.model.encoders["crystal"]
        x: dict[str, Tensor] = {}

        # atoms: real ones, then padding atoms in crystal b (at least one, so padding edges have an end)
        n_cap = self._fit("atoms", n + 1, 256)
        pad_n = n_cap - n
        x["z"] = torch.cat([c.z.long(), c.z.new_zeros(pad_n, dtype=torch.long)])
        x["pos"] = torch.cat([c.pos, c.pos.new_zeros(pad_n, 3)])
        x["batch"] = torch.cat([c.batch, torch.full((pad_n,), b, dtype=c.batch.dtype, device=dev)])
        pad_cell = torch.eye(3, dtype=c.lattice.dtype, device=dev)[None] * _PAD_CELL
        x["lattice"] = torch.cat([c.lattice, pad_cell])
        x["ptr"] = torch.cat([c.ptr, c.ptr.new_full((1,), n_cap)])
        # edges
        ei, off = c.edge_index, c.cell_offset
        e = ei.shape[1]
        e_cap = self._fit("edges", e, 4096, exact_ok=e > 0 and e % 4096 == 0)
        pad_e = e_cap - e
        x["edge_index"] = torch.cat([ei, ei.new_full((2, pad_e), n)], dim=1)
        far = off.new_zeros(pad_e, 3)
        far[:, 0] = _PAD_OFFSET
        x["cell_offset"] = torch.cat([off, far])
        # the crystal encoder's computed powder pattern (no gradient, fixed by the structure): once per
        # crystal when the data were loaded, else computed here, outside the captured step
        if hasattr(enc, "pattern"):
            pattern = getattr(c, "computed_xrd", None)
            if pattern is None:
                pattern = enc.pattern(c)
            x["computed_xrd"] = torch.cat([pattern.float(), pattern.new_zeros(1, pattern.shape[1]).float()])

        # modalities beside the crystal: their inputs as the batch has them (texts and XRD peaks padded below)
        for mod, t in batch.present.items():
            x[f"present/{mod}"] = t
        for mod in m.model.modalities:
            if mod != "crystal" and mod in batch.inputs and not get_modality(mod).present_rows_only:
                x[f"input/{mod}"] = batch.inputs[mod]
        if "input/xrd" in x:  # the augmentation renders profiles from the peaks
            xrd = x["input/xrd"]
            p = xrd["peaks"].shape[1]
            p_cap = self._fit("peaks", p, 1, exact_ok=True)
            x["input/xrd"] = {**xrd, "peaks": F.pad(xrd["peaks"], (0, 0, 0, p_cap - p)),
                              "peak_mask": F.pad(xrd["peak_mask"], (0, p_cap - p))}
        texts = [mod for mod in m.model.modalities if get_modality(mod).present_rows_only]
        for mod in texts:
            ids, mask = batch.inputs[mod]["ids"], batch.inputs[mod]["mask"]
            t_cap = self._fit(f"tokens/{mod}", ids.shape[1], 1, exact_ok=True)
            x[f"ids/{mod}"] = F.pad(ids, (0, t_cap - ids.shape[1]))
            x[f"mask/{mod}"] = F.pad(mask, (0, t_cap - mask.shape[1]))
            rows = batch.rows.get(mod) if batch.rows else None
            if rows is None:
                rows = batch.present[mod].nonzero().squeeze(1)
            k = rows.shape[0]
            r_cap = min(self._fit(f"rows/{mod}", k, 16), _round_up(b, 16))
            pad_r = max(r_cap - k, 0)
            x[f"rows/{mod}"] = torch.cat([rows, rows.new_zeros(pad_r)])
            # padding rows (and rows without the text) write to row b, which is dropped
            to = torch.where(batch.present[mod][rows], rows, torch.full_like(rows, b))
            x[f"rows_to/{mod}"] = torch.cat([to, rows.new_full((pad_r,), b)])
            enc_t = m.model.encoders[mod]
            if not getattr(enc_t, "_ids_checked", True):  # once (one read-back): ids must fit the vocabulary
                top = int(ids.max()) if ids.numel() else 0
                if top >= enc_t.vocab_size:
                    raise ValueError(f"{mod}: token id {top} >= the model's vocabulary size {enc_t.vocab_size}; "
                                     "the tokenizer does not match the model")
                enc_t._ids_checked = True
        return x

    # ------------------------------------------------------------------ the step
    def loss(self, x: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and the detached values to log, from padded tensors (the function that is compiled)."""
        m = self.module
        model = m.model
        b = x["lattice"].shape[0] - 1  # the padding crystal is the last row
        present = {k.split("/", 1)[1]: v for k, v in x.items() if k.startswith("present/")}
        inputs = {k.split("/", 1)[1]: v for k, v in x.items() if k.startswith("input/")}
        inputs["crystal"] = _Crystal(**{k: x[k] for k in ("z", "pos", "batch", "lattice", "ptr", "edge_index",
                                                             "cell_offset", "computed_xrd") if k in x})
        view = _Batch(inputs, present)
        mixture = None
        for name, aug in m.augmenters.items():
            params = aug.augment_batch(view, name)
            if self.mixture_weight > 0 and "mixture" in params:
                mixture = params["mixture"]
        emb: dict[str, Tensor] = {}
        for mod in model.modalities:
            if get_modality(mod).present_rows_only:
                emb[mod] = self._text(mod, x, b)
            elif mod == "crystal":
                h = model.encoders[mod](view)[:b]  # the padding crystal's row goes
                emb[mod] = F.normalize(model.projections[mod](h).float(), dim=-1)
            else:
                emb[mod] = model.encode(mod, view)
        loss, logs = m.loss(emb, {mod: present[mod] for mod in emb})
        out = {"train/loss": loss}
        if mixture is not None and {"xrd", "crystal"} <= set(emb):
            mix = m._mixture_loss(emb["xrd"], emb["crystal"], view, mixture=mixture)
            out["train/loss_mixture"] = mix
            loss = loss + self.mixture_weight * mix
            out["train/loss"] = loss
        for k, v in logs.items():
            if k.startswith(("loss/", "acc/", "logit")):
                out[f"train/{k}"] = v
        return loss, {k: v.detach().float() for k, v in out.items()}

    def _text(self, mod: str, x: dict[str, Tensor], b: int) -> Tensor:
        """Embeddings (B, d) of one text modality, run on the padded present rows (absent rows are zeros)."""
        model = self.module.model
        rows, to = x[f"rows/{mod}"], x[f"rows_to/{mod}"]
        ids = x[f"ids/{mod}"].index_select(0, rows)
        mask = x[f"mask/{mod}"].index_select(0, rows)
        h = F.normalize(model.projections[mod](model.encoders[mod].encode(ids, mask)).float(), dim=-1)
        return h.new_zeros(b + 1, h.shape[-1]).index_copy(0, to, h)[:b]

    def __call__(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        """Pad ``batch`` and run the step: ``(loss, logs)`` with the logs copied out of any captured memory."""
        x = self.pad(batch)
        if self.compiled and x["lattice"].is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        loss, logs = self._fn(x)
        if self.compiled and not self._reported:
            self._reported = True
            self._report()
        # one copy of every logged value: outputs of a CUDA graph are overwritten by the next replay
        names = list(logs)
        values = torch.stack([logs[k] for k in names])
        return loss, {k: values[i] for i, k in enumerate(names)}

    def _report(self) -> None:
        """Say once how the step compiled: graphs, graph breaks (and why), capacities."""
        import sys

        from torch._dynamo.utils import counters

        breaks = dict(counters["graph_break"])
        print(f"static step compiled: {len(breaks)} distinct graph breaks {breaks or ''}, "
              f"capacities {self.capacity}", file=sys.stderr, flush=True)
