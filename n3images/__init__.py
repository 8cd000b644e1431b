"""Image restoration with N3 blocks (denoising, super-resolution).

Built on :mod:`n3sets`' continuous KNN relaxation; depends on n3sets, never the other way round.
The image models are not implemented yet (see the project's open issues).
"""
