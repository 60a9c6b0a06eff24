"""dcud.toml model, WM-E parameter catalogue and parameter-file parser, loader."""
