"""The CLI layer: one module per DVC stage, each a Typer command that loads its params group,
calls the library and writes the declared outputs."""
