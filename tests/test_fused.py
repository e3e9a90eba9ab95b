"""Fused students (kdsweep/core/fused.py): members that start together equal solo train() runs,
and a pruned member's replacement leaves the others exactly as they were."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kdsweep.core import teacher
from kdsweep.core.config import DataConfig, KDConfig, ModelConfig, OptimConfig, TrainConfig, replace
from kdsweep.core.fused import FusedGroup, Member, fusion_key
from kdsweep.core.train import train

MEMBERS = [(0.5, 4.0, 11), (0.9, 10.0, 12), (0.0, 1.0, 13)]  # alpha, T, seed: KD, strong KD, plain CE


@pytest.fixture(autouse=True)
def teacher_on_one_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    """A teacher trains on the host's idle cores (cores minus the 1-minute load average), so
    the same test trained another teacher after the suite's many-worker tests than alone, and
    the students' rounding grew along another path. One thread: the same teacher at any load."""
    monkeypatch.setattr(teacher, "idle_cores", lambda: 1)


def student(npz: Path, cache: Path, epochs: int = 1, images: int = 320) -> TrainConfig:
    """A ResNet18 (cifar stem) on the tiny 8×8 npz as 3 channels: 320 images in batches of 16
    make one 20-step epoch; the teacher is a small MLP (seconds)."""
    return TrainConfig(
        data=DataConfig(dataset=f"npz:{npz}", val_size=200, train_subset=images, channels=3, pad=1, flip=True),
        model=ModelConfig(arch="resnet18", weights="none", stem="cifar"),
        optim=OptimConfig(lr=0.02, warmup=0.1),
        kd=KDConfig(alpha=0.5, temperature=4.0, teacher=ModelConfig(arch="mlp", hidden=(32,)),
                    teacher_epochs=1),
        epochs=epochs, batch_size=16, device="cpu", threads=1, cache_dir=str(cache),
    )


def member_config(base: TrainConfig, alpha: float, temperature: float, seed: int) -> TrainConfig:
    return replace(base, **{"kd.alpha": alpha, "kd.temperature": temperature, "seed": seed})


def run_group(base: TrainConfig, configs: list[TrainConfig], slots: int, data_seed: int,
              prune: dict[int, int] | None = None, queue: list[TrainConfig] | None = None):
    """Train `configs` (then `queue`) in a group; `prune[i]` = epoch after which member i stops.
    Returns {member index: (result, error, history)}."""
    prune = prune or {}
    pending = [(i, c) for i, c in enumerate(configs + (queue or []))]
    ends: dict[int, tuple] = {}

    def next_member():
        if not pending:
            return None
        i, config = pending.pop(0)

        def report(epoch, metrics, i=i):
            if prune.get(i) == epoch:
                raise RuntimeError(f"pruned after epoch {epoch}")

        return Member(config, report=report, tag=i)

    group = FusedGroup(base, slots, data_seed, teacher=teacher.prepare(base))
    group.run(next_member, lambda m, result, error: ends.__setitem__(m.tag, (result, error, m.history)))
    return ends


def flat_state(result) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A trained model's floating state (weights and BatchNorm statistics) as one float64
    vector, and its integer buffers (BatchNorm's batch counters) by name."""
    state = result.model.state_dict()
    floats = torch.cat([t.detach().double().flatten() for t in state.values() if t.is_floating_point()])
    return floats, {n: t for n, t in state.items() if not t.is_floating_point()}


def fused_and_solo(base: TrainConfig, configs: list[TrainConfig], dtype: torch.dtype) -> list[tuple]:
    """Per member: (fused result, solo result), both trained in `dtype` from the group's data
    order (member 0's seed). The teacher is trained once, in float32, before either; in
    float64 it is loaded from that file, upcast exactly."""
    teacher.prepare(base)
    torch.set_default_dtype(dtype)  # restored after the test (conftest's torch_global_state)
    teacher._LOADED.clear()
    data_seed = configs[0].seed
    ends = run_group(base, configs, slots=len(configs), data_seed=data_seed)
    out = []
    for i, config in enumerate(configs):
        teacher._LOADED.clear()
        solo = train(config, data_seed=data_seed, teacher=teacher.prepare(config))
        fused, error, _ = ends[i]
        assert error is None and fused.epochs_run == solo.epochs_run
        assert next(fused.model.parameters()).dtype == next(solo.model.parameters()).dtype == dtype
        out.append((fused, solo))
    torch.set_default_dtype(torch.float32)
    teacher._LOADED.clear()
    return out


def test_one_fused_step_equals_the_solo_step_in_float64(tiny_npz: Path, tmp_path: Path):
    """16 images in batches of 16: one optimiser step per member. In float64 the grouped and
    the plain convolutions round alike to ~1e-16, so any real difference (data order, schedule,
    loss, update rule, BatchNorm statistics) stands far above 1e-10."""
    base = student(tiny_npz, tmp_path, images=16)
    configs = [member_config(base, *m) for m in MEMBERS]
    for i, (fused, solo) in enumerate(fused_and_solo(base, configs, torch.float64)):
        (f, f_ints), (s, s_ints) = flat_state(fused), flat_state(solo)
        assert all(torch.equal(f_ints[n], s_ints[n]) for n in s_ints), i
        assert (f - s).abs().max().item() <= 1e-10 * max(1.0, s.abs().max().item()), i
        assert fused.history[0]["train_loss"] == pytest.approx(solo.history[0]["train_loss"], rel=1e-10)
        assert fused.final_val_acc == solo.final_val_acc


@pytest.mark.slow
def test_members_that_start_together_equal_solo_runs_up_to_float32_rounding(tiny_npz: Path, tmp_path: Path):
    """Three members (strong KD too: T^2 = 100 scales its soft gradients) over 20 steps.

    In float64 fused and solo runs agree to ~1e-15 after all 20 steps: the same function, the
    same data, the same updates. In float32 they round differently (batched and plain kernels)
    and rounding grows over 20 steps with BatchNorm on 16-image batches, so a fixed tolerance
    either passes real differences or fails on rounding. The yardstick is how far float32
    rounding moves each run from its own float64 run: fused and solo, both float32, may differ by
    at most 3 times the larger of the two drifts (independent roundings of equal size give about
    1.4 times). Both drifts are needed: how far rounding carries a run depends on where it lands
    (one member drifted 1.5e-5 solo and 6.9e-3 fused, and 6.9e-3 solo on convolutions that
    rounded otherwise), and a real difference cannot hide in the larger drift, since the float64
    runs it is measured from are equal."""
    base = student(tiny_npz, tmp_path)
    configs = [member_config(base, *m) for m in MEMBERS]
    in32 = fused_and_solo(base, configs, torch.float32)
    in64 = fused_and_solo(base, configs, torch.float64)
    for i, ((fused, solo), (fused64, exact)) in enumerate(zip(in32, in64, strict=True)):
        assert fused.history[0]["epoch"] == solo.history[0]["epoch"] == 1 and len(fused.history) == 1
        (f, f_ints), (s, s_ints), (e, _), (f64, _) = (flat_state(fused), flat_state(solo), flat_state(exact),
                                                      flat_state(fused64))
        assert all(torch.equal(f_ints[n], s_ints[n]) for n in s_ints), i
        assert (f64 - e).abs().max().item() <= 1e-10 * max(1.0, e.abs().max().item()), i
        rounding = max((s - e).norm().item(), (f - f64).norm().item())
        assert 0 < rounding < 1e-2 * s.norm().item(), i  # float32 rounding, not another run
        assert (f - s).norm().item() <= 3 * rounding, (i, (f - s).norm().item(), rounding)


@pytest.mark.slow
def test_a_pruned_member_is_replaced_without_disturbing_the_others(tiny_npz: Path, tmp_path: Path):
    base = student(tiny_npz, tmp_path, epochs=2, images=160)  # 10 steps per epoch
    configs = [member_config(base, *m) for m in MEMBERS[:2]]
    newcomer = member_config(base, 0.3, 2.0, 21)
    plain = run_group(base, configs, slots=2, data_seed=11)
    replaced = run_group(base, configs, slots=2, data_seed=11, prune={1: 1}, queue=[newcomer])
    assert isinstance(replaced[1][1], RuntimeError) and len(replaced[1][2]) == 1  # pruned after epoch 1
    kept_plain, kept_replaced = plain[0][0].model.state_dict(), replaced[0][0].model.state_dict()
    for name, want in kept_plain.items():
        assert torch.equal(kept_replaced[name], want), name
    assert plain[0][2] == [{**h, "seconds": p["seconds"], "images_per_s": p["images_per_s"]}
                           for h, p in zip(replaced[0][2], plain[0][2], strict=True)]
    # The newcomer started from its own initialisation at step 20 and ran its two epochs.
    result, error, history = replaced[2]
    assert error is None and [h["epoch"] for h in history] == [1, 2]
    assert result.config.seed == 21 and result.config.kd.alpha == 0.3


def test_only_alpha_temperature_and_seed_may_differ(tiny_npz: Path, tmp_path: Path):
    base = student(tiny_npz, tmp_path)
    assert fusion_key(member_config(base, 0.1, 3.0, 5)) == fusion_key(base)
    assert fusion_key(replace(base, **{"optim.lr": 0.1})) != fusion_key(base)
    group = FusedGroup(base, 2, 0, teacher=teacher.prepare(base))
    with pytest.raises(ValueError, match="cannot join"):
        group.add(Member(replace(base, batch_size=32)))


def test_label_smoothing_reaches_the_cross_entropy_term_of_every_member(tiny_npz: Path, tmp_path: Path):
    # Two members alike but for alpha (0 and a negligible 1e-6): under one smoothed CE term
    # their losses agree; a member that dropped the smoothing would differ by ~0.3.
    base = replace(student(tiny_npz, tmp_path, images=96), **{"optim.label_smoothing": 0.3})
    configs = [member_config(base, 0.0, 1.0, 11), member_config(base, 1e-6, 1.0, 11)]
    ends = run_group(base, configs, slots=2, data_seed=11)
    losses = [ends[i][2][0]["train_loss"] for i in (0, 1)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
