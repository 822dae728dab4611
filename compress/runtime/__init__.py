"""What a loaded compressed model needs, and nothing that made it.

    modules.py     QuantizedLinear, the 2:4 Linears and the kernel dispatch
    checkpoint.py  reading any checkpoint: resolve a source, its config, its tensors lazily
    artifact.py    the artifact reader: config + safetensors -> nn.Module (compress.load)
    norms.py       CRMSNorm and the rebuild of converted norms (rmsnorm pass)
    precompute.py  the precomputed first-layer table and its readers (precompute pass)
    heads.py       attention resized to pruned head counts (prune_heads pass)
    sparse24.py    2:4 storage modules put in place on load (sparsify pass)

The runtime imports compress.formats, compress.kernels and compress.models, never
compress.passes: loading an artifact imports no pass module (tests/test_runtime.py checks it).
"""
