"""The population trainer: equivalence with the sequential trainer, masking, wiring, crashes."""

import math
import os
import signal
import sqlite3
import subprocess
import sys
import time

import optuna
import pytest
import torch

from study import device as dev
from study import models
from study.config import BooleanCandidate
from study.data import boolean_function
from study.errors import ConfigError
from study.population import Member, _Group, adam_unit_step, plan_groups, train_population
from study.runner import run_study
from study.trainer import train
from tests.conftest import TINY

TARGET = 1e-3


def member(candidate, seed, target=None):
    """A population member: the candidate's profile and its training from `seed`."""
    return Member(candidate.hidden_layer_profile, candidate.train_config(seed, target))


def network(candidate, fn, seed):
    return models.build_boolean_net(
        candidate.hidden_layer_profile, fn.input_bits, fn.output_bits, seed
    )


def curves(result):
    return [m.eval_loss for m in result.history], [m.train_loss for m in result.history]


ENGINES = ["native", "torch"]


@pytest.mark.parametrize(
    ("device_name", "engine"),
    [("cpu", "native"), ("cpu", "torch"), pytest.param("cuda", "torch", marks=pytest.mark.cuda)],
)
def test_member_follows_the_sequential_trainer(device_name, engine):
    if device_name == "cuda" and not dev.cuda_available():
        pytest.skip("no CUDA device")
    fn = boolean_function(8, 0, device=dev.resolve_device(device_name))
    narrow = BooleanCandidate((12,), 1e-2, 8, 12)
    wide = BooleanCandidate((40,), 3e-3, 8, 9)
    sequential = [
        train(network(c, fn, seed), fn.task(), c.train_config(seed, TARGET))
        for c, seed in [(narrow, 5), (wide, 6)]
    ]
    population = train_population(
        [member(narrow, 5, TARGET), member(wide, 6, TARGET)], fn, engine=engine
    )
    for seq, pop in zip(sequential, population, strict=True):
        assert pop.epochs_run == seq.epochs_run
        seq_eval, seq_train = curves(seq)
        pop_eval, pop_train = curves(pop)
        # same initial weights and batch order: same curves up to float rounding (CPU; on
        # CUDA the sequential path shuffles with a device generator, so only the start agrees)
        tolerance = 1e-5 if device_name == "cpu" else None
        if tolerance:
            assert pop_eval == pytest.approx(seq_eval, rel=tolerance)
            assert pop_train == pytest.approx(seq_train, rel=tolerance)
        assert pop.parameters == seq.parameters


def test_padded_member_equals_the_narrow_network_alone():
    fn = boolean_function(8, 1)
    narrow = BooleanCandidate((7, 5), 1e-2, 16, 10)
    wide = BooleanCandidate((30, 20), 5e-3, 16, 10)
    alone = train_population([member(narrow, 3)], fn, compact=False, engine="torch")[0]
    padded = train_population(
        [member(narrow, 3), member(wide, 4)], fn, compact=False, engine="torch"
    )
    assert plan_groups([member(narrow, 3), member(wide, 4)], fn) == [[0, 1]]  # one group
    assert curves(padded[0])[0] == pytest.approx(curves(alone)[0], rel=1e-6, abs=1e-9)


def test_padded_units_have_no_effect_on_outputs_or_gradients():
    fn = boolean_function(4, 2)
    members = [
        member(BooleanCandidate((3, 2), 1e-2, 4, 5), 0),
        member(BooleanCandidate((9, 5), 1e-2, 4, 5), 1),
    ]
    group = _Group(members, [0, 1], fn)
    x, y = fn.inputs[:6], fn.targets[:6]
    loss, grads = group.loss_and_gradients(x.expand(2, 6, 4), y.expand(2, 6, 4))
    (w1, b1), (w2, b2), (w3, _) = group.layers()
    g_w1, g_b1, g_w2, g_b2, g_w3, g_b3 = grads
    # member 0 has 3 and 2 real hidden units; the rest of its rows and columns is padding
    for t in (w1[0, :, 3:], b1[0, :, 3:], w2[0, 3:, :], w2[0, :, 2:], b2[0, :, 2:], w3[0, 2:, :]):
        assert torch.count_nonzero(t) == 0
    for t in (
        g_w1[0, :, 3:],
        g_b1[0, 3:],
        g_w2[0, 3:, :],
        g_w2[0, :, 2:],
        g_b2[0, 2:],
        g_w3[0, 2:, :],
    ):
        assert torch.count_nonzero(t) == 0
    # ...and the real part equals autograd on the narrow network alone
    net = models.build_boolean_net(members[0].hidden_layer_profile, 4, 4, 0)
    reference = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
    reference.backward()
    linears = [m for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert loss[0].item() == pytest.approx(reference.item(), rel=1e-6)
    assert torch.allclose(group.forward(x)[0], net(x), atol=1e-6)
    for (g_w, g_b), linear in zip(
        [(g_w1, g_b1), (g_w2, g_b2), (g_w3, g_b3)], linears, strict=True
    ):
        fan_out, fan_in = linear.weight.shape
        assert torch.allclose(g_w[0, :fan_in, :fan_out], linear.weight.grad.T, atol=1e-7)
        assert torch.allclose(g_b[0, :fan_out], linear.bias.grad, atol=1e-7)


@pytest.mark.parametrize("engine", ENGINES)
def test_members_stop_at_the_target_and_stopped_members_are_frozen(engine):
    fn = boolean_function(3, 5, 3)
    fast = BooleanCandidate((16,), 5e-2, 8, 3000)
    slow = BooleanCandidate((16,), 2e-3, 8, 50)
    results = train_population(
        [member(fast, 0, TARGET), member(slow, 1, TARGET)], fn, engine=engine
    )
    assert results[0].reached_target and results[0].final.eval_loss <= 1e-3
    assert results[0].final.eval_accuracy == 1.0
    assert not results[1].reached_target and results[1].epochs_run == 50
    seq = train(network(fast, fn, 0), fn.task(), fast.train_config(0, TARGET))
    assert results[0].epochs_run == seq.epochs_run


@pytest.mark.parametrize("engine", ENGINES)
def test_on_epoch_and_after_epoch_stop_members(engine):
    fn = boolean_function(3, 5, 3)
    c = BooleanCandidate((8,), 1e-2, 8, 100)
    members = [member(c, s) for s in range(4)]

    def on_epoch(i, metrics):
        return i == 0 and metrics.epoch == 3

    def after_epoch(finished):
        return {1} if 0 in finished else set()

    results = train_population(members, fn, on_epoch, after_epoch, engine=engine)
    assert results[0].epochs_run == 3 and results[0].stopped_by_callback
    assert results[1].epochs_run == 3 and results[1].stopped_by_callback
    assert results[2].epochs_run == results[3].epochs_run == 100


def test_population_study_stores_trials_like_the_sequential_one(tmp_path):
    storage = f"sqlite:///{tmp_path / 'pop.db'}"
    study = run_study(
        "boolean-shallow",
        trials=6,
        storage=storage,
        sampler_seed=0,
        device="cpu",
        settings=TINY,
        quiet=True,
        population=3,
    )
    assert len(study.trials) == 6
    keys = {
        "neurons",
        "parameters",
        "best_full_table_loss",
        "best_running_loss",
        "bit_accuracy",
        "success_share",
        "seconds",
        "device",
        "learns_f",
    }
    for trial in study.trials:
        assert trial.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
        assert keys <= set(trial.user_attrs)
        assert trial.user_attrs["population_size"] >= 2
        assert (trial.constraints["learns_f"] <= 0) == trial.user_attrs["learns_f"]
        assert trial.intermediate_values  # the first seed's curve
    resumed = run_study(
        "boolean-shallow",
        trials=8,
        storage=storage,
        device="cpu",
        settings=TINY,
        quiet=True,
        population=3,
    )
    assert len(resumed.trials) == 8


@pytest.mark.slow
def test_killed_population_leaves_no_trial_running(tmp_path):
    db = tmp_path / "crash.db"
    storage = f"sqlite:///{db}"
    env = {**os.environ, "STUDY_HEARTBEAT_SECONDS": "1"}
    # a 5-bit function at a low learning rate without pruning: each population trains for a
    # few seconds, long enough to be killed mid-training
    args = [
        sys.executable,
        "-m",
        "study.cli",
        "run",
        "boolean-shallow",
        "--trials",
        "4",
        "--population",
        "4",
        "--storage",
        storage,
        "--no-prune",
        "--quiet",
        "--input-bits",
        "5",
        "--output-bits",
        "2",
        "--max-width",
        "16",
        "--max-epochs",
        "2000",
        "--seeds",
        "2",
        "--batch-sizes",
        "8",
        "--device",
        "cpu",
        "--min-learning-rate",
        "0.002",
        "--max-learning-rate",
        "0.0021",
    ]
    worker = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    running = 0
    while time.monotonic() < deadline and running < 4:
        time.sleep(0.2)
        if db.exists():
            with sqlite3.connect(db) as con:
                try:
                    # running with all four parameters sampled: the population is training
                    running = (
                        con.execute(
                            "select count(*) from trials t join trial_params p "
                            "on p.trial_id = t.trial_id where t.state = 'RUNNING'"
                        ).fetchone()[0]
                        // 4
                    )
                except sqlite3.OperationalError:  # tables not created yet
                    running = 0
    assert running == 4, "the population never started"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    killed = {
        t.number: t.params
        for t in optuna.load_study(study_name="boolean-shallow", storage=storage).trials
    }
    time.sleep(3)  # longer than the grace period (2 heartbeats)
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="boolean-shallow", storage=storage)
    states = [t.state for t in study.trials]
    assert optuna.trial.TrialState.RUNNING not in states
    failed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert sorted(t.number for t in failed) == sorted(killed)
    finished = [
        t
        for t in study.trials
        if t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    ]
    assert len(finished) == 4
    # every killed trial's parameters were re-enqueued and trained
    retried = {
        optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in finished
    }
    assert retried == set(killed)
    for t in finished:
        original = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t)
        assert t.params == killed[original]


def nan_for_seed(bad_seed):
    """A build_boolean_net whose network for `bad_seed` starts with NaN weights."""
    original = models.build_boolean_net

    def build(profile, input_bits, output_bits, seed):
        net = original(profile, input_bits, output_bits, seed)
        if seed == bad_seed:
            with torch.no_grad():
                next(net.parameters()).fill_(float("nan"))
        return net

    return build


@pytest.mark.parametrize("engine", ENGINES)
def test_a_diverging_member_stops_alone(monkeypatch, engine):
    monkeypatch.setattr("study.models.build_boolean_net", nan_for_seed(1))
    fn = boolean_function(3, 5, 3)
    c = BooleanCandidate((8,), 1e-2, 8, 20)
    results = train_population([member(c, 0), member(c, 1), member(c, 2)], fn, engine=engine)
    assert results[1].divergence is not None and results[1].epochs_run == 0
    assert results[0].epochs_run == results[2].epochs_run == 20
    assert all(torch.isfinite(torch.tensor(curves(r)[0])).all() for r in (results[0], results[2]))


@pytest.mark.parametrize("population", [None, 2])
def test_nan_trial_fails_with_its_reason_and_the_study_goes_on(tmp_path, monkeypatch, population):
    # seeds of trial t are 2t and 2t+1 (2 seeds per trial): trial 1 diverges
    monkeypatch.setattr("study.models.build_boolean_net", nan_for_seed(2))
    study = run_study(
        "boolean-shallow",
        trials=3,
        storage=f"sqlite:///{tmp_path / 'nan.db'}",
        sampler_seed=0,
        device="cpu",
        settings=TINY,
        quiet=True,
        population=population,
    )
    states = {t.number: t.state for t in study.trials}
    assert states[1] == optuna.trial.TrialState.FAIL
    failed = study.trials[1]
    reason = failed.user_attrs.get("fail_reason") or failed.system_attrs.get("fail_reason", "")
    assert "non-finite" in reason
    finished = [s for s in states.values() if s != optuna.trial.TrialState.FAIL]
    assert len(finished) == 3  # the study went on to its total


def test_adam_unit_step_is_torch_adam_with_a_rate_per_member():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 7, generator=g)
    rates = torch.tensor([1e-2, 3e-3, 5e-2])
    grads = [torch.randn(3, 7, generator=g) for _ in range(6)]
    flat, scratch = start.clone(), torch.zeros(3, 7)
    exp_avg, exp_avg_sq, step_count = torch.zeros(3, 7), torch.zeros(3, 7), torch.zeros(())
    for grad in grads:
        step_count += 1
        scratch.zero_()
        adam_unit_step(scratch, grad, exp_avg, exp_avg_sq, step_count)
        flat.addcmul_(scratch, rates[:, None])
    for row, lr in enumerate(rates.tolist()):
        p = start[row].clone().requires_grad_()
        optimizer = torch.optim.Adam([p], lr=lr)  # the sequential trainer's Adam
        for grad in grads:
            p.grad = grad[row].clone()
            optimizer.step()
        assert torch.allclose(flat[row], p.detach(), rtol=1e-6, atol=1e-7), row


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"optimizer": "sgd"}, "optimizer 'sgd'"),
        ({"weight_decay": 1e-4}, "weight_decay"),
        ({"optimizer": "adamw", "weight_decay": 1e-2}, "optimizer 'adamw'"),
    ],
)
def test_population_refuses_a_training_it_does_not_implement(change, named):
    config = BooleanCandidate((4,), 1e-2, 8, 10).train_config(0, None).replace(**change)
    with pytest.raises(ConfigError, match=rf"^population: .*{named}"):
        Member((4,), config)


def stop_plan(results_seen):
    """Callbacks that stop members at different epochs: member 1 at epoch 7 (on_epoch), and
    member 3 once member 0 has ended (after_epoch)."""

    def on_epoch(i, metrics):
        results_seen.append((i, metrics.epoch))
        return i == 1 and metrics.epoch == 7

    def after_epoch(ended):
        return {3} if 0 in ended else set()

    return on_epoch, after_epoch


@pytest.mark.parametrize("sync_every", [3, 16])
def test_reading_metrics_back_every_few_epochs_changes_no_result(sync_every):
    """The device-side stop checks (target, budget) and the callbacks applied at each readback
    give the same results as looking every epoch: with padding and members that stop at
    different epochs (target, budget, on_epoch, after_epoch). (Compaction is left out: a
    batched product over fewer members may round differently, see the padding test.)"""
    fn = boolean_function(3, 5, 3)
    candidates = [
        BooleanCandidate((16,), 5e-2, 8, 3000),  # reaches the target
        BooleanCandidate((16,), 2e-3, 8, 40),  # stopped by on_epoch at 7
        BooleanCandidate((9,), 3e-3, 8, 25),  # runs to its budget (padded to 16)
        BooleanCandidate((12,), 1e-4, 8, 3000),  # stopped once member 0 has ended
        BooleanCandidate((5,), 1e-3, 8, 33),
    ]
    members = [member(c, seed, TARGET) for seed, c in enumerate(candidates)]
    runs = {}
    for every in (1, sync_every):
        seen = []
        on_epoch, after_epoch = stop_plan(seen)
        results = train_population(
            members, fn, on_epoch, after_epoch, compact=False, engine="torch", sync_every=every
        )
        runs[every] = (results, seen)
    (looked, seen_1), (chunked, seen_n) = runs[1], runs[sync_every]
    assert seen_1 == seen_n  # the callbacks saw exactly the same epochs
    assert looked[0].reached_target and looked[1].stopped_by_callback
    assert looked[1].epochs_run == 7 and looked[2].epochs_run == 25
    assert looked[3].stopped_by_callback
    for a, b in zip(looked, chunked, strict=True):
        assert (a.epochs_run, a.reached_target, a.stopped_by_callback) == (
            b.epochs_run, b.reached_target, b.stopped_by_callback)  # fmt: skip
        assert curves(a) == curves(b)  # the same operations on the same tensors


@pytest.mark.cuda
@pytest.mark.skipif(not dev.cuda_available(), reason="no CUDA device")
def test_cuda_graph_epochs_equal_eager_epochs_on_cuda():
    """On CUDA the group epoch is a captured graph read back every 16 epochs; it must equal
    the same engine run one epoch at a time."""
    fn = boolean_function(8, 0, device=dev.resolve_device("cuda"))
    members = [member(BooleanCandidate((w,), 1e-2, 8, 30), s, TARGET)
               for s, w in enumerate((12, 40, 64, 33))]  # fmt: skip
    graphed = train_population(members, fn, engine="torch")
    one_by_one = train_population(members, fn, engine="torch", sync_every=1)
    for a, b in zip(graphed, one_by_one, strict=True):
        assert a.epochs_run == b.epochs_run
        assert curves(a)[0] == pytest.approx(curves(b)[0], rel=1e-4)


def test_without_a_compiler_the_population_falls_back_to_torch_in_one_line(
    tmp_path, monkeypatch, capsys
):
    from study import native

    monkeypatch.setenv("STUDY_CACHE_DIR", str(tmp_path / "cache"))  # nothing built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    native.load.cache_clear()
    try:
        fn = boolean_function(3, 5, 3)
        c = BooleanCandidate((8,), 1e-2, 8, 5)
        results = train_population([member(c, 0), member(c, 1)], fn)  # auto: falls back
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "could not be built" in lines[0], lines
        assert [r.epochs_run for r in results] == [5, 5]
        torch_engine = train_population([member(c, 0), member(c, 1)], fn, engine="torch")
        assert curves(results[0]) == curves(torch_engine[0])  # it is the torch engine
        with pytest.raises(ConfigError, match="engine: the native kernel needs"):
            train_population([member(c, 0)], fn, engine="native")
    finally:
        native.load.cache_clear()


def test_the_native_kernel_trains_many_members_on_two_threads_as_on_one():
    fn = boolean_function(8, 0)
    members = [member(BooleanCandidate((w, w // 2), 1e-2, b, 6), s)
               for s, (w, b) in enumerate([(30, 8), (12, 16), (50, 4), (7, 256)])]  # fmt: skip
    one = train_population(members, fn, engine="native", threads=1)
    two = train_population(members, fn, engine="native", threads=2)
    for a, b in zip(one, two, strict=True):
        assert curves(a) == curves(b)  # members share no arithmetic: threads change nothing
    # and each follows the sequential trainer from the same weights and batch order
    for m, result in zip(members, one, strict=True):
        c = BooleanCandidate(m.hidden_layer_profile, 1e-2, m.config.batch_size, 6)
        seq = train(network(c, fn, m.config.seed), fn.task(), m.config)
        assert curves(result)[0] == pytest.approx(curves(seq)[0], rel=1e-5)


SCHEDULES = [
    {"lr_schedule": "cosine"},
    {"lr_schedule": "onecycle", "warmup_fraction": 0.1, "lr_floor": 0.2},
    {"lr_schedule": "constant", "warmup_fraction": 0.25},
    {"lr_schedule": "cosine", "warmup_fraction": 0.05, "lr_floor": 0.3},
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize("engine", ENGINES)
def test_every_schedule_follows_the_sequential_trainer(engine, schedule):
    """The trainer's per-step schedules (LambdaLR over all steps of the budget: warm-up, then
    constant, cosine or onecycle decay to a floor), in both engines, from the same weights and
    batch order."""
    fn = boolean_function(8, 0)
    candidates = [BooleanCandidate((20,), 2e-2, 16, 9), BooleanCandidate((33,), 1e-2, 64, 7)]
    members = [
        Member(c.hidden_layer_profile, c.train_config(s, None).replace(**schedule))
        for s, c in enumerate(candidates)
    ]
    population = train_population(members, fn, engine=engine)
    for s, (c, m, pop) in enumerate(zip(candidates, members, population, strict=True)):
        seq = train(network(c, fn, s), fn.task(), m.config)
        end = schedule.get("lr_floor", 0.0) if schedule["lr_schedule"] != "constant" else 1.0
        # the rate the last step used: the floor of a decayed schedule (within one step's decay)
        assert seq.final.learning_rate == pytest.approx(end * m.config.learning_rate, abs=2e-3)
        assert pop.epochs_run == seq.epochs_run
        assert curves(pop)[0] == pytest.approx(curves(seq)[0], rel=1e-5)
        assert curves(pop)[1] == pytest.approx(curves(seq)[1], rel=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(map(str, s.values())))
def test_every_schedule_runs_in_the_cuda_graph(schedule):
    """On CUDA the torch engine captures an epoch as a graph: every schedule's factor is
    computed on the device inside it (no host sync), and the members start as on the CPU."""
    if not dev.cuda_available():
        pytest.skip("no CUDA device")
    c = BooleanCandidate((20,), 2e-2, 16, 9)
    members = [Member(c.hidden_layer_profile, c.train_config(s, None).replace(**schedule))
               for s in range(3)]  # fmt: skip
    cpu = train_population(members, boolean_function(8, 0), engine="torch")
    cuda = train_population(
        members, boolean_function(8, 0, device=dev.resolve_device("cuda")), engine="torch"
    )
    for a, b in zip(cpu, cuda, strict=True):
        assert b.epochs_run == a.epochs_run == 9
        assert all(math.isfinite(v) for v in curves(b)[0])
        assert curves(b)[0][0] == pytest.approx(curves(a)[0][0], rel=1e-3)


def test_a_boolean_candidate_carries_its_warm_up_and_floor_to_the_trainer():
    c = BooleanCandidate((20,), 2e-2, 16, 9, "onecycle", 0.1, 0.2)
    config = c.train_config(3, 1e-3)
    assert (config.lr_schedule, config.warmup_fraction, config.lr_floor) == ("onecycle", 0.1, 0.2)
    assert "onecycle warm-up 0.10 floor 0.20" in c.describe()


def test_without_vector_math_the_kernel_is_built_with_scalar_calls(tmp_path, monkeypatch, capsys):
    """A C library without vector exp/log (not glibc): the kernel still builds, silently, and
    trains as the sequential trainer does."""
    from study import native

    monkeypatch.setenv("STUDY_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native, "VECTOR_MATH", ["-DSTUDY_VECTOR_MATH", "-lno-such-library"])
    native.load.cache_clear()
    try:
        assert native.load() is not None
        assert capsys.readouterr().err == ""
        fn = boolean_function(8, 0)
        c = BooleanCandidate((20,), 1e-2, 8, 6)
        (result,) = train_population([member(c, 3)], fn, engine="native")
        seq = train(network(c, fn, 3), fn.task(), member(c, 3).config)
        assert curves(result)[0] == pytest.approx(curves(seq)[0], rel=1e-5)
    finally:
        native.load.cache_clear()


# ----------------------------------------------------------------------------------------------
# the native kernel's boundary: one argument table, checked before the first call


def native_buffers(members=3, rows=8, inputs=3, outputs=3, width=5):
    """Buffers for `members` networks of one hidden layer, as `_NativeState` lays them out."""
    from study import native

    size = (inputs + 1) * width + (width + 1) * outputs
    dims = torch.zeros(members, native.MAX_DIMS, dtype=torch.int32)
    dims[:, :3] = torch.tensor([inputs, width, outputs], dtype=torch.int32)
    return {
        "active": torch.ones(members, dtype=torch.uint8),
        "ndims": torch.full((members,), 3, dtype=torch.int32),
        "dims": dims,
        "offsets": torch.arange(members, dtype=torch.int64) * size,
        "params": torch.zeros(members * size),
        "exp_avg": torch.zeros(members * size),
        "exp_avg_sq": torch.zeros(members * size),
        "steps": torch.zeros(members, dtype=torch.int64),
        "lr": torch.full((members,), 1e-2),
        "schedule": torch.zeros(members, dtype=torch.uint8),
        "warmup": torch.zeros(members, dtype=torch.int64),
        "floor": torch.zeros(members),
        "total_steps": torch.ones(members, dtype=torch.int64),
        "batch": torch.full((members,), 4, dtype=torch.int32),
        "x": torch.zeros(rows, inputs),
        "y": torch.zeros(rows, outputs),
        "orders": torch.arange(rows).repeat(members, 1),
        "train_loss": torch.zeros(members),
        "eval_loss": torch.zeros(members),
        "eval_acc": torch.zeros(members),
    }


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (lambda b: b.update(lr=b["lr"].double()), "lr: dtype torch.float64"),
        (
            lambda b: b.update(
                {k: b[k][:-1].clone() for k in ("params", "exp_avg", "exp_avg_sq")}
            ),
            "offsets: a member's parameters outside",
        ),
        (lambda b: b.update(orders=b["orders"].t().contiguous().t()), "orders: not contiguous"),
        (lambda b: b.update(active=b["active"][:2].clone()), "ndims: shape (3,), not (2,)"),
        (lambda b: b["dims"].__setitem__((1, 1), 0), "dims: a layer of width 0"),
        (lambda b: b["dims"].__setitem__((0, 2), 4), "first and last sizes must match"),
        (lambda b: b["ndims"].__setitem__(0, 40), "ndims: every member needs 2 to 34"),
        (lambda b: b["batch"].__setitem__(2, 0), "batch: every batch size"),
        (lambda b: b["schedule"].__setitem__(1, 3), "schedule: must be 0, 1 or 2"),
        (lambda b: b["warmup"].__setitem__(0, 2), "warmup: from 0 to the member's total"),
        (lambda b: b["floor"].__setitem__(2, 1.0), "floor: must be in"),
        (lambda b: b.pop("eval_acc"), "buffers"),
    ],
)
def test_the_kernel_refuses_buffers_it_would_read_or_write_outside(change, said):
    from study import native

    kernel = native.load()
    assert kernel is not None
    buffers = native_buffers()
    kernel.bind(**buffers).epoch(threads=1)  # as made: accepted, and it trains
    change(buffers)
    with pytest.raises(ValueError, match=said.replace("(", r"\(").replace(")", r"\)")):
        kernel.bind(**buffers)


def test_a_bound_kernel_call_checks_threads_and_replaced_buffers():
    from study import native

    buffers = native_buffers()
    call = native.load().bind(**buffers)
    assert call.epoch(threads=2) == 0 and bool((buffers["train_loss"] > 0).all())
    with pytest.raises(ConfigError, match="threads"):
        call.epoch(threads=0)
    buffers["lr"].set_(torch.full((3,), 1e-2))  # a new storage behind the same tensor
    with pytest.raises(RuntimeError, match="replaced"):
        call.epoch(threads=1)


def test_the_signature_is_made_from_the_table():
    import ctypes

    from study import native

    kernel = native.load()
    assert len(kernel.function.argtypes) == len(native.ARGUMENTS) == 23
    scalars = [a.name for a in native.ARGUMENTS if a.dtype is None]
    assert scalars == ["members", "rows", "threads"]
    assert kernel.function.argtypes.count(ctypes.c_int32) == 3


def test_the_kernel_builds_with_warnings_as_errors_into_the_chosen_cache(tmp_path, monkeypatch):
    """The tests build the kernel with -Wall -Wextra -Werror (conftest), into a cache of their
    own: $STUDY_CACHE_DIR first, else $XDG_CACHE_HOME/study, else ~/.cache/study."""
    from study import native

    assert os.environ["STUDY_NATIVE_STRICT"] == "1" and "-Werror" in native._flags()
    monkeypatch.delenv("STUDY_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.cache_dir() == tmp_path / "xdg" / "study"
    native.load.cache_clear()
    try:
        assert native.load() is not None  # built strictly, without one warning
        assert len(list((tmp_path / "xdg" / "study").glob("population_kernel-*.so"))) == 1
    finally:
        native.load.cache_clear()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert native.cache_dir() == native.Path.home() / ".cache" / "study"


def test_every_trial_records_the_engine_that_trained_it(tmp_path):
    storage = f"sqlite:///{tmp_path / 'e.db'}"
    one = run_study("boolean-shallow", trials=2, storage=storage, device="cpu", settings=TINY,
                    quiet=True, study_name="one")  # fmt: skip
    many = run_study("boolean-shallow", trials=4, storage=storage, device="cpu", settings=TINY,
                     quiet=True, study_name="many", population=4, threads=2)  # fmt: skip
    assert {(t.user_attrs["engine"], t.user_attrs["threads"]) for t in many.trials} == {
        ("native", 2)
    }
    assert {t.user_attrs["engine"] for t in one.trials} == {"sequential"}
    from study.report import write_report

    summary = (write_report("many", storage, tmp_path / "r") / "summary.md").read_text()
    assert "trained by: native kernel on 2 threads (4 trials)" in summary
