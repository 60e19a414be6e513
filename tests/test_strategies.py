"""Strategies without a simulation: DiLoCo's outer step against torch.optim.SGD, defaults per strategy, and
state that survives a checkpoint round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import train_instruction
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedgpt.config import FedConfig
from fedgpt.config_rules import STRATEGIES
from fedgpt.fed.strategies import OuterSGD, load_strategy_state, make_strategy, server_lr, strategy_state

pytestmark = pytest.mark.usefixtures("serverapp_identity")


class Grid:
    """The two calls configure_train makes of a grid: the connected nodes, and Flower's node sampling."""

    def __init__(self, nodes: list[int]):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def reply(node: int, arrays: dict[str, torch.Tensor], weight: int) -> Message:
    metrics = MetricRecord({"num-examples": weight, "train-loss": 1.0})
    return Message(
        RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=train_instruction(node)
    )


def round_of(strategy, rnd: int, global_state: dict, clients: list[dict], weights: list[int]) -> dict:
    """configure_train then aggregate_train, as fedgpt's server loop calls them; the new global state."""
    strategy.configure_train(
        rnd, ArrayRecord(global_state), _config(), Grid(list(range(1, len(clients) + 1)))
    )
    agg, _ = strategy.aggregate_train(
        rnd, [reply(i + 1, c, w) for i, (c, w) in enumerate(zip(clients, weights))]
    )
    return {k: v.float() for k, v in agg.to_torch_state_dict().items()}


def _config():
    from flwr.app import ConfigRecord

    return ConfigRecord({})


def client_weights(global_state: dict, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [
        {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in global_state.items()} for _ in range(3)
    ]


def weighted_mean(clients: list[dict], weights: list[int]) -> dict:
    """The clients' weights averaged by hand, each weighted by its number of examples."""
    return {k: sum(w * c[k] for w, c in zip(weights, clients)) / sum(weights) for k in clients[0]}


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_is_torch_sgd_on_the_pseudo_gradient(nesterov):
    torch.manual_seed(0)
    state = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    weights = [10, 30, 60]
    strategy = OuterSGD(
        server_learning_rate=0.7,
        server_momentum=0.9,
        nesterov=nesterov,
        min_available_nodes=3,
        min_train_nodes=3,
    )
    # The reference: the global model as parameters, the averaged client delta as their gradient, torch's SGD.
    params = {k: torch.nn.Parameter(v.clone()) for k, v in state.items()}
    sgd = torch.optim.SGD(params.values(), lr=0.7, momentum=0.9, nesterov=nesterov)
    for rnd in (1, 2, 3):
        clients = client_weights(state, rnd)
        average = weighted_mean(clients, weights)
        for k, p in params.items():
            p.grad = p.detach() - average[k]
        sgd.step()
        state = round_of(strategy, rnd, state, clients, weights)
        for k, p in params.items():
            torch.testing.assert_close(state[k], p.detach(), rtol=1e-5, atol=1e-6)


def test_orthogonal_outer_step_is_muons_direction_at_the_sgd_steps_length():
    """Each round: torch.optim.SGD (lr 1, Nesterov momentum) on the averaged client delta gives the step s;
    a block matrix then moves lr * |s| along torch.optim.Muon's own step for the gradient s, everything else
    by lr * s."""
    torch.manual_seed(0)
    matrix, norm, embedding = (
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.h.0.ln_1.weight",
        "transformer.wte.weight",
    )
    state = {matrix: torch.randn(12, 8), norm: torch.randn(8), embedding: torch.randn(10, 8)}
    weights = [10, 30, 60]
    strategy = OuterSGD(
        server_learning_rate=0.7,
        server_momentum=0.9,
        nesterov=True,
        orthogonal=True,
        min_available_nodes=3,
        min_train_nodes=3,
    )
    sgd_params = {k: torch.nn.Parameter(v.clone()) for k, v in state.items()}
    sgd = torch.optim.SGD(sgd_params.values(), lr=1.0, momentum=0.9, nesterov=True)
    for rnd in (1, 2, 3):
        clients = client_weights(state, rnd)
        average = weighted_mean(clients, weights)
        before = {k: p.detach().clone() for k, p in sgd_params.items()}
        for k, p in sgd_params.items():
            p.grad = state[k] - average[k]
        sgd.step()
        steps = {k: before[k] - p.detach() for k, p in sgd_params.items()}
        # torch's Muon on the matrix, its gradient the SGD step, no momentum: its move is Muon's direction
        w = torch.nn.Parameter(torch.zeros(12, 8))
        w.grad = steps[matrix].clone()
        torch.optim.Muon([w], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0).step()
        muon_direction = -w.detach() / w.detach().norm()

        new = round_of(strategy, rnd, state, clients, weights)
        moved = state[matrix] - new[matrix]
        assert moved.norm().item() == pytest.approx(0.7 * steps[matrix].norm().item(), rel=1e-5)
        cosine = torch.nn.functional.cosine_similarity
        assert cosine(moved.flatten(), muon_direction.flatten(), dim=0) > 0.999  # torch's runs in bf16
        assert cosine(moved.flatten(), steps[matrix].flatten(), dim=0) < 0.98  # not SGD's direction
        for k in (norm, embedding):
            torch.testing.assert_close(new[k], state[k] - 0.7 * steps[k], rtol=1e-5, atol=1e-6)
        state = new


def test_outer_step_on_alternating_fragments_is_one_torch_sgd_per_fragment():
    # Streaming fragments: each round's replies hold one fragment. The reference: one torch SGD per fragment,
    # stepped only in that fragment's rounds; the other fragment and its momentum must stay as they were.
    torch.manual_seed(1)
    state = {"w": torch.randn(4, 3), "b": torch.randn(3)}
    fragments = [["w"], ["b"]]
    strategy = OuterSGD(
        server_learning_rate=0.7, server_momentum=0.9, nesterov=True, min_available_nodes=3, min_train_nodes=3
    )
    params = {k: torch.nn.Parameter(v.clone()) for k, v in state.items()}
    sgds = [torch.optim.SGD([params[k] for k in f], lr=0.7, momentum=0.9, nesterov=True) for f in fragments]
    for rnd in range(1, 6):
        names = fragments[(rnd - 1) % 2]
        clients = [{k: c[k] for k in names} for c in client_weights(state, rnd)]
        for k in names:
            params[k].grad = params[k].detach() - sum(c[k] for c in clients) / 3
        sgds[(rnd - 1) % 2].step()
        strategy.configure_train(rnd, ArrayRecord(state), _config(), Grid([1, 2, 3]))
        agg, _ = strategy.aggregate_train(rnd, [reply(i + 1, c, 1) for i, c in enumerate(clients)])
        assert set(agg.keys()) == set(names)
        state = {**state, **{k: v.float() for k, v in agg.to_torch_state_dict().items()}}
        for k, p in params.items():
            torch.testing.assert_close(state[k], p.detach(), rtol=1e-5, atol=1e-6)


def test_outer_sgd_at_lr_1_without_momentum_is_fedavg():
    torch.manual_seed(0)
    state = {"w": torch.randn(5, 2)}
    clients, weights = client_weights(state, 7), [1, 2, 5]
    fedavg = round_of(make_strategy(FedConfig(strategy="fedavg", num_clients=3)), 1, state, clients, weights)
    outer = round_of(
        OuterSGD(
            server_learning_rate=1.0,
            server_momentum=0.0,
            nesterov=True,
            min_available_nodes=3,
            min_train_nodes=3,
        ),
        1,
        state,
        clients,
        weights,
    )
    torch.testing.assert_close(outer["w"], fedavg["w"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["diloco", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_state_survives_a_checkpoint(name, tmp_path):
    # Two rounds with one strategy against one round, a save and a load into a fresh strategy, and one more.
    fed = FedConfig(strategy=name, num_clients=3)
    torch.manual_seed(0)
    state = {"w": torch.randn(4, 4), "b": torch.randn(4)}
    r1, r2 = client_weights(state, 1), client_weights(state, 2)
    straight = make_strategy(fed)
    after1 = round_of(straight, 1, state, r1, [1, 1, 1])
    expected = round_of(straight, 2, after1, r2, [1, 1, 1])

    first = make_strategy(fed)
    round_of(first, 1, state, r1, [1, 1, 1])
    torch.save({"strategy": strategy_state(first)}, tmp_path / "ckpt.pt")
    resumed = make_strategy(fed)
    load_strategy_state(resumed, torch.load(tmp_path / "ckpt.pt", weights_only=True)["strategy"])
    got = round_of(resumed, 2, after1, r2, [1, 1, 1])
    assert strategy_state(first), f"{name} has state to keep"
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_every_strategy_takes_its_own_default_server_lr_unless_overridden():
    for name in STRATEGIES:
        default = {"diloco": 0.7, "fedavgm": 1.0, "fedadam": 1e-2, "fedyogi": 1e-2, "fedadagrad": 1e-2}.get(
            name
        )
        assert server_lr(FedConfig(strategy=name)) == default, name
        s = make_strategy(FedConfig(strategy=name, server_lr=0.3, num_clients=3))
        lr = getattr(s, "lr", getattr(s, "eta", None))
        assert lr == (0.3 if default is not None else None), name
    fedavgm = make_strategy(FedConfig(strategy="fedavgm"))
    diloco = make_strategy(FedConfig(strategy="diloco", nesterov=False))
    assert (fedavgm.lr, fedavgm.momentum, fedavgm.nesterov) == (1.0, 0.9, False)
    assert (diloco.lr, diloco.momentum, diloco.nesterov) == (0.7, 0.9, False)
    assert make_strategy(FedConfig(strategy="diloco")).nesterov


def test_sampled_partitions_do_not_depend_on_node_ids(data_dir, tmp_path):
    # Two federations of the same run whose 10 nodes have other ids, listed in other orders: with
    # fed.fraction_train 0.3, each round samples the same three partitions in both.
    from fedgpt.config import load_config
    from fedgpt.fed.server import FederatedRun

    cfg = load_config(
        "configs/tiny.yaml",
        [
            f"--data.data_dir={data_dir}",
            f"--train.out_dir={tmp_path}",
            "--fed.num_clients=10",
            "--fed.fraction_train=0.3",
        ],
    )
    run = FederatedRun(cfg, log=lambda _: None)
    samples = []
    for ids in ([101 + 7 * i for i in range(10)], [9000 - 13 * i for i in range(10)]):
        run.nodes.members.clear()
        run.nodes.admit({node: p for p, node in enumerate(ids)})
        grid = Grid(list(reversed(ids)) if ids[0] > 1000 else ids)
        per_round = []
        for rnd in (1, 2, 3):
            msgs = run.strategy.configure_train(rnd, ArrayRecord({}), _config(), run.sampling_grid(grid, rnd))
            per_round.append(sorted(run.nodes.partition_of[m.metadata.dst_node_id] for m in msgs))
        samples.append(per_round)
    assert samples[0] == samples[1] and all(len(s) == 3 for s in samples[0])
    assert len({tuple(s) for s in samples[0]}) > 1  # a new sample each round


def test_fedprox_adds_its_proximal_step_through_the_clients_work_order(data_dir, tmp_path):
    # Plain SGD at lr 0.1, no clipping: the first step is the gradient's alone (w1 = w0), the second adds mu
    # (w1 - w0) to the same gradient at w1, so 2 steps with mu > 0 end at 2 steps without it minus lr x mu x
    # (w1 - w0), exactly; w1 - w0 is what one step sends. Strategy -> work order -> client -> trainer: a mu
    # lost anywhere on the way (a misspelt key) leaves the two runs equal.
    from conftest import TINY, fit_in_process

    from fedgpt.config import load_config
    from fedgpt.fed import client
    from fedgpt.fed.server import FederatedRun

    sgd = ["--train.optimizer=sgd", "--train.learning_rate=0.1", "--train.decay_lr=false"]
    sgd += ["--train.warmup_steps=0", "--train.grad_clip=0", "--fed.client_optimizer=reset"]

    def update(steps: int, mu: float):
        prox = ["--fed.strategy=fedprox", f"--fed.proximal_mu={mu}"]
        out = f"--train.out_dir={tmp_path / f'{steps}-{mu}'}"
        cfg = load_config(
            TINY, [f"--data.data_dir={data_dir}", out, *sgd, *prox, f"--fed.local_steps={steps}"]
        )
        client._CACHE.clear()
        return fit_in_process(FederatedRun(cfg, log=lambda s: None), rnd=1)

    one, plain, prox = update(1, 0.0), update(2, 0.0), update(2, 0.5)
    assert float(one.norm()) > 0
    torch.testing.assert_close(prox - plain, -0.1 * 0.5 * one, rtol=1e-3, atol=1e-6)
    assert float((prox - plain).abs().max()) > 100 * 1e-6  # the proximal step is far above the tolerance


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg"])
def test_robust_strategies_take_the_median_and_the_trimmed_mean(name):
    # Five clients, one of them far off: the coordinate-wise median, and the mean of the middle three
    # (FedTrimmedAvg's beta 0.2 cuts one of five at each end), computed here by sorting.
    fed = FedConfig(strategy=name, num_clients=5)
    torch.manual_seed(0)
    state = {"w": torch.randn(3, 4), "b": torch.randn(4)}
    clients = [{k: v + torch.randn(v.shape) for k, v in state.items()} for _ in range(5)]
    clients[2] = {k: v + 100.0 for k, v in clients[2].items()}  # an outlier both must resist
    got = round_of(make_strategy(fed), 1, state, clients, [1] * 5)
    for k in state:
        ordered = torch.stack([c[k] for c in clients]).sort(dim=0).values
        expected = ordered[2] if name == "fedmedian" else ordered[1:4].mean(dim=0)
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-5)
        assert got[k].abs().max() < 50  # the outlier moved nothing


def test_streaming_fragments_move_one_fragment_a_message_between_server_and_client(data_dir, tmp_path):
    # fed.fragments=2 through fedgpt's server loop and client code in this process (tests/in_process_grid.py):
    # round 1 brings the whole model down, every later message the fragment the round before synced, and
    # every reply this round's fragment. Fragments by hand: transformer block 1 is fragment 1, everything else
    # fragment 0 (lm_head is tied to the token embedding and travels once). The weights against a run without
    # fragments: tests/test_fed_optimization.py, on Ray.
    from conftest import TINY
    from in_process_grid import InProcessGrid

    from fedgpt.config import load_config
    from fedgpt.fed.server import FederatedRun
    from fedgpt.fed.wire import FLAT

    overrides = ["--fed.num_clients=1", "--fed.strategy=fedavg", "--fed.rounds=3", "--fed.fragments=2"]
    cfg = load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path}", *overrides])
    run = FederatedRun(cfg, log=lambda *_: None)
    run.open_folder()
    sizes = [0, 0]
    for k, v in run.global_state.items():
        if k != "lm_head.weight":
            sizes[1 if k.startswith("transformer.h.1.") else 0] += v.numel()
    assert min(sizes) > 0.2 * sum(sizes)  # two real fragments, or the test proves little
    up = []

    def watch(kind, node, reply):
        if kind == "train":
            up.append(reply.content["arrays"][FLAT].numpy().size)

    grid = InProcessGrid(1, data_dir, tamper=watch, state_dir=Path(run.state_dir))
    run.run(grid)
    down = [m.content["arrays"][FLAT].numpy().size for m in grid.sent if m.metadata.message_type == "train"]
    assert down == [sum(sizes), sizes[0], sizes[1]]
    assert up == [sizes[0], sizes[1], sizes[0]]
