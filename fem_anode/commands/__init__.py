"""One module per ``fem-anode`` subcommand: ``register(subparsers, name)`` adds its parser.

Subcommand modules import heavy dependencies (dolfinx, gmsh, matplotlib) inside their run
function only, so ``fem-anode --help`` is fast and works without them.
"""
