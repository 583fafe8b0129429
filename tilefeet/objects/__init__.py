"""Objects, not just pixels: exact instance labels, cells between membranes, and a measurements table.

    from tilefeet.objects import label_objects, write_objects

    objs = label_objects("seg.ome.zarr")            # lazy: objs.labels is a dask array, objs.table a DataFrame
    write_objects("seg.ome.zarr", min_size="0.01um2")  # out of core: labels/<class>-objects + objects.parquet

Objects of a class are the 8-connected components of its mask (the pixels of ``labels/<class>``,
or the probabilities at and above another threshold), optionally with holes filled and objects
below a minimum area dropped. Ids equal ``skimage.measure.label(mask, connectivity=2)`` of the
whole mask bit for bit (raster order of each object's first pixel), whatever the block size, the
chunking or the workers: blocks label themselves, faces give equivalences, a union-find resolves
them, and a second pass relabels (:mod:`.label`). The table has one row per object, the same
numbers as ``skimage.measure.regionprops_table`` on the whole image, combined from per-block
partial sums (:mod:`.measure`). Cells (:mod:`.cells`) are seeded where the membrane probability is
low, flooded by a watershed of bounded reach on it, and merged across weak boundaries. The minimum
size, hole filling and cell thresholds default to the engine's recipe for the class
(``engine.toml [objects.<class>]``; :func:`.options.resolve_recipe`).

A stack (a segment output with axes c, z, y, x) gives 3-D objects: 26-connected by default (6 or
18 with ``connectivity``), ids equal to ``skimage.measure.label`` and ``cc3d`` of the whole volume
for any (z, y, x) block shape; a table in nm with the anisotropic spacing (volume, surface area
from exposed voxel faces, centroid, box, z extent); ``min_size`` in µm³ and ``min_z_extent``;
holes filled per section (:mod:`.volume`, :mod:`.stack`).

==============  ==========================================================================
module          holds
==============  ==========================================================================
``label``       block labelling, faces, the union-find, raster-order numbering (pure)
``volume``      the same for stacks: 3-D blocks, pairs of pieces per block, 3-D sums and table (pure)
``measure``     per-block partial sums, their exact combination, the table (pure)
``cells``       seeds flooded by a bounded watershed, boundary sums, merging (pure)
``blocks``      what one block computes in each pass, and the reductions between passes
``options``     options (``ObjectSettings``), engines' recipes, and the plan on one section
``store``       all OME-Zarr reading and writing of this package (staging, publishing)
``run``         the out-of-core dask graph with completion records (``write_objects``)
``stack``       a stack's out-of-core graph and lazy passes
``lazy``        the lazy call (``label_objects``)
``match``       object-level scores against ground truth (``evaluate --objects``)
``colors``      a stable colour per id, and object outlines, for previews
==============  ==========================================================================
"""

from __future__ import annotations

from .lazy import Objects, label_objects
from .options import ObjectSettings
from .run import ObjectsResult, write_objects

__all__ = ["ObjectSettings", "Objects", "ObjectsResult", "label_objects", "write_objects"]
