"""Anatomy of the synthetic phantoms against published cerebral-artery morphometry (docs/phantoms.md).

These checks cover the vessel trees (``scripts.data.vessel_tree``) and the aneurysms and look-alikes placed
on them (``scripts.data.lesions``) together, through ``generate_geometry``: the statistics are of whole
geometries, so the two modules have no test files of their own.

Geometry only (``generate_geometry``, no voxels) except where labels are the point; fixed seeds, so each
check is deterministic.
"""

from __future__ import annotations

import collections

import numpy as np
import pytest
from scipy import ndimage

from scripts.data import LOCATIONS, TEMPLATES, generate_geometry, get_centre, local_diameter, render_labels
from scripts.data.lesions import aneurysm_size_at, sample_aneurysm_size
from scripts.data.vessel_tree import MAX_RADIUS_MM

N_CASES = 50


@pytest.fixture(scope="module")
def geometries():
    """Geometry of 50 default-centre cases."""
    return [generate_geometry(seed) for seed in range(N_CASES)]


def calibre_stats(trees) -> tuple[float, float]:
    """Volume-weighted share of vessel lumen at a local diameter > 3 mm, and the weighted median (mm)."""
    pairs = [tree.calibre() for tree in trees]
    diameters = np.concatenate([d for d, _ in pairs])
    volumes = np.concatenate([v for _, v in pairs])
    order = np.argsort(diameters)
    cumulative = np.cumsum(volumes[order]) / volumes.sum()
    median = float(diameters[order][np.searchsorted(cumulative, 0.5)])
    return float(volumes[diameters > 3.0].sum() / volumes.sum()), median


def _segment_diameters(geometries, name: str) -> np.ndarray:
    """Diameter (mm) at the origin of every tube called ``name``."""
    return np.array([2 * t.radii[0] for g in geometries for t in g.tree.tubes if t.name == name])


# ------------------------------------------------------------------------------------------- calibre
def test_calibre_distribution_matches_real_3dra(geometries):
    share, median = calibre_stats([g.tree for g in geometries])
    assert 0.35 <= share <= 0.45, f"share of vessel volume wider than 3 mm: {share:.3f}"
    assert 2.6 <= median <= 3.2, f"median local diameter {median:.2f} mm"
    largest = np.median([g.tree.calibre()[0].max() for g in geometries])
    assert 4.0 <= largest <= 5.4, f"median largest diameter per case {largest:.2f} mm"


@pytest.mark.parametrize(
    ("name", "low", "high"),
    [
        ("ica", 3.5, 5.0),
        ("basilar", 3.0, 4.0),
        ("vertebral", 2.5, 4.0),
        ("m1", 2.3, 3.2),
        ("a1", 1.5, 2.5),
        ("p1", 1.5, 2.5),
        ("m2", 1.0, 2.8),
    ],
)
def test_named_segments_have_published_diameters(geometries, name, low, high):
    """Origin diameters within the published range, give or take the +-4 % calibre wobble (3 sigma)."""
    diameters = _segment_diameters(geometries, name)
    low, high = 0.9 * low, 1.1 * high
    assert diameters.size >= 3, f"too few {name} segments: {diameters.size}"
    assert low <= diameters.min() and diameters.max() <= high, (
        f"{name}: {diameters.min():.2f}-{diameters.max():.2f}"
    )


def test_voxel_local_diameter_agrees_with_the_tubes(geometries):
    """The voxel map (radius of the owning tube) gives the same distribution as the centreline estimate."""
    for g in geometries[:3]:
        diameter = local_diameter(g)
        vessel = diameter[diameter > 0]
        share, median = calibre_stats([g.tree])
        assert abs(np.mean(vessel > 3.0) - share) < 0.06
        assert abs(np.median(vessel) - median) < 0.3


# ----------------------------------------------------------------------------------------- templates
def test_every_template_occurs_with_its_anatomy(geometries):
    by_template = collections.defaultdict(list)
    for g in geometries:
        by_template[g.tree.template].append(g)
    assert set(by_template) == set(TEMPLATES)
    assert len(by_template["anterior"]) >= N_CASES // 4
    expected = {
        "anterior": (
            {"ica", "m1", "a1", "m2", "a2", "acom", "ophthalmic", "acha"},
            {"ica_terminus", "mca_bifurcation", "acom"},
        ),
        "posterior": ({"basilar", "vertebral", "p1", "sca"}, {"basilar_tip"}),
        "mca": ({"m1", "m2", "lenticulostriate"}, {"mca_bifurcation"}),
    }
    for template, (segments, sites) in expected.items():
        for g in by_template[template]:
            assert segments <= {t.name for t in g.tree.tubes}, f"{template}: {g.info()['segments']}"
            assert sites <= {b.name for b in g.tree.bifurcations}


def test_siphon_and_bifurcations_follow_murray(geometries):
    """The siphon turns through more than 180 degrees; named bifurcations keep r0^3 = r1^3 + r2^3."""
    for g in geometries:
        tree = g.tree
        for tube in tree.tubes:
            if tube.name == "ica":
                tangents = tube.tangents
                turn = np.sum(np.arccos(np.clip(np.sum(tangents[1:] * tangents[:-1], axis=1), -1, 1)))
                assert np.rad2deg(turn) > 180.0
        for bif in tree.bifurcations:
            if bif.name in ("ica_terminus", "basilar_tip", "acom"):
                r1, r2 = (tree.tubes[c].radii[0] for c in bif.children)
                assert (r1**3 + r2**3) ** (1 / 3) == pytest.approx(bif.radius, rel=0.2)


def test_some_cases_leave_the_field_of_view_largely_empty(geometries):
    empty = np.array([g.tree.empty_fraction(clearance_mm=8.0) for g in geometries])
    assert np.mean(empty > 0.55) >= 0.3, "a good share of cases shows one territory with background around"
    assert np.mean(empty < 0.55) >= 0.2, "and some fill the field of view"


# ----------------------------------------------------------------------------------------- aneurysms
def test_aneurysm_size_neck_and_dome_neck_distributions(geometries):
    aneurysms = [a for g in geometries for a in g.aneurysms]
    sizes = np.array([a.size_mm for a in aneurysms])
    necks = np.array([a.neck_mm for a in aneurysms])
    ratios = np.array([a.dome_neck_ratio for a in aneurysms])
    assert sizes.min() >= 1.5 and sizes.max() > 10.0
    assert 3.8 <= np.median(sizes) <= 6.0, f"median size {np.median(sizes):.2f}"
    assert np.mean((sizes >= 2.0) & (sizes <= 7.0)) >= 0.55, "most aneurysms are 2-7 mm"
    assert necks.max() <= 8.0 and np.mean(necks >= 2.0) >= 0.5 and necks.max() >= 5.0
    # an apex neck cannot spread past the branch axes, so a few apex domes end above 3
    assert ratios.min() >= 0.75 and ratios.max() <= 4.0
    assert np.mean((ratios >= 0.8) & (ratios <= 3.0)) >= 0.9
    assert np.mean(ratios < 2.0) >= 0.3, "wide necks (dome/neck < 2) are common"
    assert np.any([a.neck_mm >= a.width_mm for a in aneurysms]), "some domes no wider than their neck"
    assert np.any([a.ridge is not None for a in aneurysms]), "neck collars drawn"


def test_aneurysm_locations(geometries):
    aneurysms = [a for g in geometries for a in g.aneurysms]
    counts = collections.Counter(a.location for a in aneurysms)
    assert set(counts) <= set(LOCATIONS)
    for site in ("mca_bifurcation", "basilar_tip", "acom", "ica_terminus", "ica_sidewall", "other_sidewall"):
        assert counts[site] >= 1, f"no {site} aneurysm: {dict(counts)}"
    named = sum(counts[s] for s in ("mca_bifurcation", "basilar_tip", "acom", "ica_terminus", "ica_sidewall"))
    assert named >= 0.5 * len(aneurysms), f"most aneurysms at the classic sites: {dict(counts)}"
    for g in geometries:
        for a in g.aneurysms:
            parent = g.tree.tubes[a.tube]
            assert a.parent_radius == pytest.approx(parent.radii[a.index])
            assert a.location.startswith("ica") == (parent.name == "ica") or a.location == "other_sidewall"
            assert a.parent_radius >= 0.6 + 0.06 * max(a.size_mm - 3.0, 0.0) - 1e-9, "parent too thin"


def test_centre_c_has_larger_aneurysms():
    sizes = {n: [a.size_mm for s in range(30) for a in generate_geometry(s, n).aneurysms] for n in "AC"}
    assert np.median(sizes["C"]) > np.median(sizes["A"]) + 1.0
    assert get_centre("A").aneurysm_min_mm == 1.5 and get_centre("A").aneurysm_max_mm == 25.0


@pytest.mark.parametrize("bounds", [(1.5, 25.0), (3.0, 8.0)], ids=["centre_a", "narrow"])
def test_size_at_a_quantile_is_that_quantile_of_the_random_sizes(bounds):
    """``aneurysm_size_at`` inverts the truncated log-normal that ``sample_aneurysm_size`` draws from."""
    rng = np.random.default_rng(0)
    draws = [sample_aneurysm_size(rng, 4.7, 0.55, *bounds) for _ in range(20000)]
    for q in (0.02, 0.1, 0.5, 0.9, 0.98):
        assert aneurysm_size_at(q, 4.7, 0.55, *bounds) == pytest.approx(
            np.quantile(draws, q), rel=0.02, abs=0.03
        )
    assert (
        bounds[0]
        < aneurysm_size_at(1e-9, 4.7, 0.55, *bounds)
        < aneurysm_size_at(1 - 1e-9, 4.7, 0.55, *bounds)
    )
    for q in (0, 1, 1.5):
        with pytest.raises(ValueError, match="quantile must be between 0 and 1"):
            aneurysm_size_at(q, 4.7, 0.55, *bounds)


def test_a_size_quantile_sets_the_first_sac_and_keeps_the_tree():
    """The tree, the aneurysm count and the other sac stay as drawn; the first sac takes the asked size."""
    seed = next(s for s in range(50) if len(generate_geometry(s).aneurysms) == 2)
    drawn, small = generate_geometry(seed), generate_geometry(seed, size_quantile=0.01)
    assert [t.radii.tolist() for t in drawn.tree.tubes[:3]] == [
        t.radii.tolist() for t in small.tree.tubes[:3]
    ]
    assert len(small.aneurysms) == 2
    centre = get_centre("A")
    wanted = aneurysm_size_at(0.01, centre.aneurysm_median_mm, centre.aneurysm_sigma_log, 1.5, 25.0)
    assert min(a.size_mm for a in small.aneurysms) == pytest.approx(wanted, rel=0.01)
    assert min(a.size_mm for a in drawn.aneurysms) > wanted + 0.3


def test_every_aneurysm_touches_its_vessel(geometries):
    """Rendered labels of cases with aneurysms, wide-necked ones included: no floating sac, none lost."""
    chosen = [g for g in geometries if g.aneurysms][:8]
    assert any(a.ridge is not None for g in chosen for a in g.aneurysms)
    for g in chosen:
        label, _, _ = render_labels(g)
        components, count = ndimage.label(label == 2, structure=np.ones((3, 3, 3)))
        near_vessel = ndimage.binary_dilation(label == 1, structure=np.ones((3, 3, 3)))
        assert count >= 1
        for index in range(1, count + 1):
            assert near_vessel[components == index].any(), f"seed {g.seed}: a sac floats"


# ------------------------------------------------------------------------------------ hard negatives
def test_anatomical_hard_negatives(geometries):
    kinds = collections.Counter(n.kind for g in geometries for n in g.hard_negatives)
    for kind in (
        "siphon_bend",
        "ica_terminus",
        "vertebrobasilar_junction",
        "tortuous_basilar",
        "fusiform_bulge",
    ):
        assert kinds[kind] >= 1, f"no {kind}: {dict(kinds)}"
    for g in geometries:
        at_terminus = any(a.location == "ica_terminus" for a in g.aneurysms)
        assert not (at_terminus and any(n.kind == "ica_terminus" for n in g.hard_negatives))
        for n in g.hard_negatives:
            for a in g.aneurysms:
                assert np.linalg.norm(a.dome_centre - n.centre) > a.reach + n.radius


def test_drawn_look_alikes_keep_clear_of_each_other(geometries):
    """Each drawn look-alike keeps 0.5 mm clear of every look-alike placed before it (loops come first)."""
    drawn = {"infundibulum", "fusiform_bulge", "wall_bump"}
    count = 0
    for g in geometries:
        for i, n in enumerate(g.hard_negatives):
            if n.kind not in drawn:
                continue
            count += 1
            for earlier in g.hard_negatives[:i]:
                gap = np.linalg.norm(earlier.centre - n.centre) - earlier.radius - n.radius
                assert gap > 0.5, f"seed {g.seed}: {n.kind} overlaps {earlier.kind} ({gap:.2f} mm)"
    assert count >= len(geometries)


def test_a_forced_overlapping_loop_coils_trees_of_every_template(geometries):
    """``overlapping_loop=True`` gives most trees a tight loop inside the field of view, the anatomical templates'
    too (drawn, only the random template's side branches coil so), and is a deterministic function of the seed."""

    def coiled(g) -> bool:
        return any(loop.overlapping and g.tree.inside(loop.centre) for loop in g.tree.loops)

    forced = [generate_geometry(seed, overlapping_loop=True) for seed in range(N_CASES)]
    assert [g.tree.template for g in forced] == [g.tree.template for g in geometries]
    anatomical = ("anterior", "posterior", "mca")
    for template in anatomical:
        assert np.mean([coiled(g) for g in forced if g.tree.template == template]) >= 0.4, template
    assert np.mean([coiled(g) for g in forced if g.tree.template in anatomical]) >= 0.5
    assert np.mean([coiled(g) for g in geometries if g.tree.template in anatomical]) <= 0.1
    assert np.mean([coiled(g) for g in forced]) >= 0.6
    assert generate_geometry(3, overlapping_loop=True).info() == forced[3].info()


def test_geometry_is_deterministic():
    a, b = generate_geometry(7), generate_geometry(7)
    assert a.info() == b.info()
    assert generate_geometry(8).info() != a.info()


# ------------------------------------------------------------------------- counts over 50 cases
def test_aneurysm_counts_and_sizes_over_50_cases(geometries):
    centre = get_centre("A")
    counts = np.bincount([len(g.aneurysms) for g in geometries], minlength=3)
    assert len(counts) == 3, "at most two aneurysms per case"
    assert 0.04 <= counts[0] / 50 <= 0.30, f"cases without aneurysm: {counts}"
    assert 0.08 <= counts[2] / 50 <= 0.36, f"cases with two aneurysms: {counts}"
    sizes = np.array([a.size_mm for g in geometries for a in g.aneurysms])
    assert np.all((sizes >= centre.aneurysm_min_mm) & (sizes <= centre.aneurysm_max_mm))
    assert np.mean(sizes <= 10.0) >= 0.8, "most aneurysms are 1.5-10 mm"
    assert sizes.max() > 8.0 and np.median(sizes) > 4.0
    kinds = {a.kind for g in geometries for a in g.aneurysms}
    assert kinds == {"bifurcation", "sidewall"}
    for g in geometries:
        extent = (np.asarray(g.centre.shape) - 1) * g.spacing
        for a in g.aneurysms:
            assert a.width_mm <= a.size_mm and a.neck_mm <= 8.0
            assert 0.75 <= a.dome_neck_ratio <= 4.0, f"dome/neck {a.dome_neck_ratio:.2f}"
            assert np.all(a.dome_centre - a.reach >= 0) and np.all(a.dome_centre + a.reach <= extent)
    assert any(a.neck_mm >= a.width_mm for g in geometries for a in g.aneurysms), "domes no wider than necks"
    assert any(a.lobes for g in geometries for a in g.aneurysms), "multi-lobed domes"
    assert any(a.daughters for g in geometries for a in g.aneurysms), "daughter sacs"


def test_trees_and_hard_negatives_over_50_cases(geometries):
    kinds = {n.kind for g in geometries for n in g.hard_negatives}
    assert {"infundibulum", "fusiform_bulge", "wall_bump", "overlapping_loop", "siphon_bend"} <= kinds
    assert all(g.hard_negatives for g in geometries)
    radii = np.concatenate(
        [t.radii for g in geometries for t in g.tree.tubes if t.kind in ("trunk", "branch", "side")]
    )
    assert 2.2 <= radii.max() <= MAX_RADIUS_MM and np.percentile(radii, 1) >= 0.3
    assert np.mean([len(g.tree.bifurcations) for g in geometries]) >= 3
    assert np.mean([len(g.tree.crossings) > 0 for g in geometries]) > 0.5, "vessels passing close by"
    # long stretches along Z: in most trees some tube runs within 25 degrees of Z for >= 5 mm
    along_z = 0
    for g in geometries:
        found = False
        for tube in g.tree.tubes:
            steep = np.abs(tube.tangents[:, 2]) > np.cos(np.deg2rad(25))
            run = np.diff(np.flatnonzero(np.diff(np.concatenate([[0], steep.astype(int), [0]]))))[::2]
            found = found or (run.size > 0 and run.max() * 0.6 >= 5.0)
        along_z += found
    assert along_z >= 40
