"""kvplug's offline long-context evaluations (generated locally, no downloads)."""
