"""Sub-pixel phase boundaries of a 2D label image as a network of shared curves.

The boundary network is built once for all phases, so neighbouring phases share their curves
exactly (no gaps, overlaps or slivers):

1. :func:`clean_labels` merges small islands into the phase around them (holes larger than
   the threshold are kept) and removes pinch points (two diagonal pixels of one region that
   touch only at a corner), so that every region is bounded by simple closed loops.
2. Every pixel edge between two different regions (4-connected components of one label) or
   between a pixel and the image box is a *crack edge*. Crack edges meet at pixel corners;
   corners where three or more regions meet, where an interface reaches the box, and the four
   box corners are *junctions*. Maximal runs of crack edges between junctions are *chains*; a
   chain separates exactly two regions (or one region and one box side). Closed chains
   without a junction (islands, holes) are split into three.
3. Each interior chain vertex sits on the segment between the centres of the two pixels its
   crack edge separates, where the difference of the two phases' Gaussian-smoothed
   indicators is zero (multi-label marching squares on a smoothed field): this recovers smooth
   curves at sub-pixel accuracy, and since every vertex stays on its own pixel-centre segment
   the chains cannot cross. Junctions stay at pixel corners; junctions on the box slide along
   the box edge to the zero of the same field.
4. Chains are simplified (Douglas-Peucker, tolerance in pixels); a simplification that would
   make two chains cross is undone.

Coordinates here are in pixel units: ``x`` = column index, ``y`` = row index (pixel ``(r, c)``
covers ``[c, c+1] x [r, r+1]``), matching the mesh axes of :mod:`fem_anode.meshing.tags`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

from fem_anode.errors import InputError, UsageError

__all__ = ["Chain", "BoundaryNetwork", "CleanReport", "clean_labels", "boundary_network", "SIDES_2D"]

logger = logging.getLogger(__name__)

#: Box sides of a 2D image in the order of their pseudo-region offsets.
SIDES_2D = ("top", "bottom", "left", "right")
_FOUR = ndimage.generate_binary_structure(2, 1)


@dataclasses.dataclass
class CleanReport:
    """What :func:`clean_labels` changed (pixel counts)."""

    islands_removed: int = 0
    island_pixels: int = 0
    pinch_pixels: int = 0


def _components(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """4-connected components of each label: (region id per pixel, label per region)."""
    regions = np.zeros(labels.shape, dtype=np.int64)
    region_label: list[np.ndarray] = []
    offset = 0
    for value in np.unique(labels):
        comp, n = ndimage.label(labels == value, structure=_FOUR)
        regions[comp > 0] = comp[comp > 0] - 1 + offset
        region_label.append(np.full(n, value))
        offset += n
    return regions, np.concatenate(region_label)


def _merge_small_islands(
    labels: np.ndarray, min_pixels: int, protected: np.ndarray | None
) -> tuple[np.ndarray, int, int]:
    """Relabel regions smaller than ``min_pixels`` with their most common 4-neighbour label."""
    labels = labels.copy()
    removed = changed = 0
    for _ in range(4):  # an island inside a small island needs a second pass
        regions, region_label = _components(labels)
        sizes = np.bincount(regions.ravel(), minlength=region_label.size)
        small = sizes < min_pixels
        if protected is not None:
            small &= ~protected[region_label]
        if not small.any() or small.all():
            break
        # Count (small region, neighbouring label) pairs over all 4-neighbour pixel pairs.
        pairs = []
        for a, b in ((regions[:, :-1], regions[:, 1:]), (regions[:-1, :], regions[1:, :])):
            a, b = a.ravel(), b.ravel()
            diff = a != b
            pairs.append(np.stack([a[diff], b[diff]], axis=1))
            pairs.append(np.stack([b[diff], a[diff]], axis=1))
        pairs_all = np.concatenate(pairs)
        pairs_all = pairs_all[small[pairs_all[:, 0]] & ~small[pairs_all[:, 1]]]
        if pairs_all.size == 0:
            break
        key = pairs_all[:, 0] * (region_label.max() + 1) + region_label[pairs_all[:, 1]]
        keys, counts = np.unique(key, return_counts=True)
        region_of, label_of = np.divmod(keys, region_label.max() + 1)
        order = np.lexsort((-counts, region_of))
        first = np.unique(region_of[order], return_index=True)[1]
        target = np.full(region_label.size, -1, dtype=np.int64)
        target[region_of[order][first]] = label_of[order][first]
        relabel = target[regions]
        mask = relabel >= 0
        removed += int(np.count_nonzero(target >= 0))
        changed += int(np.count_nonzero(mask))
        labels[mask] = relabel[mask].astype(labels.dtype)
    return labels, removed, changed


def _remove_pinches(labels: np.ndarray) -> tuple[np.ndarray, int]:
    """Fill one pixel of every 2x2 block whose diagonal pixels share a label the others lack."""
    labels = labels.copy()
    changed = 0
    parity = 0
    for _ in range(400):
        p00, p01, p10, p11 = labels[:-1, :-1], labels[:-1, 1:], labels[1:, :-1], labels[1:, 1:]
        main = (p00 == p11) & (p01 != p00) & (p10 != p00)
        anti = (p01 == p10) & (p00 != p01) & (p11 != p01)
        if not (main.any() or anti.any()):
            return labels, changed
        pi, pj = divmod(parity, 2)
        sel = np.zeros_like(main)
        sel[pi::2, pj::2] = True
        r, c = np.nonzero(main & sel)
        labels[r, c + 1] = labels[r, c]  # connect the diagonal pair through the top-right pixel
        changed += r.size
        r, c = np.nonzero(anti & ~main & sel)
        labels[r, c] = labels[r, c + 1]
        changed += r.size
        parity = (parity + 1) % 4
    raise InputError("could not remove the pinch points of the label image (pathological checkerboard pattern)")


def clean_labels(
    labels: np.ndarray, min_island_pixels: int = 0, protected_labels: Sequence[int] = ()
) -> tuple[np.ndarray, CleanReport]:
    """Merge small islands and remove pinch points of a 2D label image.

    Args:
        labels: 2D integer label image.
        min_island_pixels: 4-connected regions with fewer pixels are merged into the label
            they share most of their boundary with (0 keeps everything). Holes larger than
            this are kept.
        protected_labels: labels whose regions are never merged away.

    Returns:
        The cleaned labels and a :class:`CleanReport` of what changed (also logged).
    """
    report = CleanReport()
    out = np.asarray(labels)
    if min_island_pixels > 1:
        protected = None
        if protected_labels:
            protected = np.zeros(int(max(out.max(), max(protected_labels))) + 1, dtype=bool)
            protected[list(protected_labels)] = True
        out, report.islands_removed, report.island_pixels = _merge_small_islands(out, int(min_island_pixels), protected)
        if report.islands_removed:
            logger.info(
                "merged %d islands smaller than %d pixels (%d pixels relabelled)",
                report.islands_removed,
                min_island_pixels,
                report.island_pixels,
            )
    out, report.pinch_pixels = _remove_pinches(out)
    if report.pinch_pixels:
        logger.info("relabelled %d pixels to remove corner-only contacts (pinch points)", report.pinch_pixels)
    return out, report


@dataclasses.dataclass
class Chain:
    """One boundary curve between two regions (or a region and a box side).

    Attributes:
        points: (n, 2) vertices in pixel units (x, y), first/last = the end nodes.
        start, end: node ids of the ends (shared with the other chains meeting there).
        left, right: region ids on the left/right of the direction start -> end (in the
            right-handed (x, y) frame); ids >= ``n_regions`` are the box sides.
    """

    points: np.ndarray
    start: int
    end: int
    left: int
    right: int


@dataclasses.dataclass
class BoundaryNetwork:
    """The shared boundary curves of a cleaned 2D label image (pixel units).

    Attributes:
        labels: the cleaned label image.
        regions: region id per pixel (4-connected components of one label).
        region_label: label value per region id.
        chains: all boundary chains.
        clean: what cleaning changed.
    """

    labels: np.ndarray
    regions: np.ndarray
    region_label: np.ndarray
    chains: list[Chain]
    clean: CleanReport

    @property
    def n_regions(self) -> int:
        return int(self.region_label.size)

    def side_of(self, region: int) -> str | None:
        """Box side name of a pseudo-region id, or None for a real region."""
        k = region - self.n_regions
        return SIDES_2D[k] if k >= 0 else None

    def loops(self, region: int) -> list[list[int]]:
        """Closed loops of signed chain indices (``~i`` = chain i reversed) around a region.

        The region is on the left of every loop; the outer loop (positive signed area) is first.
        """
        outgoing: dict[int, int] = {}
        for i, ch in enumerate(self.chains):
            if ch.left == region:
                outgoing[ch.start] = i
            elif ch.right == region:
                outgoing[ch.end] = ~i
        loops: list[list[int]] = []
        areas: list[float] = []
        while outgoing:
            node = next(iter(outgoing))
            loop = []
            first = node
            while True:
                item = outgoing.pop(node) if node in outgoing else None
                if item is None:
                    raise InputError(
                        f"boundary of region {region} is not closed at node {node} (internal meshing error)"
                    )
                loop.append(item)
                ch = self.chains[item if item >= 0 else ~item]
                node = ch.end if item >= 0 else ch.start
                if node == first:
                    break
            loops.append(loop)
            areas.append(_signed_area(np.concatenate([self.oriented_points(i) for i in loop])))
        order = np.argsort(areas)[::-1]
        return [loops[i] for i in order]

    def oriented_points(self, item: int) -> np.ndarray:
        """Vertices of signed chain ``item`` in the traversal direction."""
        return self.chains[item].points if item >= 0 else self.chains[~item].points[::-1]


def _signed_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _smoothed_indicators(labels: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    values = np.unique(labels)
    index = np.searchsorted(values, labels)
    if sigma <= 0:
        return np.stack([(labels == v).astype(float) for v in values]), index
    return np.stack(
        [ndimage.gaussian_filter((labels == v).astype(float), sigma, mode="nearest") for v in values]
    ), index


def _zero_fraction(
    smooth: np.ndarray, index: np.ndarray, p: tuple[np.ndarray, np.ndarray], q: tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """Fraction t in [0.1, 0.9] from pixel p (phase a) to pixel q (phase b) where f = s_a - s_b crosses zero."""
    a, b = index[p], index[q]
    fp = smooth[a, p[0], p[1]] - smooth[b, p[0], p[1]]
    fq = smooth[a, q[0], q[1]] - smooth[b, q[0], q[1]]
    denom = fp - fq
    # Where smoothing erased the feature (no sign change: thinner than ~2 sigma), keep the
    # crack midpoint (plain marching squares) instead of collapsing the feature.
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where((fp > 0) & (fq < 0), fp / denom, 0.5)
    return np.clip(t, 0.1, 0.9)


def boundary_network(
    labels: np.ndarray,
    *,
    sigma: float = 1.0,
    tolerance: float = 0.1,
    min_island_pixels: int = 0,
    protected_labels: Sequence[int] = (),
) -> BoundaryNetwork:
    """Shared sub-pixel boundary chains of a 2D label image.

    Args:
        labels: 2D integer labels (rows = y, columns = x).
        sigma: Gaussian smoothing (pixels) of the phase indicators that places the vertices
            (0: vertices at crack-edge midpoints, i.e. plain marching squares).
        tolerance: Douglas-Peucker simplification tolerance in pixels (0: none).
        min_island_pixels: see :func:`clean_labels`.
        protected_labels: see :func:`clean_labels`.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0:
        raise InputError(f"expected a non-empty 2D label image, got shape {labels.shape}")
    if min(labels.shape) < 2:
        raise InputError(f"label image {labels.shape} is too small to mesh (need at least 2 x 2 pixels)")
    if tolerance < 0 or sigma < 0:
        raise UsageError(f"tolerance and sigma must be >= 0, got {tolerance} and {sigma}")
    labels, report = clean_labels(labels, min_island_pixels, protected_labels)
    regions, region_label = _components(labels)
    ny, nx = labels.shape
    nreg = region_label.size
    top, bottom, left, right = nreg, nreg + 1, nreg + 2, nreg + 3
    smooth, index = _smoothed_indicators(labels, sigma)
    stride = nx + 1

    # Horizontal crack edges at row line r (0..ny), column c: node (r, c) -> (r, c + 1).
    upper = np.vstack([np.full((1, nx), top), regions])
    lower = np.vstack([regions, np.full((1, nx), bottom)])
    hr, hc = np.nonzero(upper != lower)
    h_n0, h_n1 = hr * stride + hc, hr * stride + hc + 1
    h_left, h_right = lower[hr, hc], upper[hr, hc]
    h_mid = np.stack([hc + 0.5, hr.astype(float)], axis=1)
    inner = (hr > 0) & (hr < ny)
    t = _zero_fraction(smooth, index, (hr[inner] - 1, hc[inner]), (hr[inner], hc[inner]))
    h_mid[inner, 1] = hr[inner] - 0.5 + t
    # Vertical crack edges at column line c (0..nx), row r: node (r, c) -> (r + 1, c).
    west = np.hstack([np.full((ny, 1), left), regions])
    east = np.hstack([regions, np.full((ny, 1), right)])
    vr, vc = np.nonzero(west != east)
    v_n0, v_n1 = vr * stride + vc, (vr + 1) * stride + vc
    v_left, v_right = west[vr, vc], east[vr, vc]
    v_mid = np.stack([vc.astype(float), vr + 0.5], axis=1)
    inner = (vc > 0) & (vc < nx)
    t = _zero_fraction(smooth, index, (vr[inner], vc[inner] - 1), (vr[inner], vc[inner]))
    v_mid[inner, 0] = vc[inner] - 0.5 + t

    n0 = np.concatenate([h_n0, v_n0])
    n1 = np.concatenate([h_n1, v_n1])
    el = np.concatenate([h_left, v_left])
    er = np.concatenate([h_right, v_right])
    mid = np.concatenate([h_mid, v_mid])
    flip = el > er  # orient every edge with the smaller region id on its left
    n0, n1 = np.where(flip, n1, n0), np.where(flip, n0, n1)
    el, er = np.where(flip, er, el), np.where(flip, el, er)
    n_nodes = (ny + 1) * stride
    degree = np.bincount(n0, minlength=n_nodes) + np.bincount(n1, minlength=n_nodes)
    junction = degree >= 3
    junction[[0, nx, ny * stride, ny * stride + nx]] = True

    # Successor of each edge through non-junction nodes (exactly one edge leaves such a node).
    n_edges = n0.size
    out_edge = np.full(n_nodes, -1, dtype=np.int64)
    passing = ~junction[n0]
    out_edge[n0[passing]] = np.nonzero(passing)[0]
    succ = np.where(junction[n1], -1, out_edge[n1])
    linked = succ >= 0
    graph = sparse.coo_matrix(
        (np.ones(int(linked.sum())), (np.nonzero(linked)[0], succ[linked])), shape=(n_edges, n_edges)
    )
    n_chains, chain_of = csgraph.connected_components(graph, directed=True, connection="weak")
    has_head = np.zeros(n_chains, dtype=bool)
    has_head[chain_of[junction[n0]]] = True
    # Closed chains (no junction): cut before their smallest edge.
    cyc_first = np.full(n_chains, n_edges, dtype=np.int64)
    np.minimum.at(cyc_first, chain_of, np.arange(n_edges))
    cyclic = ~has_head
    cut = linked & cyclic[chain_of] & (succ == cyc_first[chain_of])
    succ[cut] = -1
    # List ranking by pointer jumping: number of edges after each edge in its chain.
    after = (succ >= 0).astype(np.int64)
    nxt = succ.copy()
    while (nxt >= 0).any():
        ok = nxt >= 0
        after[ok] += after[nxt[ok]]
        nxt[ok] = nxt[nxt[ok]]
    order = np.lexsort((-after, chain_of))
    bounds = np.searchsorted(chain_of[order], np.arange(n_chains + 1))

    # Node positions: corners, box junctions slid along the box to the zero of the smooth field.
    node_xy = {}
    jn = np.nonzero(junction)[0]
    jr, jc = np.divmod(jn, stride)
    jxy = np.stack([jc, jr], axis=1).astype(float)
    on_row = ((jr == 0) | (jr == ny)) & (jc > 0) & (jc < nx)
    rr = np.minimum(jr[on_row], ny - 1)
    jxy[on_row, 0] = jc[on_row] - 0.5 + _zero_fraction(smooth, index, (rr, jc[on_row] - 1), (rr, jc[on_row]))
    on_col = ((jc == 0) | (jc == nx)) & (jr > 0) & (jr < ny)
    cc = np.minimum(jc[on_col], nx - 1)
    jxy[on_col, 1] = jr[on_col] - 0.5 + _zero_fraction(smooth, index, (jr[on_col] - 1, cc), (jr[on_col], cc))
    for node, xy in zip(map(int, jn), jxy):
        node_xy[node] = xy

    chains: list[Chain] = []
    next_node = n_nodes
    for k in range(n_chains):
        edges = order[bounds[k] : bounds[k + 1]]
        a, b = int(el[edges[0]]), int(er[edges[0]])
        box = b >= nreg
        if not cyclic[k]:
            s, e = int(n0[edges[0]]), int(n1[edges[-1]])
            inside = np.empty((0, 2)) if box else mid[edges]
            pts = np.vstack([node_xy[s][None], inside, node_xy[e][None]])
            if s == e:  # a loop from a junction back to itself: split it in two at its middle
                m = len(pts) // 2
                chains.append(Chain(pts[: m + 1].copy(), s, next_node, a, b))
                chains.append(Chain(pts[m:].copy(), next_node, e, a, b))
                next_node += 1
            else:
                chains.append(Chain(pts, s, e, a, b))
            continue
        ring = mid[edges]
        cuts = [0, len(ring) // 3, (2 * len(ring)) // 3, len(ring)]
        ids = [next_node, next_node + 1, next_node + 2, next_node]
        next_node += 3
        for i in range(3):
            seg = ring[cuts[i] : cuts[i + 1] + 1] if i < 2 else np.vstack([ring[cuts[i] :], ring[:1]])
            chains.append(Chain(seg.copy(), ids[i], ids[i + 1], a, b))
    chains = _simplify(chains, tolerance)
    logger.debug(
        "boundary network: %d regions, %d chains, %d vertices", nreg, len(chains), sum(len(c.points) for c in chains)
    )
    return BoundaryNetwork(labels, regions, region_label, chains, report)


def _simplify(chains: list[Chain], tolerance: float) -> list[Chain]:
    """Douglas-Peucker each chain; undo it for chains that would then cross another."""
    if tolerance <= 0:
        return chains
    from skimage.measure import approximate_polygon

    simple = [
        dataclasses.replace(c, points=approximate_polygon(c.points, tolerance)) if len(c.points) > 2 else c
        for c in chains
    ]
    for _ in range(5):
        bad = _crossing_chains(simple)
        if not bad:
            break
        logger.debug("simplification made %d chains cross; keeping them unsimplified", len(bad))
        for i in bad:
            simple[i] = chains[i]
    return simple


def _crossing_chains(chains: list[Chain]) -> set[int]:
    """Indices of chains with a segment properly crossing a segment of another (or itself)."""
    from scipy.spatial import cKDTree

    starts, ends, owner = [], [], []
    for i, c in enumerate(chains):
        starts.append(c.points[:-1])
        ends.append(c.points[1:])
        owner.append(np.full(len(c.points) - 1, i))
    p, q, own = np.concatenate(starts), np.concatenate(ends), np.concatenate(owner)
    if len(p) < 2:
        return set()
    # Candidate pairs from a proximity search over pieces of at most ``piece`` length: a few long
    # segments (the straight box edges, the end segments of splines) would otherwise widen the
    # search radius of every segment and make the search quadratic. Pieces of two crossing
    # segments that contain the crossing point have midpoints within one piece length.
    length = np.linalg.norm(q - p, axis=1)
    piece = max(2.0 * float(np.median(length)), 1e-9)
    count = np.maximum(np.ceil(length / piece).astype(np.int64), 1)
    segment = np.repeat(np.arange(len(p)), count)
    first = np.cumsum(count) - count
    fraction = (np.arange(segment.size) - first[segment] + 0.5) / count[segment]
    mid = p[segment] + fraction[:, None] * (q - p)[segment]
    half = 0.5 * length[segment] / count[segment]
    pairs = cKDTree(mid).query_pairs(2.0 * half.max() + 1e-9, output_type="ndarray")
    if pairs.size == 0:
        return set()
    near = np.linalg.norm(mid[pairs[:, 0]] - mid[pairs[:, 1]], axis=1) <= half[pairs[:, 0]] + half[pairs[:, 1]] + 1e-9
    pairs = np.unique(np.sort(segment[pairs[near]], axis=1), axis=0)
    pairs = pairs[pairs[:, 0] != pairs[:, 1]]
    first, second = pairs[:, 0], pairs[:, 1]

    def orient(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        return (b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0])

    eps = 1e-9
    d1, d2 = orient(p[first], q[first], p[second]), orient(p[first], q[first], q[second])
    d3, d4 = orient(p[second], q[second], p[first]), orient(p[second], q[second], q[first])
    proper = (d1 * d2 < -eps) & (d3 * d4 < -eps)
    return {int(k) for k in own[first[proper]]} | {int(k) for k in own[second[proper]]}
