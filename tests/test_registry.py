"""The registry: built-ins through the entry point, declarations match functions, schemas."""
from __future__ import annotations

import subprocess
import sys

import pytest

import stub_nodes as stubs
from engine.node import Input, Output, define_node
from engine.registry import Registry, RegistryError, default_registry


def test_builtin_nodes_arrive_through_the_entry_point():
    registry = Registry()
    registry.load_entry_points()
    assert registry.load_errors == {}
    assert len(registry) > 0
    assert all(spec.python_module == "nodes" for spec in registry)


def test_every_registered_node_signature_matches_its_declaration():
    problems = [p for spec in default_registry() for p in spec.signature_mismatches()]
    problems += [p for spec in stubs.make_registry() for p in spec.signature_mismatches()]
    assert problems == []


def test_a_mismatched_declaration_is_caught():
    @define_node("Bad", inputs=[Input("a", "INT"), Input("b", "INT")])
    def bad(ctx, a, c):
        return None

    problems = bad.signature_mismatches()
    assert any("'b'" in p for p in problems) and any("'c'" in p for p in problems)


def test_inputs_no_parameter_can_name_arrive_through_keywords():
    """ComfyUI's per-block merge nodes name inputs "time_embed." and "input_blocks.0.": a function
    with **kwargs takes them; without it they are still caught, and an undeclared named parameter
    is caught either way."""
    @define_node("Dotted", inputs=[Input("a", "INT"), Input("time_embed.", "FLOAT")])
    def dotted(ctx, a, **ratios):
        return ratios

    @define_node("DottedBad", inputs=[Input("time_embed.", "FLOAT")])
    def dotted_bad(ctx, extra, **ratios):
        return ratios

    @define_node("NoKeywords", inputs=[Input("time_embed.", "FLOAT")])
    def no_keywords(ctx):
        return None

    assert dotted.signature_mismatches() == []
    assert dotted(None, a=1, **{"time_embed.": 0.5}) == {"time_embed.": 0.5}
    assert any("'extra'" in p for p in dotted_bad.signature_mismatches())
    assert any("'time_embed.'" in p for p in no_keywords.signature_mismatches())


def test_duplicate_names_and_aliases_are_refused():
    registry = stubs.make_registry()
    with pytest.raises(RegistryError):
        registry.add(stubs.number)

    @define_node("Other", aliases=["Number"])
    def other(ctx):
        return None

    with pytest.raises(RegistryError):
        registry.add(other)


def test_object_info_has_comfyui_shape_and_aliases():
    @define_node("Sampler", aliases=["SamplerSimple"], category="sampling", outputs=[Output("LATENT", "LATENT")],
                 inputs=[Input("seed", "INT", default=0, min=0, max=2**64 - 1, control_after_generate=True),
                         Input("name", "COMBO", choices=["a", "b"], default="a"),
                         Input("latent", "LATENT"), Input("mask", "MASK", optional=True)])
    def sampler(ctx, seed, name, latent, mask=None):
        """Denoises."""
        return (latent,)

    registry = Registry()
    registry.add(sampler)
    info = registry.object_info()
    assert set(info) == {"Sampler", "SamplerSimple"}
    entry = info["Sampler"]
    assert entry["input"]["required"]["seed"] == ["INT", {"default": 0, "min": 0, "max": 2**64 - 1,
                                                          "control_after_generate": True}]
    assert entry["input"]["required"]["name"] == [["a", "b"], {"default": "a"}]
    assert entry["input"]["required"]["latent"] == ["LATENT"]
    assert entry["input"]["optional"]["mask"] == ["MASK"]
    assert entry["input_order"] == {"required": ["seed", "name", "latent"], "optional": ["mask"]}
    assert entry["output"] == ["LATENT"] and entry["output_name"] == ["LATENT"] and entry["output_is_list"] == [False]
    assert entry["description"] == "Denoises." and entry["category"] == "sampling"
    assert info["SamplerSimple"]["name"] == "SamplerSimple"
    schema = registry.schemas()["Sampler"]
    assert [i["name"] for i in schema["inputs"]] == ["seed", "name", "latent", "mask"]
    assert schema["inputs"][1]["choices"] == ["a", "b"]


def test_third_party_plugin_failure_is_reported_not_fatal(tmp_path):
    # A real entry point in a real (temporary) distribution whose module raises on import.
    dist = tmp_path / "site"
    (dist / "brokenplugin").mkdir(parents=True)
    (dist / "brokenplugin" / "__init__.py").write_text("raise RuntimeError('boom')\n")
    info = dist / "brokenplugin-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: brokenplugin\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kiln.nodes]\nbroken = brokenplugin\n")
    code = ("import sys; sys.path.insert(0, %r)\n"
            "from engine.registry import Registry\n"
            "r = Registry(); r.load_entry_points(); print(sorted(r.load_errors)); print(len(r) > 0)") % str(dist)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "['broken']" in out.stdout and "True" in out.stdout
