"""Small applications used by the end-to-end tests, importable as `apps.<name>` by the CLI."""
