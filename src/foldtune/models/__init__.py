"""Backbone, pooling and regression head."""
