"""GIAS: Gradient Inversion with Generative Image Prior (Jeon, Kim, Lee, Oh, Ok, NeurIPS 2021).

Threat model: an honest-but-curious server that knows the input shape, the number of samples and the
normalisation, and holds a generator ``G_w: z -> x`` trained on data from the client's distribution (not on the
client's own images); labels come from the threat model or are recovered from the update. The attack searches
the generator's range instead of the pixel space, in two stages (the paper's "GI-z/w"):

1. latent search, generator fixed: ``z* = argmin_z 1 - cos(∇θ L(G_w(z), y), g) + R_prior(z)``
   from a Gaussian ``z``, Adam, several restarts, the restart with the lowest matching cost kept;
2. parameter search: one copy ``w_i`` of the generator per sample of the batch, each started from the
   trained weights, ``w* = argmin_w 1 - cos(∇θ L((G_{w_i}(z*_i))_i, y), g) + R_param(w; w0)``, Adam with a small
   learning rate; the reconstruction is ``G_{w*_i}(z*_i)``.

Defaults follow the authors' scripts (ml-postech/gradient-inversion-generative-image-prior): cosine distance,
unsigned Adam at 3e-2 on the latent and 1e-3 on the generator, step decay at 3/8, 5/8 and 7/8 of each stage,
3 restarts, TV 1e-6; their 32 px ImageNet runs give the parameter search ~10x the latent search's iterations.
``R_prior`` (weight ``latent_prior``: the Gaussian's ``||z||²`` per dimension) and ``R_param`` (weight
``generator_prior``: ``||w_i - w0||²`` per parameter) are the paper's regularisers; the scripts leave both at 0
and keep the generator near its trained weights by the small learning rate and the fixed iteration count.

Without a ``generator=`` the attack uses the bundled digits generator (:mod:`gradinv.models.generator`) for the
observation's input shape, trained on the digits' training split on first use and cached.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from gradinv._settings import above, at_least, one_of
from gradinv.attacks.base import Attack, AttackOutput, Callback, register_attack
from gradinv.attacks.components.budget import check_restarts
from gradinv.attacks.components.engine import DIFFERENTIATION, EngineResult, MatchingSettings, optimise
from gradinv.attacks.components.objectives import LAYER_WEIGHTS, OBJECTIVES, layer_weights
from gradinv.attacks.components.optim import SCHEDULES
from gradinv.attacks.components.priors import build_priors
from gradinv.attacks.components.replay import matching_cost
from gradinv.attacks.labels import label_declines, label_method_problems, labels_for
from gradinv.errors import ConfigError
from gradinv.types import Observation, Reconstruction

GENERATOR_OUTPUTS = ("unit", "normalized")


@dataclass(frozen=True)
class GIASSettings:
    """GIAS's parts; ``iterations`` counts both stages (``latent_fraction`` of them search the latent)."""

    #: iterations of both stages together; the latent search runs ``round(iterations * latent_fraction)`` (>= 1).
    #: 2000 x 0.25: the scripts' 500 latent iterations at 32 px, and 1500 (not 5000) for the small generator; a
    #: 16-dimensional latent needed ~200 iterations to converge on the digits
    iterations: int = 2000
    latent_fraction: float = 0.25
    #: latent-search restarts (batched); the parameter search refines the best one
    restarts: int = 3
    #: the generator's latent size (None: the generator's ``latent_dim`` attribute, 16 for the bundled one)
    latent_dim: int | None = None
    latent_lr: float = 3e-2
    generator_lr: float = 1e-3
    #: weights of R_prior(z) = mean ||z||² / latent_dim and R_param(w) = mean_i ||w_i - w0||² / #w
    latent_prior: float = 0.0
    generator_prior: float = 0.0
    objective: str = "cosine"
    layer_weights: str = "equal"
    #: image priors on the generated batch (as Inverting Gradients / GradInversion weigh them)
    tv: float = 1e-6
    l2: float = 0.0
    bn: float = 0.0
    schedule: str = "step"
    label_method: str = "auto"
    patience: int = 0
    min_improvement: float = 1e-4
    #: seconds for both stages together (the latent search stops at its share, :attr:`latent_share`); 0: no budget
    time_budget: float = 0.0
    log_every: int = 50
    adaptive: bool = True
    differentiation: str = "auto"
    #: the range of a user's generator's outputs: images in [0, 1] (``unit``) or normalised model inputs
    generator_output: str = "unit"
    #: training of the bundled digits generator (used when no generator is given): Adam steps and seed
    generator_steps: int = 1500
    generator_seed: int = 0

    def problems(self) -> list[str]:
        return [
            *at_least("iterations", self.iterations, 1),
            *(
                []
                if 0 < self.latent_fraction <= 1
                else [f"latent_fraction must lie in (0, 1], got {self.latent_fraction!r}"]
            ),
            *at_least("restarts", self.restarts, 1),
            *([] if self.latent_dim is None else at_least("latent_dim", self.latent_dim, 1)),
            *above("latent_lr", self.latent_lr, 0),
            *above("generator_lr", self.generator_lr, 0),
            *(
                p
                for k in ("latent_prior", "generator_prior", "tv", "l2", "bn")
                for p in at_least(k, getattr(self, k), 0)
            ),
            *one_of("objective", self.objective, sorted(OBJECTIVES)),
            *one_of("layer_weights", self.layer_weights, LAYER_WEIGHTS),
            *one_of("schedule", self.schedule, SCHEDULES),
            *label_method_problems(self.label_method),
            *at_least("patience", self.patience, 0),
            *at_least("min_improvement", self.min_improvement, 0),
            *at_least("time_budget", self.time_budget, 0),
            *at_least("log_every", self.log_every, 1),
            *one_of("differentiation", self.differentiation, DIFFERENTIATION),
            *one_of("generator_output", self.generator_output, GENERATOR_OUTPUTS),
            *at_least("generator_steps", self.generator_steps, 1),
        ]

    @property
    def latent_iterations(self) -> int:
        return max(1, min(self.iterations, round(self.iterations * self.latent_fraction)))

    @property
    def generator_iterations(self) -> int:
        return self.iterations - self.latent_iterations

    @property
    def latent_share(self) -> float:
        """The latent search's share of the gradient evaluations (restarts x its iterations), and so of a
        ``time_budget``: the parameter search gets the rest."""
        latent = self.restarts * self.latent_iterations
        return latent / (latent + self.generator_iterations)


class _Flat:
    """A generator's parameters as one flat vector per copy, and back (so the engine optimises one tensor)."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        self.names = list(params)
        self.shapes = [params[k].shape for k in self.names]
        self.sizes = [params[k].numel() for k in self.names]
        self.w0 = torch.cat([params[k].reshape(-1) for k in self.names])

    def unflatten(self, w: Tensor) -> dict[str, Tensor]:
        return {
            k: part.view(shape) for k, part, shape in zip(self.names, w.split(self.sizes), self.shapes, strict=True)
        }


@register_attack
class GIAS(Attack):
    """GIAS (Jeon et al. 2021): latent search then per-sample generator parameter search (see the module)."""

    name = "gias"
    summary = "GIAS (Jeon et al. 2021): cosine matching in a generator's latent space, then its weights per sample"
    Settings = GIASSettings
    requires = ("input_shape", "num_samples")
    table1 = {
        "initialisation": "Gaussian latent (generator's prior)",
        "objective": "cosine distance",
        "optimiser": "Adam on the latent, then Adam on per-sample generator copies; step decay",
        "priors": "generative image prior (trained generator), latent and weight regularisers, TV",
    }

    def __init__(self, settings: Any | None = None, *, generator: nn.Module | None = None, **overrides: Any) -> None:
        """``generator``: any ``nn.Module`` mapping a latent (B, latent_dim) to (B, *input_shape) images, in
        [0, 1] (``generator_output="unit"``) or in the model's normalised input space (``"normalized"``); it is
        never changed. None: the bundled digits generator (:func:`gradinv.models.generator.digits_generator`)."""
        super().__init__(settings, **overrides)
        if generator is not None and not isinstance(generator, nn.Module):
            raise ConfigError(f"gias: generator must be an nn.Module, got {type(generator).__name__}")
        self.generator = generator
        self._loaded: dict[tuple[int, int], nn.Module] = {}  # bundled generators by (channels, size)

    def __eq__(self, other: object) -> bool:
        return super().__eq__(other) and self.generator is other.generator  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), self.settings, id(self.generator)))

    def __repr__(self) -> str:
        given = "" if self.generator is None else f", generator={type(self.generator).__name__}"
        return f"{type(self).__name__}({self.settings}{given})"

    # -- declines -------------------------------------------------------------------------------------------------

    def _latent_dim(self) -> int | None:
        if self.settings.latent_dim is not None:
            return self.settings.latent_dim
        if self.generator is None:
            from gradinv.models.generator import GeneratorTraining

            return GeneratorTraining().latent_dim
        dim = getattr(self.generator, "latent_dim", None)
        return int(dim) if isinstance(dim, int) and dim > 0 else None

    def _unmet_assumptions(self, observation: Observation) -> list[str]:
        from gradinv.models.generator import GENERATOR_SIZES

        k = observation.knowledge
        reasons = list(label_declines(observation, self.settings.label_method))
        shape = tuple(k.input_shape)
        if len(shape) != 3:
            return [*reasons, f"gias generates images: the model takes inputs of shape {shape}, not (C, H, W)"]
        if k.normalization is None and (self.generator is None or self.settings.generator_output == "unit"):
            reasons.append(
                "gias maps the generator's [0, 1] images to the model's input space with the normalisation, which "
                "the threat model does not give (set known_normalization, or pass a generator of normalised "
                "inputs with generator_output='normalized')"
            )
        if self.generator is None:
            c, h, w = shape
            if c not in (1, 3) or h != w or h not in GENERATOR_SIZES:
                reasons.append(
                    f"the bundled digits generator makes square 1- or 3-channel images of side "
                    f"{', '.join(map(str, GENERATOR_SIZES))}, but the model takes {shape}: pass generator= "
                    "a generator of such images"
                )
            return reasons
        dim = self._latent_dim()
        if dim is None:
            return [
                *reasons,
                f"the generator {type(self.generator).__name__} has no latent_dim attribute: set latent_dim=",
            ]
        made = self._probe(dim, observation)
        if isinstance(made, str):
            reasons.append(made)
        elif made != shape:
            reasons.append(
                f"the generator makes images of shape {made}, but the model takes {shape}: pass a generator of "
                f"{shape} images (or one for this latent_dim={dim})"
            )
        return reasons

    def _probe(self, dim: int, observation: Observation) -> tuple[int, ...] | str:
        """The shape of one generated image, or why the generator cannot make one (a copy in eval mode runs)."""
        twin = _twin(self.generator, observation.device)
        try:
            with torch.no_grad():
                out = twin(torch.zeros(1, dim, device=observation.device))
        except Exception as err:  # a generator that cannot take (1, latent_dim) latents
            return f"the generator cannot map a (1, {dim}) latent to an image ({type(err).__name__}: {err})"
        if not isinstance(out, Tensor) or out.dim() < 1 or out.shape[0] != 1:
            return f"the generator must return a (B, C, H, W) tensor for a (B, {dim}) latent"
        return tuple(out.shape[1:])

    # -- the run --------------------------------------------------------------------------------------------------

    def reconstruct(
        self,
        observation: Observation,
        *,
        seed: int = 0,
        progress: bool = False,
        callback: Callback | None = None,
    ) -> Reconstruction:
        """As :meth:`Attack.reconstruct`; the bundled generator is trained (first use) or loaded before the timed
        run, so ``seconds`` is the attack's own time."""
        self.check(observation)
        if self.generator is None and not self._unmet_assumptions(observation):
            self._bundled(observation, progress=progress)
        return super().reconstruct(observation, seed=seed, progress=progress, callback=callback)

    def _bundled(self, observation: Observation, *, progress: bool) -> nn.Module:
        """The bundled digits generator for the observation's input shape (trained on first use, then cached on
        disk and in this attack)."""
        from gradinv.models.generator import GeneratorTraining, digits_generator

        c, size, _ = observation.knowledge.input_shape
        training = GeneratorTraining(
            latent_dim=self._latent_dim() or 16, steps=self.settings.generator_steps, seed=self.settings.generator_seed
        )
        key = (c, size)
        if key not in self._loaded:
            self._loaded[key] = digits_generator(image_size=size, channels=c, training=training, progress=progress)
        return self._loaded[key]

    def _generator(self, observation: Observation, *, progress: bool) -> tuple[nn.Module, str, dict[str, Any]]:
        """An eval-mode copy of the generator on the observation's device, its output range and a description."""
        if self.generator is not None:
            return (
                _twin(self.generator, observation.device),
                self.settings.generator_output,
                {"generator": type(self.generator).__name__},
            )
        g = self._bundled(observation, progress=progress)
        return _twin(g, observation.device), "unit", {"generator": f"bundled digits VAE decoder ({g.image_size} px)"}

    def _reconstruct(
        self,
        observation: Observation,
        *,
        generator: torch.Generator,
        progress: bool,
        callback: Callback | None,
    ) -> AttackOutput:
        s = self.settings
        check_restarts(observation, s.restarts, attack=self.name)
        k = observation.knowledge
        device = observation.device
        g_net, output, described = self._generator(observation, progress=progress)
        start = time.perf_counter()  # the generator's one-off training is not the attack's time
        dim = self._latent_dim()
        labels, label_source = labels_for(observation, method=s.label_method)
        labels = labels.to(device)
        to_inputs = _to_inputs(observation, output)
        params = {name: p.detach() for name, p in g_net.named_parameters()}
        weights = layer_weights(list(observation.update), s.layer_weights)
        prior = build_priors(observation, labels, {"tv": s.tv, "l2": s.l2, "bn": s.bn})
        build = dict(objective=OBJECTIVES[s.objective], weights=weights, prior=prior, adaptive=s.adaptive)
        match = matching_cost(observation, **build)
        match_autograd = matching_cost(observation, **build, autograd=True)

        def generate(z: Tensor) -> Tensor:
            return to_inputs(functional_call(g_net, params, (z,)))

        def latent_cost(z: Tensor, replay: Callable[[Tensor, Tensor], Tensor] = match) -> Tensor:
            value = replay(generate(z), labels)
            if s.latent_prior:
                value = value + s.latent_prior * z.pow(2).mean()
            return value

        engine = MatchingSettings(
            iterations=s.latent_iterations,
            objective=s.objective,
            optimizer="adam",
            lr=s.latent_lr,
            schedule=s.schedule,
            boxed=False,
            patience=s.patience,
            min_improvement=s.min_improvement,
            time_budget=s.time_budget * s.latent_share,
            log_every=s.log_every,
            differentiation=s.differentiation,
        )
        z0 = torch.randn((s.restarts, k.num_samples, dim), generator=generator).to(device)
        stage1 = optimise(
            latent_cost,
            z0,
            settings=engine,
            bounds=None,
            autograd_cost=lambda z: latent_cost(z, match_autograd),
            progress=progress,
            callback=_mapped(callback, generate, 0),
            desc=f"{self.name} latent",
            start=start,
        )
        z_star = stage1.inputs
        with torch.no_grad():
            best_inputs = generate(z_star)
        trace, kept = list(stage1.trace), "latent"
        stage2: EngineResult | None = None
        out_of_time = s.time_budget and time.perf_counter() - start >= s.time_budget
        if s.generator_iterations and not out_of_time and stage1.stopped != "diverged":
            stage2, inputs2 = self._parameter_search(
                observation,
                g_net,
                params,
                z_star,
                labels,
                (match, match_autograd),
                to_inputs,
                engine,
                start,
                offset=stage1.iterations_run,
                progress=progress,
                callback=callback,
            )
            trace += [replace(p, iteration=p.iteration + stage1.iterations_run) for p in stage2.trace]
            # the same score for both stages' results (matching cost and image priors, not R_prior / R_param)
            before, after = (float(match_autograd(x, labels).detach()) for x in (best_inputs, inputs2))
            if math.isfinite(after) and after <= before:
                best_inputs, kept = inputs2, "generator"
        return AttackOutput(
            inputs=_boxed(observation, best_inputs.detach()),
            labels=labels,
            label_source=label_source,
            trace=tuple(trace),
            extras={
                "restart_costs": stage1.costs.tolist(),
                "best_restart": stage1.best,
                "latent": z_star.detach().cpu(),
                "latent_iterations_run": stage1.iterations_run,
                "generator_iterations_run": 0 if stage2 is None else stage2.iterations_run,
                "iterations_run": stage1.iterations_run + (0 if stage2 is None else stage2.iterations_run),
                "stopped": stage1.stopped if stage2 is None else stage2.stopped,
                "kept": kept,
            },
            settings=described,
        )

    def _parameter_search(
        self,
        observation: Observation,
        g_net: nn.Module,
        params: dict[str, Tensor],
        z_star: Tensor,
        labels: Tensor,
        replays: tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor, Tensor], Tensor]],
        to_inputs: Callable[[Tensor], Tensor],
        engine: MatchingSettings,
        start: float,
        *,
        offset: int,
        progress: bool,
        callback: Callback | None,
    ) -> tuple[EngineResult, Tensor]:
        """Stage 2: one generator copy per sample, all started from the trained weights and fitted together."""
        s = self.settings
        flat = _Flat(params)
        batch = z_star.shape[0]
        w0 = flat.w0

        def one(w: Tensor, z: Tensor) -> Tensor:
            return functional_call(g_net, flat.unflatten(w), (z.unsqueeze(0),)).squeeze(0)

        def generate(ws: Tensor) -> Tensor:
            return to_inputs(vmap(one)(ws, z_star))

        def weight_cost(ws: Tensor, replay: Callable[[Tensor, Tensor], Tensor] = replays[0]) -> Tensor:
            value = replay(generate(ws), labels)
            if s.generator_prior:
                value = value + s.generator_prior * (ws - w0).pow(2).mean()
            return value

        settings = replace(engine, iterations=s.generator_iterations, lr=s.generator_lr, time_budget=s.time_budget)
        result = optimise(
            weight_cost,
            w0.expand(batch, -1).clone().unsqueeze(0),
            settings=settings,
            bounds=None,
            autograd_cost=lambda ws: weight_cost(ws, replays[1]),
            progress=progress,
            callback=_mapped(callback, generate, offset),
            desc=f"{self.name} generator",
            start=start,
        )
        with torch.no_grad():
            inputs = generate(result.inputs)
        return result, inputs


def _twin(generator: nn.Module, device: torch.device) -> nn.Module:
    """An eval-mode copy of ``generator`` on ``device`` whose parameters need no gradient (the original untouched)."""
    twin = copy.deepcopy(generator).to(device).eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def _to_inputs(observation: Observation, output: str) -> Callable[[Tensor], Tensor]:
    """Map generated images to the model's normalised input space."""
    norm = observation.knowledge.normalization
    if output == "normalized" or norm is None:
        return lambda x: x
    mean = torch.as_tensor(norm.mean, dtype=torch.float32, device=observation.device).view(-1, 1, 1)
    std = torch.as_tensor(norm.std, dtype=torch.float32, device=observation.device).view(-1, 1, 1)
    return lambda x: (x - mean) / std


def _boxed(observation: Observation, x: Tensor) -> Tensor:
    norm = observation.knowledge.normalization
    if norm is None:
        return x
    mean = torch.as_tensor(norm.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.as_tensor(norm.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return torch.maximum(torch.minimum(x, (1 - mean) / std), -mean / std)


def _mapped(callback: Callback | None, generate: Callable[[Tensor], Tensor], offset: int) -> Callback | None:
    """The engine's callback on the optimised variable (latent or weights), passed on as generated inputs."""
    if callback is None:
        return None

    def call(iteration: int, seconds: float, variable: Tensor) -> None:
        with torch.no_grad():
            callback(iteration + offset, seconds, generate(variable))

    return call


__all__ = ["GENERATOR_OUTPUTS", "GIAS", "GIASSettings"]
