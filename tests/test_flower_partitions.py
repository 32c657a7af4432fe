"""Who serves which clients, and by what data sizes the server weights them, on Flower (fedfull_flower.transport):
the number of partitions is the run config's, a partition a connected node serves is never handed to a newcomer,
and in the deployment mode (data-sizes=declared) each client weighs what its node declared when it joined, capped.
No processes: the nodes' answers are built here as a ClientApp (or an attacker's) would send them."""
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("flwr")
import fedkseed as fk  # noqa: E402
from fedfull_flower.transport import MESSAGE_KEY, Flower  # noqa: E402


class Grid:
    """Connected nodes, each answering the partition query with its claim (a dict, or an exception to raise)."""
    def __init__(self, claims):
        self.claims, self.asked = dict(claims), []

    def get_node_ids(self):
        return list(self.claims)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            self.asked.append((m.metadata.dst_node_id, dict(m.content[MESSAGE_KEY])))
            ids.append(str(len(self.asked)))
        return ids

    def pull_messages(self, ids):
        (mid,) = ids
        node = self.asked[int(mid) - 1][0]
        if self.claims.get(node) is None:  # a node that never answers (or left)
            return []
        failed = self.claims[node] == "error"  # a node whose ClientApp failed: an error reply
        return [SimpleNamespace(metadata=SimpleNamespace(src_node_id=node), has_error=lambda f=failed: f,
                                content={} if failed else {MESSAGE_KEY: self.claims[node]})]


@pytest.fixture(autouse=True)
def server_identity(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity
    for k in ("run_id", "task_id", "node_id"):  # what a ServerApp process has set when it builds messages
        monkeypatch.setattr(TaskIdentity, "_" + k, 1)


def flower(grid, **kw):
    logged = []
    return Flower(grid, "cpu", "fedkseed", "--rounds 1", 2, 1.0, 1.0, log=logged.append, **kw), logged


def claim(p, count=2, **extra):
    return {"partition-id": p, "num-partitions": count, **extra}


def test_a_newcomer_cannot_take_a_partition_whose_node_is_connected_and_takes_it_once_that_node_left():
    grid = Grid({11: claim(0), 12: claim(1)})
    f, logged = flower(grid)
    f.join(1.0)
    assert f.node_of == {0: 11, 1: 12}
    grid.claims[13] = claim(0)  # a third node says it serves partition 0
    f.refresh()
    assert f.node_of == {0: 11, 1: 12} and "node 13 claims partition 0, which connected node 11 serves" in logged[-1]
    del grid.claims[11]  # node 0 leaves: the waiting claim is honoured, without asking again
    asked = len(grid.asked)
    f.refresh()
    assert f.node_of == {0: 13, 1: 12} and len(grid.asked) == asked


@pytest.mark.parametrize("answer, words", [
    (claim(0, count=3), "says partition 0 of 3, the run has 2"),  # the run config's count, not the first node's
    (claim(2), "says partition 2 of 2"),
    ({}, "did not tell its partition (KeyError)"),
    (claim("x"), "did not tell its partition (ValueError)"),
])
def test_a_node_that_counts_otherwise_or_answers_badly_serves_nothing(answer, words):
    f, logged = flower(Grid({11: answer, 12: claim(1)}))
    f.join(1.0)
    assert f.node_of == {1: 12} and any(words in line and line.endswith("left out") for line in logged)


def test_the_partition_count_is_the_run_configs_even_when_every_node_says_otherwise():
    f, _ = flower(Grid({11: claim(0, count=3), 12: claim(1, count=3)}), partitions=2)
    with pytest.raises(Exception, match="no SuperNode told its partition"):
        f.join(1.0)


def test_declared_sizes_are_asked_with_the_run_and_capped():
    grid = Grid({11: claim(0, clients=[0, 2], sizes=[5, 50_000]), 12: claim(1, clients=[1, 3], sizes=[7, 9])})
    f, _ = flower(grid, data_sizes="declared", size_cap=1000, key="0123456789abcdef")
    f.join(1.0)
    assert all(cfg["script"] == "fedkseed" and cfg["argv"] == "--rounds 1" and cfg["key"] == "0123456789abcdef"
               for _, cfg in grid.asked)
    assert [f.data_size(c, held=123) for c in range(4)] == [5, 7, 1000, 9]
    equal, _ = flower(Grid(dict(grid.claims)), data_sizes="declared", key="0123456789abcdef")  # no cap: the default
    equal.join(1.0)
    assert [equal.data_size(c, held=123) for c in range(4)] == [1, 1, 1, 1]  # no declaration is trusted
    plain, _ = flower(Grid({11: claim(0), 12: claim(1)}))
    plain.join(1.0)
    assert plain.data_size(2, held=123) == 123 and all(set(cfg) == {"ask"} for _, cfg in plain.grid.asked)


def test_a_waiting_newcomers_declaration_counts_only_once_it_is_given_the_partition():
    grid = Grid({11: claim(0, clients=[0], sizes=[5]), 12: claim(1, clients=[1], sizes=[4])})
    f, _ = flower(grid, data_sizes="declared")
    f.join(1.0)
    grid.claims[13] = claim(0, clients=[0, 2], sizes=[900, 900])  # claims node 11's partition, and big sizes
    f.refresh()
    assert f.node_of[0] == 11 and f.declared == {0: 5, 1: 4}
    del grid.claims[11]
    f.refresh()
    assert f.node_of[0] == 13 and f.declared == {0: 900, 1: 4, 2: 900}


def test_two_new_nodes_claiming_one_free_partition_the_lower_id_serves_it():
    grid = Grid({12: claim(1), 13: claim(0), 11: claim(0)})
    f, logged = flower(grid)
    f.join(1.0)
    assert f.node_of == {0: 11, 1: 12}
    assert any("nodes 11 and 13 both claim free partition 0: the lower id, 11, serves it" in x for x in logged)


@pytest.mark.parametrize("silent", [None, "error"])
def test_a_node_that_never_answers_is_asked_three_times_then_left_out(silent):
    grid = Grid({11: silent, 12: claim(1)})
    f, logged = flower(grid)
    f.join(1.0)
    f.refresh()
    f.refresh()
    assert "node 11 left 3 partition queries unanswered: left out" in logged[-1]
    f.refresh()
    assert [n for n, _ in grid.asked].count(11) == 3 and f.node_of == {1: 12}


@pytest.mark.parametrize("declaration", [
    dict(clients=[0, 1], sizes=[5, 5]),         # client 1 lives on partition 1, not 0
    dict(clients=[0, 2], sizes=[5]),            # a size missing
    dict(clients=[0], sizes=[0]),               # an empty client weighs nothing: refused
    dict(clients=[0], sizes=[-3]),
    dict(clients=[0], sizes=[2.5]),
    dict(clients=[], sizes=[]),
    dict(),                                      # the mode asks for sizes: a node without them serves nothing
])
def test_a_malformed_declaration_leaves_the_node_out(declaration):
    f, logged = flower(Grid({11: claim(0, **declaration), 12: claim(1, clients=[1], sizes=[4])}),
                       data_sizes="declared")
    f.join(1.0)
    assert f.node_of == {1: 12} and f.declared == {1: 4} and "left out" in logged[-1]


def test_fedkseed_weights_each_client_by_the_servers_record_of_its_size():
    """check_uploads in the deployment mode: the server weights each client by the capped declaration, not by the
    upload's own size field, and the aggregate is the by-hand weighted sum with those weights."""
    K, lr = 16, 0.1
    args = SimpleNamespace(K=K, local_steps=2, directions=1, bias_sampling=False, seed=3)
    ups, want = {}, np.zeros(K)
    sizes = {0: 5, 1: 1000}  # client 1 declared 50,000: capped at 1,000
    for c, g in ((0, [1.0, -2.0]), (1, [0.5, 4.0])):
        draws = fk.seed_draws(args, K, 1, c)[0]
        ups[c] = (fk.encode_upload(3, draws, g, K), {"loss": 1.0})  # states 3 examples: ignored in this mode
        for k, x in zip(draws, g):
            want[k] += sizes[c] / 1005 * x
    transport = SimpleNamespace(declares_sizes=True, data_size=lambda c, held: {0: 5, 1: 1000}[c])
    run = SimpleNamespace(args=args, transport=transport, clients=[[None] * 3, [None] * 3],
                          server={"A_history": [np.zeros(K, np.float32)]}, progress=SimpleNamespace(log=print))
    accepted, weights = fk.check_uploads(run, ups, [0, 1], {})
    assert list(accepted) == [0, 1] and weights == {0: 5, 1: 1000}
    got = fk.server_aggregate([u for u, _ in accepted.values()], list(weights.values()), K, lr)
    assert np.allclose(got, -lr * want, rtol=1e-6, atol=0)


def test_the_deployment_servers_data_is_its_own_held_out_and_validation_sets(tmp_path):
    """server_only (data-sizes = declared): the server reads its own file for the held-out and validation sets and
    holds no client's examples; the clients are counted by --num_clients."""
    from test_fedkseed import write_dolly
    dolly = write_dolly(tmp_path / "dolly.jsonl")
    args = fk.parse_args(["--data_path", str(dolly), "--num_clients", "4", "-m", "0.5", "--val_samples", "3", "--iid", "iid",
                          "--device", "cpu"])
    data, sampled = fk.load_data(args, None, server_only=True)
    full, _ = fk.load_data(args, None)
    assert data.clients == [[], [], [], []] and sampled == 2
    assert data.test == full.test and data.val == full.val and sum(map(len, full.clients)) > 0
