"""Augmentations that turn computed powder peaks into patterns that look measured, and benchmark queries.

Computed patterns (DFT cells, ideal peak shapes) differ from measured ones in predictable ways: the cell is
strained by 1-3 % (functional, temperature), the zero of the goniometer is off by up to ~0.1-0.15° 2θ,
peaks are broader (instrument, crystallite size), intensities are off (preferred orientation, absorption),
weak peaks are lost in the noise, a second phase adds a few peaks, and the pattern sits on a smooth
background with counting noise.  :class:`XRDAugment` draws all of these per sample, batched on any device,
and renders the result with :func:`mmmat.data.xrd.render_profile_torch` on the fixed grid
:data:`mmmat.data.xrd.TWO_THETA` (Cu Kα).  :func:`corrupt_profile` applies fixed, documented corruptions
to build reproducible benchmark queries (:data:`BENCHMARK_CASES`). :class:`CrystalAugment` perturbs crystals
slightly (cell strain, atomic displacements).

Each is the training augmentation of its modality (:meth:`mmmat.modalities.ModalitySpec.augmenter`) and
augments a batch through ``augment_batch(batch, name)``.

Bragg's law: d = λ / (2 sin θ).  An isotropic strain ε multiplies every d by (1 + ε), i.e. it translates the
pattern by ln(1 + ε) in u = ln d, whereas a zero shift translates it in 2θ.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mmmat.data.xrd import CU_KA, DEFAULT_FWHM, TWO_THETA, TWO_THETA_MAX, TWO_THETA_MIN, render_profile_torch

#: Benchmark query corruptions for :func:`corrupt_profile` (keyword arguments per case name).
BENCHMARK_CASES: dict[str, dict[str, float]] = {
    "clean": {},
    "shift_0.1deg": {"shift": 0.1},
    "strain_1pct": {"strain": 0.01},
    "strain_2pct": {"strain": 0.02},
    "strain_1pct_shift_noise_bg": {"strain": 0.01, "shift": 0.1, "noise": 0.02, "background_slope": 0.05},
}


def _uniform(
    shape: tuple[int, ...], lo: float, hi: float, gen: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """U(lo, hi) float32 samples drawn on the generator's device, returned on ``device``."""
    dev = gen.device if gen is not None else device
    u = torch.rand(shape, generator=gen, device=dev, dtype=torch.float32).to(device)
    return lo + (hi - lo) * u


def _normal(shape: tuple[int, ...], gen: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard-normal float32 samples drawn on the generator's device, returned on ``device``."""
    dev = gen.device if gen is not None else device
    return torch.randn(shape, generator=gen, device=dev, dtype=torch.float32).to(device)


def _unit_grid(grid: torch.Tensor) -> torch.Tensor:
    """The 2θ grid mapped linearly onto [0, 1]."""
    return (grid - grid[0]) / (grid[-1] - grid[0])


class XRDAugment(nn.Module):
    """Random, batched corruption of computed powder peaks into a realistic 2θ profile (Cu Kα grid).

    Every augmentation is applied to a sample with its own probability ``p_*`` (independent Bernoulli draws
    per sample); all random numbers are drawn for every sample whatever the probabilities, so a seeded
    ``torch.Generator`` gives the same output for the same input (bit for bit on the CPU; on CUDA the
    renderer's ``scatter_add`` sums with atomics, so repeats agree to float rounding).  It runs under
    ``torch.no_grad``.  Throughput: about 185,000 patterns/s at batch 1024 and 512 peaks on one H200.
    Steps, in order:

    1. Missing weak peaks (``p_drop``): each peak with intensity below ``drop_threshold`` (0..100 scale) is
       removed with probability ``drop_prob``.
    2. Intensity jitter (``p_intensity``): each intensity is multiplied by exp(σ z), z ~ N(0, 1),
       σ = ``intensity_log_sigma`` (preferred-orientation-like, per peak).
    3. Anisotropic strain (``p_aniso``): each d is multiplied by (1 + δ), δ ~ U(-a, a) per peak,
       a = ``max_aniso_strain``.
    4. Impurity peaks (``p_impurity``, only for samples with at least one peak): 1 to ``max_impurity_peaks``
       extra peaks at 2θ ~ U(grid range), intensity ~ U(1, ``max_impurity_intensity``) on the 0..100 scale.
    5. Rendering by :func:`~mmmat.data.xrd.render_profile_torch` with isotropic strain ε ~ U(-max_strain,
       max_strain) (``p_strain``; d → d·(1 + ε)), zero shift ~ U(-max_shift, max_shift) degrees 2θ
       (``p_shift``), FWHM ~ U(fwhm_min, fwhm_max) degrees 2θ (always drawn; set both equal for a fixed
       width) and Lorentzian fraction ``eta``.  The rendered profile has maximum 1 (0 without peaks).
    6. Background (``p_background``): a smooth, non-negative curve of maximum A ~ U(0, max_background)
       (relative to the peak maximum 1): a random convex mix of a linear slope (rising or falling), an
       exponential decay exp(-t/τ) with τ ~ U(0.05, 0.5), a random cubic and a broad amorphous hump
       (Gaussian, centre at t ~ U(0.05, 0.5), σ_t ~ U(0.03, 0.15)), t = (2θ - 5°)/(90° - 5°).
    7. Gaussian noise (``p_noise``): i.i.d. N(0, σ²) per grid point, σ ~ U(0, max_noise) (relative to the
       peak maximum 1).
    8. Optional clipping at 0 (``clip_negative``), then division by the row maximum (rows without peaks
       stay all zeros: background and noise scale with the rendered peak maximum).

    Mixtures (``p_mixture``): after step 4, a sample becomes a mixture of itself (intensity fraction
    U(``mixture_min_primary``, 0.9)) and 1 to ``mixture_phases`` - 1 other samples of the batch sharing the
    rest (uniform split); each phase's relative intensities are scaled by its fraction (the stored peaks carry
    no absolute scale).  ``return_params`` then gives ``mixture``: a (B, B) matrix of the fractions of batch
    member j in pattern i (the identity without mixtures), the target of a multi-label objective.

    Instrument model (``instrument``): when given (a mapping of :class:`mmmat.xrd.instrument.InstrumentRanges`
    ranges, ``{}`` for the defaults), steps 5-7 are replaced by :func:`mmmat.xrd.instrument.render`:
    Kα1/Kα2, Caglioti and Scherrer widths, axial asymmetry, displacement and zero shift, Chebyshev background
    with an amorphous hump, Poisson noise and a random 2θ range, each drawn per sample from its range (the
    isotropic strain of step 5 still applies; intensities are used as stored, with their Cu Kα
    Lorentz-polarisation factor).

    Args:
        p_strain: Probability of isotropic strain.
        max_strain: Largest |ε| of the isotropic strain (0.03 = 3 %).
        p_aniso: Probability of per-peak d jitter.
        max_aniso_strain: Largest |δ| of the per-peak d jitter.
        p_shift: Probability of a zero shift.
        max_shift: Largest |zero shift|, degrees 2θ.
        fwhm_min: Smallest peak FWHM, degrees 2θ.
        fwhm_max: Largest peak FWHM, degrees 2θ.
        p_intensity: Probability of intensity jitter.
        intensity_log_sigma: σ of the log-normal intensity factor.
        p_drop: Probability of dropping weak peaks.
        drop_threshold: Peaks below this intensity (0..100) may be dropped.
        drop_prob: Probability that one weak peak is dropped.
        p_impurity: Probability of impurity peaks.
        max_impurity_peaks: Most impurity peaks per sample.
        max_impurity_intensity: Largest impurity-peak intensity (0..100 scale).
        p_background: Probability of a background.
        max_background: Largest background maximum, fraction of the peak maximum.
        p_noise: Probability of Gaussian noise.
        max_noise: Largest noise σ, fraction of the peak maximum.
        eta: Lorentzian fraction of the pseudo-Voigt peak shape (0 = Gaussian).
        clip_negative: Clip the profile at 0 before the final normalisation.
        max_peaks: Keep only the strongest this many peaks per sample (0 keeps all).  Rendering costs
            B × P × (peak window) work with P the batch's largest peak count, and large low-symmetry cells
            have over 1,000 reflections (in mp20 under 1 % of crystals have more than 512; their 512th
            strongest peak is at most 1.5 % of the strongest).
        wavelength: X-ray wavelength in Å (the grid is 2θ at this wavelength).
        p_mixture: Probability that a sample becomes a mixture with other samples of the batch.
        mixture_phases: Most phases in a mixture (2 or more).
        mixture_min_primary: Smallest intensity fraction of the sample's own phase in its mixture.
        instrument: Ranges of the instrument model (see above), or None for steps 5-7 as listed.

    """

    def __init__(
        self,
        p_strain: float = 0.9,
        max_strain: float = 0.03,
        p_aniso: float = 0.3,
        max_aniso_strain: float = 0.003,
        p_shift: float = 0.7,
        max_shift: float = 0.15,
        fwhm_min: float = 0.05,
        fwhm_max: float = 0.5,
        p_intensity: float = 0.5,
        intensity_log_sigma: float = 0.3,
        p_drop: float = 0.3,
        drop_threshold: float = 5.0,
        drop_prob: float = 0.5,
        p_impurity: float = 0.3,
        max_impurity_peaks: int = 3,
        max_impurity_intensity: float = 10.0,
        p_background: float = 0.7,
        max_background: float = 0.1,
        p_noise: float = 0.7,
        max_noise: float = 0.03,
        eta: float = 0.0,
        clip_negative: bool = False,
        max_peaks: int = 512,
        wavelength: float = CU_KA,
        p_mixture: float = 0.0,
        mixture_phases: int = 3,
        mixture_min_primary: float = 0.5,
        instrument: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for name, p in (
            ("p_strain", p_strain),
            ("p_aniso", p_aniso),
            ("p_shift", p_shift),
            ("p_intensity", p_intensity),
            ("p_drop", p_drop),
            ("drop_prob", drop_prob),
            ("p_impurity", p_impurity),
            ("p_background", p_background),
            ("p_noise", p_noise),
            ("eta", eta),
            ("p_mixture", p_mixture),
            ("mixture_min_primary", mixture_min_primary),
        ):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must lie in [0, 1], got {p}")
        if not 0 < fwhm_min <= fwhm_max:
            raise ValueError(f"need 0 < fwhm_min <= fwhm_max (degrees 2θ), got {fwhm_min}, {fwhm_max}")
        if max_strain < 0 or max_aniso_strain < 0 or max_shift < 0 or max_noise < 0 or max_background < 0:
            raise ValueError(
                "max_strain, max_aniso_strain, max_shift, max_noise, max_background must be >= 0"
            )
        self.p_strain, self.max_strain = float(p_strain), float(max_strain)
        self.p_aniso, self.max_aniso_strain = float(p_aniso), float(max_aniso_strain)
        self.p_shift, self.max_shift = float(p_shift), float(max_shift)
        self.fwhm_min, self.fwhm_max = float(fwhm_min), float(fwhm_max)
        self.p_intensity, self.intensity_log_sigma = float(p_intensity), float(intensity_log_sigma)
        self.p_drop, self.drop_threshold, self.drop_prob = (
            float(p_drop),
            float(drop_threshold),
            float(drop_prob),
        )
        self.p_impurity, self.max_impurity_peaks = float(p_impurity), int(max_impurity_peaks)
        self.max_impurity_intensity = float(max_impurity_intensity)
        self.p_background, self.max_background = float(p_background), float(max_background)
        self.p_noise, self.max_noise = float(p_noise), float(max_noise)
        self.eta = float(eta)
        self.clip_negative = bool(clip_negative)
        self.max_peaks = int(max_peaks)
        self.wavelength = float(wavelength)
        if mixture_phases < 2:
            raise ValueError(f"mixture_phases must be at least 2, got {mixture_phases}")
        self.p_mixture, self.mixture_phases = float(p_mixture), int(mixture_phases)
        self.mixture_min_primary = float(mixture_min_primary)
        self.instrument = None
        if instrument is not None:
            from mmmat.xrd.instrument import InstrumentRanges

            self.instrument = InstrumentRanges.from_dict(instrument)
        self.register_buffer("grid", torch.as_tensor(TWO_THETA, dtype=torch.float32), persistent=False)
        self._min_step = float(np.diff(np.asarray(TWO_THETA, dtype=np.float32)).min())  # known on the host

    @classmethod
    def off(cls, fwhm: float = DEFAULT_FWHM, **overrides: Any) -> XRDAugment:
        """An augmenter with every augmentation switched off and a fixed ``fwhm`` (degrees 2θ)."""
        cfg: dict[str, Any] = {
            k: 0.0
            for k in (
                "p_strain",
                "p_aniso",
                "p_shift",
                "p_intensity",
                "p_drop",
                "p_impurity",
                "p_background",
                "p_noise",
            )
        }
        cfg.update(fwhm_min=fwhm, fwhm_max=fwhm)
        cfg.update(overrides)
        return cls(**cfg)

    def augment_batch(self, batch: Any, name: str) -> dict[str, torch.Tensor]:
        """Replace the profiles of ``batch.inputs[name]`` by augmented ones rendered from its peaks (present rows).

        Returns the parameters drawn (see :meth:`forward` with ``return_params``).
        """
        x = batch.inputs[name]
        prof, params = self(peaks=x["peaks"], peak_mask=x["peak_mask"], return_params=True)
        profile = torch.where(batch.present[name][:, None], prof.to(x["profile"].dtype), x["profile"])
        batch.inputs[name] = {**x, "profile": profile}
        return params

    def extra_repr(self) -> str:
        """Key ranges, for printing."""
        return (
            f"strain=±{self.max_strain} (p={self.p_strain}), shift=±{self.max_shift}° (p={self.p_shift}), "
            f"fwhm=[{self.fwhm_min}, {self.fwhm_max}]°, "
            f"background≤{self.max_background} (p={self.p_background}), "
            f"noise σ≤{self.max_noise} (p={self.p_noise})"
        )

    @torch.no_grad()
    def forward(
        self,
        batch: Any = None,
        *,
        peaks: torch.Tensor | None = None,
        peak_mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        return_params: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Augmented profiles of a batch's peaks.

        Args:
            batch: A :class:`~mmmat.data.batch.MultimodalBatch` (the ``peaks`` and ``peak_mask`` of its XRD
                input are used), or None when ``peaks`` and ``peak_mask`` are given.
            peaks: (B, P, 2) peaks (d-spacing Å, relative intensity 0..100), zero-padded.
            peak_mask: (B, P) bool, True for real peaks.
            generator: Source of randomness (its device may differ from the data's: numbers are drawn there
                and moved); None uses torch's global generator on the data's device.
            return_params: Also return the per-sample parameters drawn.

        Returns:
            (B, L) float32 profiles on :data:`~mmmat.data.xrd.TWO_THETA`, each row max-normalised (all zeros
            for a row without peaks); with ``return_params``, also a dict of (B,) tensors ``strain``,
            ``shift`` (degrees 2θ), ``fwhm`` (degrees 2θ), ``background`` (amplitude) and ``noise`` (σ).

        """
        if peaks is None:
            if batch is None:
                raise ValueError("XRDAugment needs a batch or peaks= and peak_mask=")
            peaks, peak_mask = batch.inputs["xrd"]["peaks"], batch.inputs["xrd"]["peak_mask"]
        elif peak_mask is None:
            peak_mask = torch.ones(peaks.shape[:2], dtype=torch.bool, device=peaks.device)
        if peaks.dim() != 3 or peaks.shape[-1] != 2:
            raise ValueError(f"peaks must be (B, P, 2) (d Å, intensity), got shape {tuple(peaks.shape)}")
        device = peaks.device
        g = generator
        d = peaks[..., 0].float()
        inten = peaks[..., 1].float()
        mask = peak_mask.to(device=device, dtype=torch.bool) & (d > 0) & (inten > 0)
        if 0 < self.max_peaks < d.shape[1]:
            keep = torch.where(mask, inten, torch.full_like(inten, -1.0)).topk(self.max_peaks, dim=1).indices
            d, inten, mask = d.gather(1, keep), inten.gather(1, keep), mask.gather(1, keep)
        b, p = d.shape
        has_peaks = mask.any(dim=1)

        def gate(prob: float) -> torch.Tensor:
            return _uniform((b,), 0.0, 1.0, g, device) < prob

        # 1. missing weak peaks
        drop = (
            gate(self.p_drop)[:, None]
            & (inten < self.drop_threshold)
            & (_uniform((b, p), 0, 1, g, device) < self.drop_prob)
        )
        mask = mask & ~drop
        # 2. intensity jitter (log-normal, per peak)
        log_f = self.intensity_log_sigma * _normal((b, p), g, device)
        inten = inten * torch.where(gate(self.p_intensity)[:, None], log_f.exp(), torch.ones_like(log_f))
        # 3. anisotropic strain (per-peak d jitter)
        delta = _uniform((b, p), -self.max_aniso_strain, self.max_aniso_strain, g, device)
        d = d * (1.0 + torch.where(gate(self.p_aniso)[:, None], delta, torch.zeros_like(delta)))
        # 4. impurity peaks
        k = max(self.max_impurity_peaks, 0)
        if k > 0:
            n_imp = torch.floor(_uniform((b,), 1.0, k + 1.0, g, device)).clamp(max=k)
            imp_on = gate(self.p_impurity) & has_peaks
            imp_mask = (torch.arange(k, device=device)[None, :] < n_imp[:, None]) & imp_on[:, None]
            imp_tt = _uniform((b, k), TWO_THETA_MIN, TWO_THETA_MAX, g, device)
            imp_d = self.wavelength / (2.0 * torch.sin(torch.deg2rad(imp_tt) / 2.0))
            imp_i = _uniform((b, k), 1.0, max(self.max_impurity_intensity, 1.0), g, device)
            d = torch.cat([d, imp_d], dim=1)
            inten = torch.cat([inten, imp_i], dim=1)
            mask = torch.cat([mask, imp_mask], dim=1)
        # mixtures with other samples of the batch
        mixture = torch.eye(b, device=device)
        if self.p_mixture > 0 and b > 1:
            d, inten, mask, mixture = self._mix(d, inten, mask, has_peaks, gate(self.p_mixture), g, device)
        # 5. render with isotropic strain, zero shift, width
        eps = _uniform((b,), -self.max_strain, self.max_strain, g, device)
        eps = torch.where(gate(self.p_strain), eps, torch.zeros_like(eps))
        if self.instrument is not None:
            profile, inst = self._render_instrument(d * (1.0 + eps[:, None]), inten, mask, g, device)
            if return_params:
                return profile, {"strain": eps, "mixture": mixture, **inst}
            return profile
        shift = _uniform((b,), -self.max_shift, self.max_shift, g, device)
        shift = torch.where(gate(self.p_shift), shift, torch.zeros_like(shift))
        fwhm = _uniform((b,), self.fwhm_min, self.fwhm_max, g, device)
        profile = render_profile_torch(
            d,
            inten,
            mask,
            wavelength=self.wavelength,
            fwhm=fwhm,
            strain=eps,
            shift=shift,
            grid=self.grid,
            eta=self.eta,
            max_fwhm=self.fwhm_max,
            min_step=self._min_step,
        )
        scale = profile.amax(dim=1)  # 1 with peaks on the grid, 0 without
        # 6. background
        amp = _uniform((b,), 0.0, self.max_background, g, device)
        amp = torch.where(gate(self.p_background), amp, torch.zeros_like(amp)) * scale
        profile = profile + amp[:, None] * self._background(b, g, device)
        # 7. Gaussian noise
        sigma = _uniform((b,), 0.0, self.max_noise, g, device)
        sigma = torch.where(gate(self.p_noise), sigma, torch.zeros_like(sigma)) * scale
        profile = profile + sigma[:, None] * _normal(tuple(profile.shape), g, device)
        # 8. clip, normalise
        if self.clip_negative:
            profile = profile.clamp_min(0.0)
        top = profile.amax(dim=1, keepdim=True)
        profile = torch.where(top > 0, profile / top.clamp_min(1e-12), torch.zeros_like(profile))
        if return_params:
            return profile, {"strain": eps, "shift": shift, "fwhm": fwhm, "background": amp, "noise": sigma,
                             "mixture": mixture}
        return profile

    def _mix(self, d: torch.Tensor, inten: torch.Tensor, mask: torch.Tensor, has_peaks: torch.Tensor,
             on: torch.Tensor, g: torch.Generator | None, device: torch.device
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append other batch members' peaks to the mixed samples; returns the (B, B) fraction matrix."""
        b = d.shape[0]
        extra = self.mixture_phases - 1
        n_other = torch.floor(_uniform((b,), 1.0, extra + 1.0, g, device)).clamp(max=extra)
        on = on & has_peaks & (has_peaks.sum() > 1)
        # partners: random other rows (an offset in 1..b-1 never picks the row itself)
        offsets = torch.floor(_uniform((b, extra), 1.0, float(b), g, device)).long().clamp(1, b - 1)
        partner = (torch.arange(b, device=device)[:, None] + offsets) % b
        used = (torch.arange(extra, device=device)[None, :] < n_other[:, None]) & on[:, None]
        used = used & has_peaks[partner]
        primary = _uniform((b,), self.mixture_min_primary, 0.9, g, device)
        share = _uniform((b, extra), 0.2, 1.0, g, device) * used
        share = share / share.sum(1, keepdim=True).clamp_min(1e-12) * (1.0 - primary[:, None])
        mixed = used.any(1)
        primary = torch.where(mixed, primary, torch.ones_like(primary))
        frac = torch.zeros(b, b, device=device)
        frac[torch.arange(b, device=device), torch.arange(b, device=device)] = primary
        frac.scatter_add_(1, partner, torch.where(used, share, torch.zeros_like(share)))
        ds, ins, ms = [d], [inten * primary[:, None]], [mask]
        for k in range(extra):
            j = partner[:, k]
            ds.append(d[j])
            ins.append(inten[j] * share[:, k:k + 1])
            ms.append(mask[j] & used[:, k:k + 1])
        return torch.cat(ds, 1), torch.cat(ins, 1), torch.cat(ms, 1), frac

    def _render_instrument(self, d: torch.Tensor, inten: torch.Tensor, mask: torch.Tensor,
                           g: torch.Generator | None, device: torch.device) -> tuple[torch.Tensor, dict]:
        """Steps 5-7 through :func:`mmmat.xrd.instrument.render` with settings drawn from ``instrument``."""
        from dataclasses import asdict

        from mmmat.xrd.instrument import render, sample_params

        gen_dev = g.device if g is not None else device
        params = sample_params(self.instrument, d.shape[0], generator=g, device=gen_dev)
        params = type(params)(**{k: v.to(device) for k, v in asdict(params).items()})
        noise_gen = g if g is not None and g.device == device else None
        profile = render(d, inten, mask, params, self.grid, lp=False, generator=noise_gen).float()
        profile = profile * mask.any(1, keepdim=True)  # rows without peaks stay all zeros
        return profile, {"zero_shift": params.zero_shift, "W": params.W, "size_nm": params.size_nm}

    def _background(self, b: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
        """(B, L) smooth non-negative background shapes of maximum 1 (see the class docstring, step 6)."""
        t = _unit_grid(self.grid.to(device))[None, :]  # (1, L)
        rising = _uniform((b, 1), 0, 1, g, device) < 0.5
        linear = torch.where(rising, t, 1.0 - t)
        tau = _uniform((b, 1), 0.05, 0.5, g, device)
        decay = torch.exp(-t / tau)
        coef = _uniform((b, 4), -1.0, 1.0, g, device)
        cubic = coef[:, :1] + coef[:, 1:2] * t + coef[:, 2:3] * t**2 + coef[:, 3:4] * t**3
        cubic = cubic - cubic.amin(dim=1, keepdim=True)
        cubic = cubic / cubic.amax(dim=1, keepdim=True).clamp_min(1e-6)
        centre = _uniform((b, 1), 0.05, 0.5, g, device)
        width = _uniform((b, 1), 0.03, 0.15, g, device)
        hump = torch.exp(-0.5 * ((t - centre) / width) ** 2)
        w = _uniform((b, 4), 0.0, 1.0, g, device)
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
        bg = w[:, :1] * linear + w[:, 1:2] * decay + w[:, 2:3] * cubic + w[:, 3:4] * hump
        return bg / bg.amax(dim=1, keepdim=True).clamp_min(1e-6)


class CrystalAugment(nn.Module):
    """A small random perturbation of crystals: a symmetric cell strain and Gaussian atomic displacements.

    Small distortions should not move a crystal in the latent space; they keep a crystal encoder from
    memorising exact coordinates. The graph's neighbour list and cell offsets stay as they are (valid for
    small distortions); a powder pattern cached on the graph (``computed_xrd``) is dropped.

    Args:
        displacement: σ of the Gaussian noise on every atom's position, Å (0: none).
        strain: Largest |ε| of a uniform random symmetric strain of the cell (0: none).

    """

    def __init__(self, displacement: float = 0.0, strain: float = 0.0):
        super().__init__()
        self.displacement, self.strain = float(displacement), float(strain)

    def extra_repr(self) -> str:
        """The two amplitudes, for printing."""
        return f"displacement={self.displacement} Å, strain=±{self.strain}"

    def forward(self, crystal: Any) -> Any:
        """Perturb a torch-geometric crystal batch in place (``pos``, ``lattice``, ``frac_coords``) and return it."""
        c = crystal
        lat = c.lattice
        if self.strain:
            e = (torch.rand_like(lat) * 2 - 1) * self.strain
            e = 0.5 * (e + e.transpose(1, 2))
            lat = lat @ (torch.eye(3, device=lat.device, dtype=lat.dtype) + e)
        pos = torch.bmm(c.frac_coords.unsqueeze(1), lat[c.batch]).squeeze(1)
        if self.displacement:
            pos = pos + torch.randn_like(pos) * self.displacement
            c.frac_coords = torch.linalg.solve(lat[c.batch].transpose(1, 2), pos.unsqueeze(-1)).squeeze(-1)
        c.pos, c.lattice = pos, lat
        if getattr(c, "computed_xrd", None) is not None:
            del c.computed_xrd  # the geometry changed: the encoder computes the pattern again
        return c

    def augment_batch(self, batch: Any, name: str) -> dict[str, torch.Tensor]:
        """Perturb the crystals ``batch.inputs[name]`` in place; no parameters are returned (an empty dict)."""
        self(batch.inputs[name])
        return {}


def _per_row(value: Any, b: int, name: str) -> torch.Tensor:
    """A float or a length-B sequence as a (B,) float64 tensor."""
    t = torch.as_tensor(np.asarray(value, dtype=np.float64)).reshape(-1)
    if t.numel() == 1:
        return t.expand(b).clone()
    if t.numel() != b:
        raise ValueError(f"{name}: expected a number or {b} values, got {t.numel()}")
    return t


def corrupt_profile(
    peaks_d: Any,
    peaks_I: Any,
    mask: Any = None,
    strain: float | Sequence[float] = 0.0,
    shift: float | Sequence[float] = 0.0,
    noise: float | Sequence[float] = 0.0,
    background_slope: float | Sequence[float] = 0.0,
    fwhm: float | Sequence[float] = DEFAULT_FWHM,
    seed: int | Sequence[int] = 0,
    wavelength: float = CU_KA,
    normalize: bool = True,
) -> torch.Tensor:
    """A deterministic corrupted Cu Kα profile on :data:`~mmmat.data.xrd.TWO_THETA`, for benchmark queries.

    The profile is built in float64 on the CPU, in this order:

    1. ``y0`` = :func:`~mmmat.data.xrd.render_profile_torch` of the peaks with isotropic strain
       ``strain`` (every d → d·(1 + strain), so every peak moves to 2θ = 2 asin(λ / (2 d (1 + strain)))),
       zero shift ``shift`` (degrees 2θ added to every peak position) and Gaussian peaks of FWHM ``fwhm``
       (degrees 2θ); ``y0`` has maximum 1 (all zeros without peaks).
    2. Background: ``bg(2θ) = s · (2θ - 5°) / (90° - 5°)`` for ``s = background_slope >= 0`` (linear from 0
       at 5° to ``s`` at 90°), and ``|s| · (90° - 2θ) / (90° - 5°)`` for ``s < 0`` (from ``|s|`` at 5° down
       to 0 at 90°), in units of the peak maximum of ``y0``.
    3. Noise: i.i.d. Gaussian, σ = ``noise`` × max(y0) per grid point, from ``torch.Generator`` seeded with
       the row's seed; no clipping (values may be negative).
    4. ``y = y0 + bg + noise``; with ``normalize`` (default) ``y`` is divided by its maximum, so the final σ
       and slope are those above divided by max(y) (about 1 + the background at the strongest peak).

    Every corruption parameter is a number or one value per row.  ``seed`` as one int seeds one generator
    for the whole batch (rows drawn in order); a sequence gives each row its own seed, so a row's noise does
    not depend on how the queries are batched (e.g. pass the query indices).

    Args:
        peaks_d: (P,) or (B, P) d-spacings, Å (numpy or torch).
        peaks_I: (P,) or (B, P) relative intensities (0..100).
        mask: (P,) or (B, P) bool, True for real peaks; None means all of them (with d > 0).
        strain: Isotropic strain ε (0.01 = 1 %).
        shift: Zero shift, degrees 2θ.
        noise: Gaussian noise σ as a fraction of the peak maximum (0.02 = 2 %).
        background_slope: Linear background height at the high end (or, negative, at the low end) as a
            fraction of the peak maximum (0.05 = 5 %).
        fwhm: Peak FWHM, degrees 2θ.
        seed: Noise seed: one int, or one per row.
        wavelength: X-ray wavelength in Å.
        normalize: Divide each row by its maximum at the end.

    Returns:
        float32 CPU tensor, (L,) for 1-D input or (B, L) for 2-D input.

    """
    d = torch.as_tensor(np.asarray(peaks_d, dtype=np.float64))
    inten = torch.as_tensor(np.asarray(peaks_I, dtype=np.float64))
    single = d.dim() == 1
    d, inten = d.reshape(-1, d.shape[-1]), inten.reshape(-1, inten.shape[-1])
    if d.shape != inten.shape:
        raise ValueError(f"peaks_d {tuple(d.shape)} and peaks_I {tuple(inten.shape)} differ in shape")
    m = d > 0 if mask is None else torch.as_tensor(np.asarray(mask, dtype=bool)).reshape(d.shape)
    b = d.shape[0]
    grid = torch.as_tensor(TWO_THETA.astype(np.float64))
    y0 = render_profile_torch(
        d,
        inten,
        m,
        wavelength=wavelength,
        fwhm=_per_row(fwhm, b, "fwhm"),
        strain=_per_row(strain, b, "strain"),
        shift=_per_row(shift, b, "shift"),
        grid=grid,
    )
    scale = y0.amax(dim=1, keepdim=True)
    t = _unit_grid(grid)[None, :]
    slope = _per_row(background_slope, b, "background_slope")[:, None]
    bg = torch.where(slope >= 0, slope * t, -slope * (1.0 - t))
    sigma = _per_row(noise, b, "noise")[:, None]
    seeds = np.asarray(seed).reshape(-1)
    if seeds.size == 1:
        gen = torch.Generator().manual_seed(int(seeds[0]))
        z = torch.randn((b, grid.shape[0]), generator=gen, dtype=torch.float64)
    elif seeds.size == b:
        z = torch.stack(
            [
                torch.randn(
                    grid.shape[0], generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64
                )
                for s in seeds
            ]
        )
    else:
        raise ValueError(f"seed: expected one int or {b} ints, got {seeds.size}")
    y = y0 + scale * (bg + sigma * z)
    if normalize:
        top = y.amax(dim=1, keepdim=True)
        y = torch.where(top > 0, y / top.clamp_min(1e-300), torch.zeros_like(y))
    y = y.float()
    return y[0] if single else y
