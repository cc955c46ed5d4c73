"""Run configs (``ml_collections``), loaded by path: ``--config=configs/default.py[:ARG]``.

Installed with pfm, so that ``from configs import default`` works from any folder (a notebook, a
Colab runtime) and a config file may import its siblings (``from configs import vanilla``).
"""
