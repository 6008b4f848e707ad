"""Routing by warmth on its own: which worker a job goes to, and what the map forgets."""
from __future__ import annotations

from engine.server.cluster_warmth import WarmthMap

JOB = {"ckpt": "sig-ckpt", "clip": "sig-clip", "vae": "sig-vae"}


def test_the_worker_holding_most_of_the_job_wins_and_ties_go_to_the_longest_idle():
    warmth = WarmthMap()
    warmth.remember("a", ["sig-ckpt"])
    warmth.remember("b", ["sig-ckpt", "sig-clip"])
    assert warmth.choose(["a", "b", "c"], JOB, fallback="c") == "b"
    assert warmth.choose(["a", "c"], JOB, fallback="c") == "a"
    assert warmth.choose(["c", "d"], JOB, fallback="x") == "c"  # nobody warm: the first (longest idle)
    assert warmth.choose([], JOB, fallback="x") == "x"


def test_the_oldest_signatures_are_forgotten_beyond_the_limit_and_a_reuse_refreshes_one():
    warmth = WarmthMap(limit=2)
    warmth.remember("a", ["sig-ckpt", "sig-clip"])
    warmth.remember("a", ["sig-ckpt"])  # used again: now the newest
    warmth.remember("a", ["sig-vae"])  # evicts sig-clip, the oldest
    assert warmth.choose(["b", "a"], {"n": "sig-clip"}, fallback="b") == "b"
    assert warmth.choose(["b", "a"], {"n": "sig-ckpt"}, fallback="b") == "a"
    assert warmth.choose(["b", "a"], {"n": "sig-vae"}, fallback="b") == "a"


def test_a_lost_worker_and_a_cleared_cache_are_cold_again():
    warmth = WarmthMap()
    warmth.remember("a", ["sig-ckpt"])
    warmth.remember("b", ["sig-ckpt"])
    warmth.forget("a")
    assert warmth.choose(["a", "b"], JOB, fallback="a") == "b"
    warmth.clear()
    assert warmth.choose(["a", "b"], JOB, fallback="b") == "a"
