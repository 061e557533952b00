"""The packaged configs (`tpas.configs`): models/, ensemble/ and train/ presets, found by `tpas.io.resolve_config`."""
