"""Releasing: merging, shipping, promoting an adapter, and the feedback loop that chains them."""
