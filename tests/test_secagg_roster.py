"""SecAgg+ against a server that lies: nodes with a roster (fedgpt.fed.roster) take only signed peers and
unmask only a survivor set their peers signed. The attacks are a dishonest server's hand-built messages, sent
through the real ClientApp mod (fedgpt.fed.secagg.secure_aggregation, wrapping Flower's secaggplus_mod)."""

from __future__ import annotations

import copy
import time
import uuid

import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from flwr.app import (
    DEFAULT_TTL,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MessageType,
    Metadata,
    RecordDict,
)
from flwr.common.secure_aggregation.crypto.shamir import combine_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt, generate_shared_key
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

from fedgpt.fed import roster
from fedgpt.fed.secagg import CONSISTENCY, SIGNED, NodeRefusal, masked_reply, secure_aggregation

SETUP = {Key.STAGE: Stage.SETUP, Key.SHARE_NUMBER: 5, Key.THRESHOLD: 2, Key.CLIPPING_RANGE: 8.0}
SETUP |= {Key.TARGET_RANGE: 2**22, Key.MOD_RANGE: 2**32, Key.MAX_WEIGHT: 1.0}


# -- keys, made in the test (never committed) ----------------------------------------------------------------


def write_key(path, kind: str = "ecdsa", fmt: str = "openssh"):
    """A private key at `path` (OpenSSH or PEM); its OpenSSH public line."""
    key = {
        "ecdsa": lambda: ec.generate_private_key(ec.SECP384R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate,
    }
    key = key.get(kind, lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))()
    f = serialization.PrivateFormat.OpenSSH if fmt == "openssh" else serialization.PrivateFormat.PKCS8
    enc = serialization.Encoding.PEM
    path.write_bytes(key.private_bytes(enc, f, serialization.NoEncryption()))
    ssh = serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    return key.public_key().public_bytes(*ssh).decode()


def fleet(tmp_path, nodes: list[int], with_roster: bool = True, extra: list[str] = ()) -> dict[int, Context]:
    """A Context for each node id, each with its own identity key and all with one roster (the nodes' keys
    and `extra` public lines), or with no roster."""
    lines, contexts = list(extra), {}
    for i, nid in enumerate(nodes):
        kind = "ed25519" if i == 1 else "ecdsa"  # a roster may mix them
        key = tmp_path / f"node-{nid}.key"
        lines.append(write_key(key, kind, "pem" if i == 2 else "openssh"))
        config = {"require-secagg": True, "partition-id": i}
        if with_roster:
            config |= {"secagg-identity-key": str(key), "secagg-roster": str(tmp_path / "roster.pub")}
        contexts[nid] = Context(run_id=1, node_id=nid, node_config=config, state=RecordDict(), run_config={})
    (tmp_path / "roster.pub").write_text("# the nodes of this federation\n" + "\n".join(lines) + "\n")
    return contexts


def test_the_roster_reads_ssh_and_pem_keys_and_binds_each_statement(tmp_path):
    pub = [write_key(tmp_path / "a", "ecdsa"), write_key(tmp_path / "b", "ed25519", "pem")]
    (tmp_path / "roster").write_text("\n".join(pub) + "\n")
    peers = roster.load_roster(str(tmp_path / "roster"))
    assert len(peers) == 2
    for name in ("a", "b"):
        me = roster.load_identity(str(tmp_path / name))
        sig = me.sign(roster.advertisement(1, 3, 7, b"pk1", b"pk2"))
        assert peers.verify(me.fingerprint, sig, roster.advertisement(1, 3, 7, b"pk1", b"pk2"))
        for other in [(1, 4, 7, b"pk1", b"pk2"), (2, 3, 7, b"pk1", b"pk2"), (1, 3, 8, b"pk1", b"pk2")]:
            assert not peers.verify(
                me.fingerprint, sig, roster.advertisement(*other)
            )  # other round, run, node
        assert not peers.verify(me.fingerprint, sig, roster.survivors(1, 3, 7, [], []))  # another statement
    write_key(tmp_path / "rsa", "rsa")
    with pytest.raises(ValueError, match="use an ECDSA or Ed25519 key"):
        roster.load_identity(str(tmp_path / "rsa"))


# -- a dishonest server's messages, through the real mod -----------------------------------------------------


def message(nid: int, records: dict, kind=MessageType.TRAIN, rnd: int = 1) -> Message:
    """A message to node `nid` as the SuperLink stamps it."""
    meta = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=0,
        dst_node_id=nid,
        reply_to_message_id="",
        group_id=str(rnd),
        created_at=time.time(),
        ttl=DEFAULT_TTL,
        message_type=kind,
    )
    return Message(metadata=meta, content=RecordDict(records))


def send(ctx: Context, configs: dict, signed: dict | None = None, rnd: int = 1, update=None):
    """One stage's message to the node of `ctx` through its mod: its reply's records, or its refusal."""
    records = {RECORD_KEY_CONFIGS: ConfigRecord(configs)}
    if signed is not None:
        records[SIGNED] = ConfigRecord(signed)
    if update is not None:  # collect masked vectors: the node's train handler answers with this update
        records["arrays"] = ArrayRecord()

    def train(m, c):
        return Message(masked_reply(np.asarray(update, np.float32), 1, {"train-loss": 1.0}), reply_to=m)

    try:
        return secure_aggregation(message(ctx.node_id, records, rnd=rnd), ctx, train).content
    except NodeRefusal as e:
        return e


def setup(ctx: Context, n: int, rnd: int = 1) -> tuple[list[bytes], dict | None]:
    """The setup stage: the node's two public keys, and its signature record (None without a roster)."""
    reply = send(ctx, {**SETUP, Key.SAMPLE_NUMBER: n, Key.SHARE_NUMBER: n}, rnd=rnd)
    keys = reply.config_records[RECORD_KEY_CONFIGS]
    signed = reply.config_records.get(SIGNED)
    return [keys[Key.PUBLIC_KEY_1], keys[Key.PUBLIC_KEY_2]], (dict(signed) if signed else None)


def made_up_peers(n: int) -> dict[int, tuple]:
    """Peers the server invents: node id -> (pk1, pk2, sk1, sk2), key pairs it generated itself."""
    peers = {}
    for nid in range(100, 100 + n):
        (sk1, pk1), (sk2, pk2) = generate_key_pairs(), generate_key_pairs()
        peers[nid] = tuple(map(public_key_to_bytes, (pk1, pk2))) + tuple(
            map(private_key_to_bytes, (sk1, sk2))
        )
    return peers


def test_made_up_peers_unmask_a_node_without_a_roster_and_are_refused_with_one(tmp_path):
    # Without a roster: the server answers node 7's setup with 9 peers of its own making (cohort 10,
    # threshold 2). Node 7 encrypts a share of its mask seed and of its private key to each: the server
    # decrypts them all and has both secrets, so it can unmask node 7's update. The honest-but-curious limit.
    ctx = fleet(tmp_path, [7], with_roster=False)[7]
    own, _ = setup(ctx, 10)
    fake = made_up_peers(9)
    share_keys = {Key.STAGE: Stage.SHARE_KEYS, "7": own, **{str(n): list(p[:2]) for n, p in fake.items()}}
    reply = send(ctx, share_keys)
    assert not isinstance(reply, NodeRefusal)
    out = reply.config_records[RECORD_KEY_CONFIGS]
    seeds, sk1s = [], []
    for dst, ciphertext in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST]):
        shared = generate_shared_key(bytes_to_private_key(fake[dst][3]), bytes_to_public_key(own[1]))
        _, _, seed_share, sk1_share = share_keys_plaintext_separate(decrypt(shared, ciphertext))
        seeds.append(seed_share)
        sk1s.append(sk1_share)
    flower = ctx.state.config_records[RECORD_KEY_STATE]
    assert combine_shares(sk1s[:2]) == flower["sk1"] and combine_shares(seeds[:2]) == flower["rd_seed"]

    # With a roster, the same attack: no signatures at all, the server's own signatures (keys of its
    # making), or one roster member (a node colluding with it) signing for all 9: refused at share keys,
    # before Flower's mod encrypts a share (its state never leaves setup).
    contexts = fleet(tmp_path, [7, 8])
    ctx, colluder = contexts[7], roster.load_identity(str(tmp_path / "node-8.key"))
    own, signed = setup(ctx, 10)
    liar_key = ec.generate_private_key(ec.SECP384R1())  # the server's own: on no roster
    liar = roster.Identity(liar_key, roster.fingerprint(liar_key.public_key()))
    entry = lambda nid, pk, who: [*pk, who.fingerprint, who.sign(roster.advertisement(1, 1, nid, *pk))]
    mine = [*own, signed["key"], signed["signature"]]
    for who, needle in [
        (None, "without their signatures"),
        (liar, "not signed by a member"),
        (colluder, "one roster"),
    ]:
        forwarded = (
            None if who is None else {"7": mine, **{str(n): entry(n, p[:2], who) for n, p in fake.items()}}
        )
        refusal = send(ctx, share_keys | {"7": own}, forwarded)
        assert isinstance(refusal, NodeRefusal) and needle in str(refusal), refusal
        assert ctx.state.config_records[RECORD_KEY_STATE]["current_stage"] == Stage.SETUP
        assert not ctx.state.config_records[RECORD_KEY_STATE]["sk1_share_dict:K"]  # no share made

    # A roster member's signature from another round (an advertisement replayed) does not verify either.
    peer_pk = made_up_peers(1)[100][:2]
    old = [*peer_pk, colluder.fingerprint, colluder.sign(roster.advertisement(1, 0, 8, *peer_pk))]
    refusal = send(ctx, {Key.STAGE: Stage.SHARE_KEYS, "7": own, "8": list(peer_pk)}, {"7": mine, "8": old})
    assert isinstance(refusal, NodeRefusal) and "not signed by a member" in str(refusal)


class Network:
    """Real nodes (their contexts, through the real mod) and a server that can send each what it likes."""

    def __init__(self, contexts: dict[int, Context], updates: dict[int, np.ndarray]):
        self.ctx, self.updates, self.keys, self.adverts = contexts, updates, {}, {}
        self.lists, self.agreed = {}, {}

    def setup(self):
        for nid, ctx in self.ctx.items():
            self.keys[nid], self.adverts[nid] = setup(ctx, len(self.ctx))

    def share_keys(self, views: dict[int, list[int]] | None = None) -> dict[int, list]:
        """Each node is told of the peers in its view (all nodes by default); the server forwards their signed
        keys. Returns each node's ciphertexts by destination."""
        boxes = {nid: [] for nid in self.ctx}
        for nid, ctx in self.ctx.items():
            view = (views or {}).get(nid, list(self.ctx))
            configs = {Key.STAGE: Stage.SHARE_KEYS, **{str(p): self.keys[p] for p in view}}
            forwarded = None
            if self.adverts[nid] is not None:
                forwarded = {
                    str(p): [*self.keys[p], self.adverts[p]["key"], self.adverts[p]["signature"]]
                    for p in view
                }
            reply = send(ctx, configs, forwarded)
            assert not isinstance(reply, NodeRefusal), reply
            out = reply.config_records[RECORD_KEY_CONFIGS]
            for dst, c in zip(out[Key.DESTINATION_LIST], out[Key.CIPHERTEXT_LIST]):
                boxes[dst].append((nid, c))
            if SIGNED in reply.config_records:
                self.lists[nid] = dict(reply.config_records[SIGNED])
        return boxes

    def collect(self, boxes):
        for nid, ctx in self.ctx.items():
            configs = {Key.STAGE: Stage.COLLECT_MASKED_VECTORS}
            configs |= {
                Key.CIPHERTEXT_LIST: [c for _, c in boxes[nid]],
                Key.SOURCE_LIST: [s for s, _ in boxes[nid]],
            }
            reply = send(ctx, configs, update=self.updates[nid])
            assert not isinstance(reply, NodeRefusal), reply

    def consistency(self, nid: int, active: list[int], dead: list[int]):
        reply = send(
            self.ctx[nid],
            {Key.STAGE: CONSISTENCY, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead},
        )
        if isinstance(reply, NodeRefusal):
            return reply
        if SIGNED in reply.config_records:
            self.agreed[nid] = dict(reply.config_records[SIGNED])
        return reply

    def unmask(self, nid: int, active: list[int], dead: list[int]):
        """Node `nid`'s shares for these lists (every signature the server holds attached), or its refusal."""
        configs = {Key.STAGE: Stage.UNMASK, Key.ACTIVE_NODE_ID_LIST: active, Key.DEAD_NODE_ID_LIST: dead}
        signed = None
        if self.lists:
            signed = {"signers": list(self.agreed), "signer-keys": [a["key"] for a in self.agreed.values()]}
            signed["signatures"] = [a["signature"] for a in self.agreed.values()]
            for p, s in self.lists.items():
                signed |= {
                    f"peers:{p}": s["peers"],
                    f"peer-keys:{p}": s["peer-keys"],
                    f"signature:{p}": s["signature"],
                }
        reply = send(self.ctx[nid], configs, signed)
        if isinstance(reply, NodeRefusal):
            return reply
        out = reply.config_records[RECORD_KEY_CONFIGS]
        return dict(zip(out[Key.NODE_ID_LIST], out[Key.SHARE_LIST]))


@pytest.mark.parametrize("with_roster", [False, True])
def test_split_dropout_views_unmask_node_1_without_a_roster_and_fail_with_one(tmp_path, with_roster):
    # Five real nodes, each sharing with all (threshold 2). The server tells nodes 2 and 3 that node 1 is
    # alive (they reveal shares of its mask seed) and nodes 4 and 5 that it dropped (they reveal shares of its
    # private key): with both, it has node 1's update alone.
    ids = [1, 2, 3, 4, 5]
    rng = np.random.default_rng(0)
    net = Network(fleet(tmp_path, ids, with_roster), {n: rng.normal(0, 0.01, 8) for n in ids})
    net.setup()
    net.collect(net.share_keys())
    alive, dropped = ([1, 2, 3, 4, 5], []), ([2, 3, 4, 5], [1])
    if with_roster:  # each node signs the set it is shown; node 1 will not sign one that says it dropped
        for nid in ids:
            net.consistency(nid, *(alive if nid in (1, 2, 3) else dropped))
        assert "already signed another survivor set" in str(net.consistency(4, *alive))  # once a round
    seed_shares = [net.unmask(n, *alive) for n in (2, 3)]
    key_shares = [net.unmask(n, *dropped) for n in (4, 5)]
    flower = net.ctx[1].state.config_records[RECORD_KEY_STATE]
    if not with_roster:
        assert combine_shares([s[1] for s in seed_shares]) == flower["rd_seed"]
        assert combine_shares([s[1] for s in key_shares]) == flower["sk1"]  # node 1 unmasked
        return
    # 2 and 3 see a survivor set that nodes 1, 2, 3 signed (a majority of node 1's share holders); 4 and 5
    # see one that only they signed, a minority: they refuse, and node 1's private key stays whole.
    assert all(isinstance(s, dict) for s in seed_shares)
    for refusal in key_shares:
        assert isinstance(refusal, NodeRefusal) and "only 2 of the 5 nodes that hold node 1's" in str(refusal)


def test_split_cohort_views_fail_too(tmp_path):
    # A subtler split: the server shows nodes 2, 3 a cohort of {1, 2, 3} and nodes 4, 5 one of {1, 4, 5}, so
    # that each pair is a majority of the cohort it sees. A majority of the cohort a node sees would pass
    # both; fedgpt counts the nodes that hold node 1's shares, as node 1 itself signed them ({1..5}).
    ids = [1, 2, 3, 4, 5]
    net = Network(fleet(tmp_path, ids), {n: np.zeros(8) for n in ids})
    net.setup()
    views = {2: [1, 2, 3], 3: [1, 2, 3], 4: [1, 4, 5], 5: [1, 4, 5]}
    net.collect(net.share_keys(views))
    left, right = ([1, 2, 3], []), ([4, 5], [1])
    for nid in (2, 3):
        net.consistency(nid, *left)
    for nid in (4, 5):
        net.consistency(nid, *right)
    assert "without all of its peers" in str(net.consistency(1, *left))  # node 1 shared with all five
    for nid, view in [(2, left), (3, left), (4, right), (5, right)]:
        refusal = net.unmask(nid, *view)
        assert isinstance(refusal, NodeRefusal) and "only 2 of the 5" in str(refusal), refusal


def test_unmask_needs_the_signed_set_and_a_majority(tmp_path):
    ids = [1, 2, 3, 4, 5]
    net = Network(fleet(tmp_path, ids), {n: np.zeros(8) for n in ids})
    net.setup()
    net.collect(net.share_keys())
    everyone = (ids, [])
    assert "without a consistency check" in str(net.unmask(2, *everyone))  # a server that skips the stage
    for nid in (1, 2):
        net.consistency(nid, *everyone)
    assert "only 2 of the 5" in str(net.unmask(2, *everyone))  # 2 signatures: the threshold, not a majority
    net.consistency(3, *everyone)
    assert "not the survivor set this node signed" in str(net.unmask(2, [2, 3, 4, 5], [1]))
    assert isinstance(net.unmask(2, *everyone), dict)  # 3 of 5 signed: node 2 reveals its shares


def test_a_node_that_requires_secagg_refuses_to_evaluate_and_still_answers_queries(tmp_path):
    ctx = fleet(tmp_path, [7], with_roster=False)[7]
    ran = []
    handler = lambda m, c: ran.append(m) or m
    with pytest.raises(NodeRefusal, match="refuses evaluate messages: evaluating weights the server chose"):
        secure_aggregation(message(7, {}, MessageType.EVALUATE), ctx, handler)
    secure_aggregation(message(7, {}, MessageType.QUERY), ctx, handler)
    assert len(ran) == 1
    plain = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    secure_aggregation(message(7, {}, MessageType.EVALUATE), plain, handler)  # a node without the floor does
    assert len(ran) == 2


def test_a_second_setup_of_a_round_is_refused(tmp_path):
    ctx = fleet(tmp_path, [7, 8])[7]
    setup(ctx, 2, rnd=3)
    refusal = send(ctx, {**SETUP, Key.SAMPLE_NUMBER: 2}, rnd=3)
    assert isinstance(refusal, NodeRefusal) and "rounds only move forward" in str(refusal)
    setup(ctx, 2, rnd=4)


# -- the server's side: fedgpt's workflow drives the stages, each node's message goes through the real mod ---


class ModGrid:
    """A grid whose nodes are contexts in this process: each message goes through the ClientApp's mod, and a
    train message's handler answers with that node's update (weight: its `weights` entry)."""

    def __init__(self, contexts: dict[int, Context], updates: dict[int, np.ndarray], weights: dict[int, int]):
        self.ctx, self.updates, self.weights = contexts, updates, weights
        self.replies, self.sent, self.errors, self.dropped = {}, [], [], None

    def get_node_ids(self):
        return list(self.ctx)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = uuid.uuid4().hex
            msg.metadata.__dict__.update(_message_id=mid, _created_at=time.time(), _run_id=1)
            msg.metadata.ttl = DEFAULT_TTL
            self.sent.append(msg)
            nid = msg.metadata.dst_node_id

            def train(m, c, nid=nid):
                if nid == self.dropped:
                    raise ConnectionError("this node dropped out while training")
                return Message(
                    masked_reply(self.updates[nid], self.weights[nid], {"train-loss": 1.0}), reply_to=m
                )

            try:
                # a copy, as the wire delivers it: Flower's workflow sends one content to all at setup
                reply = secure_aggregation(copy.deepcopy(msg), self.ctx[nid], train)
            except Exception as e:  # as Flower returns a ClientApp's exception
                reply = Message(Error(code=0, reason=f"{type(e).__name__}: {e}"), reply_to=msg)
                self.errors.append(reply.error.reason)
            reply.metadata.__dict__["_src_node_id"] = nid
            self.replies[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in list(ids) if i in self.replies]


@pytest.mark.parametrize("with_roster, dropped", [(False, None), (True, None), (True, 13)])
@pytest.mark.usefixtures("serverapp_identity")
def test_an_honest_round_through_fedgpts_workflow_gives_the_weighted_mean(tmp_path, with_roster, dropped):
    from conftest import TINY

    from fedgpt.config import load_config
    from fedgpt.fed.secagg_server import secure_round

    ids = [11, 12, 13, 14, 15]
    rng = np.random.default_rng(1)
    updates = {n: rng.normal(0, 0.05, 64).astype(np.float32) for n in ids}
    weights = {n: 100 * (i + 1) for i, n in enumerate(ids)}
    grid = ModGrid(fleet(tmp_path, ids, with_roster), updates, weights)
    grid.dropped = dropped  # its masked vector never comes: its neighbours reveal its private key's shares
    cfg = load_config(TINY, ["--secagg.enabled=true", "--fed.num_clients=5", "--fed.round_timeout=5"])
    msgs = [
        Message(
            RecordDict({"config": ConfigRecord({"server-round": 1})}),
            dst_node_id=n,
            message_type=MessageType.TRAIN,
        )
        for n in ids
    ]
    mean, replies, _, _ = secure_round(grid, msgs, 1, cfg, weights)
    alive = [n for n in ids if n != dropped]
    assert mean is not None and len(replies) == len(alive), grid.errors
    exact = sum(weights[n] * updates[n] for n in alive) / sum(weights[n] for n in alive)
    step = 2 * cfg.secagg.clipping_range / cfg.secagg.quantization_range * len(ids)
    assert np.abs(mean - exact).max() <= step
    stages = [m.content[RECORD_KEY_CONFIGS][Key.STAGE] for m in grid.sent if RECORD_KEY_CONFIGS in m.content]
    # with rosters, one stage more (the consistency check) and the signatures beside Flower's records
    assert stages.count(CONSISTENCY) == (len(alive) if with_roster else 0)
    assert any(SIGNED in m.content for m in grid.sent) == with_roster


# -- on real Ray: a federation whose nodes all have a roster -------------------------------------------------

STAGES: list = []


@pytest.mark.slow
@pytest.mark.usefixtures("no_ray_left")
def test_a_federation_with_rosters_trains_and_its_mean_is_fedavgs(data_dir, tmp_path, monkeypatch):
    import ray
    from conftest import TINY, simulate

    from fedgpt.checkpoint import load_checkpoint
    from fedgpt.config import load_config
    from fedgpt.fed.server import FederatedRun

    class Recording(FederatedRun):
        def run(self, grid):
            class Grid:  # the stage of every SecAgg+ message the server pushes
                def push_messages(_, messages):
                    messages = list(messages)
                    STAGES.extend(
                        m.content[RECORD_KEY_CONFIGS][Key.STAGE]
                        for m in messages
                        if RECORD_KEY_CONFIGS in m.content
                    )
                    return grid.push_messages(messages)

                def __getattr__(_, name):
                    return getattr(grid, name)

            return super().run(Grid())

    one = ["--fed.rounds=1"]
    simulate(data_dir, tmp_path / "plain", "client_app", *one)
    # Every simulated node has its own key (the path names its partition) and the same roster.
    lines = [write_key(tmp_path / f"node-{p}.key", "ecdsa") for p in range(3)]
    (tmp_path / "roster.pub").write_text("\n".join(lines) + "\n")
    if ray.is_initialized():  # the nodes' settings are in the environment Ray's workers start with
        ray.shutdown()
    monkeypatch.setenv("FEDGPT_NODE_REQUIRE_SECAGG", "true")
    monkeypatch.setenv("FEDGPT_NODE_SECAGG_IDENTITY_KEY", str(tmp_path / "node-{partition-id}.key"))
    monkeypatch.setenv("FEDGPT_NODE_SECAGG_ROSTER", str(tmp_path / "roster.pub"))
    try:
        simulate(
            data_dir, tmp_path / "secure", "client_app", *one, "--secagg.enabled=true", run_class=Recording
        )
    finally:
        ray.shutdown()
    assert STAGES.count(CONSISTENCY) == 3  # the nodes signed: the consistency check ran

    # The mean is FedAvg's up to SecAgg+'s quantization (as tests/test_secagg.py checks without a roster).
    cfg = load_config(TINY).secagg
    a = load_checkpoint(tmp_path / "plain" / "last.pt")["model"]
    b = load_checkpoint(tmp_path / "secure" / "last.pt")["model"]
    init = FederatedRun(
        load_config(TINY, [f"--data.data_dir={data_dir}", f"--train.out_dir={tmp_path / 'i'}"]),
        log=lambda s: None,
    )
    keys = init.exchange.names
    # 3 clients, each rounded to 2 x clipping_range / quantization_range, over their weight ratios (>= 1)
    tolerance = 3 * 2 * cfg.clipping_range / cfg.quantization_range + 1e-6
    assert max(float((a[k].float() - b[k].float()).abs().max()) for k in keys) <= tolerance
    moved = max(float((a[k].float() - init.global_state[k]).abs().max()) for k in keys)
    assert moved > 100 * tolerance  # the round did move the model: the agreement is not trivial
