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
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from study import device as dev
from study import models
from study.config import TrainConfig, mlp_parameters
from study.data import BooleanFunction
from study.errors import ConfigError
from study.trainer import Divergence, EpochMetrics, TrainResult, target_met

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
    the sequential path). Adam at a constant rate without weight decay, nothing else."""

    def __post_init__(self) -> None:
        c = self.config
        refused = [
            f"optimizer {c.optimizer!r} (only adam)" if c.optimizer != "adam" else "",
            f"weight_decay {c.weight_decay}" if c.weight_decay != 0 else "",
            f"lr_schedule {c.lr_schedule!r} (only constant)"
            if c.lr_schedule != "constant"
            else "",
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
            net = models.build_boolean_net(
                member.hidden_layer_profile, fn.input_bits, fn.output_bits, member.config.seed
            )
            linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
            offset = 0
            for (fan_in_max, fan_out_max), linear in zip(self.shapes, linears, strict=True):
                fan_out, fan_in = linear.weight.shape
                weight = torch.zeros(fan_in_max, fan_out_max)
                weight[:fan_in, :fan_out] = linear.weight.detach().T
                bias = torch.zeros(fan_out_max)
                bias[:fan_out] = linear.bias.detach()
                size = fan_in_max * fan_out_max
                flat[j, offset : offset + size] = weight.flatten()
                flat[j, offset + size : offset + size + fan_out_max] = bias
                offset += size + fan_out_max
        # padded units keep zero weights and bias: relu(0) = 0 and relu'(0) = 0, so they output
        # 0, receive exactly zero gradient, and Adam leaves them at zero
        self.flat = flat.to(device)
        self.exp_avg = torch.zeros_like(self.flat)
        self.exp_avg_sq = torch.zeros_like(self.flat)
        # active members step together, so one step count serves the whole group
        self.step_count = torch.zeros((), device=device)
        self.scratch = torch.zeros_like(self.flat)
        self.lr = torch.tensor([m.config.learning_rate for m in members], device=device)
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
        """Freeze the members whose flag is False (their learning rate becomes 0)."""
        self.active = active
        self.active_lr = torch.where(active, self.lr, 0.0)

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
        self.step_count += 1
        self.scratch.zero_()
        adam_unit_step(self.scratch, grad, self.exp_avg, self.exp_avg_sq, self.step_count)
        self.flat.addcmul_(self.scratch, self.active_lr[:, None])

    def keep(self, rows: list[int]) -> None:
        """Drop every member but `rows` (positions in this group) from all tensors."""
        index = torch.tensor(rows, device=self.lr.device)

        def take(t: Tensor) -> Tensor:
            return t.index_select(0, index)

        self.flat = take(self.flat)
        self.exp_avg, self.exp_avg_sq = take(self.exp_avg), take(self.exp_avg_sq)
        self.scratch = torch.zeros_like(self.exp_avg)
        self.lr = take(self.lr)
        self.set_active(take(self.active))
        self.generators = [self.generators[r] for r in rows]
        self.indices = [self.indices[r] for r in rows]
        self._layers = self._make_layers()


def train_population(
    members: Sequence[Member],
    fn: BooleanFunction,
    on_epoch: MemberCallback | None = None,
    after_epoch: EpochHook | None = None,
    compact: bool = True,
) -> list[TrainResult]:
    """Train every member; return one `TrainResult` per member, in the members' order.

    Groups (same depth and batch size, see `plan_groups`) train one after another.
    `on_epoch` sees every member's metrics and may stop it; `after_epoch` may stop further
    members (e.g. the other seeds of a trial that can no longer learn f).
    """
    results: dict[int, TrainResult] = {}
    for indices in plan_groups(members, fn):
        group = {i: members[i] for i in indices}
        results.update(_train_group(group, fn, on_epoch, after_epoch, compact))
    return [results[i] for i in range(len(members))]


def _train_group(
    members: dict[int, Member],
    fn: BooleanFunction,
    on_epoch: MemberCallback | None,
    after_epoch: EpochHook | None,
    compact: bool,
) -> dict[int, TrainResult]:
    """Train one group (members by their index in the population); return their results."""
    device = fn.inputs.device
    indices = list(members)
    group = _Group(list(members.values()), indices, fn)
    configs = {i: m.config for i, m in members.items()}
    batch = configs[indices[0]].batch_size
    history: dict[int, list[EpochMetrics]] = {i: [] for i in indices}
    results: dict[int, TrainResult] = {}
    n = len(fn.inputs)
    steps_per_epoch = math.ceil(n / batch)
    x_all, y_all = fn.inputs, fn.targets
    describe = dev.describe(device)
    dev.synchronize(device)
    started = time.perf_counter()

    def finish(
        i: int, reached: bool, stopped: bool, divergence: Divergence | None = None
    ) -> TrainResult:
        results[i] = TrainResult(
            history=history[i],
            parameters=mlp_parameters(
                fn.input_bits, members[i].hidden_layer_profile, fn.output_bits
            ),
            device=describe,
            seconds=history[i][-1].seconds if history[i] else time.perf_counter() - started,
            reached_target=reached,
            stopped_by_callback=stopped,
            divergence=divergence,
        )
        return results[i]

    for epoch in range(1, max(c.epochs for c in configs.values()) + 1):
        # --- train: each member its own seeded order; batches gathered for all members at once
        orders = torch.stack([torch.randperm(n, generator=g) for g in group.generators]).to(device)
        # one gather per epoch: each member's rows in its own order, then plain slices
        x_epoch, y_epoch = x_all[orders], y_all[orders]
        step_losses = [
            group.train_step(x_epoch[:, start : start + batch], y_epoch[:, start : start + batch])
            for start in range(0, n, batch)
        ]
        loss_sum = torch.stack(step_losses).sum(dim=0)
        # --- evaluate every member on the whole truth table
        with torch.no_grad():
            logits = group.forward(x_all)
            targets = y_all.expand_as(logits)
            eval_loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(
                dim=(1, 2)
            )
            accuracy = ((logits > 0) == (targets > 0.5)).float().mean(dim=(1, 2))
        # .tolist(): host sync, once per epoch for the whole group
        train_losses = (loss_sum / steps_per_epoch).tolist()
        eval_losses, accuracies = eval_loss.tolist(), accuracy.tolist()
        active = group.active.tolist()
        seconds = time.perf_counter() - started
        ended: dict[int, TrainResult] = {}
        for row, i in enumerate(group.indices):
            if not active[row]:
                continue
            config = configs[i]
            if not (math.isfinite(train_losses[row]) and math.isfinite(eval_losses[row])):
                # this member alone diverged (members share no arithmetic): stop it, say why
                bad = (
                    train_losses[row] if not math.isfinite(train_losses[row]) else eval_losses[row]
                )
                ended[i] = finish(i, False, False, Divergence(epoch, bad))
                continue
            metrics = EpochMetrics(
                epoch=epoch,
                train_loss=train_losses[row],
                eval_loss=eval_losses[row],
                eval_accuracy=accuracies[row],
                train_accuracy=None,
                seconds=seconds,
                learning_rate=config.learning_rate,
            )
            history[i].append(metrics)
            if target_met("binary", metrics, config.target_loss):
                ended[i] = finish(i, True, False)
            elif on_epoch is not None and on_epoch(i, metrics):
                ended[i] = finish(i, False, True)
            elif epoch >= config.epochs:
                ended[i] = finish(i, False, False)
        stopped = set()
        if after_epoch is not None:
            stopped = {i for i in after_epoch(dict(ended)) if i in members and i not in results}
            for i in stopped:
                finish(i, False, True)
        if ended or stopped:
            still_active = group.active.clone()
            done = set(ended) | stopped
            still_active[[row for row, i in enumerate(group.indices) if i in done]] = False
            group.set_active(still_active)
        still = group.active.nonzero().flatten().tolist()
        if not still:
            break
        if compact and len(still) < COMPACT_BELOW * len(group):
            group.keep(still)  # stop paying for members that have finished
    return results
