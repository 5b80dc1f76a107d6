"""fem_anode: image-based FEniCSx modelling of aged silicon-based Li-ion battery anodes.

Subpackages:

* :mod:`fem_anode.io` -- images with voxel size and phase map; atomic result files.
* :mod:`fem_anode.imaging` -- synthetic microstructures, segmentation, image metrics (NumPy/SciPy).
* :mod:`fem_anode.meshing` -- segmented images to tagged gmsh meshes.
* :mod:`fem_anode.fem` -- dolfinx solvers (needs FEniCSx).
* :mod:`fem_anode.detachment` -- particle-detachment model and fit (NumPy/SciPy).

Units: SI throughout the public API (lengths in metres) unless a docstring says otherwise.
Importing this package imports neither dolfinx nor gmsh.
"""

__version__ = "0.1.0"
