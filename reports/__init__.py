"""Paper-shaped tables regenerated from run directories: `python -m reports.build NAME`."""
