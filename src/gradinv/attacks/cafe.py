"""CAFE: Catastrophic Data Leakage in Vertical Federated Learning (Jin, Chen, Hsu, Yu, Chen, NeurIPS 2021).

Threat model: the server of a vertical federation (:mod:`gradinv.fl.vertical`) is honest-but-curious. Over
``T`` training iterations it knows every batch's sample indices ``s(t)`` (it chooses them), the model of every
iteration, its own labels, and each party's gradient of the first fully connected layer ``z = W H + b`` of its
bottom model. From these it recovers all ``N`` samples, not one batch: each sample's slice at every party.

- Step I (the paper's Algorithm 1, "data index alignment"): every sample's ``V_n = dL/dz_n`` from the bias
  gradients, ``min_V sum_t || sum_{n in s(t)} V_n - grad_b L^t ||^2``.
- Step II (Algorithm 2): every sample's input to that layer ``H_n`` from the weight gradients,
  ``min_H sum_t || sum_{n in s(t)} V_n H_n^T - grad_W L^t ||^2``.
- Step III (Algorithm 3, "internal representation alignment"): dummy data ``x`` whose first-layer inputs match,
  ``min_x sum_t gamma ||H(x_{s(t)}) - H_hat_{s(t)}||^2 + beta TV(x) + alpha ||grad L^t(x) - grad L^t||^2``,
  one Adam step on the batch ``s(t)`` with the model of iteration ``t`` (the paper's code: Adam, lr 0.01,
  dummy data uniform in [0, 1], TV on each party's slice, the gradient-matching term from DLG).

Steps I and II are linear least-squares problems; the paper minimises them by SGD (lr 5e-3) and Adam (lr 1e-2),
one step per training iteration. Here they are solved exactly (normal equations in float64), which needs the
batches' sample-incidence matrix to have full column rank (every sample in some batch, ``T >= N``, ``B < N``):
:meth:`Cafe.applicable` says when it does not. The model may change between iterations (as in the paper's
single-loop CAFE); steps I and II then fit one ``V_n`` and ``H_n`` to iterations whose true values drift slightly.

The server holds the labels in vertical FL: the reconstruction's labels are the server's own (``label_source``
``"server"``). ``Cafe`` is not an :class:`~gradinv.attacks.base.Attack` (that takes a horizontal
:class:`~gradinv.types.Observation`); it has the same shape: ``name``, ``summary``, ``Settings``,
``applicable`` and ``reconstruct(observation, seed=...) -> Reconstruction``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call
from tqdm.auto import tqdm

from gradinv._settings import Configurable, above, at_least, one_of
from gradinv.attacks.components.priors import total_variation
from gradinv.errors import AttackError
from gradinv.fl.functional import stateless_twin
from gradinv.fl.vertical import VerticalObservation
from gradinv.types import GroundTruth, Reconstruction, TracePoint

Callback = Callable[[int, float, Tensor], None]

#: the attack's row of the survey's Table 1
TABLE1 = {
    "initialisation": "dummy images uniform in [0, 1] (the paper's code), one per sample of the whole data set",
    "objective": (
        "I: sum_t ||sum_{n in s(t)} V_n - grad_b L||^2 (first FC bias); II: sum_t ||sum_n V_n H_n^T - grad_W L||^2; "
        "III: ||H(x) - H_hat||^2 on each observed batch (+ first-layer gradient matching)"
    ),
    "optimiser": "least squares for I and II (the paper: SGD / Adam); Adam on each observed batch for III",
    "priors": "total variation of each party's slice; pixels kept in [0, 1]",
}


@dataclass(frozen=True)
class CafeSettings:
    """CAFE's settings. ``lr`` 0.01, Adam's ``beta1``, ``beta2``, ``eps`` (1e-7), the uniform start and the
    per-batch updates are the paper's code's. The three weights of step III are relative: each term is scaled
    by its target's size (``||H_hat||^2``, ``||grad||^2``; TV as the mean absolute pixel difference), so they do
    not depend on the model's scale as the code's raw weights (1e-3, 1e-2, 1e-4) do. ``epochs`` passes over the
    ``T`` observed batches (the code makes one pass of 20,000 iterations). ``clamp`` keeps pixels in [0, 1]
    (the code clips only to score). ``ridge`` regularises the least squares of steps I and II, relative to the
    mean diagonal of their normal matrices."""

    lr: float = 0.01
    epochs: int = 20
    representation_weight: float = 1.0
    gradient_weight: float = 0.0
    tv_weight: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-7
    init: str = "uniform"
    clamp: bool = True
    ridge: float = 0.0
    log_every: int = 100

    def problems(self) -> list[str]:
        return [
            *above("lr", self.lr, 0),
            *at_least("epochs", self.epochs, 0),
            *at_least("representation_weight", self.representation_weight, 0),
            *at_least("gradient_weight", self.gradient_weight, 0),
            *at_least("tv_weight", self.tv_weight, 0),
            *([] if 0 <= self.beta1 < 1 else [f"beta1 must be in [0, 1), got {self.beta1!r}"]),
            *([] if 0 <= self.beta2 < 1 else [f"beta2 must be in [0, 1), got {self.beta2!r}"]),
            *above("eps", self.eps, 0),
            *one_of("init", self.init, ["uniform", "half"]),
            *at_least("ridge", self.ridge, 0),
            *at_least("log_every", self.log_every, 1),
        ]


def incidence(batches: Tensor, num_samples: int) -> Tensor:
    """``A`` (T, N) in float64: ``A[t, n] = 1`` where sample ``n`` is in iteration ``t``'s batch."""
    a = torch.zeros(batches.shape[0], num_samples, dtype=torch.float64, device=batches.device)
    return a.scatter_(1, batches.long(), 1.0)


def _solve(gram: Tensor, rhs: Tensor, ridge: float) -> Tensor:
    """``gram^-1 rhs`` for a symmetric positive (semi-)definite ``gram``, with a relative ``ridge``."""
    if ridge:
        gram = gram + ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.lstsq(gram, rhs).solution


def recover_output_gradients(a: Tensor, bias_gradients: Tensor, *, ridge: float = 0.0) -> tuple[Tensor, float]:
    """Step I: ``V`` (N, out) minimising ``sum_t ||sum_{n in s(t)} V_n - bias_gradients[t]||^2`` (``a``: the
    incidence matrix) and the fit's relative residual."""
    g = bias_gradients.to(torch.float64)
    v = _solve(a.T @ a, a.T @ g, ridge)
    residual = float((a @ v - g).norm() / g.norm().clamp_min(1e-300))
    return v, residual


def recover_layer_inputs(
    a: Tensor, batches: Tensor, v: Tensor, weight_gradients: Tensor, *, ridge: float = 0.0
) -> tuple[Tensor, float]:
    """Step II: ``H`` (N, in) minimising ``sum_t ||sum_{n in s(t)} V_n H_n^T - weight_gradients[t]||^2`` given
    step I's ``V``, and the fit's relative residual. The normal matrix is ``(A^T A) * (V V^T)`` (N x N); the
    right-hand side gathers ``V_n^T grad_W L^t`` over the iterations that hold ``n``."""
    n = v.shape[0]
    gw = weight_gradients.to(torch.float64)
    gram = (a.T @ a) * (v @ v.T)
    vb = v[batches]  # (T, B, out)
    rhs = torch.zeros(n, gw.shape[-1], dtype=torch.float64, device=v.device)
    rhs.index_add_(0, batches.reshape(-1), torch.einsum("tbo,toi->tbi", vb, gw).reshape(-1, gw.shape[-1]))
    h = _solve(gram, rhs, ridge)
    fitted = torch.einsum("tbo,tbi->toi", vb, h[batches])
    residual = float((fitted - gw).norm() / gw.norm().clamp_min(1e-300))
    return h, residual


class Cafe(Configurable):
    """CAFE against a :class:`~gradinv.fl.vertical.VerticalObservation` (see the module's docstring)."""

    name = "cafe"
    summary = "CAFE (Jin et al. 2021): vertical FL, every sample from many iterations' first-layer gradients"
    Settings = CafeSettings

    def applicable(self, observation: VerticalObservation) -> list[str]:
        """Every reason CAFE cannot run on ``observation`` (empty when it can)."""
        if isinstance(observation, GroundTruth):
            raise TypeError("attacks receive an observation, never the GroundTruth")
        if not isinstance(observation, VerticalObservation):
            raise TypeError(f"Cafe.reconstruct() takes a VerticalObservation, got {type(observation).__name__}")
        reasons = []
        n, t = observation.num_samples, observation.iterations
        seen = torch.zeros(n, dtype=torch.bool).index_fill_(0, observation.batches.reshape(-1).cpu(), True)
        if not bool(seen.all()):
            missing = int((~seen).sum())
            reasons.append(
                f"{missing} of the {n} samples are in none of the {t} observed batches: observe more iterations"
            )
        else:
            a = incidence(observation.batches.cpu(), n)
            rank = int(torch.linalg.matrix_rank(a))
            if rank < n:
                reasons.append(
                    f"the {t} observed batches determine only {rank} of the {n} samples' gradients (the "
                    "sample-incidence matrix needs full column rank): observe at least N iterations with batches "
                    "smaller than N"
                )
        return reasons

    def reconstruct(
        self,
        observation: VerticalObservation,
        *,
        seed: int = 0,
        progress: bool = False,
        callback: Callback | None = None,
    ) -> Reconstruction:
        """Recover all ``N`` samples (normalised) of ``observation``; ``seed`` fixes the dummy data's start;
        ``callback(step, seconds, inputs)`` is called at logged step-III updates. Raises :class:`AttackError`
        with every reason of :meth:`applicable`."""
        reasons = self.applicable(observation)
        if reasons:
            raise AttackError(f"{self.name} does not apply here: {'; '.join(reasons)}")
        generator = torch.Generator().manual_seed(int(seed))
        start = time.perf_counter()
        s, obs = self.settings, observation
        a = incidence(obs.batches, obs.num_samples)
        batches = obs.batches.long()
        vs, hs, residuals = [], [], []
        for m in range(obs.parties):
            grads = obs.layer_gradients[m]
            v, r1 = recover_output_gradients(a, grads["bias"], ridge=s.ridge)
            h, r2 = recover_layer_inputs(a, batches, v, grads["weight"], ridge=s.ridge)
            vs.append(v.to(grads["bias"].dtype))
            hs.append(h.to(grads["weight"].dtype))
            residuals.append({"step1": r1, "step2": r2})
        algebra_seconds = time.perf_counter() - start
        images, trace = self._step3(obs, hs, generator=generator, progress=progress, callback=callback, start=start)
        seconds = time.perf_counter() - start
        return Reconstruction(
            inputs=obs.normalization.normalize(images).detach(),
            labels=obs.labels.clone(),
            attack=self.name,
            settings={**self.settings_dict(), "label_source": "server"},
            seconds=seconds,
            normalization=obs.normalization,
            trace=tuple(trace),
            extras={
                "residuals": residuals,
                "first_layer_output_gradients": tuple(vs),
                "first_layer_inputs": tuple(hs),
                "algebra_seconds": algebra_seconds,
                "step3_updates": s.epochs * obs.iterations,
            },
        )

    def _step3(
        self,
        obs: VerticalObservation,
        hs: list[Tensor],
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
        start: float,
    ) -> tuple[Tensor, list[TracePoint]]:
        """Adam on the dummy images (in [0, 1]), one step per observed batch, with per-sample moments."""
        s, norm = self.settings, obs.normalization
        n, shape = obs.num_samples, obs.input_shape
        u = torch.rand((n, *shape), generator=generator) if s.init == "uniform" else torch.full((n, *shape), 0.5)
        u = u.to(device=obs.device, dtype=hs[0].dtype)
        m1, m2 = torch.zeros_like(u), torch.zeros_like(u)
        steps = torch.zeros(n, dtype=torch.long, device=u.device)
        twins = [stateless_twin(b, train_mode=False) for b in obs.bottoms]
        top = stateless_twin(obs.top, train_mode=False)
        feature = [_first_layer_input(tw, obs.layer) for tw in twins]
        hnorm = [h.pow(2).sum(1) for h in hs]
        trace: list[TracePoint] = []
        total = s.epochs * obs.iterations
        view = (-1,) + (1,) * len(shape)
        for step in tqdm(range(total), desc="cafe step III", disable=not progress, leave=False):
            t = step % obs.iterations
            idx = obs.batches[t].long()
            x = u[idx].clone().requires_grad_(True)
            cost = self._cost(obs, t, idx, norm.normalize(x), hs, hnorm, twins, top, feature)
            (grad,) = torch.autograd.grad(cost, x)
            with torch.no_grad():
                steps[idx] += 1
                k = steps[idx].to(u.dtype).view(view)
                m1[idx] = s.beta1 * m1[idx] + (1 - s.beta1) * grad
                m2[idx] = s.beta2 * m2[idx] + (1 - s.beta2) * grad.pow(2)
                mhat = m1[idx] / (1 - s.beta1**k)
                vhat = m2[idx] / (1 - s.beta2**k)
                new = u[idx] - s.lr * mhat / (vhat.sqrt() + s.eps)
                u[idx] = new.clamp(0, 1) if s.clamp else new
            if step % s.log_every == 0 or step == total - 1:
                seconds = time.perf_counter() - start
                trace.append(TracePoint(step, seconds, float(cost.detach())))
                if callback is not None:
                    callback(step, seconds, norm.normalize(u.detach()))
        return u.detach(), trace

    def _cost(
        self,
        obs: VerticalObservation,
        t: int,
        idx: Tensor,
        x: Tensor,
        hs: list[Tensor],
        hnorm: list[Tensor],
        twins: list[nn.Module],
        top: nn.Module,
        feature: list[Callable[..., Tensor]],
    ) -> Tensor:
        """Step III's objective on iteration ``t``'s batch ``idx`` (normalised dummy inputs ``x``)."""
        s, layer = self.settings, obs.layer
        parts = obs.split.parts(x)
        cost = x.new_zeros(())
        want_grad = s.gradient_weight > 0
        outputs, firsts = [], []
        for m, part in enumerate(parts):
            params = obs.bottom_parameters(t, m)
            buffers = dict(obs.buffers[m])
            if want_grad:
                first = {k: params[f"{layer}.{k}"].detach().clone().requires_grad_(True) for k in ("weight", "bias")}
                params = {**params, **{f"{layer}.{k}": v for k, v in first.items()}}
                firsts.append(first)
                h, out = feature[m](params, buffers, part, full=True)
                outputs.append(out)
            else:
                h = feature[m](params, buffers, part, full=False)
            if s.representation_weight:
                target = hs[m][idx]
                cost = cost + s.representation_weight * (h - target).pow(2).sum() / hnorm[m][idx].sum().clamp_min(1e-30)
            if s.tv_weight:
                cost = cost + s.tv_weight * total_variation(part) / len(parts)
        if want_grad:
            logits = functional_call(top, obs.top_parameters_at(t), (torch.cat(outputs, dim=1),))
            loss = F.cross_entropy(logits, obs.labels[idx].to(logits.device))
            leaves = [v for first in firsts for v in first.values()]
            grads = torch.autograd.grad(loss, leaves, create_graph=True)
            targets = [obs.layer_gradients[m][k][t] for m in range(obs.parties) for k in ("weight", "bias")]
            num = sum((g - target).pow(2).sum() for g, target in zip(grads, targets, strict=True))
            den = sum(target.pow(2).sum() for target in targets)
            cost = cost + s.gradient_weight * num / den.clamp_min(1e-30)
        return cost


def _first_layer_input(twin: nn.Module, layer: str) -> Callable[..., Tensor]:
    """``f(params, buffers, x, full)``: the input of ``twin``'s layer ``layer`` on ``x``, flattened (and with
    ``full``, also the model's output); without ``full`` the forward pass stops at the layer."""
    module = twin.get_submodule(layer)

    class _Reached(Exception):
        pass

    def f(params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, full: bool):
        seen: list[Tensor] = []

        def grab(_module: nn.Module, args: tuple) -> None:
            seen.append(args[0].flatten(1))
            if not full:
                raise _Reached

        handle = module.register_forward_pre_hook(grab)
        try:
            out = functional_call(twin, (params, buffers), (x,))
        except _Reached:
            return seen[0]
        finally:
            handle.remove()
        return seen[0], out

    return f


__all__ = ["TABLE1", "Cafe", "CafeSettings", "incidence", "recover_layer_inputs", "recover_output_gradients"]
