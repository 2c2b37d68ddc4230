"""Many small Boolean networks trained at once: one set of batched tensors per group.

A Boolean trial is a few thousand parameters on 256 rows; trained alone, its time is all
per-step overhead. Here K networks (members) of one depth and batch size form a group whose
weights are stacked into (K, fan_in, width) tensors: every step is a handful of batched
matrix products (`torch.baddbmm`) for all members at once. Each member keeps its own initial
weights (the same as `study.models.build_boolean_net` draws from its seed), shuffling order
(the same generator as the sequential trainer), learning rate, width and epoch budget.

Narrower members are padded to the group's widest layer: padded units have zero incoming
weights and bias, so they output relu(0) = 0, receive exactly zero gradient (relu'(0) = 0),
and Adam with a zero gradient leaves them at zero: no effect on outputs or gradients.

Same contract as `study.trainer.train`: a member is a hidden profile and its `TrainConfig`
(whatever the population cannot honour is refused, not ignored); per-member per-epoch
`EpochMetrics`, early stop at the target (loss and all bits), an `on_epoch` hook that can stop
a member, and a `TrainResult` per member. A member whose loss turns NaN/inf is stopped alone,
with `result.divergence` set, as the sequential trainer does.

Why one file over 600 lines: both engines (the batched torch groups and the native kernel's
buffers) keep one contract, one ledger of results and one per-member start
(`initial_layers`); apart, a change to one would silently drift from the other.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from study import device as dev
from study import models, native
from study.config import TrainConfig, mlp_parameters
from study.data import BooleanFunction
from study.errors import ConfigError
from study.trainer import Divergence, EpochMetrics, History, TrainResult, target_met

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
"""torch.optim.Adam's defaults, which the sequential trainer uses."""
COMPACT_BELOW = 0.5
"""Repack a group once fewer than this share of its members is still training."""


@dataclass(frozen=True)
class Member:
    """One network of a population: a hidden profile and its training."""

    hidden_layer_profile: tuple[int, ...]
    """Hidden widths, input side first."""
    config: TrainConfig
    """Its training; `config.seed` draws the initial weights and the shuffling order (as in
    the sequential path). Adam without weight decay, on any of the trainer's per-step
    schedules (warm-up, constant, cosine or onecycle decay, a floor); nothing else."""

    def __post_init__(self) -> None:
        c = self.config
        refused = [
            f"optimizer {c.optimizer!r} (only adam)" if c.optimizer != "adam" else "",
            f"weight_decay {c.weight_decay}" if c.weight_decay != 0 else "",
            f"ema_decay {c.ema_decay}" if c.ema_decay else "",
            "augmentation" if c.augments else "",
        ]
        refused = [r for r in refused if r]
        if refused:
            raise ConfigError(
                f"population: the population trainer does not implement {', '.join(refused)}; "
                "train this configuration with the sequential trainer"
            )


MemberCallback = Callable[[int, EpochMetrics], bool | None]
"""on_epoch(member_index, metrics) -> True to stop that member (result kept)."""
EpochHook = Callable[[dict[int, TrainResult]], set[int]]
"""after_epoch({member index: result} of the members that ended this epoch) -> further member
indices to stop now."""


STEP_OVERHEAD_PARAMETERS = 45_000
"""Fixed cost of one group step (kernel launches) in units of per-parameter work; measured
on a 2-core CPU (about 230 us per step, plus about 5 ns per member parameter). Used to decide
when padding narrow members into a wider group is cheaper than a group of their own."""

MAX_GROUP_SEARCH = 256
"""Longest run of members the grouping considers as one group (bounds the planning time)."""


def memory_needed(settings, members: int, device: torch.device, threads: int = 1) -> int:
    """Bytes `members` networks of a Boolean study's largest shape need at once: each one's
    parameters, gradient and Adam moments, and a history of 16 bytes per epoch; plus the
    activations of the whole truth table (per thread on the CPU's native kernel, per member
    with the batched torch engine). An upper bound to check before anything is claimed."""
    rows = 2**settings.input_bits
    profile = [settings.max_width] * settings.max_layers
    params = mlp_parameters(settings.input_bits, profile, settings.output_bits)
    state = members * (4 * 4 * params + 16 * settings.max_epochs)
    units = sum(profile) + settings.output_bits
    at_once = threads if device.type == "cpu" else members
    return state + 3 * 4 * rows * units * at_once


def plan_groups(members: Sequence[Member], fn: BooleanFunction) -> list[list[int]]:
    """Split members into groups that can train together, at least total cost.

    Members of one depth and batch size may share a group. Sorted by width, they are cut into
    consecutive runs so that sum(overhead + size * padded parameters) is least (dynamic
    programming over the cut points): a few wide members do not make hundreds of narrow ones
    pay for their width, and a handful of narrow ones do not pay a group's fixed cost alone.
    """
    by_kind: dict[tuple[int, int], list[int]] = {}
    for i, member in enumerate(members):
        key = (len(member.hidden_layer_profile), member.config.batch_size)
        by_kind.setdefault(key, []).append(i)
    groups = []
    for indices in by_kind.values():
        order = sorted(indices, key=lambda i: (max(members[i].hidden_layer_profile), i))
        n = len(order)
        best = [0.0] + [math.inf] * n  # best[j]: least cost of the first j members
        cut = [0] * (n + 1)
        profiles = [members[k].hidden_layer_profile for k in order]
        for j in range(1, n + 1):
            widths = list(profiles[j - 1])
            for i in range(j - 1, max(0, j - MAX_GROUP_SEARCH) - 1, -1):
                widths = [max(a, b) for a, b in zip(widths, profiles[i], strict=True)]
                padded = mlp_parameters(fn.input_bits, widths, fn.output_bits)
                cost = best[i] + STEP_OVERHEAD_PARAMETERS + (j - i) * padded
                if cost < best[j]:
                    best[j], cut[j] = cost, i
        j, runs = n, []
        while j > 0:
            runs.append(order[cut[j] : j])
            j = cut[j]
        groups.extend(reversed(runs))
    return groups


def adam_unit_step(
    step: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step_count: Tensor
) -> None:
    """torch.optim.Adam's update at learning rate 1 (torch's betas and eps, no weight decay):
    updates the moments in place and writes -m_hat / (sqrt(v_hat) + eps) into `step`, which
    must be zero on entry. One fused kernel (torch's own, as `Adam(fused=True)` runs it); the
    caller scales each member's row by its own rate. A test pins it to `torch.optim.Adam`."""
    torch._fused_adam_(
        [step],
        [grad],
        [exp_avg],
        [exp_avg_sq],
        [],
        [step_count],
        lr=1.0,
        beta1=ADAM_BETAS[0],
        beta2=ADAM_BETAS[1],
        weight_decay=0.0,
        eps=ADAM_EPS,
        amsgrad=False,
        maximize=False,
    )


def initial_layers(member: Member, fn: BooleanFunction) -> list[tuple[Tensor, Tensor]]:
    """A member's initial (weight as (fan_in, fan_out), bias) per layer: those of the sequential
    trainer's network from the member's seed, so that every engine starts where it starts."""
    net = models.build_boolean_net(
        member.hidden_layer_profile, fn.input_bits, fn.output_bits, member.config.seed
    )
    return [
        (m.weight.detach().T, m.bias.detach()) for m in net.modules() if isinstance(m, nn.Linear)
    ]


class _Group:
    """The stacked parameters, Adam state and bookkeeping of one group of members."""

    def __init__(self, members: list[Member], indices: list[int], fn: BooleanFunction) -> None:
        device = fn.inputs.device
        self.indices = list(indices)  # positions in the caller's member list
        depth = len(members[0].hidden_layer_profile)
        widths = [max(m.hidden_layer_profile[layer] for m in members) for layer in range(depth)]
        dims = [fn.input_bits, *widths, fn.output_bits]
        # all parameters of a member in one row of a (K, P) buffer: one Adam pass per step
        self.shapes = [(dims[i], dims[i + 1]) for i in range(depth + 1)]
        sizes = [a * b + b for a, b in self.shapes]
        flat = torch.zeros(len(members), sum(sizes))
        for j, member in enumerate(members):
            offset = 0
            for (most_in, most_out), (weight, bias) in zip(
                self.shapes, initial_layers(member, fn), strict=True
            ):
                fan_in, fan_out = weight.shape
                size = most_in * most_out
                flat[j, offset : offset + size].view(most_in, most_out)[:fan_in, :fan_out] = weight
                flat[j, offset + size : offset + size + fan_out] = bias
                offset += size + most_out
        # padded units keep zero weights and bias: relu(0) = 0 and relu'(0) = 0, so they output
        # 0, receive exactly zero gradient, and Adam leaves them at zero
        self.flat = flat.to(device)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        # active members step together, so one step count serves the whole group
        self.step_count = torch.zeros((), device=device)
        self.scratch = torch.zeros_like(self.flat)
        self.lr = torch.tensor([m.config.learning_rate for m in members], device=device)
        rows = len(fn.inputs)
        self.schedule = Schedules(members, rows, device)
        self.generators = [torch.Generator().manual_seed(m.config.seed) for m in members]
        self.active = torch.ones(len(members), dtype=torch.bool, device=device)
        self.active_lr = self.lr.clone()
        self._layers = self._make_layers()

    def layers(self) -> list[tuple[Tensor, Tensor]]:
        """(weight (K, fan_in, fan_out), bias (K, 1, fan_out)) views into the flat buffer."""
        return self._layers

    def _make_layers(self) -> list[tuple[Tensor, Tensor]]:
        # made once per group (and after `keep`): views stay valid as the buffer is updated
        views, offset, k = [], 0, self.flat.shape[0]
        for fan_in, fan_out in self.shapes:
            size = fan_in * fan_out
            weight = self.flat[:, offset : offset + size].view(k, fan_in, fan_out)
            bias = self.flat[:, offset + size : offset + size + fan_out].view(k, 1, fan_out)
            views.append((weight, bias))
            offset += size + fan_out
        return views

    def __len__(self) -> int:
        return len(self.indices)

    def forward(self, x: Tensor) -> Tensor:
        """Logits of every member: x is (K, rows, n) or (rows, n), shared by all members."""
        return self._forward(x)[0]

    def _forward(self, x: Tensor) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Logits, each layer's input and each hidden pre-activation (for the backward pass)."""
        h = x if x.dim() == 3 else x.expand(len(self), *x.shape)
        inputs, pre_activations = [h], []
        *hidden, (w_out, b_out) = self._layers
        for w, b in hidden:
            z = torch.baddbmm(b, h, w)
            pre_activations.append(z)
            h = z.clamp_min(0)
            inputs.append(h)
        return torch.baddbmm(b_out, h, w_out), inputs, pre_activations

    def set_active(self, active: Tensor) -> None:
        """Freeze the members whose flag is False (their learning rate becomes 0). In place:
        a captured CUDA graph keeps reading the same tensors."""
        self.active.copy_(active)
        torch.mul(self.lr, self.active, out=self.active_lr)

    @torch.no_grad()
    def train_step(self, x: Tensor, y: Tensor) -> Tensor:
        """One optimiser step of every member on its own batch; returns each member's loss."""
        per_member, grads = self.loss_and_gradients(x, y)
        self.adam_step(torch.cat([t.reshape(len(self), -1) for t in grads], dim=1))
        return per_member

    @torch.no_grad()
    def loss_and_gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Each member's mean BCE on its batch and its gradients, in the flat buffer's order
        (weight (K, fan_in, fan_out), bias (K, fan_out) of each layer, input side first).

        The backward pass is written out (a ReLU MLP with mean BCE on logits), which halves
        the per-step dispatch overhead of autograd for these tiny tensors; tests compare it
        with autograd and with the autograd-based sequential trainer.
        """
        layers = self._layers
        logits, inputs, pre_activations = self._forward(x)
        per_member = F.binary_cross_entropy_with_logits(logits, y, reduction="none").mean(
            dim=(1, 2)
        )
        # d(mean BCE)/d(logits) = (sigmoid(logits) - y) / (rows * outputs), per member
        g = torch.sigmoid(logits).sub_(y).mul_(1.0 / (y.shape[1] * y.shape[2]))
        grads: list[Tensor] = []
        for index in range(len(layers) - 1, -1, -1):
            grads.append(g.sum(dim=1))  # bias
            grads.append(torch.bmm(inputs[index].transpose(1, 2), g))  # weight
            if index > 0:  # back through the weights and the ReLU (relu'(0) = 0)
                g = torch.bmm(g, layers[index][0].transpose(1, 2))
                g = torch.ops.aten.threshold_backward(g, pre_activations[index - 1], 0)
        grads.reverse()  # the flat buffer's order: weight, bias of each layer, input side first
        return per_member, grads

    @torch.no_grad()
    def adam_step(self, grad: Tensor) -> None:
        """torch.optim.Adam's update with a learning rate per member; stopped members frozen:
        the unit-rate step for all members at once, then each row scaled by its own rate."""
        rate = self.active_lr * self.schedule.factor(self.step_count)
        self.step_count += 1
        self.scratch.zero_()
        adam_unit_step(self.scratch, grad, self.exp_avg, self.exp_avg_sq, self.step_count)
        self.flat.addcmul_(self.scratch, rate[:, None])

    def keep(self, rows: list[int]) -> None:
        """Drop every member but `rows` (positions in this group) from all tensors."""
        index = torch.tensor(rows, device=self.lr.device)

        def take(t: Tensor) -> Tensor:
            return t.index_select(0, index)

        self.flat = take(self.flat)
        self.exp_avg, self.exp_avg_sq = take(self.exp_avg), take(self.exp_avg_sq)
        self.scratch = torch.zeros_like(self.exp_avg)
        self.lr = take(self.lr)
        self.schedule = self.schedule.take(take)
        self.active, self.active_lr = take(self.active), take(self.active_lr)
        self.generators = [self.generators[r] for r in rows]
        self.indices = [self.indices[r] for r in rows]
        self._layers = self._make_layers()


ENGINES = ("auto", "native", "torch")
"""native: the C kernel on the CPU (`study.native`), every member its own shapes, no padding;
torch: members grouped into batched tensors (any device; the CPU fallback); auto: native on
the CPU when it can be built, else torch."""


def train_population(
    members: Sequence[Member],
    fn: BooleanFunction,
    on_epoch: MemberCallback | None = None,
    after_epoch: EpochHook | None = None,
    compact: bool = True,
    engine: str = "auto",
    threads: int = 1,
    sync_every: int | None = None,
    weights: dict[int, list[tuple[Tensor, Tensor]]] | None = None,
) -> list[TrainResult]:
    """Train every member; return one `TrainResult` per member, in the members' order.

    `on_epoch` sees every member's metrics and may stop it; `after_epoch` may stop further
    members (e.g. the other seeds of a trial that can no longer learn f). The native engine
    trains all members at once on `threads` threads; the torch engine trains groups (same depth
    and batch size, see `plan_groups`) one after another, reading their metrics back every
    `sync_every` epochs (default: every epoch on the CPU, `SYNC_EVERY_CUDA` on CUDA).
    With a `weights` dict (native engine only), each member's final (weight as (fan_in,
    fan_out), bias) per layer is put in it: the network as it was when the member stopped.
    """
    if engine not in ENGINES:
        raise ConfigError(f"engine: must be one of {ENGINES}, got {engine!r}")
    kernel = None
    if engine != "torch" and fn.inputs.device.type == "cpu":
        kernel = native.load()
    if (engine == "native" or weights is not None) and kernel is None:
        raise ConfigError("engine: the native kernel needs the CPU and a C compiler")
    if kernel is not None:
        ledger = _Ledger(members, fn, on_epoch, after_epoch, "native", threads)
        state = _train_native(kernel, members, fn, ledger, threads)
        if weights is not None:
            weights.update({j: state.layers(j) for j in range(len(members))})
    else:
        cpu = fn.inputs.device.type == "cpu"
        ledger = _Ledger(members, fn, on_epoch, after_epoch, "torch",
                         torch.get_num_threads() if cpu else 1)  # fmt: skip
        for indices in plan_groups(members, fn):
            pending = [i for i in indices if i not in ledger.results]
            if pending:
                group = {i: members[i] for i in pending}
                _train_group(group, fn, ledger, compact, sync_every)
    return [ledger.results[i] for i in range(len(members))]


class _Ledger:
    """What both engines share: each member's history, the stop rules applied after every
    epoch (target, budget, divergence, the callbacks), and the results."""

    def __init__(
        self,
        members: Sequence[Member],
        fn: BooleanFunction,
        on_epoch: MemberCallback | None,
        after_epoch: EpochHook | None,
        engine: str,
        threads: int,
    ) -> None:
        self.members, self.fn = members, fn
        self.on_epoch, self.after_epoch = on_epoch, after_epoch
        self.engine, self.threads = engine, threads
        self.history = {i: History(m.config.learning_rate) for i, m in enumerate(members)}
        self.results: dict[int, TrainResult] = {}
        self.device = dev.describe(fn.inputs.device)

    def finish(
        self,
        i: int,
        seconds: float,
        reached: bool,
        stopped: bool,
        divergence: Divergence | None = None,
    ) -> TrainResult:
        history = self.history[i]
        self.results[i] = TrainResult(
            history=history,
            parameters=mlp_parameters(
                self.fn.input_bits, self.members[i].hidden_layer_profile, self.fn.output_bits
            ),
            device=self.device,
            seconds=history[-1].seconds if history else seconds,
            reached_target=reached,
            stopped_by_callback=stopped,
            divergence=divergence,
            engine=self.engine,
            threads=self.threads,
        )
        return self.results[i]

    def epoch(
        self, epoch: int, seconds: float, rows: Sequence[tuple[int, float, float, float]]
    ) -> set[int]:
        """Record one epoch of the members in `rows` (index, train loss, eval loss, bit
        accuracy); return the members that stop now."""
        ended: dict[int, TrainResult] = {}
        for i, train_loss, eval_loss, accuracy in rows:
            config = self.members[i].config
            if not (math.isfinite(train_loss) and math.isfinite(eval_loss)):
                # this member alone diverged (members share no arithmetic): stop it, say why
                bad = train_loss if not math.isfinite(train_loss) else eval_loss
                ended[i] = self.finish(i, seconds, False, False, Divergence(epoch, bad))
                continue
            history = self.history[i]
            history.append(train_loss, eval_loss, accuracy, seconds)
            metrics = history[-1]  # as stored (float32), so that rules see what is kept
            if target_met("binary", metrics, config.target_loss):
                ended[i] = self.finish(i, seconds, True, False)
            elif self.on_epoch is not None and self.on_epoch(i, metrics):
                ended[i] = self.finish(i, seconds, False, True)
            elif epoch >= config.epochs:
                ended[i] = self.finish(i, seconds, False, False)
        stopped: set[int] = set()
        if self.after_epoch is not None:
            for i in self.after_epoch(dict(ended)):
                if i not in self.results and self.history.get(i):  # started, not yet ended
                    self.finish(i, seconds, False, True)
                    stopped.add(i)
        return set(ended) | stopped


def _total_steps(config: TrainConfig, rows: int) -> int:
    """Optimiser steps of the whole budget: the schedule's length."""
    return config.epochs * math.ceil(rows / config.batch_size)


SCHEDULE_CODES = {"constant": 0, "cosine": 1, "onecycle": 2}
"""The native kernel's schedule numbers (SCHEDULE_* in population_kernel.c)."""


def warmup_steps(config: TrainConfig, rows: int) -> int:
    """Steps of the linear warm-up, as the trainer rounds them."""
    return round(config.warmup_fraction * _total_steps(config, rows))


class Schedules:
    """Every member's per-step rate factor (the trainer's `_scheduler`), as tensors: the
    member's schedule code, warm-up steps, floor and total steps."""

    def __init__(self, members: Sequence[Member], rows: int, device) -> None:
        configs = [m.config for m in members]

        def tensor(values: list) -> Tensor:
            return torch.tensor(values, dtype=torch.float32, device=device)

        self.code = tensor([SCHEDULE_CODES[c.lr_schedule] for c in configs])
        self.warmup = tensor([warmup_steps(c, rows) for c in configs])
        self.floor = tensor([c.lr_floor for c in configs])
        self.total = tensor([_total_steps(c, rows) for c in configs])
        self.constant = all(c.lr_schedule == "constant" and not warmup_steps(c, rows)
                            for c in configs)  # fmt: skip
        """Every member at a constant rate: no factor to compute (decided once, on the host:
        nothing here syncs with the device or breaks a CUDA graph's capture)."""

    def factor(self, step: Tensor) -> Tensor | float:
        """The factor of optimiser step `step` (from 0) for every member."""
        if self.constant:
            return 1.0
        span = torch.clamp(self.total - self.warmup, min=1.0)
        t = torch.clamp(torch.minimum(step - self.warmup, self.total - self.warmup), min=0.0)
        t = t / span
        decay = torch.where(
            self.code == 1,
            0.5 * (1.0 + torch.cos(math.pi * t)),
            torch.where(self.code == 2, 1.0 - t, torch.ones_like(t)),
        )
        decayed = torch.where(self.code == 0, decay, self.floor + (1.0 - self.floor) * decay)
        warming = (step + 1.0) / torch.clamp(self.warmup, min=1.0)
        return torch.where(step < self.warmup, warming, decayed)

    def take(self, take: Callable[[Tensor], Tensor]) -> Schedules:
        new = object.__new__(Schedules)
        for name in ("code", "warmup", "floor", "total"):
            setattr(new, name, take(getattr(self, name)))
        new.constant = self.constant  # members kept of a constant set stay constant
        return new


class _NativeState:
    """The native engine's state: every member's parameters and Adam moments in flat buffers,
    its layer widths, learning rate, batch size and shuffling generator."""

    def __init__(self, members: Sequence[Member], fn: BooleanFunction) -> None:
        k = len(members)
        self.members, self.rows = members, len(fn.inputs)
        self.x = fn.inputs.float().contiguous()
        self.y = fn.targets.float().contiguous()
        self.dims = torch.zeros(k, native.MAX_DIMS, dtype=torch.int32)
        self.ndims = torch.zeros(k, dtype=torch.int32)
        sizes = []
        for j, member in enumerate(members):
            shape = [fn.input_bits, *member.hidden_layer_profile, fn.output_bits]
            if len(shape) > native.MAX_DIMS:
                raise ConfigError(f"hidden_layer_profile: at most {native.MAX_DIMS - 2} layers")
            self.dims[j, : len(shape)] = torch.tensor(shape, dtype=torch.int32)
            self.ndims[j] = len(shape)
            sizes.append(
                mlp_parameters(fn.input_bits, member.hidden_layer_profile, fn.output_bits)
            )
        self.offsets = torch.tensor([0, *itertools.accumulate(sizes)][:-1], dtype=torch.int64)
        self.params = torch.empty(sum(sizes), dtype=torch.float32)
        for j, member in enumerate(members):
            blocks = [t for w, b in initial_layers(member, fn) for t in (w.flatten(), b)]
            self.params[self.offsets[j] : self.offsets[j] + sizes[j]] = torch.cat(blocks)
        self.exp_avg, self.exp_avg_sq = (
            torch.zeros_like(self.params),
            torch.zeros_like(self.params),
        )
        self.steps = torch.zeros(k, dtype=torch.int64)
        self.lr = torch.tensor([m.config.learning_rate for m in members], dtype=torch.float32)
        configs = [m.config for m in members]
        self.schedule = torch.tensor(
            [SCHEDULE_CODES[c.lr_schedule] for c in configs], dtype=torch.uint8
        )
        self.warmup = torch.tensor([warmup_steps(c, self.rows) for c in configs])
        self.floor = torch.tensor([c.lr_floor for c in configs], dtype=torch.float32)
        self.total_steps = torch.tensor([_total_steps(c, self.rows) for c in configs])
        self.batch = torch.tensor([m.config.batch_size for m in members], dtype=torch.int32)
        self.generators = [torch.Generator().manual_seed(m.config.seed) for m in members]
        self.active = torch.zeros(k, dtype=torch.uint8)
        self.orders = torch.zeros(k, self.rows, dtype=torch.int64)
        self.train_loss, self.eval_loss, self.accuracy = (torch.zeros(k) for _ in range(3))

    def bind(self, kernel: native.Kernel) -> native.BoundEpoch:
        """The kernel's epoch on these buffers, checked once (`native.ARGUMENTS`)."""
        return kernel.bind(
            active=self.active, ndims=self.ndims, dims=self.dims, offsets=self.offsets,
            params=self.params, exp_avg=self.exp_avg, exp_avg_sq=self.exp_avg_sq,
            steps=self.steps, lr=self.lr, schedule=self.schedule, warmup=self.warmup,
            floor=self.floor, total_steps=self.total_steps,
            batch=self.batch, x=self.x, y=self.y, orders=self.orders,
            train_loss=self.train_loss, eval_loss=self.eval_loss, eval_acc=self.accuracy,
        )  # fmt: skip

    def layers(self, j: int) -> list[tuple[Tensor, Tensor]]:
        """Member `j`'s (weight as (fan_in, fan_out), bias) per layer, copied out."""
        dims = self.dims[j, : self.ndims[j]].tolist()
        offset, layers = int(self.offsets[j]), []
        for fan_in, fan_out in itertools.pairwise(dims):
            weight = self.params[offset : offset + fan_in * fan_out].view(fan_in, fan_out)
            offset += fan_in * fan_out
            layers.append((weight.clone(), self.params[offset : offset + fan_out].clone()))
            offset += fan_out
        return layers

    def epoch(self, call: native.BoundEpoch, running: list[int], threads: int) -> list[tuple]:
        """One epoch of the `running` members: (index, train loss, eval loss, accuracy) each."""
        for i in running:  # each member's own seeded order, as the sequential trainer draws it
            torch.randperm(self.rows, generator=self.generators[i], out=self.orders[i])
        self.active.zero_()
        self.active[running] = 1
        status = call.epoch(threads)
        if status != 0:
            raise MemoryError("population kernel: out of memory")
        tl, el, acc = self.train_loss.tolist(), self.eval_loss.tolist(), self.accuracy.tolist()
        return [(i, tl[i], el[i], acc[i]) for i in running]


def _train_native(
    kernel: native.Kernel,
    members: Sequence[Member],
    fn: BooleanFunction,
    ledger: _Ledger,
    threads: int,
) -> _NativeState:
    """All members at once, one kernel call per epoch; a member that stops costs nothing."""
    state = _NativeState(members, fn)
    call = state.bind(kernel)
    running = [i for i in range(len(members)) if i not in ledger.results]
    started = time.perf_counter()
    for epoch in range(1, max((m.config.epochs for m in members), default=0) + 1):
        if not running:
            break
        rows = state.epoch(call, running, threads)
        done = ledger.epoch(epoch, time.perf_counter() - started, rows)
        running = [i for i in running if i not in done]
    return state


SYNC_EVERY_CUDA = 16
"""Epochs between two reads of a group's metrics on CUDA (one host sync each)."""


class _GroupEpoch:
    """One epoch of a torch-engine group as a fixed sequence of tensor operations on static
    buffers: every step of every member, the evaluation on the whole table, the stop checks
    on the device (target reached with every bit right, budget spent, loss not finite: the
    member is frozen at once), and the epoch's metrics into `metrics`. Nothing in it reads a
    value back to the host; on CUDA it is captured once as a CUDA graph and replayed."""

    def __init__(self, group: _Group, configs: list[TrainConfig], fn: BooleanFunction) -> None:
        device = fn.inputs.device
        self.group, self.fn = group, fn
        k, n = len(group), len(fn.inputs)
        self.batch = configs[0].batch_size
        self.orders = torch.zeros(k, n, dtype=torch.int64, device=device)
        # targets compared in float64, as the host compares the stored float32 value
        self.target = torch.tensor(
            [-math.inf if c.target_loss is None else c.target_loss for c in configs],
            dtype=torch.float64,
            device=device,
        )
        self.budget = torch.tensor([c.epochs for c in configs], device=device)
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)
        self.metrics = torch.zeros(3, k, device=device)  # train loss, eval loss, accuracy
        self.graph = None
        self.cuda = device.type == "cuda"

    @torch.no_grad()
    def body(self) -> None:
        group, fn, batch = self.group, self.fn, self.batch
        n = len(fn.inputs)
        x_epoch, y_epoch = fn.inputs[self.orders], fn.targets[self.orders]  # one gather
        losses = [
            group.train_step(x_epoch[:, s : s + batch], y_epoch[:, s : s + batch])
            for s in range(0, n, batch)
        ]
        train_loss = torch.stack(losses).sum(dim=0) / len(losses)
        logits = group.forward(fn.inputs)
        targets = fn.targets.expand_as(logits)
        eval_loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(
            dim=(1, 2)
        )
        accuracy = ((logits > 0) == (targets > 0.5)).float().mean(dim=(1, 2))
        self.epoch += 1
        finite = torch.isfinite(train_loss) & torch.isfinite(eval_loss)
        reached = (eval_loss.double() <= self.target) & (accuracy == 1.0)
        stop = ~finite | reached | (self.epoch >= self.budget)
        group.active.logical_and_(~stop)
        torch.mul(group.lr, group.active, out=group.active_lr)
        self.metrics[0].copy_(train_loss)
        self.metrics[1].copy_(eval_loss)
        self.metrics[2].copy_(accuracy)

    def run(self) -> None:
        """One epoch: replay the captured graph on CUDA, run the operations elsewhere."""
        if not self.cuda:
            self.body()
            return
        if self.graph is None:
            self.graph = self._capture()
        self.graph.replay()

    def _capture(self):
        """Capture `body` as a CUDA graph. Capturing needs warm-up runs, which would train:
        the state is saved before and put back after them."""
        group = self.group
        state = [group.flat, group.exp_avg, group.exp_avg_sq, group.step_count, group.active,
                 group.active_lr, self.epoch, self.metrics]  # fmt: skip
        saved = [t.clone() for t in state]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self.body()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.body()
        for t, value in zip(state, saved, strict=True):
            t.copy_(value)
        return graph


def _train_group(
    members: dict[int, Member],
    fn: BooleanFunction,
    ledger: _Ledger,
    compact: bool,
    sync_every: int | None = None,
) -> None:
    """Train one group of the torch engine (members by their index in the population).

    The stop checks run on the device; the host reads the metrics back every epoch on the CPU
    and every `SYNC_EVERY_CUDA` epochs on CUDA, then applies the callbacks: a member stopped
    by a callback at epoch e has its history end at e (the epochs it trained beyond are
    dropped), so that results do not depend on how often the host looks.
    """
    device = fn.inputs.device
    n = len(fn.inputs)
    group = _Group(list(members.values()), list(members), fn)
    step = _GroupEpoch(group, [m.config for m in members.values()], fn)
    if sync_every is None:
        sync_every = SYNC_EVERY_CUDA if device.type == "cuda" else 1
    # each member's seeded orders for `sync_every` epochs, drawn on the host (as the
    # sequential trainer draws them) into pinned memory, copied without a sync
    pinned = device.type == "cuda"
    orders = torch.zeros(sync_every, len(group), n, dtype=torch.int64, pin_memory=pinned)
    metrics = torch.zeros(sync_every, 3, len(group), device=device)
    dev.synchronize(device)
    started = time.perf_counter()
    epoch, last = 0, max(m.config.epochs for m in members.values())
    while epoch < last:
        chunk = min(sync_every, last - epoch)
        for e in range(chunk):
            for row, generator in enumerate(group.generators):
                torch.randperm(n, generator=generator, out=orders[e, row])
            step.orders.copy_(orders[e], non_blocking=True)
            step.run()
            metrics[e].copy_(step.metrics)
        # .tolist(): the host sync, once per chunk of epochs for the whole group
        values = metrics[:chunk].tolist()
        seconds = time.perf_counter() - started
        done: set[int] = set()
        for e in range(chunk):
            train_losses, eval_losses, accuracies = values[e]
            rows = [
                (i, train_losses[row], eval_losses[row], accuracies[row])
                for row, i in enumerate(group.indices)
                if i not in ledger.results
            ]
            done |= ledger.epoch(epoch + e + 1, seconds, rows)
        epoch += chunk
        if done:  # members the callbacks stopped (the device froze the others already)
            keep = torch.tensor([i not in ledger.results for i in group.indices], device=device)
            group.set_active(group.active & keep)
        still = [row for row, i in enumerate(group.indices) if i not in ledger.results]
        if not still:
            break
        if compact and len(still) < COMPACT_BELOW * len(group):
            group.keep(still)  # stop paying for members that have finished
            step = _GroupEpoch(group, [members[i].config for i in group.indices], fn)
            step.epoch.fill_(epoch)
            orders = torch.zeros(sync_every, len(group), n, dtype=torch.int64, pin_memory=pinned)
            metrics = torch.zeros(sync_every, 3, len(group), device=device)
