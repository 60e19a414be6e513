"""A client's state between rounds, without a simulation: the file store, restoring AdamW bitwise, the age
rule, and the clients' learning-rate schedule."""

from __future__ import annotations

import math

import torch
from conftest import tiny_gpt

from fedgpt.config import Config, TrainConfig
from fedgpt.data import Batches
from fedgpt.fed.client import restore
from fedgpt.fed.client_state import ClientStateStore
from fedgpt.model import GPT
from fedgpt.train import Schedule, Trainer


def trainer(seed: int = 0) -> Trainer:
    return Trainer(
        tiny_gpt(seed=seed),
        TrainConfig(batch_size=4, max_steps=100, warmup_steps=0),
        torch.device("cpu"),
        log=None,
    )


def keeping(max_age: int) -> Config:
    """A run whose clients keep their AdamW state for up to max_age rounds (no quantized uplink)."""
    cfg = Config()
    cfg.fed.client_optimizer, cfg.fed.client_state_max_age = "keep", max_age
    return cfg


def restore_optimizer(t: Trainer, store, rnd: int, max_age: int) -> tuple[int, int]:
    """(age of the state restored, 1 if a stale one was dropped): what fedgpt.fed.client.restore says."""
    age, stale, saved = restore(t, store, rnd, keeping(max_age))
    assert saved.get("residual") is None
    return age, stale


def batches(seed: int) -> Batches:
    tokens = torch.randint(65, (2000,), generator=torch.Generator().manual_seed(seed))
    return Batches(tokens.numpy(), 16, 4, seed=seed)


def test_store_finds_the_newest_state_before_a_round_and_prunes_what_no_resume_needs(tmp_path):
    store = ClientStateStore(tmp_path, "run-a", 3)
    for rnd in (1, 2, 4, 5):
        store.save(rnd, {"round": torch.tensor(rnd)})
    assert store.load(before_round=1) == (None, None)
    state, saved = store.load(before_round=4)
    assert saved == 2 and int(state["round"]) == 2  # a client that skipped round 3 gets round 2's state
    assert store.load(before_round=9)[1] == 5
    # the server's newest checkpoint is round 4: a resume trains round 5 from round 4's state, so 4 stays
    store.prune(keep_from_round=4)
    assert store.rounds() == [4, 5]
    store.prune(keep_from_round=3)  # nothing at or before round 3 is left: nothing more goes
    assert store.rounds() == [4, 5]
    # another run, or another partition, never sees these files
    assert ClientStateStore(tmp_path, "run-b", 3).load(before_round=9) == (None, None)
    assert ClientStateStore(tmp_path, "run-a", 2).load(before_round=9) == (None, None)


def test_a_restored_optimizer_is_bitwise_the_one_saved_and_trains_on_identically(tmp_path):
    first = trainer()
    first.train_steps(batches(1), 3)
    store = ClientStateStore(tmp_path, "run", 0)
    store.save(1, {"optimizer": first.optimizer.state_dict()})

    second = trainer(seed=5)  # another process: other weights, no moments
    second.raw_model.load_state_dict(first.raw_model.state_dict())
    assert restore_optimizer(second, store, rnd=2, max_age=1) == (1, 0)
    saved, restored = first.optimizer.state_dict(), second.optimizer.state_dict()
    assert saved["state"].keys() == restored["state"].keys()
    for i, s in saved["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s[name], restored["state"][i][name]), (i, name)
    # the schedule's position comes with the round's work order, not with the state
    first.train_steps(batches(2), 2, at_step=3)
    second.train_steps(batches(2), 2, at_step=3)
    for a, b in zip(first.raw_model.parameters(), second.raw_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_state_older_than_max_age_is_dropped_and_said_so(tmp_path):
    t = trainer()
    t.train_steps(batches(1), 2)
    store = ClientStateStore(tmp_path, "run", 0)
    store.save(1, {"optimizer": t.optimizer.state_dict()})
    assert restore_optimizer(t, store, rnd=3, max_age=1) == (0, 1)  # missed round 2: stale
    assert not t.optimizer.state  # fresh moments
    assert restore_optimizer(t, store, rnd=3, max_age=2) == (2, 0)
    assert restore_optimizer(t, None, rnd=3, max_age=2) == (0, 0)  # client_optimizer=reset


def test_the_clients_schedule_stretches_the_local_trainers_shape_over_the_run():
    tc = TrainConfig(learning_rate=3e-3, min_lr=3e-4, warmup_steps=100, max_steps=2000)
    fed = Schedule.of(tc, steps=250)  # e.g. 10 rounds x 25 local steps
    assert fed.warmup == 12  # 100 / 2000 of 250 steps, rounded
    # warm-up: linear to the peak over the same share; then the cosine, by hand
    assert math.isclose(fed.lr(0), 3e-3 * 1 / 13)
    assert math.isclose(fed.lr(11), 3e-3 * 12 / 13)
    assert math.isclose(fed.lr(12), 3e-3)
    halfway = 12 + (250 - 12) / 2
    assert math.isclose(
        fed.lr(int(halfway)), 3e-4 + 0.5 * (3e-3 - 3e-4) * (1 + math.cos(math.pi * 0.5)), rel_tol=1e-2
    )
    assert fed.lr(249) > 3e-4 and fed.lr(250) == 3e-4 and fed.lr(400) == 3e-4  # rounds added later


def test_auto_keeps_client_state_only_when_every_client_trains_every_round():
    from fedgpt.config import Config, FedConfig

    def keeps(**fed) -> bool:
        return Config(fed=FedConfig(**fed)).keeps_client_state

    assert keeps() and keeps(fraction_train=1.0, client_optimizer="auto")
    assert not keeps(fraction_train=0.1) and keeps(fraction_train=0.1, client_optimizer="keep")
    assert not keeps(client_optimizer="reset")


def test_fedsgd_step_is_one_sgd_step_on_the_gradient_of_all_the_clients_windows():
    # FedSGD (McMahan et al.): each client takes one plain SGD step on the gradient of its whole data.
    import itertools

    tokens = torch.randint(65, (300,), generator=torch.Generator().manual_seed(3)).numpy()
    model = tiny_gpt()
    sgd = TrainConfig(optimizer="sgd", learning_rate=0.5, warmup_steps=0, decay_lr=False, grad_clip=0.0)
    t = Trainer(model, sgd, torch.device("cpu"), log=None)
    x, y = Batches(tokens, 16, 4, seed=0).all_windows()
    assert x.shape == (19, 16)  # 18 windows of 16 cover 288 targets; the 19th ends at the last token
    before = {k: v.clone() for k, v in t.raw_model.named_parameters()}
    ref = GPT(t.raw_model.cfg)
    ref.load_state_dict(t.raw_model.state_dict())
    loss = ref(x, y)[1]
    grads = dict(
        zip([k for k, _ in ref.named_parameters()], torch.autograd.grad(loss, list(ref.parameters())))
    )
    t.train_steps(itertools.repeat((x, y)), 1)
    for k, p in t.raw_model.named_parameters():
        torch.testing.assert_close(p, before[k] - 0.5 * grads[k], rtol=1e-5, atol=1e-6)
