"""How a node declares itself.

One declaration drives everything that needs to know about a node: validation,
the executor's call, the editor's widgets (Kiln schema) and ComfyUI's
``/object_info`` shape. A node is a plain function whose first parameter is the
:class:`~engine.context.NodeContext` and whose other parameters are its inputs, by name.

    @define_node(
        "ImageInvert",
        category="image",
        inputs=[Input("image", IMAGE)],
        outputs=[Output("IMAGE", IMAGE)],
    )
    def image_invert(ctx, image):
        return (1.0 - image,)
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from engine import types as T
from engine.budget import Size
from engine.comfy_v3 import comfy_inputs


class _NoDefault:
    def __repr__(self) -> str:
        return "NO_DEFAULT"


NO_DEFAULT: Any = _NoDefault()


class _Always:
    """Fingerprint value meaning "this node's result can never be reused"."""

    def __repr__(self) -> str:
        return "ALWAYS"


ALWAYS: Any = _Always()

#: A fixed list, or a function of the Environment (files in a folder), evaluated
#: whenever a schema is served or a workflow validated.
Choices = Sequence[str] | Callable[[Any], Sequence[str]]


@dataclass(frozen=True)
class Grow:
    """A group of sockets that grows as the user links them (ComfyUI's Autogrow).

    Kiln runs and validates each socket as its own input, named ``<group>.<name>`` as ComfyUI's
    API form names them; this one object says which inputs form the group, so ``/object_info`` can
    show them as one growing input without guessing from names. Sockets are named ``prefix0``,
    ``prefix1``, ... (``count`` of them) or by ``names``; the first ``min`` are required.
    """

    group: str
    min: int = 1
    prefix: str = ""
    count: int = 0
    names: tuple[str, ...] = ()
    #: The name ComfyUI gives the template input (shown only where several templates share a group).
    template: str = "value"

    def __post_init__(self) -> None:
        if bool(self.prefix) == bool(self.names):
            raise ValueError(f"growing input {self.group}: give either a prefix (with a count) or names")
        if self.prefix and self.count < 1:
            raise ValueError(f"growing input {self.group}: a prefix needs a count of at least 1")
        if not 0 <= self.min <= len(self.slot_names()):
            raise ValueError(f"growing input {self.group}: min {self.min} is outside 0..{len(self.slot_names())}")

    def slot_names(self) -> list[str]:
        """The sockets' own names, without the group: image0, image1, ... or the given names."""
        return list(self.names) if self.names else [f"{self.prefix}{i}" for i in range(self.count)]

    def inputs(self, type: str, **options: Any) -> list["Input"]:
        """The group's sockets as Kiln inputs, the first ``min`` required, each knowing its group."""
        return [Input(f"{self.group}.{name}", type, optional=i >= self.min, grow=self, **options)
                for i, name in enumerate(self.slot_names())]


@dataclass(frozen=True)
class Input:
    """One typed input. Inputs of widget types may be typed in or linked."""

    name: str
    type: str
    default: Any = NO_DEFAULT
    min: float | None = None
    max: float | None = None
    step: float | None = None
    round: float | None = None
    choices: Choices | None = None
    multiline: bool = False
    optional: bool = False
    tooltip: str = ""
    #: Seed-like inputs: the editor offers fixed / increment / randomize after a run.
    control_after_generate: bool = False
    #: Hints for the editor: {"display": "slider"}, {"image_upload": True}, ...
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The choices are suggestions, not a closed list: validation skips the
    #: membership check and the node's ``validate`` hook judges the value instead
    #: (ComfyUI does the same for inputs its VALIDATE_INPUTS takes over, e.g.
    #: LoadImage accepting a path or URL besides the listed input files).
    open_choices: bool = False
    #: The default when the workflow came in ComfyUI's format (API or editor), where
    #: ComfyUI's own default differs from Kiln's (SaveImage's "ComfyUI" prefix):
    #: filled in when such a workflow is parsed, so its files are named as in ComfyUI.
    comfy_default: Any = NO_DEFAULT
    #: Evaluated only when the node asks for it (its spec's ``lazy`` hook), so the branch
    #: feeding it runs only if needed (ComfyUI's lazy inputs: a switch runs one branch).
    lazy: bool = False
    #: ComfyUI's DynamicCombo: each choice brings its own sub-inputs, {choice: (sub, ...)}. The
    #: sub-inputs are declared beside it as ``"<name>.<sub>"`` (the API form's names); an editor
    #: file lists the chosen option's widget values right after the combo's own (NodeSpec.option_widgets).
    dynamic: Mapping[str, tuple[str, ...]] | None = None
    #: The growing group (ComfyUI's Autogrow) this socket belongs to; made by :meth:`Grow.inputs`.
    grow: Grow | None = None
    #: Kiln's own addition to a ComfyUI node (LoadImage's ``background``): left out of
    #: ``/object_info``, so ComfyUI's frontend neither shows it nor reads an editor file's values
    #: into it, and laid out after every input ComfyUI knows (an editor file carries it last).
    #: It must be optional; ComfyUI-format workflows get its ``comfy_default``.
    comfy_hidden: bool = False
    #: A value of a widget type that only a link gives (ComfyUI's ``force_input``: SaveText's
    #: ``text``): a socket, never a widget, so an editor file's ``widgets_values`` hold no slot for it.
    force_input: bool = False

    def __post_init__(self) -> None:
        if self.choices is not None and self.type != T.COMBO:
            object.__setattr__(self, "type", T.COMBO)

    @property
    def widget(self) -> bool:
        """Whether the editor shows a widget for it (a value type, not forced to a socket)."""
        return self.type in T.WIDGET_TYPES and not self.force_input

    @property
    def required(self) -> bool:
        return not self.optional and self.default is NO_DEFAULT

    def choice_list(self, env: Any = None) -> list[str]:
        if self.choices is None:
            return []
        if callable(self.choices):
            return list(self.choices(env)) if env is not None else []
        return list(self.choices)

    def options(self) -> dict[str, Any]:
        """The input's options as ComfyUI's second list element expects them."""
        opts: dict[str, Any] = {}
        if self.default is not NO_DEFAULT:
            opts["default"] = self.default
        for key in ("min", "max", "step", "round"):
            value = getattr(self, key)
            if value is not None:
                opts[key] = value
        if self.multiline:
            opts["multiline"] = True
        if self.control_after_generate:
            opts["control_after_generate"] = True
        if self.tooltip:
            opts["tooltip"] = self.tooltip
        if self.lazy:
            opts["lazy"] = True
        if self.force_input:
            opts["forceInput"] = True
        opts.update(self.extra)
        return opts

    def comfy_options(self) -> dict[str, Any]:
        """:meth:`options` as ComfyUI's clients see them: with ComfyUI's default where it differs."""
        opts = self.options()
        if self.comfy_default is not NO_DEFAULT:
            opts["default"] = self.comfy_default
        return opts


@dataclass(frozen=True)
class Output:
    name: str
    type: str
    tooltip: str = ""


@dataclass
class Result:
    """What a node returns when it has UI output (saved files, text) to report."""

    outputs: tuple = ()
    ui: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    """How one node runs the copies of itself from several queued jobs as one call.

    The server may run jobs whose graphs are the same except for some literal
    inputs of such nodes (a sampler's seed) together: nodes they share run once,
    this node runs once for all of them through ``run``, and what follows runs per
    job. The declaration lives on the node because only the node knows which of
    its inputs can differ within one call and how it keeps each job's result equal
    to its single run.

    ``run(ctx, items, **inputs)``: ``items`` holds one dict per job with that job's
    values of the ``vary`` inputs, literal or linked (a sampler's latent, which
    differs per job when an upstream node such as AddNoise varies too); ``inputs``
    are the values all jobs share. It
    returns one output tuple per item, in order, or None to decline (the jobs'
    inputs are a case the node cannot batch exactly): the node then runs per job.
    """

    vary: tuple[str, ...]
    run: Callable[..., "list[tuple] | None"]


FingerprintFn = Callable[[Any, Mapping[str, Any]], Any]
#: ``lazy(values, pending) -> names``: given the values at hand (every non-lazy input, and lazy
#: ones already evaluated) and ``pending`` (lazy inputs that are linked but not evaluated), the
#: pending inputs the node needs; called again after those arrive, until it asks for nothing.
LazyFn = Callable[[Mapping[str, Any], "frozenset[str]"], "Iterable[str]"]
PrefetchFn = Callable[[Any, Mapping[str, Any]], None]
ValidateFn = Callable[[Any, Mapping[str, Any]], "list[tuple[str, str]]"]


@dataclass
class NodeSpec:
    """A registered node type: its declaration plus the function that runs it."""

    type: str
    fn: Callable[..., Any]
    inputs: list[Input]
    outputs: list[Output]
    category: str = ""
    display_name: str = ""
    description: str = ""
    version: int = 1
    output_node: bool = False
    #: ``fingerprint(env, literal_inputs) -> hashable | ALWAYS``: external state the
    #: result depends on (a file's content hash), so a changed file re-runs the node.
    fingerprint: FingerprintFn | None = None
    #: ``validate(env, literal_inputs) -> [(input_name, message)]``: checks that need
    #: the environment (does the file exist?), run before anything executes.
    validate: ValidateFn | None = None
    aliases: tuple[str, ...] = ()
    python_module: str = "nodes"
    deprecated: bool = False
    #: How the node sizes the images/latents it outputs, read from its inputs, so
    #: validation can check the job against the resource budget (engine.budget).
    size: Size | None = None
    #: ``prefetch(env, literal_inputs)``: slow preparation the node's run will need
    #: (reading a model file), started in the background as soon as the job is planned,
    #: so it overlaps the nodes and start-up work before it. It must leave its result
    #: where the node's run finds it (the model manager); errors are ignored here and
    #: reported by the node itself when it runs.
    prefetch: PrefetchFn | None = None
    #: How queued jobs differing only in some of this node's literal inputs run it as one call (see :class:`Batch`).
    batch: Batch | None = None
    #: Which of its ``lazy`` inputs the node needs (:data:`LazyFn`); a pending input it does not
    #: ask for reaches the function as None, and what feeds only it does not run.
    lazy: LazyFn | None = None

    def __post_init__(self) -> None:
        if not self.display_name:
            self.display_name = self.type
        names = [i.name for i in self.inputs]
        if len(set(names)) != len(names):
            raise ValueError(f"node {self.type}: duplicate input names {names}")
        if self.size is not None:
            unknown = [n for n in self.size.input_names() if n not in names]
            if unknown:
                raise ValueError(f"node {self.type}: size names unknown input(s) {unknown}")
        if any(i.comfy_hidden and not i.optional for i in self.inputs):
            raise ValueError(f"node {self.type}: an input hidden from ComfyUI's clients must be optional")
        if any(i.lazy for i in self.inputs) != (self.lazy is not None):
            raise ValueError(f"node {self.type}: lazy inputs and a lazy hook come together")
        for inp in self.inputs:
            missing = [f"{inp.name}.{sub}" for subs in (inp.dynamic or {}).values() for sub in subs
                       if f"{inp.name}.{sub}" not in names]
            if missing:
                raise ValueError(f"node {self.type}: {inp.name}'s options name undeclared input(s) {missing}")
        groups: dict[Grow, list[str]] = {}
        for inp in self.inputs:
            if inp.grow is not None:
                groups.setdefault(inp.grow, []).append(inp.name)
        for grow, members in groups.items():
            if members != [f"{grow.group}.{n}" for n in grow.slot_names()]:
                raise ValueError(f"node {self.type}: growing input {grow.group} must declare its sockets "
                                 f"with Grow.inputs, in order")
        if self.batch is not None and not set(self.batch.vary) <= set(names):
            raise ValueError(f"node {self.type}: batch varies unknown input(s) {sorted(set(self.batch.vary) - set(names))}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def input(self, name: str) -> Input | None:
        return next((i for i in self.inputs if i.name == name), None)

    def comfy_input_order(self) -> list[Input]:
        """Inputs as ComfyUI lays them out: required ones, then optional ones, each in declared order,
        then Kiln's own additions (:attr:`Input.comfy_hidden`).

        ``/object_info`` lists them so, ComfyUI's editor builds its widgets in this
        order, and an editor file's positional ``widgets_values`` follow it.
        """
        known = [i for i in self.inputs if not i.comfy_hidden]
        return ([i for i in known if not i.optional] + [i for i in known if i.optional]
                + [i for i in self.inputs if i.comfy_hidden])

    def widget_order(self) -> list[Input]:
        """The widget inputs in the order an editor file's ``widgets_values`` lists them, without
        the sub-inputs of dynamic combos (which follow their combo: :meth:`option_widgets`), growing
        sockets (links, as ComfyUI makes them) and values forced to a socket (:attr:`Input.force_input`)."""
        subs = self.option_input_names()
        return [i for i in self.comfy_input_order()
                if i.widget and i.name not in subs and i.grow is None]

    def option_input_names(self) -> set[str]:
        """The names of every dynamic combo's sub-inputs (``resize_type.width``, ...)."""
        return {f"{i.name}.{sub}" for i in self.inputs for names in (i.dynamic or {}).values() for sub in names}

    def option_widgets(self, combo: Input, choice: Any) -> list[Input]:
        """The widget sub-inputs a dynamic combo's ``choice`` brings, in their order: what an editor
        file lists right after the combo's value (ComfyUI's DynamicCombo)."""
        names = (combo.dynamic or {}).get(choice, ()) if isinstance(choice, str) else ()
        found = [self.input(f"{combo.name}.{sub}") for sub in names]
        return [i for i in found if i is not None and i.widget]

    def signature_mismatches(self) -> list[str]:
        """Differences between the function's parameters and the declared inputs.

        Empty when they agree; used by a test over every registered node so that a
        declaration cannot drift from the code it describes.
        """
        params = list(inspect.signature(self.fn).parameters.values())
        problems = []
        if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
            return [f"{self.type}: first parameter must be the context"]
        declared = {i.name: i for i in self.inputs}
        taken = {p.name: p for p in params[1:]}
        # ComfyUI names some inputs that no Python parameter can be named ("time_embed."): a
        # function taking **kwargs receives every declared input it does not name there.
        keywords = any(p.kind is p.VAR_KEYWORD for p in params[1:])
        for name, inp in declared.items():
            if name not in taken:
                if not keywords:
                    problems.append(f"{self.type}: input '{name}' has no parameter")
            elif not inp.required and taken[name].default is inspect.Parameter.empty and inp.default is NO_DEFAULT:
                problems.append(f"{self.type}: optional input '{name}' needs a default in the function")
        for name, param in taken.items():
            if name not in declared and param.kind is not param.VAR_KEYWORD:
                problems.append(f"{self.type}: parameter '{name}' is not a declared input")
        return problems

    # -- schemas ----------------------------------------------------------------

    def schema(self, env: Any = None) -> dict[str, Any]:
        """Kiln's own description of the node, for the editor and `kiln nodes`."""
        inputs = []
        for i in self.inputs:
            entry: dict[str, Any] = {"name": i.name, "type": i.type, "required": i.required, **i.options()}
            if i.type == T.COMBO:
                entry["choices"] = i.choice_list(env)
                if i.open_choices:
                    entry["open_choices"] = True
            entry["widget"] = i.widget
            if i.dynamic:
                entry["dynamic"] = {choice: [f"{i.name}.{sub}" for sub in subs] for choice, subs in i.dynamic.items()}
            inputs.append(entry)
        return {
            "type": self.type,
            "display_name": self.display_name,
            "category": self.category,
            "description": self.description,
            "version": self.version,
            "output_node": self.output_node,
            "inputs": inputs,
            "outputs": [{"name": o.name, "type": o.type, **({"tooltip": o.tooltip} if o.tooltip else {})}
                        for o in self.outputs],
            "aliases": list(self.aliases),
        }

    def object_info(self, name: str | None = None, env: Any = None) -> dict[str, Any]:
        """The node in ComfyUI's ``/object_info`` shape (dynamic combos and growing groups in
        ComfyUI's v3 form: :mod:`engine.comfy_v3`)."""
        required, optional = comfy_inputs(self, env)
        info: dict[str, Any] = {
            "input": {"required": required, **({"optional": optional} if optional else {})},
            "input_order": {"required": list(required), **({"optional": list(optional)} if optional else {})},
            "output": [o.type for o in self.outputs],
            "output_is_list": [False for _ in self.outputs],
            "output_name": [o.name for o in self.outputs],
            "name": name or self.type,
            "display_name": self.display_name,
            "description": self.description,
            "python_module": self.python_module,
            "category": self.category,
            "output_node": self.output_node,
        }
        if any(o.tooltip for o in self.outputs):
            info["output_tooltips"] = [o.tooltip for o in self.outputs]
        if self.deprecated:
            info["deprecated"] = True
        return info


def define_node(
    type: str,
    *,
    inputs: Sequence[Input] = (),
    outputs: Sequence[Output] = (),
    category: str = "",
    display_name: str = "",
    description: str = "",
    version: int = 1,
    output_node: bool = False,
    fingerprint: FingerprintFn | None = None,
    validate: ValidateFn | None = None,
    aliases: Sequence[str] = (),
    size: Size | None = None,
    prefetch: PrefetchFn | None = None,
    batch: Batch | None = None,
    lazy: LazyFn | None = None,
) -> Callable[[Callable[..., Any]], NodeSpec]:
    """Decorator turning a function into a :class:`NodeSpec`.

    The description defaults to the function's docstring, so the text a developer
    writes for readers of the code is the text users see in the editor. ``size``
    declares how the node sizes its image outputs from its inputs (see
    :mod:`engine.budget`), checked against the resource budget before a job runs.
    """

    def wrap(fn: Callable[..., Any]) -> NodeSpec:
        module = fn.__module__ or "nodes"
        return NodeSpec(
            type=type,
            fn=fn,
            inputs=list(inputs),
            outputs=list(outputs),
            category=category,
            display_name=display_name,
            description=description or inspect.cleandoc(fn.__doc__ or ""),
            version=version,
            output_node=output_node,
            fingerprint=fingerprint,
            validate=validate,
            aliases=tuple(aliases),
            size=size,
            prefetch=prefetch,
            batch=batch,
            lazy=lazy,
            python_module="nodes" if module.startswith("nodes") else f"custom_nodes.{module.split('.')[0]}",
        )

    return wrap
