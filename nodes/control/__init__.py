"""ControlNet: reading ControlNet files (load.py) and adding their residuals to the UNet (apply.py).

The nodes are in ``nodes/controlnet.py``; the Canny preprocessor in ``nodes/canny.py``.
"""
