"""compress: post-training compression for transformer language models."""

__version__ = "0.1.0"


def load(path, device=None, dtype=None):
    """Load a compress artifact (or any supported model source) as a working nn.Module."""
    from compress.runtime.artifact import load_artifact

    return load_artifact(path, device=device, dtype=dtype)
