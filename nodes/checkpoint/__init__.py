"""Everything about Stable Diffusion checkpoints that is not a node.

detect.py (family and architecture from key names and shapes), load.py (building
components offline from a single file or a diffusers folder), families.py (what
shapes cannot tell), tokenizer.py (the CLIP tokenizer from shipped BPE merges),
to_original.py (the diffusers -> original-layout writer) and tiny.py (tiny
random-weight models for tests and the demo checkpoint). Importing this package
imports no torch.
"""
