"""The tables' fused optimizer is built from the config: its keyword arguments are what
the optimizer class torchrec constructs takes, and what fbgemm's kernel reads."""

from __future__ import annotations

import inspect

import pytest
import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_training import WeightDecayMode

from gmeta.config import ConfigError, load_config
from gmeta.parallel.sharding import EMBEDDING_OPTIMIZERS, embedding_optimizer_kwargs


@pytest.mark.parametrize("name", sorted(EMBEDDING_OPTIMIZERS))
@pytest.mark.parametrize("wd", [0.0, 0.25])
def test_embedding_optimizer_kwargs_construct_the_optimizer(debug_config_path, name, wd):
    """torchrec constructs the optimizer class with these kwargs before sharding (also on a
    GPU, where Adam tables run): every optimizer with a weight decay must accept them."""
    cfg = load_config(debug_config_path, [f"optim.embedding_optimizer={name}", f"optim.embedding_weight_decay={wd}"])
    if wd and name in ("sgd", "adagrad"):
        with pytest.raises(ConfigError, match=f"optim.embedding_weight_decay: fbgemm's '{name}' has no weight decay"):
            embedding_optimizer_kwargs(cfg)
        return
    kwargs = embedding_optimizer_kwargs(cfg)
    assert kwargs["lr"] == cfg.optim.embedding_lr
    assert kwargs.get("weight_decay", 0.0) == wd
    EMBEDDING_OPTIMIZERS[name]([torch.nn.Parameter(torch.zeros(3, 2))], **kwargs)  # as torchrec does


def test_adam_tables_take_fbgemm_adams_own_decay(debug_config_path):
    """fbgemm's Adam kernel has no weight-decay mode (its decay is the decoupled one): the
    kwargs carry the decay and no mode; row-wise Adagrad's carry the L2 mode."""
    from fbgemm_gpu.split_embedding_codegen_lookup_invokers import lookup_adam

    assert "weight_decay_mode" not in inspect.getsource(lookup_adam)
    adam = embedding_optimizer_kwargs(load_config(debug_config_path, ["optim.embedding_optimizer=adam",
                                                                      "optim.embedding_weight_decay=0.1"]))
    assert adam == {"lr": 0.05, "weight_decay": 0.1}
    rowwise = embedding_optimizer_kwargs(load_config(debug_config_path, ["optim.embedding_weight_decay=0.1"]))
    assert rowwise == {"lr": 0.05, "weight_decay": 0.1, "weight_decay_mode": WeightDecayMode.L2}
