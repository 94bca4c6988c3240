"""The DALI graph: region (decoded pixels or raw JPEG pieces) -> crops -> stain/photometric jitter -> normalise.

One graph for both devices: ``device="cpu"`` runs DALI CPU operators (``device_id=None``; tests and CI),
``device="gpu"`` decodes with nvJPEG (``decoders.image_slice(device="mixed")``) and runs every image op on the GPU.
Per crop (choices drawn on the host, see :mod:`foundation.data.crops`):

1. ``resize`` of the crop window to the crop size (antialiased bilinear), both flips folded into the window;
2. ``rotate`` by a multiple of 90 degrees, nearest neighbour (exact; 5x cheaper than bilinear on the CPU);
3. stain jitter ``255 exp(-(OD M + T))`` with the log as a 256-entry lookup table (:mod:`stain.dali_ops`);
4. the generic photometric ops, only when some probability in ``augmentation.generic`` is non-zero;
5. ``crop_mirror_normalize`` to float CHW with the ``crops`` mean/std.

Mixed batches (some slides on the raw-tile path, some on the region path) use a DALI conditional per sample.
"""

from __future__ import annotations

from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline

from foundation.data.crops import CropConfig
from foundation.data.source import BatchSource, SourceLayout
from stain.dali_ops import PHOTOMETRIC_INPUTS, photometric_augment, stain_augment
from stain.deconvolution import MAX_LEVEL

DEVICES = ("cpu", "gpu")
START_METHODS = ("auto", "fork", "spawn")


def _assemble_raw(inputs: dict[str, DataNode], slots: int, decode_device: str) -> DataNode:
    """Decode the needed part of each piece's tile and concatenate the pieces into the region."""
    rows = []
    for r in range(slots):
        parts = []
        for c in range(slots):
            p = r * slots + c
            parts.append(fn.decoders.image_slice(inputs[f"jpeg{p}"], inputs[f"anchor{p}"], inputs[f"shape{p}"],
                                                 device=decode_device, normalized_anchor=False,
                                                 normalized_shape=False, output_type=types.RGB))
        rows.append(parts[0] if slots == 1 else fn.cat(*parts, axis=1))
    return rows[0] if slots == 1 else fn.cat(*rows, axis=0)


def _region(inputs: dict[str, DataNode], layout: SourceLayout, device: str) -> DataNode:
    decode_device = "mixed" if device == "gpu" else "cpu"
    graph = layout.plan.graph
    if graph == "region":
        region = inputs["region"]
        return region.gpu() if device == "gpu" else region
    if graph == "raw":
        return _assemble_raw(inputs, layout.plan.slots, decode_device)
    # mixed: a per-sample conditional (DALI splits the batch, runs each branch on its part and merges)
    if inputs["is_raw"]:
        region = _assemble_raw(inputs, layout.plan.slots, decode_device)
    else:
        region = inputs["region"]
        if device == "gpu":
            region = region.gpu()
    return region


def _crop(region: DataNode, inputs: dict[str, DataNode], c: int, size: int, layout: SourceLayout,
          crops: CropConfig, solarize_threshold: float, device: str) -> DataNode:
    x = fn.resize(region, roi_start=inputs[f"roi_start{c}"], roi_end=inputs[f"roi_end{c}"], size=[size, size],
                  interp_type=types.INTERP_LINEAR, antialias=True)
    if crops.rot90:
        x = fn.rotate(x, angle=inputs[f"angle{c}"], interp_type=types.INTERP_NN, keep_size=True)
    x = stain_augment(x, inputs[f"stain_m{c}"], inputs[f"stain_t{c}"], device=device)
    if layout.photometric:
        x = photometric_augment(x, {k: inputs[f"{k}{c}"] for k in PHOTOMETRIC_INPUTS}, solarize_threshold,
                                device=device)
    return fn.crop_mirror_normalize(x, dtype=types.FLOAT, output_layout="CHW",
                                    mean=[MAX_LEVEL * m for m in crops.mean], std=[MAX_LEVEL * s for s in crops.std])


def output_names(layout: SourceLayout) -> list[str]:
    names = [f"crop{c}" for c in range(layout.num_crops)] + ["stain_id", "marker_id", "retries"]
    if layout.masks:
        names.append("masks")
    if layout.sample_ids:
        names.append("sample_id")
    return names


def build_pipeline(source: BatchSource, crops: CropConfig, solarize_threshold: float, device: str,
                   batch_size: int, threads: int, prefetch: int, exec_dynamic: bool, reader_workers: int,
                   reader_start: str = "auto", device_id: int | None = None) -> Pipeline:
    """A built DALI pipeline whose outputs are :func:`output_names` (crops as float CHW, then per-sample data).

    ``reader_start`` (``data.pipeline.reader_start``): how reader processes start; ``auto`` forks on the CPU and
    spawns on the GPU, where the trainer has initialised CUDA and DALI refuses to fork.
    """
    if device not in DEVICES:
        raise ValueError(f"data.pipeline.device={device!r}; choose one of {DEVICES}")
    if reader_start not in START_METHODS:
        raise ValueError(f"data.pipeline.reader_start={reader_start!r}; choose one of {START_METHODS}")
    if reader_start == "auto":
        reader_start = "spawn" if device == "gpu" else "fork"
    if device == "gpu" and device_id is None:
        raise ValueError("device=gpu needs the CUDA device id of this rank")
    layout = source.layout
    sizes = crops.crop_sizes()
    parallel = reader_workers > 0

    @pipeline_def(enable_conditionals=layout.plan.graph == "mixed")
    def graph():
        nodes = fn.external_source(
            source=source, num_outputs=len(layout.names), batch=True, batch_info=True, parallel=parallel,
            layout=["HWC" if n == "region" else "" for n in layout.names],
            # each batch is one task of one reader process: fewer batches in flight than processes idle the rest
            **({"prefetch_queue_depth": max(prefetch, reader_workers)} if parallel else {}),
        )
        inputs = {name: nodes[i] for i, name in enumerate(layout.names)}  # autograph's zip has no strict=
        region = _region(inputs, layout, device)
        outputs = [_crop(region, inputs, c, sizes[c], layout, crops, solarize_threshold, device)
                   for c in range(layout.num_crops)]
        extra = [inputs["stain_id"], inputs["marker_id"], inputs["retries"]]
        if layout.masks:
            extra.append(inputs["masks"])
        if layout.sample_ids:
            extra.append(inputs["sample_id"])
        if device == "gpu":
            extra = [e.gpu() for e in extra]
        return (*outputs, *extra)

    kwargs = {"py_num_workers": reader_workers, "py_start_method": reader_start} if parallel else {}
    pipe = graph(batch_size=batch_size, num_threads=threads, device_id=device_id, prefetch_queue_depth=prefetch,
                 exec_dynamic=exec_dynamic, **kwargs)
    if parallel:
        pipe.start_py_workers()
    pipe.build()
    return pipe

