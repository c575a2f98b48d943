"""The shared bottom layer: recipe-file loading (`config_file`), crash-safe writes (`fsutil`) and the
device resolver (`device`). Every package may import it; it imports no first-party package (the
import-linter contracts in pyproject.toml check that)."""
