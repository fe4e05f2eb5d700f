import pytest

from swarm.config import NodeConfig, config_dir, load
from swarm.errors import SwarmError


def test_default_node_config_loads():
    cfg = load(NodeConfig, config_dir() / "node.yaml")
    assert cfg.model == "gpt2-tiny" and cfg.granularity == "coarse" and cfg.micro_batch_size == 4


@pytest.mark.parametrize("text, expected", [
    ("model: gpt2-tiny\nmicro_batch: 4\n", "key 'micro_batch': unknown key"),
    ("micro_batch_size: many\n", "key 'micro_batch_size'"),
    ("micro_batch_size: 0\n", "key 'micro_batch_size'"),
    ("granularity: medium\n", "key 'granularity'"),
    ("training: {backup_every_steps: 1}\n", "key 'training.backup_every_steps': Value error, must be 0 (no backups) or at least 2"),
    ("model: [unclosed\n", "invalid YAML at line"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_bad_config_is_one_line_naming_the_key(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(SwarmError) as err:
        load(NodeConfig, path)
    msg = str(err.value)
    assert expected in msg and str(path) in msg and "\n" not in msg


def test_missing_config_file(tmp_path):
    with pytest.raises(SwarmError, match="config file not found: .*nope.yaml"):
        load(NodeConfig, tmp_path / "nope.yaml")


def test_empty_config_gives_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load(NodeConfig, path) == NodeConfig()
