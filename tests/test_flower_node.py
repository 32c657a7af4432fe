"""A Flower node does not obey blindly (fedfull_flower.node.node_args): it refuses, with one line, a state key that
could be a path, a data path or model the server chose that its own config does not set, and sizes past its limits,
before loading or allocating anything. No processes: the message's config is built here."""
import pytest

pytest.importorskip("flwr")
from fedfull_flower.node import node_args  # noqa: E402
from fedfull_flower.transport import run_key  # noqa: E402

import fedkseed as fk  # noqa: E402
from test_fedkseed import argv, dolly, tiny_dir  # noqa: E402, F401  (fixtures)


def cfg(argv="--device cpu", key=None, script="fedkseed"):
    return {"script": script, "argv": argv, "key": run_key(script, fk.parse_args(argv.split())) if key is None else key}


def test_a_run_the_node_allows_parses():
    name, script, args = node_args(cfg("--device cpu -K 1024"), {})
    assert name == "fedkseed" and script is fk and args.K == 1024 and args.data_path is None


@pytest.mark.parametrize("key", ["../../etc", "0123456789abcdef/..", "0123456789ABCDEF", "abc", "", "0" * 17])
def test_a_state_key_that_is_not_16_hex_digits_is_refused(key):
    with pytest.raises(fk.ConfigError, match="is not 16 hex digits: refused"):
        node_args(cfg(key=key), {})


def test_a_data_path_or_model_the_server_chose_is_refused_unless_the_node_sets_or_trusts_it(tmp_path):
    with pytest.raises(fk.ConfigError, match="the server chose --data_path /etc/passwd: this node's config"):
        node_args(cfg("--device cpu --data_path /etc/passwd"), {})
    with pytest.raises(fk.ConfigError, match="the server chose --model some/model: this node's config"):
        node_args(cfg("--device cpu --model some/model"), {})
    with pytest.raises(fk.ConfigError, match="the server chose --model /tmp/elsewhere: this node's config"):
        node_args(cfg("--device cpu --model smollm2-135m --model /tmp/elsewhere"), {})  # argparse takes the last
    mine = tmp_path / "mine.jsonl"
    mine.write_text("")
    # the node's own config pins both: whatever the server says, the node's values are used
    _, _, args = node_args(cfg("--device cpu --data_path /etc/passwd --model some/model"),
                           {"data-path": str(mine), "model": "my/model"})
    assert (args.data_path, args.model) == (str(mine), "my/model")
    _, _, args = node_args(cfg("--device cpu --model some/model"), {"trust-server-paths": "true"})
    assert args.model == "some/model"


@pytest.mark.parametrize("argv, words", [("--local_epochs 1e9", "--local_epochs 1000000000.0 is more than this node allows "
                                                                "(max-local-epochs 100)"),
                                         ("--grad_accum 100000", "--grad_accum 100000 is more than this node allows")])
def test_fedcybgd_sizes_are_refused_too(argv, words):
    import fedcybgd as cy
    key = run_key("fedcybgd", cy.parse_args(["--device", "cpu"]))
    with pytest.raises(fk.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        node_args({"script": "fedcybgd", "argv": "--device cpu " + argv, "key": key}, {})


def test_the_node_config_pins_the_device():
    import torch
    if not torch.cuda.is_available():  # the server's choice, where the node has no GPU
        with pytest.raises(fk.ConfigError, match="--device cuda:7: this torch build sees no CUDA device"):
            node_args(cfg("--device cuda:7", key="0" * 16), {})
    _, _, args = node_args(cfg("--device cuda:7", key="0" * 16), {"device": "cpu"})
    assert args.device == "cpu"


@pytest.mark.parametrize("argv, words", [("-K 4294967296", "-K 4294967296 is more than this node allows (max-K 1048576)"),
                                         ("--max_length 1000000", "--max_length 1000000 is more than this node allows"),
                                         ("--local_steps 1000000", "--local_steps 1000000 is more than this node allows"),
                                         ("--estimator one_sided --directions 5000",
                                          "--directions 5000 is more than this node allows (max-directions 1024)"),
                                         ("--batch_size 100000", "--batch_size 100000 is more than this node allows"),
                                         ("--num_clients 1000000", "--num_clients 1000000 is more than this node")])
def test_absurd_sizes_are_refused_before_anything_is_allocated(argv, words):
    with pytest.raises(fk.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        node_args(cfg("--device cpu " + argv), {})
    node_args(cfg("--device cpu -K 4096"), {"max-K": 4096})  # the node's own limit, and at it


def test_a_node_declares_its_clients_sizes_from_its_own_data_when_asked(tiny_dir, dolly, tmp_path,  # noqa: F811
                                                                        monkeypatch):
    """The deployment mode's partition query carries the run's flags: the node answers with the clients of its
    partition and the number of examples each holds in its own data; without the flags, the partition only."""
    import shlex
    from types import SimpleNamespace

    import flwr.app
    from fedfull_flower.node import answer_query
    from fedfull_flower.transport import MESSAGE_KEY
    monkeypatch.setattr(flwr.app, "Message", lambda content, reply_to: content[MESSAGE_KEY])
    flags = argv(tiny_dir, dolly, tmp_path / "out", "--num_clients", "5")
    ask = {"ask": "partition", "script": "fedkseed", "argv": shlex.join(flags), "key": "0" * 16}
    node = {"partition-id": 1, "num-partitions": 2, "trust-server-paths": "true"}
    answer = answer_query(SimpleNamespace(content={MESSAGE_KEY: ask}), SimpleNamespace(node_config=node))
    held = fk.load_data(fk.parse_args(flags), None)[0].clients
    assert answer["clients"] == [1, 3] and answer["sizes"] == [len(held[1]), len(held[3])]
    plain = answer_query(SimpleNamespace(content={MESSAGE_KEY: {"ask": "partition"}}),
                         SimpleNamespace(node_config=node))
    assert plain == {"partition-id": 1, "num-partitions": 2}
    refused = answer_query(SimpleNamespace(content={MESSAGE_KEY: ask}), SimpleNamespace(node_config={
        "partition-id": 1, "num-partitions": 2}))  # the server chose the data path, and this node does not trust it
    assert "sizes" not in refused


@pytest.mark.parametrize("path", ["/etc/passwd", "/no/such/file.jsonl"])
def test_a_server_chosen_path_is_refused_alike_whether_it_exists_or_not(path):
    """The trust check comes before the flags are parsed: the answer is the same for a path that exists and one that
    does not, so the server cannot probe the node's files."""
    with pytest.raises(fk.ConfigError) as e:
        node_args(cfg(f"--device cpu --data_path {path}", key="0" * 16), {})
    assert str(e.value) == f"the server chose --data_path {path}: this node's config does not set data-path (or " \
                           "trust-server-paths=true): refused"
    with pytest.raises(fk.ConfigError, match="the server chose --data_path"):  # argparse's = and prefix spellings
        node_args(cfg(f"--device cpu --data_pa={path}", key="0" * 16), {})


@pytest.mark.parametrize("script, argv, words", [
    ("fedavg", "--method lora --lora_r 100000", "--lora_r 100000 is more than this node allows (max-lora-r 256)"),
    ("fedkseed", "--local_steps 50000 --batch_size 1000", "--local_steps x --batch_size = 50000000 examples a round, "
                                                         "more than this node allows (max-examples 1000000)"),
    ("fedkseed", "--local_steps 2000 --estimator fzoo --directions 1000", "examples a round, more than this node"),
    ("fedcybgd", "--local_steps 1 --batch_size 4000 --grad_accum 100 --max_length 512",
     "--batch_size x --grad_accum x --max_length = 204800000 tokens a step, more than this node allows"),
])
def test_products_of_sizes_and_the_lora_rank_are_bounded(script, argv, words):
    import importlib
    module = importlib.import_module(script)
    key = run_key(script, module.parse_args(["--device", "cpu"]))
    with pytest.raises(fk.ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        node_args({"script": script, "argv": "--device cpu " + argv, "key": key}, {})


def test_a_node_trains_only_its_own_clients_and_bounds_its_state_dir(tiny_dir, dolly, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    """Partition 0 of 2 with 4 clients: clients 0 and 2 are its own; 1 (another partition's), -2 and 6 (no such
    client) are refused with one line each while its own train; a state dir past max-state-bytes refuses to grow."""
    import shlex
    from types import SimpleNamespace

    import flwr.app
    from fedfull_flower.node import handle
    from fedfull_flower.transport import MESSAGE_KEY
    monkeypatch.setattr(flwr.app, "Message", lambda content, reply_to: content[MESSAGE_KEY])
    monkeypatch.setattr(flwr.app, "ConfigRecord", dict)
    monkeypatch.setattr(flwr.app, "RecordDict", dict)
    flags = argv(tiny_dir, dolly, tmp_path / "out")  # 4 clients
    key = run_key("fedkseed", fk.parse_args(flags))
    down = fk.encode_download(fk.np.zeros(16, fk.np.float32), None)
    msg = {"script": "fedkseed", "argv": shlex.join(flags), "key": key, "round": 1, "clients": [0, 1, 2, -2, 6],
           "downloads": [down] * 5, "held": [""] * 5, "after": ["1"] * 5}
    node = {"partition-id": 0, "num-partitions": 2, "trust-server-paths": "true", "state-dir": str(tmp_path / "s")}
    reply = handle(SimpleNamespace(content={MESSAGE_KEY: msg}), SimpleNamespace(node_config=node))
    assert [bool(u) for u in reply["uploads"]] == [True, False, True, False, False]
    assert all(reply["errors"][i].startswith("ConfigError: client ") and "is not one of this node's" in
               reply["errors"][i] for i in (1, 3, 4))
    small = dict(node, **{"max-state-bytes": 10, "state-dir": str(tmp_path / "small")})  # A alone is 64 bytes
    reply = handle(SimpleNamespace(content={MESSAGE_KEY: dict(msg, clients=[0], downloads=[down], held=[""],
                                                               after=["1"])}), SimpleNamespace(node_config=small))
    assert "more than this node allows (max-state-bytes 10)" in reply["errors"][0]
