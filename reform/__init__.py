"""Rectification of the inherited weights: least squares, ADMM, bias compensation."""
