"""Modules built for loading skip their initialisers on the building thread only (nodes.checkpoint.no_init).

The loaders' parity tests prove that what is built this way and then filled from a file gives the
reference pipelines' results; these tests pin the rule itself: nothing initialised on the building
thread, everything initialised as usual on any other thread and after the block, constructors'
own buffers kept.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.init as torch_init

from nodes.checkpoint.no_init import skipped_init


def _seeded_linear() -> torch.Tensor:
    torch.manual_seed(7)
    return torch.nn.Linear(8, 8).weight.detach().clone()


def test_initialisers_do_nothing_on_the_building_thread_and_are_restored_after():
    originals = {name: getattr(torch_init, name) for name in ("normal_", "kaiming_uniform_", "zeros_")}
    zeros = torch.zeros(4, 4)
    with skipped_init():
        assert torch_init.normal_(zeros) is zeros and torch.count_nonzero(zeros) == 0
        assert torch_init.kaiming_uniform_(zeros) is zeros and torch.count_nonzero(zeros) == 0
    assert {name: getattr(torch_init, name) for name in originals} == originals
    torch_init.normal_(zeros)
    assert torch.count_nonzero(zeros) > 0


def test_another_thread_initialises_as_usual_while_one_builds():
    expected = _seeded_linear()
    inside, release = threading.Event(), threading.Event()

    def builder() -> None:
        with skipped_init():
            inside.set()
            release.wait(10)

    thread = threading.Thread(target=builder)
    thread.start()
    try:
        assert inside.wait(10)
        assert torch.equal(_seeded_linear(), expected)  # the wrappers are in place, and pass through here
        with skipped_init():  # a second builder leaves the first one's wrappers working
            zeros = torch.zeros(3)
            assert torch_init.uniform_(zeros) is zeros and torch.count_nonzero(zeros) == 0
    finally:
        release.set()
        thread.join(10)
    assert torch.equal(_seeded_linear(), expected)


def test_transformers_second_pass_is_skipped_and_computed_buffers_kept():
    from transformers import Qwen3Config, Qwen3Model

    from nodes.checkpoint.load import _empty

    config = Qwen3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, vocab_size=64)
    built = _empty(Qwen3Model, config)
    assert built.layers[0].mlp.up_proj.weight.is_meta
    reference = Qwen3Model(config)  # after the block: initialised as usual
    assert reference.layers[0].mlp.up_proj.weight.std() > 0
    # transformers marks each module its pass initialised; the built one's pass never ran
    assert reference.layers[0].mlp.up_proj._is_hf_initialized
    assert not getattr(built.layers[0].mlp.up_proj, "_is_hf_initialized", False)
    assert torch.equal(built.rotary_emb.inv_freq, reference.rotary_emb.inv_freq)
