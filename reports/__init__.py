"""Paper-shaped tables regenerated from run directories (issues 3 and 4: not built yet)."""
