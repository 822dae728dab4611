"""compress: post-training compression for transformer language models."""

__version__ = "0.1.0"


def apply(model, recipe, output, **options):
    """Compress a model (source string or nn.Module) with a recipe (path, bundled name, Recipe
    or list of pass configs) into the artifact directory `output`; see compress.api.apply."""
    from compress.api import apply as run

    return run(model, recipe, output, **options)


def load(path, device=None, dtype=None, verify=True):
    """Load a compress artifact (or any supported model source) as a working nn.Module.
    verify=False skips checking the files against their recorded SHA-256 (faster)."""
    from compress.runtime.artifact import load_artifact

    return load_artifact(path, device=device, dtype=dtype, verify=verify)
