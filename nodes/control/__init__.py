"""ControlNet: reading ControlNet files (load.py; FLUX's in flux_load.py) and adding their residuals
to the model's network (apply.py; what a family's ControlNet returns: unet.py, flux.py).

The nodes are in ``nodes/controlnet.py``; the Canny preprocessor in ``nodes/canny.py``.
"""
