"""Particle detachment from the carbon-black/binder domain (NumPy/SciPy; no dolfinx).

Gap measurement from images, the Maxwell-material detachment model and its bootstrap fit
(paper 003). Importing this package never imports dolfinx or gmsh.
"""

__all__: list[str] = []
