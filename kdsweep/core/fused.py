"""Fused students: K students of one architecture trained together, as one batched model.

Q2's trials all train the same ResNet18 on the same data with the same optimiser settings; the
KD weight alpha and temperature T enter only the loss, and the seed only the initialisation.
A `FusedGroup` holds K such students ("members") in K slots: their parameters and buffers are
stacked along a new first dimension (`torch.func.stack_module_state`) and one forward/backward
runs all of them through `torch.func.vmap` + `functional_call` (convolutions become grouped
convolutions, the idea of HFTA, Wang et al. MLSys 2021). Every step takes ONE data batch, ONE
teacher-logit gather and one fused forward/backward for all K.

What each member keeps for itself: its parameters, BatchNorm running statistics (buffers are
stacked too, so batch statistics and running averages are per member), momentum buffers, step
counter and learning-rate schedule (the schedule is a device table indexed by the member's own
step), epoch loss, and its `report` callback, called after each of its epochs with the metrics
`train()` reports. A member whose report raises (pruned) or that ran all its epochs leaves its
slot; the slot's tensors are overwritten in place with the next member's own initialisation
(its seed) and zero momentum, so nothing is rebuilt or recompiled.

Data order. The group draws one stream of batches exactly as `train()` draws them with seed
`data_seed`: epoch after epoch, a permutation of the training images (generator `data_seed+1`)
and a view id per image (generator `data_seed`), in batches of `batch_size`. A member's epoch
is the `steps_per_epoch` consecutive batches from the step it joined. Members that join at the
group's first step therefore train exactly as `train(config, data_seed=data_seed)` does
(tests/test_fused.py checks parameters and losses); a member that joins later sees the same
stream from there, so its epochs straddle two of the group's permutations (each image once per
group epoch, not necessarily once per member epoch).

Not fused: configs that differ in anything but `kd.alpha`, `kd.temperature` and `seed`
(`fusion_key`), partly trainable students (`trainable="head"`), and Q1's models (see README).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from kdsweep.core import data, models
from kdsweep.core.config import TrainConfig, to_dict
from kdsweep.core.devices import autocast, resolve_device, set_threads
from kdsweep.core.distill import at_least_float32
from kdsweep.core.train import (
    Report,
    Stopped,
    TeacherSource,
    TrainingError,
    TrainResult,
    _norm_on,
    _polling,
    _to_input,
    build_student,
    correctness,
    epoch_order,
    evaluate,
    input_shape,
    lr_factor,
    resolve,
    to_device,
    with_precision,
)

log = logging.getLogger("kdsweep.core.fused")

PER_MEMBER = ("kd.alpha", "kd.temperature", "seed")  # what may differ inside a group


def fusion_key(config: TrainConfig) -> str:
    """Everything but `PER_MEMBER`, as JSON: configs with equal keys can share a group."""
    spec = to_dict(config)
    spec.pop("seed")
    if spec.get("kd"):
        spec["kd"].pop("alpha")
        spec["kd"].pop("temperature")
    return json.dumps(spec, sort_keys=True)


@dataclass
class Member:
    """One student of a group. `config` is resolved and has `kd` set; `report(epoch, metrics)`
    is called after each of its epochs and may raise to stop it (the group goes on)."""

    config: TrainConfig
    report: Report | None = None
    tag: Any = None  # the caller's handle (the fused worker keeps its Optuna trial here)
    history: list[dict[str, float]] = field(default_factory=list)
    joined_step: int = 0  # the group step at which it started (its place in the data stream)
    val_correct: torch.Tensor | None = None  # its last epoch's per-image validation mask


OnEnd = Callable[[Member, TrainResult | None, BaseException | None], None]


class _Slot(nn.Module):
    """Slot k of a group seen as an ordinary model (for `train.evaluate` and exports)."""

    def __init__(self, group: FusedGroup, k: int):
        super().__init__()
        self.template = group.template
        self._group, self._k = group, k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, k = self._group, self._k
        params = {n: p[k] for n, p in g.params.items()}
        buffers = {n: b[k] for n, b in g.buffers.items()}
        return functional_call(self.template, (params, buffers), (x,))


class FusedGroup:
    """K slots of students sharing `base` (resolved or not) but for alpha, T and seed.

    `teacher` is the prepared teacher (`kdsweep.core.teacher.prepare(base)`), as `train()` takes
    it: alpha does not enter the teacher's config, so one teacher serves every member.
    Raises ValueError for a config that cannot be fused (no `kd`, a partly trainable student).
    """

    def __init__(self, base: TrainConfig, slots: int, data_seed: int,
                 stop: threading.Event | None = None, *, teacher: TeacherSource | None = None):
        if slots < 1:
            raise ValueError(f"a fused group needs at least 1 slot, got {slots}.")
        if base.kd is None:
            raise ValueError("fused groups train distillation students: the config needs kd settings.")
        if base.model.trainable != "all":
            raise ValueError("fused groups train whole students; model.trainable must be 'all'.")
        set_threads(base.threads)
        self.device = resolve_device(base.device)
        self.splits = data.load_splits(base.data)
        self.base = with_precision(resolve(base, self.splits), self.device)
        self.key = fusion_key(self.base)
        self.k = slots
        self.data_seed = data_seed
        self.stop = stop
        self.in_shape = input_shape(self.base, self.splits)
        self.n = len(self.splits.train_x)
        self.steps_per_epoch = math.ceil(self.n / self.base.batch_size)
        self.total_steps = self.steps_per_epoch * self.base.epochs

        if teacher is None:
            raise ValueError("a fused group distils from a teacher: prepare it first with "
                             "kdsweep.core.teacher.prepare(config) and pass it as teacher=...")
        self.teacher_fn, self.teacher_info = teacher.logits_source(self.base, self.splits, self.device)
        self.train_x = self.splits.train_x.to(self.device)
        self.train_y = self.splits.train_y.to(self.device)
        d = self.base.data  # warm the device copy of the normalisation (see train._norm_on)
        _norm_on(d.mean or self.splits.mean, d.std or self.splits.std, self.device)

        # The template gives the module structure; its own tensors are never used.
        probe = self._build(self.base)
        self.template = copy.deepcopy(probe).to("meta")
        stacked_p, stacked_b = stack_module_state([probe] * slots)
        self.params = {n: p.detach().to(self.device).requires_grad_(True) for n, p in stacked_p.items()}
        self.buffers = {n: b.to(self.device) for n, b in stacked_b.items()}
        self.momentum = {n: torch.zeros_like(p) for n, p in self.params.items()}
        self.decay = {n: p.ndim > 2 for n, p in self.params.items()}  # weights, not BN or biases
        o = self.base.optim
        self.schedule = torch.tensor(
            [o.lr * lr_factor(s, self.total_steps, o.warmup, o.schedule) for s in range(self.total_steps)],
            device=self.device)
        # Per slot, on the device (read by the step, never by the host) ...
        self.step_dev = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.active_dev = torch.zeros(slots, device=self.device)
        self.alpha = torch.zeros(slots, device=self.device)
        self.temperature = torch.ones(slots, device=self.device)
        self.smoothing = torch.zeros(slots, device=self.device)
        self.loss_sum = torch.zeros(slots, device=self.device)
        # ... and their host mirrors.
        self.members: list[Member | None] = [None] * slots
        self.steps = [0] * slots
        self.epoch_start = [0.0] * slots
        self.group_step = 0
        self._losses = self._fused_losses
        if self.base.compile and self.device.type == "cuda":
            from kdsweep.core.train import _compiled

            self._losses = _compiled(self._fused_losses)
        self._stream = self._batches()

    # -- members -------------------------------------------------------------------------

    def _build(self, config: TrainConfig) -> nn.Module:
        torch.manual_seed(config.seed)  # as train() does, so a member starts as its solo run
        return build_student(config, self.in_shape, self.splits.num_classes)

    def free_slots(self) -> list[int]:
        return [k for k, m in enumerate(self.members) if m is None]

    def active(self) -> int:
        return sum(m is not None for m in self.members)

    def add(self, member: Member) -> int:
        """Start `member` in a free slot from its own initialisation; returns the slot."""
        free = self.free_slots()
        if not free:
            raise ValueError("the group is full; wait for a member to end.")
        config = with_precision(resolve(member.config, self.splits), self.device)
        if fusion_key(config) != self.key:
            raise ValueError("this member's config differs from the group's in more than "
                             f"{', '.join(PER_MEMBER)}; it cannot join.")
        k = free[0]
        model = self._build(config)
        with torch.no_grad():
            for n, t in model.named_parameters():
                self.params[n][k].copy_(t)
            for n, t in model.named_buffers():
                self.buffers[n][k].copy_(t)
            for m in self.momentum.values():
                m[k].zero_()
            self.step_dev[k] = 0
            self.active_dev[k] = 1.0
            self.alpha[k] = config.kd.alpha
            self.temperature[k] = config.kd.temperature
            self.smoothing[k] = config.optim.label_smoothing  # the hard term's, whatever alpha
            self.loss_sum[k] = 0.0
        member.config = config
        member.joined_step = self.group_step
        self.members[k], self.steps[k] = member, 0
        self.epoch_start[k] = time.perf_counter()
        return k

    def _end(self, k: int) -> Member:
        member = self.members[k]
        assert member is not None
        self.members[k] = None
        with torch.no_grad():
            self.active_dev[k] = 0.0
        return member

    def model_of(self, k: int) -> nn.Module:
        """Slot k's student as an ordinary model on the CPU (weights and buffers copied)."""
        model = copy.deepcopy(self.template)  # on the meta device: no init, no global RNG draw
        state = {n: t[k].detach().cpu().clone() for n, t in {**self.params, **self.buffers}.items()}
        model.load_state_dict(state, assign=True)
        return model

    # -- training --------------------------------------------------------------------------

    def _batches(self):
        """The group's stream: (device ids, device views, host ids, host views) per step."""
        d = self.base.data
        gen = torch.Generator().manual_seed(self.data_seed)
        index_gen = torch.Generator().manual_seed(self.data_seed + 1)
        bs = self.base.batch_size
        while True:
            order, views = epoch_order(self.n, d.pad, d.flip, index_gen, gen)
            order_dev, views_dev = to_device(order, self.device), to_device(views, self.device)
            host_order, host_views = order.numpy(), views.numpy()
            for i in range(self.steps_per_epoch):
                rows = slice(i * bs, (i + 1) * bs)
                yield order_dev[rows], views_dev[rows], host_order[rows], host_views[rows]

    def _fused_losses(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                      inp: torch.Tensor, t_logits: torch.Tensor, y: torch.Tensor,
                      alpha: torch.Tensor, temperature: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
        def one(p, b, alpha, temperature, smoothing):
            with autocast(self.device, self.base.precision):
                logits = functional_call(self.template, (p, b), (inp,))
            return _member_loss(logits, t_logits, y, alpha, temperature, smoothing)

        return vmap(one, randomness="different")(params, buffers, alpha, temperature, smoothing)

    def step(self) -> None:
        """One optimiser step of every slot on the group's next batch (no host sync)."""
        idx, views, host_idx, host_views = next(self._stream)
        d = self.base.data
        x = data.apply_views(self.train_x[idx], views, d.pad)
        inp = _to_input(x, self.base, self.splits, self.device)
        t_logits = self.teacher_fn(idx, views, x, (host_idx, host_views))
        self.template.train()
        # Only slots up to the last occupied one run (views of the stacked tensors: gradients and
        # BatchNorm updates land in place); a group that drains at the end of a study stops
        # paying for its empty slots (compiled: one graph per count). Members take the lowest
        # free slot, so they stay packed.
        m = 1 + max(k for k, member in enumerate(self.members) if member is not None)
        losses = self._losses({n: p[:m] for n, p in self.params.items()},
                              {n: b[:m] for n, b in self.buffers.items()}, inp, t_logits,
                              self.train_y[idx], self.alpha[:m], self.temperature[:m], self.smoothing[:m])
        for p in self.params.values():
            p.grad = None
        losses.sum().backward()  # members' parameters are disjoint: each gets its own gradient
        self._sgd()
        with torch.no_grad():
            self.loss_sum[:m].add_(losses.detach())
            self.step_dev.add_(self.active_dev.long())
        self.group_step += 1
        for k, member in enumerate(self.members):
            if member is not None:
                self.steps[k] += 1

    @torch.no_grad()
    def _sgd(self) -> None:
        # torch.optim.SGD's update (Nesterov momentum, decoupled from nothing: L2 added to the
        # gradient, on weights only) with a learning rate per slot; a free slot gets lr 0.
        o = self.base.optim
        lr = self.schedule[self.step_dev.clamp(max=self.total_steps - 1)] * self.active_dev
        for n, p in self.params.items():
            g = p.grad
            if self.decay[n] and o.weight_decay:
                g = g.add(p, alpha=o.weight_decay)
            if o.momentum:
                buf = self.momentum[n]
                buf.mul_(o.momentum).add_(g)  # from zero: the first step stores g, as SGD does
                g = g.add(buf, alpha=o.momentum)  # Nesterov, as train()'s optimiser
            p.sub_(g * lr.view(-1, *([1] * (p.ndim - 1))))

    def _epoch_end(self, k: int) -> tuple[dict[str, float], bool]:
        member = self.members[k]
        assert member is not None
        spe = self.steps_per_epoch
        epoch = self.steps[k] // spe
        train_loss = self.loss_sum[k].item() / spe  # one sync per member epoch
        with torch.no_grad():
            self.loss_sum[k] = 0.0
        if not math.isfinite(train_loss):
            raise TrainingError(f"the training loss became {train_loss} in epoch {epoch}.")
        seconds = time.perf_counter() - self.epoch_start[k]
        # Slot k as an ordinary ResNet, so scoring folds its BatchNorms as train()'s does.
        member.val_correct = correctness(self.model_of(k).to(self.device), self.splits.val_x, self.splits.val_y,
                                         self.base, self.splits, self.device)
        val_acc = member.val_correct.sum().item() / max(1, len(member.val_correct))
        c = member.config
        metrics = {
            "epoch": epoch,
            "val_acc": val_acc,
            "train_loss": train_loss,
            "lr": c.optim.lr * lr_factor(self.steps[k], self.total_steps, c.optim.warmup, c.optim.schedule),
            "images_per_s": self.n / seconds,  # of this member; the group trains K at that rate
            "seconds": time.perf_counter() - self.epoch_start[k],
        }
        member.history.append(metrics)
        self.epoch_start[k] = time.perf_counter()
        return metrics, epoch >= c.epochs

    def _result(self, k: int, start: float) -> TrainResult:
        member = self.members[k]
        assert member is not None
        model = self.model_of(k)
        best = max(member.history, key=lambda h: h["val_acc"])
        imgs = sum(self.n for _ in member.history)
        secs = sum(h["seconds"] for h in member.history)
        test_acc = None
        if member.config.evaluate_test:  # verification and reference runs, as train() does
            test_acc = evaluate(_Slot(self, k), self.splits.test_x, self.splits.test_y, self.base,
                                self.splits, self.device)
        return TrainResult(
            config=member.config, final_val_acc=member.history[-1]["val_acc"],
            best_val_acc=best["val_acc"], best_epoch=int(best["epoch"]),
            epochs_run=len(member.history),
            params=sum(p.numel() for p in model.parameters() if p.requires_grad),
            param_split=models.param_split(model), wall_time=time.perf_counter() - start,
            images_per_s=imgs / secs if secs else 0.0, device=str(self.device),
            history=list(member.history), teacher=self.teacher_info, model=model, test_acc=test_acc,
            val_correct=None if member.val_correct is None else member.val_correct.cpu(),
        )

    def run(self, next_member: Callable[[], Member | None], on_end: OnEnd) -> None:
        """Train until no member is left and `next_member()` gives none.

        Free slots are offered to `next_member()` at the start, whenever a member ends and
        after every member epoch while a slot is free. `on_end(member, result, error)` is
        called once per member: `result` when it ran all its epochs, `error` when its report
        or its training raised an Exception (it alone stops). Stopped (the `stop` event, checked
        before every step) and other KeyboardInterrupts propagate with members still in their
        slots (`self.members`): the caller re-queues them.
        """
        started: dict[int, float] = {}

        def fill() -> None:
            for _ in self.free_slots():
                member = next_member()
                if member is None:
                    return
                started[id(member)] = time.perf_counter()
                self.add(member)

        with _polling(self.stop):
            fill()
            while self.active():
                if self.stop is not None and self.stop.is_set():
                    raise Stopped()
                self.step()
                ended = False
                for k, member in enumerate(self.members):
                    if member is None or self.steps[k] % self.steps_per_epoch:
                        continue
                    ended = True
                    try:
                        metrics, last = self._epoch_end(k)
                        if member.report is not None:
                            member.report(int(metrics["epoch"]), metrics)
                    except Exception as exc:  # noqa: BLE001 - pruned or failed: this member only
                        self._end(k)
                        on_end(member, None, exc)
                        continue
                    if last:
                        result = self._result(k, started.pop(id(member), time.perf_counter()))
                        self._end(k)
                        on_end(member, result, None)
                if ended and self.free_slots():
                    fill()


def _member_loss(student: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                 alpha: torch.Tensor, temperature: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """kdsweep.core.distill.kd_loss with alpha, T (and label smoothing of the hard term) as
    0-d tensors, so vmap can give every member its own:

        L = (1 - alpha) * CE_smoothed(y, s) + alpha * T^2 * KL(softmax(t / T) || softmax(s / T))

    Equal to kd_loss within float rounding (alpha 0 and 1 too: the other term is multiplied by
    zero rather than skipped)."""
    s = at_least_float32(student)
    logp = F.log_softmax(s, dim=1)
    nll = -logp.gather(1, targets[:, None]).squeeze(1)
    hard = ((1 - smoothing) * nll - smoothing * logp.mean(1)).mean()
    log_q = F.log_softmax(teacher.to(s.dtype) / temperature, dim=1)
    # F.kl_div(log_p, log_q, reduction="batchmean", log_target=True), spelled out: vmap has no
    # batching rule for kl_div and would loop over the members.
    kl = (log_q.exp() * (log_q - F.log_softmax(s / temperature, dim=1))).sum() / s.shape[0]
    soft = kl * temperature**2
    return (1 - alpha) * hard + alpha * soft
