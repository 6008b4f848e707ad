// `node --test tests/js`: the editor's model cases on Node's built-in runner.
import test from "node:test";
import { cases } from "./graph_model_cases.mjs";

for (const [name, fn] of cases) test(name, fn);
