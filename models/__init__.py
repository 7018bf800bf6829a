"""The generators, in PyTorch (+ MONAI): the dHVAE and its baselines, one file per idea.

``registry.py`` maps a generator's name to its class; ``train.py`` fits any of them, ``sampler.py``
draws pairs from any of them, ``checkpoint.py`` stores and loads them (``weights_only=True``).
"""
