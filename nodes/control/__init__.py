"""ControlNet: reading ControlNet files (load.py; FLUX's in flux_load.py, SD3's in sd3.py, SDXL
union's in sdxl_union.py, Qwen-Image's in qwen_image.py) and adding their residuals to the model's
network (apply.py; what a family's ControlNet returns: unet.py with sdxl_union.py, flux.py, sd3.py,
qwen_image.py).

The nodes are in ``nodes/controlnet.py``; the Canny preprocessor in ``nodes/canny.py``.
"""
