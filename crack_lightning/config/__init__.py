"""Typed run configuration: the dataclass schema, its jsonargparse parsers, and YAML files."""
