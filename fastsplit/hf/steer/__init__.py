"""Steering a model: the modules (layer.py) and the handle (model.py)."""
