"""Whole-slide images: readers, pixel sizes, raw JPEG tiles, tissue detection and the tile index.

- ``readers.open_slide(path, reader="auto", mpp=None) -> SlideReader`` (cuCIM, OpenSlide or tifffile)
- ``raw_tiles.RawTileSource``: standalone JPEG tiles of JPEG-tiled TIFF pyramids, for GPU decoding
- ``tissue.tissue_mask``: tissue on a thumbnail (config ``tissue:``)
- ``manifest.read_manifest``, ``index.build_index`` / ``index.TileIndex``: ``foundation index`` (config ``index:``)

Nothing is imported here, so ``import foundation.slides.<module>`` loads only what it needs.
"""
