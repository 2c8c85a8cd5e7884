"""Synthetic chest CT phantoms with exact lung labels, for training ct-lung next to the two real CTs.

A phantom is drawn slice by slice in patient millimetres (LPS: x towards the patient's left, y posterior,
z head) from a handful of random shapes: body ellipse (fat over muscle), rib cage, spine, mediastinum and
heart (with the cardiac notch it cuts into the smaller left lung), aorta, trachea and main bronchi,
two lungs under two diaphragm domes (right higher, liver below it; stomach with gas below the left),
a random vessel tree and sometimes a solid tumour inside a lung. CT-like effects follow: thick slices
average sub-slices, in-plane blur, noise. Spacing (0.6-0.9 mm pixels, 1-5 mm slices), coverage (whole
chest or part of it) and the storage order (columns towards patient left or right, rows posterior or
anterior, frames head or feet first) vary, so a network learns patient left/right from the reoriented
grid and not from array order.

Labels are exact by construction: 1 = right lung, 2 = left lung; vessels, airways inside the lungs and
tumours are lung (as in the reference masks of the real CTs); trachea and main bronchi outside the lung
are not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from dicom_ai_node.infer.volume import Volume
from dicom_ai_node.training.data import volume_from_array

RIGHT, LEFT = 1, 2
AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 45.0
BONE_HU = 700.0
MARROW_HU = 250.0


@dataclass(frozen=True)
class Tube:
    """A straight tube from p0 to p1 (LPS mm) with a radius: vessels, trachea, bronchi."""

    p0: np.ndarray
    p1: np.ndarray
    radius: float


@dataclass(frozen=True)
class Phantom:
    volume: Volume
    labels: np.ndarray  # uint8 (frames, rows, cols) on the volume's grid


@dataclass(frozen=True)
class _Anatomy:
    """Random shape parameters of one patient, all in mm."""

    body_a: float
    body_b: float
    fat: float
    thorax_a: float
    thorax_b: float
    apex: float  # lung apex height above the lowest lung point (z = 0)
    dome_right: float
    dome_left: float
    med_front: float  # half-width of the mediastinum at the front (anterior junction)
    med_back: float
    med_shift: float
    med_width: float
    shoulder: float
    heart_centre: tuple[float, float]
    heart_axes: tuple[float, float]
    heart_top: float
    spine_y: float
    lung_hu: float
    dependent_hu: float
    blood_hu: float
    rib_period: float
    rib_phase: float
    carina: float
    trachea_radius: float
    tumour: tuple[float, float, float, float] | None  # x, y, z, radius
    stomach_gas: bool
    table: bool
    airways: tuple[Tube, ...]
    vessels: tuple[Tube, ...]


def _anatomy(rng: np.random.Generator) -> _Anatomy:
    body_a = rng.uniform(130, 185)
    body_b = rng.uniform(0.62, 0.78) * body_a
    fat = rng.uniform(4, 25)
    wall = rng.uniform(12, 20)
    thorax_a, thorax_b = body_a - fat - wall, body_b - fat - wall
    apex = rng.uniform(200, 280)
    dome_right = rng.uniform(45, 85)
    dome_left = dome_right - rng.uniform(5, 25)
    spine_y = thorax_b * rng.uniform(0.5, 0.68)
    heart_axes = (thorax_a * rng.uniform(0.38, 0.5), thorax_b * rng.uniform(0.42, 0.55))
    heart_centre = (thorax_a * rng.uniform(0.1, 0.22), -thorax_b * rng.uniform(0.1, 0.25))
    carina = apex * rng.uniform(0.55, 0.68)
    trachea_radius = rng.uniform(7.5, 11)
    trachea_y = spine_y - rng.uniform(32, 45)
    carina_point = np.array([0.0, trachea_y, carina])
    right_hilum = np.array([-thorax_a * 0.32, trachea_y + 8, carina - rng.uniform(15, 30)])
    left_hilum = np.array([thorax_a * 0.36, trachea_y + 10, carina - rng.uniform(30, 50)])
    airways = (
        Tube(np.array([0.0, trachea_y, apex + 200]), carina_point, trachea_radius),
        Tube(carina_point, right_hilum, trachea_radius * 0.75),
        Tube(carina_point, left_hilum, trachea_radius * 0.7),
    )
    vessels: list[Tube] = []
    for hilum, side in ((right_hilum, -1.0), (left_hilum, 1.0)):
        _grow_tree(rng, hilum + np.array([0, 6, 0]), side, rng.uniform(5, 7), 0, vessels)
        # Peripheral vessels: short thin segments scattered through the lung (drawn only inside it).
        for _ in range(120):
            start = np.array(
                [
                    side * rng.uniform(0.15, 0.95) * thorax_a,
                    rng.uniform(-0.9, 0.9) * thorax_b,
                    rng.uniform(0, apex),
                ]
            )
            direction = rng.normal(size=3)
            end = start + direction / np.linalg.norm(direction) * rng.uniform(8, 30)
            vessels.append(Tube(start, end, rng.uniform(0.6, 1.8)))
    tumour = None
    if rng.random() < 0.5:
        side = rng.choice([-1.0, 1.0])
        tumour = (
            side * thorax_a * rng.uniform(0.35, 0.8),
            thorax_b * rng.uniform(-0.6, 0.6),
            rng.uniform(dome_right + 20, apex - 30),
            rng.uniform(6, 28),
        )
    return _Anatomy(
        body_a=body_a,
        body_b=body_b,
        fat=fat,
        thorax_a=thorax_a,
        thorax_b=thorax_b,
        apex=apex,
        dome_right=dome_right,
        dome_left=dome_left,
        med_front=rng.uniform(1.5, 12),
        med_back=rng.uniform(22, 38),
        med_shift=rng.uniform(-8, 8),
        med_width=rng.uniform(18, 38),
        shoulder=rng.uniform(0.4, 0.6),
        heart_centre=heart_centre,
        heart_axes=heart_axes,
        heart_top=apex * rng.uniform(0.45, 0.58),
        spine_y=spine_y,
        lung_hu=rng.uniform(-900, -780),
        dependent_hu=rng.uniform(0, 90),
        blood_hu=rng.choice([rng.uniform(30, 55), rng.uniform(120, 300)]),
        rib_period=rng.uniform(22, 32),
        rib_phase=rng.uniform(0, 1),
        carina=carina,
        trachea_radius=trachea_radius,
        tumour=tumour,
        stomach_gas=bool(rng.random() < 0.7),
        table=bool(rng.random() < 0.6),
        airways=airways,
        vessels=tuple(vessels),
    )


def _grow_tree(
    rng: np.random.Generator, start: np.ndarray, side: float, radius: float, depth: int, out: list[Tube]
) -> None:
    """A random branching tree from the hilum outwards: lateral, up/down, front/back; thinner per level."""
    branches = 6 if depth == 0 else 3
    for _ in range(branches):
        direction = np.array([side * rng.uniform(0.3, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-1.0, 1.0)])
        direction /= np.linalg.norm(direction)
        end = start + direction * rng.uniform(25, 55) * (0.8**depth)
        out.append(Tube(start, end, radius))
        if depth < 3 and radius > 1.0:
            _grow_tree(rng, end, side, radius * rng.uniform(0.6, 0.75), depth + 1, out)


def _ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    """(x-cx)^2/a^2 + (y-cy)^2/b^2: < 1 inside the ellipse."""
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2


def _draw_tubes(
    tubes: tuple[Tube, ...], z: float, x: np.ndarray, y: np.ndarray, spacing: float, out: np.ndarray
) -> None:
    """Mark pixels of this slice within `radius` of each tube (3-D point-to-segment distance)."""
    x0, y0 = float(x[0, 0]), float(y[0, 0])
    for tube in tubes:
        lo, hi = min(tube.p0[2], tube.p1[2]) - tube.radius, max(tube.p0[2], tube.p1[2]) + tube.radius
        if not lo <= z <= hi:
            continue
        # The part of the segment near this slice decides the bounding box.
        d = tube.p1 - tube.p0
        length2 = float(d @ d)
        if abs(d[2]) > 1e-6:
            ta = np.clip((z - tube.radius - tube.p0[2]) / d[2], 0, 1)
            tb = np.clip((z + tube.radius - tube.p0[2]) / d[2], 0, 1)
            t_lo, t_hi = min(ta, tb), max(ta, tb)
        else:
            t_lo, t_hi = 0.0, 1.0
        pa, pb = tube.p0 + t_lo * d, tube.p0 + t_hi * d
        margin = tube.radius + spacing
        i0 = max(0, int((min(pa[0], pb[0]) - margin - x0) / spacing))
        i1 = min(x.shape[1], int((max(pa[0], pb[0]) + margin - x0) / spacing) + 2)
        j0 = max(0, int((min(pa[1], pb[1]) - margin - y0) / spacing))
        j1 = min(x.shape[0], int((max(pa[1], pb[1]) + margin - y0) / spacing) + 2)
        if i0 >= i1 or j0 >= j1:
            continue
        px, py = x[j0:j1, i0:i1] - tube.p0[0], y[j0:j1, i0:i1] - tube.p0[1]
        pz = z - tube.p0[2]
        t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / max(length2, 1e-9), 0, 1)
        dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2
        out[j0:j1, i0:i1] |= dist2 <= tube.radius**2


def _slice(
    anat: _Anatomy, x: np.ndarray, y: np.ndarray, z: float, spacing: float
) -> tuple[np.ndarray, np.ndarray]:
    """HU and labels of the axial plane at height z; x, y are (rows, cols) grids in LPS mm.

    Structures are painted back to front: body, bones, then the lungs, which lose what the heart, the
    diaphragm domes and the mediastinum occupy; vessels, tumour and airways last.
    """
    hu = np.full(x.shape, AIR_HU, dtype=np.float32)
    body, inner = _draw_body(anat, x, y, z, hu)
    thorax = _ellipse(x, y, 0, 0, anat.thorax_a, anat.thorax_b)
    _draw_ribs_and_spine(anat, x, y, z, thorax, inner, hu)
    lung_region = _lung_region(anat, x, y, z)
    lung_region &= ~_draw_heart(anat, x, y, z, inner, hu)
    lung_region &= ~_draw_domes(anat, x, y, z, thorax, inner, hu)
    _draw_aorta(anat, x, y, z, lung_region, hu)
    labels = _fill_lungs(anat, x, y, z, spacing, thorax, lung_region, hu)
    _draw_airways(anat, x, y, z, spacing, body, lung_region, hu, labels)
    return hu, labels


def _draw_body(
    anat: _Anatomy, x: np.ndarray, y: np.ndarray, z: float, hu: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Fat over muscle (narrowing into the neck above the apex) and sometimes the table; (body, inner)."""
    scale = 1.0 if z <= anat.apex else max(0.45, 1.0 - (z - anat.apex) / 120.0)
    body = _ellipse(x, y, 0, 0, anat.body_a * scale, anat.body_b * max(scale, 0.7)) < 1
    hu[body] = FAT_HU
    inner = _ellipse(x, y, 0, 0, anat.body_a * scale - anat.fat, anat.body_b * max(scale, 0.7) - anat.fat) < 1
    hu[inner & body] = MUSCLE_HU
    if anat.table:
        hu[(y > anat.body_b + 12) & (y < anat.body_b + 20) & (np.abs(x) < anat.body_a * 1.1)] = 150.0
    return body, inner


def _draw_ribs_and_spine(
    anat: _Anatomy,
    x: np.ndarray,
    y: np.ndarray,
    z: float,
    thorax: np.ndarray,
    inner: np.ndarray,
    hu: np.ndarray,
) -> None:
    # Ribs: bone in a band outside the thorax ellipse, where an oblique wave says a rib crosses.
    angle = np.arctan2(y, x)
    rib_wave = np.sin(2 * np.pi * ((z + 18 * np.cos(angle)) / anat.rib_period + anat.rib_phase))
    ribs = (thorax > 1.02) & (thorax < 1.16) & (rib_wave > 0.55) & (z < anat.apex + 10)
    hu[ribs & inner] = BONE_HU
    # Spine: vertebral body (marrow in a cortex), posterior elements around the canal.
    vertebra_r = _ellipse(x, y, 0, anat.spine_y, 19, 16)
    hu[vertebra_r < 1] = MARROW_HU
    hu[(vertebra_r < 1) & (vertebra_r > 0.75)] = BONE_HU
    canal = _ellipse(x, y, 0, anat.spine_y + 26, 9, 9)
    hu[(_ellipse(x, y, 0, anat.spine_y + 30, 24, 16) < 1) & (canal > 1)] = BONE_HU
    hu[canal < 1] = 20.0


def _spine_block(anat: _Anatomy, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The spine with its muscles: never lung."""
    return _ellipse(x, y, 0, anat.spine_y + 5, 32, 30) < 1


def _lung_region(anat: _Anatomy, x: np.ndarray, y: np.ndarray, z: float) -> np.ndarray:
    """Inside the thorax (tapering to the apex, narrower and further back there), outside the mediastinum."""
    shoulder = anat.apex * anat.shoulder
    taper = 1.0
    if z > shoulder:
        taper = float(np.sqrt(max(0.0, 1.0 - ((z - shoulder) / (anat.apex - shoulder)) ** 2)))
    if taper <= 0.05:
        return np.zeros(x.shape, dtype=bool)
    centre_y = anat.thorax_b * (1 - taper) * 0.3
    region = _ellipse(x, y, 0, centre_y, anat.thorax_a * taper, anat.thorax_b * (0.35 + 0.65 * taper)) < 1
    # Mediastinum: a band narrow at the front (anterior junction), wide at the back; wider above the heart
    # (great vessels, trachea), plus a central ellipse (vessels, oesophagus, thymus).
    frac = np.clip((y + anat.thorax_b) / (2 * anat.thorax_b), 0, 1)
    med_half = anat.med_front + (anat.med_back - anat.med_front) * frac
    if z > anat.heart_top:
        med_half = np.maximum(med_half, 22.0 + 10.0 * (1 - frac))
    region &= np.abs(x - anat.med_shift) > med_half
    region &= _ellipse(x, y, anat.med_shift, anat.thorax_b * 0.15, anat.med_width, anat.thorax_b * 0.8) > 1
    region &= ~_spine_block(anat, x, y)
    return region


def _draw_heart(
    anat: _Anatomy, x: np.ndarray, y: np.ndarray, z: float, inner: np.ndarray, hu: np.ndarray
) -> np.ndarray:
    """An ellipsoid in front and to the patient's left (the cardiac notch of the left lung); its mask."""
    heart = np.zeros(x.shape, dtype=bool)
    rel = (z - anat.dome_left * 0.5) / (anat.heart_top - anat.dome_left * 0.5)
    if 0 < rel < 1.15:
        shrink = float(np.sqrt(max(0.0, 1 - (rel - 0.45) ** 2 / 0.7**2)))
        if shrink > 0:
            axes = (anat.heart_axes[0] * shrink, anat.heart_axes[1] * shrink)
            heart = _ellipse(x, y, *anat.heart_centre, *axes) < 1
            hu[heart & inner] = anat.blood_hu
    return heart


def _draw_domes(
    anat: _Anatomy,
    x: np.ndarray,
    y: np.ndarray,
    z: float,
    thorax: np.ndarray,
    inner: np.ndarray,
    hu: np.ndarray,
) -> np.ndarray:
    """Diaphragm domes (right higher): liver below the right, spleen and stomach gas below the left.

    Returns what lies below the domes (never lung)."""
    below_any = np.zeros(x.shape, dtype=bool)
    for side, peak, sign in ((RIGHT, anat.dome_right, -1.0), (LEFT, anat.dome_left, 1.0)):
        r2 = _ellipse(
            x, y, sign * anat.thorax_a * 0.45, -anat.thorax_b * 0.1, anat.thorax_a * 0.75, anat.thorax_b * 1.1
        )
        half = (x < anat.med_shift) if side == RIGHT else (x >= anat.med_shift)
        below = half & (z <= peak * (1 - r2)) & (thorax < 1)
        hu[below & inner] = 58.0 if side == RIGHT else 42.0
        if side == LEFT and anat.stomach_gas:
            gas = _ellipse(x, y, anat.thorax_a * 0.45, -anat.thorax_b * 0.15, 35, 28) < 1
            hu[below & gas & (z < peak - 15) & (y < -anat.thorax_b * 0.15)] = AIR_HU
        below_any |= below
    return below_any


def _draw_aorta(
    anat: _Anatomy, x: np.ndarray, y: np.ndarray, z: float, lung_region: np.ndarray, hu: np.ndarray
) -> None:
    """Descending aorta left of the spine, ascending in front, the arch between them above the carina."""
    arch = anat.carina + 20
    if z < arch:
        hu[_ellipse(x, y, 24, anat.spine_y - 8, 13, 13) < 1] = anat.blood_hu
        if anat.heart_top - 20 < z:
            hu[_ellipse(x, y, -8, -anat.thorax_b * 0.15, 15, 15) < 1] = anat.blood_hu
    elif z < arch + 25:
        front, back = -anat.thorax_b * 0.15, anat.spine_y - 8
        arch_band = (np.abs(y - (back + front) / 2) < (back - front) / 2 + 4) & (np.abs(x - 8) < 14)
        hu[arch_band & ~lung_region] = anat.blood_hu


def _fill_lungs(
    anat: _Anatomy,
    x: np.ndarray,
    y: np.ndarray,
    z: float,
    spacing: float,
    thorax: np.ndarray,
    lung_region: np.ndarray,
    hu: np.ndarray,
) -> np.ndarray:
    """Parenchyma (denser towards the back), vessels and tumour; labels by side of the mediastinum."""
    labels = np.zeros(x.shape, dtype=np.uint8)
    right = lung_region & (x < anat.med_shift)
    left = lung_region & (x >= anat.med_shift)
    dependent = np.clip((y + anat.thorax_b) / (2 * anat.thorax_b), 0, 1) ** 2
    parenchyma = anat.lung_hu + anat.dependent_hu * dependent
    hu[lung_region] = parenchyma[lung_region]
    labels[right] = RIGHT
    labels[left] = LEFT
    vessels = np.zeros(x.shape, dtype=bool)
    _draw_tubes(anat.vessels, z, x, y, spacing, vessels)
    hu[vessels & lung_region] = anat.blood_hu
    if anat.tumour is not None:
        # Solid tumour: lung where it lies in the lung region; may bulge into the chest wall.
        tx, ty, tz, tr = anat.tumour
        in_sphere = ((x - tx) ** 2 + (y - ty) ** 2 + (z - tz) ** 2) < tr**2
        hu[in_sphere & (thorax < 1.02) & ~_spine_block(anat, x, y)] = 35.0
        labels[in_sphere & right] = RIGHT
        labels[in_sphere & left] = LEFT
    return labels


def _draw_airways(
    anat: _Anatomy,
    x: np.ndarray,
    y: np.ndarray,
    z: float,
    spacing: float,
    body: np.ndarray,
    lung_region: np.ndarray,
    hu: np.ndarray,
    labels: np.ndarray,
) -> None:
    """Trachea and main bronchi with a 1.5 mm wall; outside the lung region they are not lung."""
    airway = np.zeros(x.shape, dtype=bool)
    _draw_tubes(anat.airways, z, x, y, spacing, airway)
    wall = np.zeros(x.shape, dtype=bool)
    _draw_tubes(tuple(Tube(t.p0, t.p1, t.radius + 1.5) for t in anat.airways), z, x, y, spacing, wall)
    hu[wall & ~airway & body] = 30.0
    hu[airway & body] = AIR_HU + 20.0
    labels[(wall | airway) & ~lung_region] = 0


def make_phantom(
    seed: int,
    *,
    spacing_mm: float | None = None,
    slice_mm: float | None = None,
    matrix: int = 512,
    frames: int | None = None,
    flips: tuple[bool, bool, bool] | None = None,
) -> Phantom:
    """A phantom CT (HU) with exact labels; everything not given is drawn from `seed`.

    `frames` fixes the number of slices (and the coverage follows from it); `flips` = (columns towards
    patient right, rows towards anterior, frames head to feet).
    """
    rng = np.random.default_rng(seed)
    anat = _anatomy(rng)
    spacing = (
        spacing_mm if spacing_mm is not None else max(rng.uniform(0.6, 0.9), (2 * anat.body_a + 15) / matrix)
    )
    thickness = (
        slice_mm if slice_mm is not None else float(rng.choice([1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0, 5.0]))
    )
    if frames is None:
        z_lo = -rng.uniform(0, 60)
        z_hi = anat.apex + rng.uniform(0, 40)
        if rng.random() < 0.3:  # partial coverage: start higher or stop lower
            if rng.random() < 0.5:
                z_lo = rng.uniform(20, 90)
            else:
                z_hi = anat.apex - rng.uniform(20, 80)
        frames = max(8, int((z_hi - z_lo) / thickness))
    else:
        z_lo = anat.apex / 2 - frames * thickness / 2
    flip = flips if flips is not None else tuple(bool(v) for v in rng.random(3) < 0.25)
    blur = rng.uniform(0.5, 1.0)
    noise = rng.uniform(5, 35)

    centre = (matrix - 1) / 2
    coords = (np.arange(matrix, dtype=np.float32) - centre) * spacing
    y_shift = rng.uniform(-15, 15)
    x, y = np.meshgrid(coords + rng.uniform(-10, 10), coords + y_shift)  # (rows, cols)
    hu = np.empty((frames, matrix, matrix), dtype=np.float32)
    labels = np.empty((frames, matrix, matrix), dtype=np.uint8)
    # Thick slices average the plane at their centre with planes a third of a slice above and below
    # (partial volume along z); the label is the centre plane's.
    offsets = (0.0, -thickness / 3, thickness / 3) if thickness > 2 else (0.0,)
    for k in range(frames):
        z = z_lo + k * thickness
        planes = [_slice(anat, x, y, z + dz, spacing) for dz in offsets]
        plane = np.mean([p[0] for p in planes], axis=0) if len(planes) > 1 else planes[0][0]
        hu[k] = ndi.gaussian_filter(plane, blur)
        labels[k] = planes[0][1]
    hu += rng.standard_normal(size=hu.shape, dtype=np.float32) * np.float32(noise)
    np.clip(hu, -1024, 3071, out=hu)

    # Affine of the canonical layout: columns towards +x (left), rows +y (posterior), frames +z (head).
    affine = np.diag([spacing, spacing, thickness, 1.0])
    affine[:3, 3] = (float(x[0, 0]), float(y[0, 0]), z_lo)
    # Storage flips: reverse an array axis and move the origin to its other end.
    for axis_xyz, flipped in enumerate(flip):
        if flipped:
            array_axis = 2 - axis_xyz
            size = hu.shape[array_axis]
            hu = np.flip(hu, axis=array_axis)
            labels = np.flip(labels, axis=array_axis)
            affine[:3, 3] = affine[:3, 3] + affine[:3, axis_xyz] * (size - 1)
            affine[:3, axis_xyz] = -affine[:3, axis_xyz]
    volume = volume_from_array(
        np.ascontiguousarray(hu).transpose(2, 1, 0), affine, description=f"phantom-{seed}"
    )
    return Phantom(volume=volume, labels=np.ascontiguousarray(labels))
